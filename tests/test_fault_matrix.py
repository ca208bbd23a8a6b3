"""The fault matrix, part 1 and 2 of issue 10, with real processes: ``serve`` killed hard at the worst moments.

Every test kills the whole ``serve`` process group with SIGKILL (the embedded Redis and the worker with it: no
``finally`` runs), starts ``serve`` again on the same data directory, and then checks what the PACS (a real
Orthanc) holds: every acknowledged instance is in the study's state, exactly one SR per study generation
reached the PACS (no duplicates), every generation has an outcome record, and the restarted daemon answers
C-ECHO. Studies are chests, which the shipped routes report as "not processed" without running a model, so the
tests measure the transport, not the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml

from tests.bonebridge_process import REPO, BoneBridgeProcess, write_config
from tests.dicom_factory import make_study
from tests.orthanc_fixture import OrthancServer, echoscu, wait_for
from tests.test_integration import _by_modality

pytestmark = pytest.mark.integration


def _metric(proc: BoneBridgeProcess, name: str) -> float | None:
    import urllib.request

    port = proc.config["metrics"]["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else None


def _status_page(proc: BoneBridgeProcess) -> str:
    import urllib.request

    port = proc.config["status"]["port"]
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()


def _chest_study(folder: Path, count: int) -> tuple[list[Path], str]:
    """``count`` instances of one chest study (routed to a not-processed report: no model runs); (files, uid)."""
    files = [Path(ds.filename) for ds in make_study(folder, count=count, size=64, body_part="CHEST")]
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _storescu(port: int, files: list[Path]) -> list[str]:
    """dcmtk's storescu command sending ``files`` in one association."""
    return ["storescu", "-aet", "STORESCU", "-aec", "BONEBRIDGE", "127.0.0.1", str(port), *map(str, files)]


def _kill_group(proc: BoneBridgeProcess) -> None:
    assert proc.proc is not None
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(timeout=30)


def _state(proc: BoneBridgeProcess, study_uid: str) -> dict:
    """The study's state file; ``{"state": None}`` until the assembler's first tick after its first instance wrote it
    (a crash before that is covered by adopting the spooled files)."""
    try:
        return json.loads((proc.data_dir / "studies" / f"{study_uid}.json").read_text())
    except FileNotFoundError:
        return {"state": None}


def _settled(pacs, proc: BoneBridgeProcess, study_uid: str, timeout: float = 120) -> tuple[dict, list[dict]]:
    """Wait until the study is done and every generation's SR is in the PACS; returns (state, SRs)."""
    def done():
        state = _state(proc, study_uid)
        if state["state"] != "done":
            return None
        srs = _by_modality(pacs, study_uid).get("SR", [])
        return (state, srs) if len(srs) >= state["generation"] else None

    state, _ = wait_for(done, timeout, interval=0.3, what=f"study {study_uid} done with its SRs")
    time.sleep(3)  # a duplicate delivery would land by now
    return state, _by_modality(pacs, study_uid).get("SR", [])


def _assert_one_result_per_generation(pacs, proc: BoneBridgeProcess, study_uid: str, instances: int) -> None:
    state, srs = _settled(pacs, proc, study_uid)
    assert len(state["instances"]) == instances
    assert len(srs) == state["generation"], [s.get("SOPInstanceUID") for s in srs]
    assert len({s["SOPInstanceUID"] for s in srs}) == len(srs)
    records = proc.results(study_uid)
    assert sorted(r["generation"] for r in records) == list(range(1, state["generation"] + 1))
    assert all(r["status"] in ("sent", "not-processed") or r["destinations"] == {"pacs": "sent"} for r in records)
    assert echoscu(proc.port, "BONEBRIDGE").returncode == 0


