"""Latency: from the last C-STORE response to the SR stored in a real Orthanc, split by stage, same run reference.

One-image studies are sent with dcmtk's ``storescu`` to ``bonebridge serve`` (shipped config: anatomy model on,
shipped routes and models) whose destination is a real Orthanc. For each study the script takes the moment
``storescu`` returned (its last C-STORE response, plus the association release) and polls Orthanc until the
study's SR is there. The stages come from what serve writes anyway: the study's state file (``last_instance_at``,
``queued_at``) and the outcome record's ``timing`` (``started_at``, ``analysed_at``, ``finished_at``,
``dispatched_at``):

- quiet: last instance to queued (the configured quiet period plus the poller's tick);
- hand-off: queued to the worker starting the task (Redis, Celery);
- worker: reading the instances and the analysis (anatomy, model, heatmap);
- results: writing the SR and SC and the outcome "ready to send" (``finished_at``: analysis ends there);
- dispatch: the dispatch stage's Celery task picking the result up and sending SR and SC to the destination, until
  the record says delivered (``dispatched_at``);
- seen: from the record's ``dispatched_at`` until this script's poll of Orthanc finds the SR (at most its 20 ms poll
  interval; slightly negative when the poll finds the SR before the record is updated).

The reference, in the same run: the quiet period plus ``storescu`` sending the very SR and SC BoneBridge produced
(from its outbox) straight to that Orthanc, which is what a study costs with zero processing overhead. Ratio =
reference / BoneBridge (higher is better); the goal (issue 9) is quiet period + at most 1.0 s at the median for the
full-resolution study. Then ``--burst`` one-image studies sent back to back: time to the last SR, studies a minute.

Run: ``.venv/bin/python bench/bench_latency.py [--rounds 5] [--burst 100] [--quiet 3] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import print_environment, summarise  # noqa: E402
from tests.bonebridge_process import BoneBridgeProcess, write_config  # noqa: E402
from tests.dicom_factory import make_dx  # noqa: E402
from tests.orthanc_fixture import OrthancServer  # noqa: E402

_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
POLL_S = 0.02


def real_radiograph() -> np.ndarray:
    """pydicom-data's RG3 (a 1760 x 1760 CR of a lower leg, MIT licence) as 12-bit pixels."""
    import data_store
    import pydicom

    ds = pydicom.dcmread(Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm")
    pixels = ds.pixel_array.astype(np.float32)
    pixels = (pixels - pixels.min()) / max(1.0, float(pixels.max() - pixels.min()))
    return (pixels * 4095).astype(np.uint16)


def resized(pixels: np.ndarray, long_side: int) -> np.ndarray:
    from PIL import Image

    h, w = pixels.shape
    scale = long_side / max(h, w)
    image = Image.fromarray(pixels.astype(np.int32)).resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    return np.asarray(image).astype(np.uint16)


def one_study(folder: Path, pixels: np.ndarray, name: str) -> tuple[Path, str]:
    """A one-image leg study with fresh UIDs; (file, StudyInstanceUID)."""
    path = folder / f"{name}.dcm"
    ds = make_dx(path, pixels=pixels, body_part="LEG", age="045Y", study_description="XR TIBIA FIBULA")
    return path, str(ds.StudyInstanceUID)


def storescu(port: int, aec: str, files: list[Path]) -> float:
    """Send *files* in one association; returns the epoch time storescu returned (after the last response)."""
    out = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                         capture_output=True, text=True, env=_ENV)
    if out.returncode != 0:
        raise RuntimeError(f"storescu failed: {out.stderr[-2000:]}")
    return time.time()


