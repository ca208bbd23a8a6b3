"""Receive throughput: radiographs sent with dcmtk's storescu to BoneBridge and to dcmtk's storescp, same run.

The reference is dcmtk's own ``storescp`` writing to a folder (what mercure receives with), measured in the same
run on the same machine, interleaved with BoneBridge. BoneBridge does more per instance than storescp: it fsyncs
each file and its folder before answering (storescp leaves its files in the page cache), and records the instance
in its study assembler. Three cases (issue 9):

- ``receive-dx-8mb``: 100 DX of 8 MB over one association;
- ``receive-cr-2mb``: 500 CR of 2 MB over one association;
- ``receive-dx-4-assoc``: 4 storescu processes at once, 25 DX of 8 MB each, one study each.

The summary line gives throughput in MB/s (ratio = BoneBridge / storescp, higher is better) and, after it, the
time ratio the issue's goal is written in (BoneBridge's time / storescp's time, at most 1.0 wanted), the resident
memory of serve and its children, and the CPU (user + system) each side spent per instance: on a small machine
that the sender shares, CPU per instance is what the receive rate follows.
Run: ``.venv/bin/python bench/bench_receive.py [--cases receive-dx-8mb] [--rounds 3] [--scale 0.5] [--json]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import print_environment, summarise  # noqa: E402
from tests.bonebridge_process import BoneBridgeProcess, write_config  # noqa: E402
from tests.dicom_factory import make_dx  # noqa: E402
from tests.orthanc_fixture import free_port, wait_for  # noqa: E402

_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}


@dataclass(frozen=True)
class Case:
    name: str
    files: int
    size: int  # image side in pixels, uint16: 2048 -> 8 MB, 1024 -> 2 MB
    modality: str
    associations: int


CASES = (
    Case("receive-dx-8mb", 100, 2048, "DX", 1),
    Case("receive-cr-2mb", 500, 1024, "CR", 1),
    Case("receive-dx-4-assoc", 100, 2048, "DX", 4),
)


def make_files(folder: Path, count: int, size: int, modality: str = "DX", studies: int = 1) -> list[list[Path]]:
    """``count`` files of size x size uint16 split over ``studies`` studies (one list of files per study)."""
    import pydicom
    from pydicom.uid import generate_uid

    template = folder / "template.dcm"
    make_dx(template, size=size, body_part="CHEST", age="050Y", modality=modality)
    per_study: list[list[Path]] = [[] for _ in range(studies)]
    ds = pydicom.dcmread(template)
    if modality == "CR":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    study_uids = [generate_uid() for _ in range(studies)]
    for i in range(count):
        ds.StudyInstanceUID = study_uids[i % studies]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = folder / f"img{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        per_study[i % studies].append(path)
    template.unlink()
    return per_study


def send(port: int, aec: str, batches: list[list[Path]]) -> float:
    """Seconds for storescu processes (one per batch, all at once) to send every batch."""
    began = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV) for files in batches]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - began
    if any(p.returncode for p in procs):
        raise RuntimeError(f"storescu failed: {b''.join(errors)[-2000:]!r}")
    return elapsed


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_pids(pgid: int) -> list[int]:
    """The processes of process group *pgid* (serve, its Redis and its worker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return pids


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds so far of every process in process group *pgid*."""
    return sum(process_cpu_s(pid) for pid in group_pids(pgid))


CPU_PER_FILE: dict[str, list[float]] = {"storescp": [], "bonebridge": []}  # ms of CPU per instance, per run


def bench_storescp(work: Path, batches: list[list[Path]]) -> float:
    port = free_port()
    out_dir = work / "storescp"
    out_dir.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "--output-directory", str(out_dir), str(port)], env=_ENV)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)],
                                        capture_output=True).returncode == 0, 20, what="storescp")
        before = process_cpu_s(proc.pid)
        elapsed = send(port, "STORESCP", batches)
        CPU_PER_FILE["storescp"].append((process_cpu_s(proc.pid) - before) * 1000 / sum(map(len, batches)))
        return elapsed
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out_dir, ignore_errors=True)


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in process group *pgid*, in MB."""
    total_kb = 0
    for pid in group_pids(pgid):
        try:
            total_kb += next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                             if line.startswith("VmRSS:"))
        except (OSError, ValueError, StopIteration):
            continue
    return total_kb / 1024


MEMORY: list[tuple[float, float]] = []  # (before, after) resident MB of serve and its children, per BoneBridge run


def bench_bonebridge(work: Path, batches: list[list[Path]]) -> float:
    config = write_config(work, pacs_port=free_port(), quiet_period_s=3600)
    with BoneBridgeProcess(config) as proc:
        assert proc.proc is not None
        before, cpu_before = group_rss_mb(proc.proc.pid), group_cpu_s(proc.proc.pid)
        elapsed = send(proc.port, "BONEBRIDGE", batches)
        CPU_PER_FILE["bonebridge"].append((group_cpu_s(proc.proc.pid) - cpu_before) * 1000 / sum(map(len, batches)))
        MEMORY.append((before, group_rss_mb(proc.proc.pid)))
        received = list((proc.data_dir / "incoming").rglob("*.dcm"))
        expected = sum(len(files) for files in batches)
        assert len(received) == expected, f"{len(received)} of {expected} on disk"
    shutil.rmtree(work / "var", ignore_errors=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each case's file count to send")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print_environment()
    for case in (c for c in CASES if c.name in args.cases):
        count = max(case.associations, int(case.files * args.scale))
        with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
            work = Path(tmp)
            batches = make_files(work, count, case.size, case.modality, studies=case.associations)
            megabytes = sum(p.stat().st_size for files in batches for p in files) / 1e6
            ours, ref = [], []
            MEMORY.clear()
            for runs in CPU_PER_FILE.values():
                runs.clear()
            for _ in range(args.rounds):  # interleaved, so drift in machine load hits both alike
                ref.append(bench_storescp(work, batches))
                ours.append(bench_bonebridge(work, batches))
            summarise(case.name, "dcmtk-storescp", "MB/s", [megabytes / t for t in ref], [megabytes / t for t in ours],
                      higher_is_better=True, as_json=args.json,
                      note=f"{count} files, {megabytes:.0f} MB, {case.associations} association(s); time ratio "
                           f"BoneBridge/storescp {statistics.median(ours) / statistics.median(ref):.2f} "
                           f"(goal <= 1.0); resident memory of serve and its children "
                           f"{statistics.median(b for b, _ in MEMORY):.0f} MB before, "
                           f"{statistics.median(a for _, a in MEMORY):.0f} MB after; CPU per instance "
                           f"{statistics.median(CPU_PER_FILE['bonebridge']):.1f} ms (serve and its children) against "
                           f"storescp's {statistics.median(CPU_PER_FILE['storescp']):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
