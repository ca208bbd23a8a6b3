"""The queue keeps one second in memory: a broker that loses what it held must not lose studies.

The embedded Redis fsyncs its append-only file once a second, so a crash right after an enqueue can lose the
message. The assembler's state on disk still says the study is queued, and that is what re-enqueues it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from daemon.assemble.assembler import StudyAssembler
from tests.bonebridge_process import BoneBridgeProcess, write_config
from tests.dicom_factory import make_dx
from tests.orthanc_fixture import OrthancServer, storescu, wait_for


def test_requeue_unfinished_enqueues_queued_studies_without_a_result(tmp_path: Path) -> None:
    from tests.test_assembler import Clock, Queue, event

    clock, queue = Clock(), Queue()
    assembler = StudyAssembler(tmp_path, 1.0, queue, clock=clock)
    for study in ("1.2.3", "1.2.4", "1.2.5"):
        assembler.instance_received(event(study, assoc=study))
        assembler.association_closed(study)
    assert len(assembler.poll(clock.t + 5)) == 3
    assembler.mark_done("1.2.4", 1, None)  # its result was sent
    (tmp_path / "results" / "1.2.5").mkdir(parents=True)  # a worker recorded it; the assembler has not read it yet
    (tmp_path / "results" / "1.2.5" / "1.json").write_text(json.dumps({"status": "sent", "generation": 1}))
    queue.items.clear()
    assembler.instance_received(event("1.2.6", assoc="open"))  # still receiving: left alone
    assert assembler.requeue_unfinished() == [("1.2.3", 1)]
    assert queue.items == [("1.2.3", 1)]
    assert assembler.get("1.2.6").open_associations == ["open"]


def _state(proc: BoneBridgeProcess, study_uid: str) -> str | None:
    try:
        return json.loads((proc.data_dir / "studies" / f"{study_uid}.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.integration
def test_redis_killed_with_its_last_writes_lost_still_delivers_the_queued_study(tmp_path: Path,
                                                                               orthanc: OrthancServer) -> None:
    marker = tmp_path / "paused.pid"
    config = write_config(tmp_path, pacs_port=orthanc.dicom_port)
    env = {"BONEBRIDGE_FAULT_PAUSE_S": "6", "BONEBRIDGE_FAULT_MARKER": str(marker)}
    with BoneBridgeProcess(config, env=env) as proc:
        busy = make_dx(tmp_path / "a.dcm", body_part="CHEST", age="050Y")
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "a.dcm"]).returncode == 0
        wait_for(marker.exists, 60, what="the worker to be busy with the first study")
        waiting = make_dx(tmp_path / "b.dcm", body_part="CHEST", age="050Y")
        waiting_uid = str(waiting.StudyInstanceUID)
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "b.dcm"]).returncode == 0
        wait_for(lambda: _state(proc, waiting_uid) == "queued", 30, what="the second study to be queued")

        # The second study's message sits in Redis only. Freeze serve, kill Redis and lose its file (worse than
        # the one second `appendfsync everysec` risks), then let serve find it dead and restart it.
        assert proc.proc is not None
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            redis_pid = json.loads((proc.data_dir / "broker" / "owner.json").read_text())["redis_pid"]
            os.kill(redis_pid, signal.SIGKILL)
            time.sleep(0.3)
            for lost in (proc.data_dir / "broker").glob("appendonly*"):
                shutil.rmtree(lost) if lost.is_dir() else lost.unlink()
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)

        def reported(uid: str):
            return [i for i in orthanc.instances_in_study(uid)
                    if orthanc.get(f"/instances/{i['ID']}/simplified-tags").get("Modality") == "SR"] or None

        assert len(wait_for(lambda: reported(waiting_uid), 120, what="the second study's SR")) == 1
        assert len(wait_for(lambda: reported(str(busy.StudyInstanceUID)), 60, what="the first study's SR")) == 1
        assert "after the broker restarted" in proc.log_tail(400)
