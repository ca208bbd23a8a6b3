"""Dispatch as its own stage (issue 27): analysis throughput with the PACS down against the PACS up, and the time a
DICOMweb destination takes to receive a study's results after its analysis.

1. **PACS down vs up.** One ``bonebridge serve`` with one analysis worker (``--workers 1``; its dispatch worker
   beside it, as shipped) whose destination is dcmtk's ``storescp`` on a fixed port. Rounds alternate: PACS up
   (``storescp`` running), PACS down (stopped), up, down... In each round ``--studies`` one-image wrist studies go to
   the fracture model (real CPU work: decode, model, heatmap, SR and SC), sent in one ``storescu`` association so
   that they are complete at the same moment and queue for the worker. A round's throughput is its studies divided by the worker's busy span, from the first study's analysis start to
   the last one's end (``timing.started_at`` / ``finished_at`` of the outcome records: the end of analysis, results
   on disk and ready to send, whether or not they were delivered). After a PACS-down round ``storescp`` is started
   again and the backlog drains before the next round, so each round starts from an empty dispatch queue. The
   reference is the PACS-up figure; ratio = down / up (goal: within 20 %, ratio >= 0.8).
2. **DICOMweb delivery.** A ``serve`` whose destination is ``type: dicomweb`` (STOW-RS with basic auth) to a local
   Orthanc with Debian's DICOMweb plugin. One-image wrist studies are sent one at a time; for each, the time from
   the end of its analysis (``timing.finished_at``) to the end of its delivery (``timing.dispatched_at``, written
   when the destination has answered). The first delivery of a dispatch worker is reported on its own (it pays for
   importing the HTTP client); the figure is the median of the others (goal < 0.2 s). Reference, same run: this
   script POSTing the very same SR and SC files to the same endpoint with ``dicomweb-client`` (a warm process and
   a kept-open session): what the HTTP transfer and Orthanc's storing cost. Ratio = reference / BoneBridge.

Run: ``.venv/bin/python bench/bench_dispatch.py [--rounds 3] [--studies 10] [--deliveries 8] [--size 1024] [--json]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import print_environment, summarise  # noqa: E402
from tests.bonebridge_process import BoneBridgeProcess, write_config  # noqa: E402
from tests.dicom_factory import make_dx  # noqa: E402
from tests.orthanc_fixture import OrthancServer, StoreSCP, free_port, storescu, wait_for  # noqa: E402

PASSWORD = "bench-dispatch-password"


def _wrist(folder: Path, name: str, size: int) -> tuple[Path, str]:
    path = folder / f"{name}.dcm"
    ds = make_dx(path, body_part="WRIST", age="040Y", size=size, seed=abs(hash(name)) % 10_000)
    return path, str(ds.StudyInstanceUID)


def _send(proc: BoneBridgeProcess, *paths: Path) -> None:
    out = storescu(proc.port, "BONEBRIDGE", list(paths))
    if out.returncode != 0:
        raise RuntimeError(f"storescu failed: {out.stderr[-2000:]}")


def _analysed(proc: BoneBridgeProcess, uid: str) -> dict | None:
    records = proc.results(uid, settled=False)
    return records[0] if records and records[0].get("timing", {}).get("finished_at") else None


def _round(proc: BoneBridgeProcess, work: Path, label: str, count: int, size: int) -> tuple[float, list[str]]:
    """Send ``count`` studies in one association, so they are complete together and queue for the one analysis
    worker; studies per second over its busy span."""
    studies = [_wrist(work, f"{label}-{i}", size) for i in range(count)]
    _send(proc, *[path for path, _ in studies])
    records = [wait_for(lambda uid=uid: _analysed(proc, uid), 120 + 30 * count, interval=0.1, what=f"{uid} analysed")
               for _, uid in studies]
    span = max(r["timing"]["finished_at"] for r in records) - min(r["timing"]["started_at"] for r in records)
    return count / span, [uid for _, uid in studies]


def pacs_down_against_up(work: Path, rounds: int, count: int, size: int, as_json: bool) -> None:
    scp = StoreSCP(work / "pacs", port=free_port(), unique_filenames=True)
    (work / "a").mkdir()
    config = write_config(work / "a", pacs_port=scp.port, dest_retries=12, dest_backoff_s=1.0)
    text = config.read_text().replace("ae_title: ORTHANC\n    host", "ae_title: STORESCP\n    host")
    config.write_text(text)
    up, down = [], []
    with BoneBridgeProcess(config, args=["--workers", "1"]) as proc:
        scp.start()
        warm, warm_uid = _wrist(work, "warm-up", size)
        _send(proc, warm)
        wait_for(lambda: proc.results(warm_uid), 300, interval=0.2, what="the warm-up study delivered")
        for i in range(rounds):
            rate, _ = _round(proc, work, f"up{i}", count, size)
            up.append(rate)
            print(f"  round {i}: PACS up   {rate:.3f} studies/s", flush=True)
            scp.stop()
            rate, uids = _round(proc, work, f"down{i}", count, size)
            down.append(rate)
            waiting = sum(1 for uid in uids if not proc.results(uid))
            print(f"  round {i}: PACS down {rate:.3f} studies/s ({waiting} of {count} still waiting to be sent)",
                  flush=True)
            scp.start()
            began = time.monotonic()
            for uid in uids:
                wait_for(lambda uid=uid: proc.results(uid), 300, interval=0.2, what=f"{uid} delivered")
            print(f"  round {i}: backlog delivered {time.monotonic() - began:.1f} s after the PACS came back",
                  flush=True)
        scp.stop()
    summarise(f"analysis-throughput-pacs-down-1-worker-{size}px", "pacs-up", "studies/s", up, down,
              higher_is_better=True, as_json=as_json, note="goal: ratio >= 0.8 (within 20 %)")


def dicomweb_delivery(work: Path, deliveries: int, size: int, as_json: bool) -> None:
    from dicomweb_client.api import DICOMwebClient
    import pydicom
    import requests

    orthanc = OrthancServer(work / "orthanc", dicomweb=True, users={"bonebridge": PASSWORD}).start()
    try:
        secret = work / "stow-password"
        secret.write_text(PASSWORD)
        secret.chmod(0o600)
        dest = {"type": "dicomweb", "url": orthanc.dicomweb_url, "retries": 3, "backoff_s": 0.5,
                "auth": {"basic": {"user": "bonebridge", "password_file": str(secret)}}}
        (work / "b").mkdir()
        config = write_config(work / "b", pacs_port=free_port(), extra={"destinations": {"pacs": dest}})
        session = requests.Session()
        session.auth = ("bonebridge", PASSWORD)
        client = DICOMwebClient(url=orthanc.dicomweb_url, session=session)
        ours, ref = [], []
        with BoneBridgeProcess(config, args=["--workers", "1"]) as proc:
            for i in range(deliveries + 1):
                path, uid = _wrist(work, f"web{i}", size)
                _send(proc, path)
                [record] = wait_for(lambda: proc.results(uid), 300, interval=0.02, what=f"{uid} delivered")
                assert record["destinations"] == {"pacs": "sent"}, record
                took = record["timing"]["dispatched_at"] - record["timing"]["finished_at"]
                files = [proc.data_dir / name for name in record["outputs"]]
                datasets = [pydicom.dcmread(f) for f in files]
                began = time.perf_counter()
                client.store_instances(datasets)  # the same SOP instances again: stored anew, as for a first copy
                again = time.perf_counter() - began
                print(f"  study {i}: {len(files)} files, delivered {took:.3f} s after its analysis ended; "
                      f"the same POST from this script {again:.3f} s", flush=True)
                if i == 0:
                    print(f"  (first delivery of the dispatch worker: {took:.3f} s, left out of the median)")
                    continue
                ours.append(took)
                ref.append(again)
    finally:
        orthanc.stop()
    summarise(f"dicomweb-delivery-sr+sc-{size}px", "stow-rs-of-the-same-files-from-a-warm-client", "s", ref, ours,
              higher_is_better=False, as_json=as_json,
              note=f"median {statistics.median(ours):.3f} s from end of analysis to delivered (goal < 0.2 s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="PACS-up and PACS-down rounds each (interleaved)")
    parser.add_argument("--studies", type=int, default=10, help="studies per round")
    parser.add_argument("--deliveries", type=int, default=8, help="DICOMweb deliveries measured (after a first one)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--skip", choices=["pacs-down", "dicomweb"], action="append", default=[])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print_environment()
    with tempfile.TemporaryDirectory(prefix="bb-dispatch-") as tmp:
        work = Path(tmp)
        try:
            if "pacs-down" not in args.skip:
                pacs_down_against_up(work, args.rounds, args.studies, args.size, args.json)
            if "dicomweb" not in args.skip:
                dicomweb_delivery(work, args.deliveries, args.size, args.json)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