def sr_arrived(pacs: OrthancServer, study_uid: str) -> bool:
    found = pacs.post("/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}})
    return bool(found)


def wait_for_sr(pacs: OrthancServer, study_uid: str, timeout: float = 120.0) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sr_arrived(pacs, study_uid):
            return time.time()
        time.sleep(POLL_S)
    raise TimeoutError(f"no SR for {study_uid} after {timeout} s")


def stages(proc: BoneBridgeProcess, study_uid: str, sent_at: float, seen_at: float) -> dict[str, float]:
    def delivered() -> bool:
        records = proc.results(study_uid)
        return bool(records) and "dispatched_at" in records[-1].get("timing", {})

    deadline = time.time() + 30
    while not delivered() and time.time() < deadline:  # written just after the sending
        time.sleep(POLL_S)
    timing = proc.results(study_uid)[-1]["timing"]
    state = json.loads((proc.data_dir / "studies" / f"{study_uid}.json").read_text())
    return {
        "total": seen_at - sent_at,
        "quiet": state["queued_at"] - state["last_instance_at"],
        "hand-off": timing["started_at"] - state["queued_at"],
        "worker": timing["analysed_at"] - timing["started_at"],
        "results": timing["finished_at"] - timing["analysed_at"],
        "dispatch": timing["dispatched_at"] - timing["finished_at"],
        "seen": seen_at - timing["dispatched_at"],
    }


def reference_send(proc: BoneBridgeProcess, pacs: OrthancServer, study_uid: str) -> float:
    """Seconds for storescu to send the SR and SC BoneBridge made for the study straight to the PACS."""
    outputs = sorted((proc.data_dir / "outbox" / study_uid).rglob("*.dcm"))
    began = time.time()
    storescu(pacs.dicom_port, "ORTHANC", outputs)
    return time.time() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--burst", type=int, default=100, help="one-image studies sent back to back (0: skip)")
    parser.add_argument("--quiet", type=float, default=3.0, help="assembly.quiet_period_s (the shipped default is 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print_environment()
    full = real_radiograph()
    cases = {"latency-fullres-1760": full, "latency-512": resized(full, 512)}
    with tempfile.TemporaryDirectory(prefix="bb-latency-") as tmp:
        work = Path(tmp)
        pacs = OrthancServer(work / "pacs").start()
        try:
            config = write_config(work, pacs_port=pacs.dicom_port, quiet_period_s=args.quiet, anatomy_model=True)
            with BoneBridgeProcess(config) as proc:
                warm, warm_uid = one_study(work, cases["latency-512"], "warm-up")
                storescu(proc.port, "BONEBRIDGE", [warm])
                wait_for_sr(pacs, warm_uid)  # the worker's first study loads its models
                for name, pixels in cases.items():
                    ours, ref = [], []
                    for i in range(args.rounds):
                        path, uid = one_study(work, pixels, f"{name}-{i}")
                        sent_at = storescu(proc.port, "BONEBRIDGE", [path])
                        split = stages(proc, uid, sent_at, wait_for_sr(pacs, uid))
                        ours.append(split["total"])
                        ref.append(args.quiet + reference_send(proc, pacs, uid))
                        print(f"  {name} study {i}: " + "  ".join(f"{k} {v:.2f} s" for k, v in split.items()),
                              flush=True)
                    overhead = statistics.median(ours) - args.quiet
                    summarise(name, "quiet-period+storescu-of-the-outputs", "s", ref, ours, higher_is_better=False,
                              as_json=args.json, note=f"median overhead over the quiet period {overhead:.2f} s "
                                                      f"(goal for full resolution: <= 1.0 s)")
                if args.burst:
                    files = [one_study(work, cases["latency-512"], f"burst-{i}") for i in range(args.burst)]
                    began = time.time()
                    for path, _ in files:
                        storescu(proc.port, "BONEBRIDGE", [path])
                    last = max(wait_for_sr(pacs, uid, timeout=60 + 30 * args.burst) for _, uid in files)
                    minutes = (last - began) / 60
                    print(f"burst-512  {args.burst} one-image studies back to back: last SR after "
                          f"{last - began:.1f} s, {args.burst / minutes:.0f} studies a minute")
        finally:
            pacs.stop()
            shutil.rmtree(work / "var", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
