"""Issue 27: results leave through their own stage, so a PACS that is down never stalls analysis.

Real processes throughout: ``bonebridge serve`` (its embedded Redis, its analysis worker and its dispatch worker),
dcmtk's ``storescu`` sending studies in, and dcmtk's ``storescp`` as the destination, started only when the test
says the PACS is back. ``storescp +uf`` writes every C-STORE it gets to a file of its own, so a result delivered
twice would show as two files: "exactly once" is counted on the receiving side, not taken from our own log.
Studies are chests, which the shipped routes report as "not processed" without a model: the test measures the
transport, not the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pydicom
import pytest

from tests.bonebridge_process import BoneBridgeProcess, write_config
from tests.dicom_factory import make_dx
from tests.orthanc_fixture import StoreSCP, free_port, missing_dcmtk_tools, storescu, wait_for

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(bool(missing_dcmtk_tools()), reason="dcmtk (storescu, storescp) not installed")]


def _pending(proc: BoneBridgeProcess, study_uid: str) -> dict | None:
    path = proc.data_dir / "dispatch" / "pending" / "pacs" / f"{study_uid}-1.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ready(proc: BoneBridgeProcess, study_uid: str) -> dict | None:
    """The study's outcome record once analysis is done, delivered or not, with its result files on disk."""
    records = proc.results(study_uid, settled=False)
    if not records:
        return None
    record = records[0]
    assert all((proc.data_dir / f).is_file() for f in record["outputs"])
    return record


def _received(scp: StoreSCP) -> dict[str, int]:
    """SOP Instance UID -> how many times storescp received it."""
    counts: dict[str, int] = {}
    for path in scp.received():
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        counts[uid] = counts.get(uid, 0) + 1
    return counts


def _send_chests(tmp_path: Path, proc: BoneBridgeProcess, count: int, first: int = 0) -> list[str]:
    uids = []
    for i in range(first, first + count):
        chest = make_dx(tmp_path / f"chest{i}.dcm", body_part="CHEST", age="050Y", size=64, seed=i)
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / f"chest{i}.dcm"]).returncode == 0
        uids.append(str(chest.StudyInstanceUID))
    return uids


def _config(tmp_path: Path, scp_port: int) -> Path:
    # 10 retries from 1 s, doubling to the 60 s cap: the first study would hold a worker for minutes if the
    # worker that analyses also waited to send
    config = write_config(tmp_path, pacs_port=scp_port, dest_retries=10, dest_backoff_s=1.0)
    text = config.read_text().replace("ae_title: ORTHANC\n    host", "ae_title: STORESCP\n    host")
    config.write_text(text)
    return config


def test_pacs_down_does_not_stall_analysis_and_everything_is_delivered_once_it_is_back(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "pacs", port=free_port(), unique_filenames=True)  # not started: the PACS is down
    config = _config(tmp_path, scp.port)
    with BoneBridgeProcess(config) as proc:
        [first] = _send_chests(tmp_path, proc, 1)
        wait_for(lambda: (p := _pending(proc, first)) and p["state"] == "retrying", 120, interval=0.2,
                 what="the first study's first failed try")
        began = time.monotonic()
        later = _send_chests(tmp_path, proc, 3, first=1)
        records = {uid: wait_for(lambda uid=uid: _ready(proc, uid), 120, interval=0.2, what=f"{uid} analysed")
                   for uid in later}
        analysed_in = time.monotonic() - began
        # Analysed while the first study's delivery is still retrying: the worker did not wait for the PACS.
        pending = _pending(proc, first)
        assert pending is not None and pending["state"] == "retrying" and pending["attempts"] < 11, pending
        assert all(r["status"] == "ready-to-send" and r["destinations"] == {"pacs": "retrying"}
                   or r["destinations"] == {"pacs": "waiting"} for r in records.values()), records
        assert proc.results(first) == []  # not settled: still on its way
        print(f"\n3 studies analysed in {analysed_in:.1f} s with the PACS down; "
              f"first study at attempt {pending['attempts']} of 11")

        with scp:  # the PACS comes back
            back = time.monotonic()
            settled = {uid: wait_for(lambda uid=uid: proc.results(uid), 150, interval=0.3, what=f"{uid} delivered")[0]
                       for uid in [first, *later]}
            delivered_in = time.monotonic() - back
            time.sleep(3)  # a second copy of any delivery would land by now
            counts = _received(scp)
        print(f"all 4 delivered {delivered_in:.1f} s after the PACS came back")
    for uid, record in settled.items():
        assert record["status"] == "sent" and record["destinations"] == {"pacs": "sent"}, record
        assert counts.get(record["sr"][3]) == 1, (uid, counts)
    assert len(counts) == 4 and set(counts.values()) == {1}
    assert not list((proc.data_dir / "dead-letter").glob("*/reason.json"))
    assert not list((proc.data_dir / "dispatch" / "pending").glob("*/*.json"))