def test_serve_killed_mid_association_then_storescu_resends(tmp_path: Path, orthanc) -> None:
    """(1) SIGKILL of the process group while a 50-instance association is under way; restart; resend."""
    pacs = orthanc
    files, study_uid = _chest_study(tmp_path / "study", 50)
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, quiet_period_s=2.0)
    with BoneBridgeProcess(config) as first:  # the with stops it should the test fail before the kill
        sender = subprocess.Popen(_storescu(first.port, files), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        incoming = first.data_dir / "incoming" / study_uid
        wait_for(lambda: incoming.is_dir() and len(list(incoming.glob("*.dcm"))) >= 10, 60, interval=0.01,
                 what="ten instances on disk")
        _kill_group(first)
    sender.wait(timeout=60)
    acknowledged = len(list(incoming.glob("*.dcm")))
    assert 10 <= acknowledged < 50 or sender.returncode != 0
    with BoneBridgeProcess(config) as second:
        resend = subprocess.run(_storescu(second.port, files), capture_output=True, text=True, timeout=120)
        assert resend.returncode == 0, resend.stderr
        _assert_one_result_per_generation(pacs, second, study_uid, 50)


def test_serve_killed_in_the_quiet_period(tmp_path: Path, orthanc) -> None:
    """(2a) SIGKILL after the association ended, before the quiet period ran out: the restart finishes the study."""
    pacs = orthanc
    files, study_uid = _chest_study(tmp_path / "study", 3)
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, quiet_period_s=6.0)
    with BoneBridgeProcess(config) as first:
        assert subprocess.run(_storescu(first.port, files), capture_output=True, timeout=60).returncode == 0
        wait_for(lambda: _state(first, study_uid)["state"] == "receiving", 5, interval=0.05,
                 what="the study's state written at the assembler's tick, still in its quiet period")
        _kill_group(first)
    with BoneBridgeProcess(config) as second:
        _assert_one_result_per_generation(pacs, second, study_uid, 3)
        assert _state(second, study_uid)["generation"] == 1


def test_serve_killed_while_the_worker_runs(tmp_path: Path, orthanc) -> None:
    """(2b) SIGKILL while the worker is inside the study (after analysis, before sending): one SR after restart."""
    pacs = orthanc
    marker = tmp_path / "paused.pid"
    files, study_uid = _chest_study(tmp_path / "study", 2)
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, quiet_period_s=1.0)
    env = {"BONEBRIDGE_FAULT_PAUSE_S": "120", "BONEBRIDGE_FAULT_MARKER": str(marker)}
    with BoneBridgeProcess(config, env=env) as first:
        assert subprocess.run(_storescu(first.port, files), capture_output=True, timeout=60).returncode == 0
        wait_for(marker.exists, 60, what="the worker to pause mid-study")
        _kill_group(first)
    assert "SR" not in _by_modality(pacs, study_uid)
    with BoneBridgeProcess(config) as second:
        _assert_one_result_per_generation(pacs, second, study_uid, 2)
        assert _state(second, study_uid)["generation"] == 1
        assert "re-queued" in second.log_tail(400) or "recover" in second.log_tail(400).lower()


