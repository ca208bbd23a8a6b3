"""Receive throughput: 100 radiographs of 8 MB sent with dcmtk's storescu to BoneBridge and to dcmtk's storescp.

The reference is measured in the same run on the same machine: dcmtk's own ``storescp`` writing to a folder
(what mercure receives with). The figure that matters is the ratio, since these machines are shared and noisy.
BoneBridge does more per instance than storescp: it fsyncs each file and its folder before answering, and
records the instance in the study's state file. Run: ``.venv/bin/python bench/bench_receive.py [--files 100]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.bonebridge_process import BoneBridgeProcess, write_config  # noqa: E402
from tests.dicom_factory import make_dx  # noqa: E402
from tests.orthanc_fixture import free_port, wait_for  # noqa: E402


def make_files(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` DX files of size x size uint16 (2048 px = 8 MB), one study, distinct SOP instances."""
    import pydicom
    from pydicom.uid import generate_uid

    template = make_dx(folder / "template.dcm", size=size, body_part="CHEST", age="050Y")
    files = []
    for i in range(count):
        ds = pydicom.dcmread(folder / "template.dcm")
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = folder / f"img{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    (folder / "template.dcm").unlink()
    del template
    return files


def send(port: int, aec: str, files: list[Path]) -> float:
    began = time.perf_counter()
    out = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                         capture_output=True, text=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
    elapsed = time.perf_counter() - began
    if out.returncode != 0:
        raise RuntimeError(f"storescu failed: {out.stderr[-2000:]}")
    return elapsed


def bench_storescp(work: Path, files: list[Path]) -> float:
    port = free_port()
    out_dir = work / "storescp"
    out_dir.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "--output-directory", str(out_dir), str(port)],
                            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)],
                                        capture_output=True).returncode == 0, 20, what="storescp")
        return send(port, "STORESCP", files)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out_dir, ignore_errors=True)


def bench_bonebridge(work: Path, files: list[Path]) -> float:
    config = write_config(work, pacs_port=free_port(), quiet_period_s=3600)
    with BoneBridgeProcess(config) as proc:
        elapsed = send(proc.port, "BONEBRIDGE", files)
        received = list((proc.data_dir / "incoming").rglob("*.dcm"))
        assert len(received) == len(files), f"{len(received)} of {len(files)} on disk"
    shutil.rmtree(work / "var", ignore_errors=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (2048 -> 8 MB)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        work = Path(tmp)
        files = make_files(work, args.files, args.size)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        ours, ref = [], []
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits both alike
            ref.append(bench_storescp(work, files))
            ours.append(bench_bonebridge(work, files))
        o, r = statistics.median(ours), statistics.median(ref)
        print(f"{args.files} files, {megabytes:.0f} MB in all, median of {args.rounds} rounds")
        print(f"dcmtk storescp (reference): {r:6.2f} s  {megabytes / r:7.1f} MB/s")
        print(f"BoneBridge listener       : {o:6.2f} s  {megabytes / o:7.1f} MB/s  (fsync per instance)")
        print(f"ratio BoneBridge / storescp time: {o / r:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