def test_serve_killed_while_results_wait_to_be_sent_loses_none(tmp_path: Path) -> None:
    """kill -9 of serve's whole process group (Redis, workers and all) while two results wait for a PACS that is
    down; the PACS comes back and serve is started again: both are delivered, each once."""
    scp = StoreSCP(tmp_path / "pacs", port=free_port(), unique_filenames=True)
    config = _config(tmp_path, scp.port)
    proc = BoneBridgeProcess(config).start()
    try:
        uids = _send_chests(tmp_path, proc, 2)
        for uid in uids:
            wait_for(lambda uid=uid: (p := _pending(proc, uid)) and p["state"] == "retrying", 120, interval=0.2,
                     what=f"{uid}'s first failed try")
        os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(timeout=30)
    finally:
        proc.stop()
    with scp, BoneBridgeProcess(config) as again:
        settled = [wait_for(lambda uid=uid: again.results(uid), 150, interval=0.3, what=f"{uid} delivered")[0]
                   for uid in uids]
        time.sleep(3)
        counts = _received(scp)
        assert "re-queued 2 result deliveries waiting on disk" in again.log_tail(400)
    assert [r["destinations"] for r in settled] == [{"pacs": "sent"}] * 2
    assert sorted(counts) == sorted(r["sr"][3] for r in settled) and set(counts.values()) == {1}


def test_twenty_studies_analysed_while_the_pacs_is_down_are_each_delivered_once_when_it_is_back(tmp_path: Path) -> None:
    """The issue's PACS-down test: with the destination stopped, 20 studies are sent; every one is analysed (its
    outcome record and result files on disk) before the destination comes back, and once it is back every result
    arrives, each SOP instance exactly once (counted in storescp's own files, one per C-STORE)."""
    scp = StoreSCP(tmp_path / "pacs", port=free_port(), unique_filenames=True)  # not started: the PACS is down
    config = _config(tmp_path, scp.port)
    with BoneBridgeProcess(config) as proc:
        began = time.monotonic()
        uids = _send_chests(tmp_path, proc, 20)
        records = {uid: wait_for(lambda uid=uid: _ready(proc, uid), 300, interval=0.2, what=f"{uid} analysed")
                   for uid in uids}
        analysed_in = time.monotonic() - began
        # Every outcome exists before the PACS returns: analysed, results on disk, waiting to be sent.
        assert all(r["status"] == "ready-to-send" and r["destinations"]["pacs"] in ("waiting", "retrying")
                   for r in records.values()), records
        assert all(proc.results(uid) == [] for uid in uids)  # none delivered: the PACS is still down
        assert not scp.output_dir.exists()
        tries = [(_pending(proc, uid) or {}).get("attempts", 0) for uid in uids]
        print(f"\n20 studies sent and analysed in {analysed_in:.1f} s with the PACS down "
              f"(failed tries so far: {min(tries)} to {max(tries)} per study)")

        with scp:  # the PACS comes back
            back = time.monotonic()
            settled = {uid: wait_for(lambda uid=uid: proc.results(uid), 240, interval=0.3, what=f"{uid} delivered")[0]
                       for uid in uids}
            delivered_in = time.monotonic() - back
            time.sleep(3)  # a second copy of any delivery would land by now
            counts = _received(scp)
        print(f"all 20 delivered {delivered_in:.1f} s after the PACS came back")
    made = {}
    for record in settled.values():
        assert record["status"] == "not-processed" or record["status"] == "sent", record
        assert record["destinations"] == {"pacs": "sent"}, record
        for name in record["outputs"]:
            made[str(pydicom.dcmread(proc.data_dir / name, stop_before_pixels=True).SOPInstanceUID)] = 1
    assert len(made) >= 20 and counts == made, {u: c for u, c in counts.items() if c != 1}  # each exactly once
    assert not list((proc.data_dir / "dead-letter").glob("*/reason.json"))
    assert not list((proc.data_dir / "dispatch" / "pending").glob("*/*.json"))