def test_eight_parallel_associations_and_one_study_over_two_at_once(tmp_path: Path, orthanc) -> None:
    """(6) Eight storescu processes at once, one study each, and one more study split over two simultaneous
    associations: every study ends with all its instances and exactly one SR (one generation)."""
    pacs = orthanc
    studies = [_chest_study(tmp_path / f"s{i}", 3) for i in range(8)]
    split, split_uid = _chest_study(tmp_path / "split", 10)
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, quiet_period_s=2.0)
    with BoneBridgeProcess(config) as proc:
        batches = [*(files for files, _ in studies), split[::2], split[1::2]]
        senders = [subprocess.Popen(_storescu(proc.port, files), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for files in batches]
        assert [s.wait(timeout=120) for s in senders] == [0] * len(senders)
        for files, uid in [*studies, (split, split_uid)]:
            state, srs = _settled(pacs, proc, uid)
            assert len(state["instances"]) == len(files) and state["generation"] == 1
            assert len(srs) == 1, uid
        assert echoscu(proc.port, "BONEBRIDGE").returncode == 0


def test_disk_full_refuses_under_the_floor_and_recovers_by_itself(tmp_path: Path, orthanc) -> None:
    """(5) ``data_dir`` on a real 64 MiB filesystem with a 24 MiB floor: instances are answered 0xA700 once under it,
    before anything is written, with a log line saying why; C-ECHO still answers; once space is freed the same
    sender succeeds, and the study (only acknowledged instances) gets exactly one SR."""
    from tests.small_filesystem import fill, small_filesystem
    from tests.test_receive_file import _send

    pacs = orthanc
    with small_filesystem(tmp_path / "small", 64) as mount:
        config = write_config(tmp_path, pacs_port=pacs.dicom_port, quiet_period_s=2.0)
        config_data = yaml.safe_load(config.read_text())
        config_data["storage"] = {"data_dir": str(mount / "var"), "min_free_mb": 24}
        config.write_text(yaml.safe_dump(config_data, sort_keys=False))
        files = [Path(ds.filename) for ds in make_study(tmp_path / "big", count=4, size=2048, body_part="CHEST")]
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        with BoneBridgeProcess(config) as proc:
            # leave about 32 MiB: two 8 MiB instances fit above the floor, the third does not
            filler = fill(mount / "filler", max(0, shutil.disk_usage(mount).free // 2**20 - 32))
            statuses = _send(proc.port, files[:3])
            assert statuses == [0x0000, 0x0000, 0xA700]
            assert "under the floor" in proc.log_tail(200)
            assert list((proc.data_dir / "tmp").iterdir()) == []
            assert echoscu(proc.port, "BONEBRIDGE").returncode == 0

            filler.unlink()
            sent = subprocess.run(_storescu(proc.port, files[2:]), capture_output=True, text=True, timeout=120)
            assert sent.returncode == 0, sent.stderr
            _assert_one_result_per_generation(pacs, proc, study_uid, 4)


def test_pacs_down_past_the_retries_then_bonebridge_retry_delivers_once(tmp_path: Path) -> None:
    """(4) The PACS is down through every retry: the study is dead-lettered (its outcome says so). ``bonebridge
    retry`` fails loudly (exit 1) while the PACS is still down, then, with the PACS up, delivers the SR exactly
    once and empties the entry; a second ``retry`` finds nothing to send."""
    pacs = OrthancServer(tmp_path / "pacs")  # not started yet: the PACS is down
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, dest_retries=1, dest_backoff_s=0.2)
    files, study_uid = _chest_study(tmp_path / "study", 2)

    def retry() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "daemon.cli", "retry", "--config", str(config)],
                              capture_output=True, text=True, timeout=120, cwd=REPO)

    with BoneBridgeProcess(config) as proc:
        assert subprocess.run(_storescu(proc.port, files), capture_output=True).returncode == 0
        records = wait_for(lambda: proc.results(study_uid), 120, interval=0.3, what="the outcome record")
        assert records[0]["status"] == "dead-lettered"
        dead_letter = proc.data_dir / "dead-letter"
        assert len(list(dead_letter.iterdir())) == 1

        still_down = retry()
        assert still_down.returncode == 1, still_down.stdout + still_down.stderr
        assert len(list(dead_letter.iterdir())) == 1

        assert _metric(proc, 'bonebridge_results{status="dead-lettered"}') == 1.0
        with pacs:  # __enter__ starts it
            delivered = retry()
            assert delivered.returncode == 0, delivered.stdout + delivered.stderr
            assert list(dead_letter.iterdir()) == []
            assert len(_by_modality(pacs, study_uid).get("SR", [])) == 1
            # issue 28, case 4: the outcome record, the metric and the status page say delivered now
            [record] = proc.results(study_uid)
            assert record["status"] == "sent" and record["destinations"] == {"pacs": "sent"}
            assert record["delivered_at"] and record["redelivered"]["pacs"]["attempts"] == 2 + 1 + 1
            assert _metric(proc, 'bonebridge_results{status="dead-lettered"}') is None
            assert _metric(proc, 'bonebridge_results{status="sent"}') == 1.0
            page = _status_page(proc)
            assert "dead-lettered" not in page and "pacs: sent" in page

            again = retry()
            assert again.returncode == 0 and "dead-letter folder is empty" in again.stdout
            assert len(_by_modality(pacs, study_uid).get("SR", [])) == 1
        assert echoscu(proc.port, "BONEBRIDGE").returncode == 0
