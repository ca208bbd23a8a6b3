"""Study assembler: completion rules, re-opening, persistence and crash recovery (fake clock)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from daemon.assemble.assembler import StudyAssembler
from daemon.receive.spool import InstanceEvent, Spool
from tests.test_spool import make_dx

QUIET = 3.0


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Queue:
    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []
        self.fail = False

    def __call__(self, study_uid: str, generation: int) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.items.append((study_uid, generation))


def event(study: str, assoc: str = "a1", sop: str | None = None, own: bool = False) -> InstanceEvent:
    sop = sop or generate_uid()
    return InstanceEvent(
        study_uid=study,
        series_uid="1.2.3",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        path=Path(f"/spool/{study}/{sop}.dcm"),
        calling_ae="CR1",
        assoc_id=assoc,
        own_output=own,
    )


@pytest.fixture()
def env(tmp_path: Path) -> tuple[StudyAssembler, Clock, Queue]:
    clock, queue = Clock(), Queue()
    return StudyAssembler(tmp_path, QUIET, queue, clock=clock), clock, queue


def test_complete_only_after_close_and_quiet_period(env) -> None:
    asm, clock, queue = env
    study = generate_uid()
    asm.instance_received(event(study))
    asm.instance_received(event(study))
    assert asm.poll(clock.t + 100) == []  # association still open: never complete
    asm.association_closed("a1")
    assert asm.poll(clock.t + QUIET - 0.1) == []  # quiet period not over
    assert asm.poll(clock.t + QUIET) == [(study, 1)]
    assert queue.items == [(study, 1)]
    assert asm.poll(clock.t + 100) == []  # once per completion
    st = asm.get(study)
    assert st is not None and st.state == "queued" and len(st.instances) == 2


def test_study_spanning_two_associations_waits_for_both(env) -> None:
    asm, clock, queue = env
    study = generate_uid()
    asm.instance_received(event(study, "a1"))
    asm.instance_received(event(study, "a2"))
    asm.association_closed("a1")
    asm.association_closed("a1")  # idempotent: release + connection close both report
    assert asm.poll(clock.t + 60) == []
    asm.association_closed("a2")
    assert asm.poll(clock.t + 60) == [(study, 1)]


def test_duplicates_are_deduplicated(env) -> None:
    asm, clock, queue = env
    study, sop = generate_uid(), generate_uid()
    asm.instance_received(event(study, sop=sop))
    asm.instance_received(event(study, sop=sop))
    assert len(asm.list_instances(study)) == 1


def test_late_instance_reopens_with_next_generation_and_keeps_sr_refs(env) -> None:
    asm, clock, queue = env
    study = generate_uid()
    first = event(study)
    asm.instance_received(first)
    asm.association_closed("a1")
    asm.poll(clock.t + QUIET)
    sr = (study, "1.2.9", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9.1")
    asm.mark_done(study, 1, sr)
    assert asm.get(study).state == "done"

    # A blind resend of an instance already processed changes nothing.
    clock.t += 10
    asm.instance_received(event(study, "a2", sop=first.sop_instance_uid))
    assert asm.get(study).state == "done" and asm.get(study).generation == 1

    asm.instance_received(event(study, "a3"))
    st = asm.get(study)
    assert (st.state, st.generation, st.sr_refs) == ("receiving", 2, [sr])
    asm.association_closed("a2")
    asm.association_closed("a3")
    assert asm.poll(clock.t + QUIET) == [(study, 2)]
    assert len(asm.list_instances(study)) == 2


def test_resend_with_other_content_reopens_a_finished_study(env, caplog) -> None:
    """Issue 28, case 3, at the assembler: an instance whose content the spool replaced (the earlier file kept)
    re-opens a finished study as a new generation, logged at WARNING; an identical re-send still changes nothing."""
    import dataclasses
    import logging

    asm, clock, queue = env
    study = generate_uid()
    first = event(study)
    asm.instance_received(first)
    asm.association_closed("a1")
    asm.poll(clock.t + QUIET)
    sr = (study, "1.2.9", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9.1")
    asm.mark_done(study, 1, sr)
    asm.instance_received(event(study, "a2", sop=first.sop_instance_uid))
    assert (asm.get(study).state, asm.get(study).generation) == ("done", 1)

    clock.t += 10
    with caplog.at_level(logging.WARNING, logger="daemon.assemble.assembler"):
        asm.instance_received(dataclasses.replace(event(study, "a3", sop=first.sop_instance_uid),
                                                  superseded="/spool/superseded/x.dcm"))
    st = asm.get(study)
    assert (st.state, st.generation, st.sr_refs) == ("receiving", 2, [sr])
    assert any(r.levelno == logging.WARNING and "re-sent with other content" in r.getMessage() for r in caplog.records)
    asm.association_closed("a2")
    asm.association_closed("a3")
    assert asm.poll(clock.t + QUIET) == [(study, 2)]
    assert len(asm.list_instances(study)) == 1


def test_result_of_superseded_generation_is_kept_as_predecessor(env) -> None:
    asm, clock, queue = env
    study = generate_uid()
    asm.instance_received(event(study))
    asm.association_closed("a1")
    asm.poll(clock.t + QUIET)
    asm.instance_received(event(study, "a2"))  # re-opened while generation 1 is being processed
    sr1 = (study, "1.2.9", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.9.1")
    asm.mark_done(study, 1, sr1)
    st = asm.get(study)
    assert st.state == "receiving" and st.generation == 2 and st.sr_refs == [sr1]
    asm.mark_failed(study, 1, "stale")  # a stale failure does not touch the current generation
    assert asm.get(study).state == "receiving"


def test_mark_failed_and_reopen_on_resend(env) -> None:
    asm, clock, queue = env
    study, sop = generate_uid(), generate_uid()
    asm.instance_received(event(study, sop=sop))
    asm.association_closed("a1")
    asm.poll(clock.t + QUIET)
    asm.mark_failed(study, 1, "decode error")
    st = asm.get(study)
    assert st.state == "failed" and st.failure_reason == "decode error"
    asm.instance_received(event(study, "a2", sop=sop))  # resending a failed study retries it
    assert asm.get(study).state == "receiving" and asm.get(study).generation == 2


def test_enqueue_failure_retries_next_poll(env) -> None:
    asm, clock, queue = env
    study = generate_uid()
    asm.instance_received(event(study))
    asm.association_closed("a1")
    queue.fail = True
    assert asm.poll(clock.t + QUIET) == []
    assert asm.get(study).state == "receiving"
    queue.fail = False
    assert asm.poll(clock.t + QUIET) == [(study, 1)]


def test_own_outputs_are_ignored(env) -> None:
    asm, clock, queue = env
    study = generate_uid()
    asm.instance_received(event(study, own=True))
    asm.association_closed("a1")
    assert asm.get(study) is None and asm.poll(clock.t + 100) == []


def test_state_file_is_json_and_survives_restart(tmp_path: Path) -> None:
    clock, queue = Clock(), Queue()
    asm = StudyAssembler(tmp_path, QUIET, queue, clock=clock)
    receiving, queued = generate_uid(), generate_uid()
    asm.instance_received(event(receiving, "open-assoc"))
    asm.instance_received(event(queued, "b"))
    asm.association_closed("b")
    asm.poll(clock.t + QUIET)
    data = json.loads((tmp_path / "studies" / f"{receiving}.json").read_text())
    assert data["state"] == "receiving" and data["open_associations"] == ["open-assoc"]
    assert not list((tmp_path / "studies").glob(".*.tmp"))

    # "Crash": a new assembler over the same directory.
    clock2, queue2 = Clock(5000.0), Queue()
    asm2 = StudyAssembler(tmp_path, QUIET, queue2, clock=clock2)
    assert asm2.recover() == [(queued, 1)]  # queued is re-enqueued (task is idempotent)
    assert queue2.items == [(queued, 1)]
    st = asm2.get(receiving)
    assert st.open_associations == [] and st.last_instance_at == 5000.0  # fresh quiet period
    assert asm2.poll(5000.0 + QUIET - 0.1) == []
    assert asm2.poll(5000.0 + QUIET) == [(receiving, 1)]


def test_recover_adopts_spooled_instances_missing_from_state(tmp_path: Path) -> None:
    """A crash after the spool rename but before the state write must not lose the instance."""
    spool = Spool(tmp_path, is_own_output=False)
    src = tmp_path / "src.dcm"
    ds = make_dx(src)
    spooled = spool.store_file(src, "CR7", "gone")  # on disk, never reported to the assembler
    clock, queue = Clock(), Queue()
    asm = StudyAssembler(tmp_path, QUIET, queue, clock=clock)
    asm.recover()
    st = asm.get(ds.StudyInstanceUID)
    assert st is not None and ds.SOPInstanceUID in st.instances
    assert st.calling_ae == "CR7"
    assert asm.list_instances(ds.StudyInstanceUID) == [spooled.path]
    assert asm.poll(clock.t + QUIET) == [(ds.StudyInstanceUID, 1)]


def test_corrupt_state_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "1.2.3.json").write_text("{not json")
    asm = StudyAssembler(tmp_path, QUIET, Queue())
    assert asm.studies() == []
    assert (tmp_path / "studies" / "1.2.3.corrupt").exists()


def test_concurrent_instances_are_all_recorded(env) -> None:
    asm, clock, queue = env
    study = generate_uid()

    def sender(n: int) -> None:
        for _ in range(20):
            asm.instance_received(event(study, f"assoc-{n}"))
        asm.association_closed(f"assoc-{n}")

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(asm.list_instances(study)) == 80
    assert asm.poll(clock.t + QUIET) == [(study, 1)]


def test_run_poller_enqueues_in_background(tmp_path: Path) -> None:
    queue = Queue()
    asm = StudyAssembler(tmp_path, 0.0, queue)
    study = generate_uid()
    asm.instance_received(event(study))
    asm.association_closed("a1")
    stop = threading.Event()
    thread = asm.run_poller(stop, interval_s=0.02)
    try:
        for _ in range(250):
            if queue.items:
                break
            stop.wait(0.02)
    finally:
        stop.set()
        thread.join(2)
    assert queue.items == [(study, 1)]


def test_worker_results_on_disk_mark_studies_done_and_are_not_requeued(tmp_path) -> None:
    """A worker in another process writes results/<study>/<gen>.json; a restart must not re-enqueue that study."""
    import json as _json

    from daemon.assemble.assembler import StudyAssembler
    from daemon.receive.spool import InstanceEvent

    queued: list[tuple[str, int]] = []
    clock = [1000.0]
    asm = StudyAssembler(tmp_path, 1.0, lambda uid, gen: queued.append((uid, gen)), clock=lambda: clock[0])
    for study in ("1.2.3", "1.2.4"):
        path = tmp_path / "incoming" / study / "9.9.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        asm.instance_received(InstanceEvent(study_uid=study, series_uid="1.1", sop_instance_uid=f"{study}.1",
                                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1", path=path,
                                            calling_ae="STORESCU", assoc_id="a"))
    asm.association_closed("a")
    clock[0] += 5
    asm.poll()
    assert sorted(queued) == [("1.2.3", 1), ("1.2.4", 1)] or sorted(queued) == [("1.2.3", 0), ("1.2.4", 0)]
    generation = queued[0][1]
    record = tmp_path / "results" / "1.2.3" / f"{generation}.json"
    record.parent.mkdir(parents=True)
    record.write_text(_json.dumps({"status": "sent", "sr": ["1.2.3", "4.5", "1.2.840.10008.5.1.4.1.1.88.33", "6.7"]}))

    queued.clear()
    restarted = StudyAssembler(tmp_path, 1.0, lambda uid, gen: queued.append((uid, gen)), clock=lambda: clock[0])
    restarted.recover()
    assert [uid for uid, _ in queued] == ["1.2.4"]  # the finished study stays finished
    assert restarted.get("1.2.3").state == "done"
    assert restarted.get("1.2.3").sr_refs[0][3] == "6.7"


def test_a_route_can_set_its_own_quiet_period(tmp_path) -> None:
    """quiet_period_for pre-routes a study: a short period for one study does not shorten another's."""
    from daemon.assemble.assembler import StudyAssembler
    from daemon.receive.spool import InstanceEvent

    queued: list[str] = []
    clock = [0.0]
    asm = StudyAssembler(tmp_path, 10.0, lambda uid, gen: queued.append(uid), clock=lambda: clock[0],
                         quiet_period_for=lambda st: 1.0 if st.study_uid == "1.2.5" else None)
    for study in ("1.2.5", "1.2.6"):
        path = tmp_path / "incoming" / study / "1.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        asm.instance_received(InstanceEvent(study_uid=study, series_uid="1.1", sop_instance_uid=f"{study}.1",
                                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1", path=path,
                                            calling_ae="STORESCU", assoc_id=study))
        asm.association_closed(study)
    clock[0] = 2.0
    asm.poll()
    assert queued == ["1.2.5"]          # its route waits 1 s
    clock[0] = 11.0
    asm.poll()
    assert queued == ["1.2.5", "1.2.6"]  # the global 10 s for the other


def test_state_file_follows_memory_at_the_next_tick_and_a_crash_before_it_loses_nothing(tmp_path: Path) -> None:
    """Instances of a receiving study reach the state file at the next poll, not before their C-STORE response;
    a crash in between is repaired by adopting the spooled files, with their calling AE."""
    spool = Spool(tmp_path, is_own_output=False)
    clock, queue = Clock(), Queue()
    asm = StudyAssembler(tmp_path, QUIET, queue, clock=clock)
    first = make_dx(tmp_path / "1.dcm")
    second = make_dx(tmp_path / "2.dcm", study_uid=first.StudyInstanceUID)
    asm.instance_received(spool.store_file(tmp_path / "1.dcm", "MOD1", "a1"))
    asm.poll()
    state_path = tmp_path / "studies" / f"{first.StudyInstanceUID}.json"
    assert set(json.loads(state_path.read_text())["instances"]) == {first.SOPInstanceUID}

    asm.instance_received(spool.store_file(tmp_path / "2.dcm", "MOD1", "a1"))
    assert set(json.loads(state_path.read_text())["instances"]) == {first.SOPInstanceUID}  # lags until the tick

    restarted = StudyAssembler(tmp_path, QUIET, Queue(), clock=clock)  # the crash: memory lost
    restarted.recover()
    st = restarted.get(first.StudyInstanceUID)
    assert st is not None and set(st.instances) == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert st.instances[second.SOPInstanceUID].calling_ae == "MOD1"

    asm.save_pending()
    assert set(json.loads(state_path.read_text())["instances"]) == {first.SOPInstanceUID, second.SOPInstanceUID}


def test_reopening_a_finished_study_is_written_at_once(env, tmp_path: Path) -> None:
    """A late instance that re-opens a finished study is on disk before its C-STORE response: a restart could not
    tell a re-sent instance of a failed study from an old one."""
    asm, clock, queue = env
    study = generate_uid()
    sop = generate_uid()
    asm.instance_received(event(study, sop=sop))
    asm.association_closed("a1")
    clock.t += QUIET
    assert asm.poll() == [(study, 1)]
    asm.mark_failed(study, 1, "boom")
    asm.instance_received(event(study, assoc="a2", sop=sop))
    state = json.loads((tmp_path / "studies" / f"{study}.json").read_text())
    assert state["generation"] == 2 and state["state"] == "receiving"


def test_state_json_is_what_asdict_gives_and_reads_back() -> None:
    """The hand-built JSON of a study state (faster than ``dataclasses.asdict``) has every field asdict has."""
    from dataclasses import asdict

    from daemon.assemble.assembler import InstanceRecord, StudyState

    state = StudyState("1.2.3", instances={f"1.2.3.{i}": InstanceRecord(f"/spool/{i}.dcm", "1.2.4", "1.2.840.10008.5.1.4.1.1.1",
                                                                      "MODALITY", 1700000000.0 + i) for i in range(3)},
                       calling_ae="MODALITY", open_associations=["a1"], sr_refs=[("1.2.3", "1.2.5", "1.2.840", "1.2.6")],
                       queued_at=1.5, accession_number="ACC1")
    expected = {**asdict(state), "sr_refs": [list(ref) for ref in state.sr_refs], "version": 1}
    assert state.to_json() == expected
    assert StudyState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_a_slow_state_write_does_not_hold_up_the_listener(env, monkeypatch) -> None:
    """The poller's flush of lagging state files runs outside the lock every C-STORE handler takes.

    The disk is made slow (its directory flush waits on an event): while the poller is stuck in it, another
    study's instance must still be recorded, which it could not be if the write held the assembler's lock.
    """
    import daemon.store.atomic as writer_module  # the assembler's state writes go through it

    asm, _, _ = env
    entered, release = threading.Event(), threading.Event()
    real_fsync_dir = writer_module.fsync_dir

    def slow_fsync_dir(path: Path) -> None:
        entered.set()
        assert release.wait(10)
        real_fsync_dir(path)

    first, second = generate_uid(), generate_uid()
    asm.instance_received(event(first))
    monkeypatch.setattr(writer_module, "fsync_dir", slow_fsync_dir)
    poller = threading.Thread(target=asm.save_pending)
    poller.start()
    try:
        assert entered.wait(10)
        handler = threading.Thread(target=asm.instance_received, args=(event(second, assoc="a2"),))
        handler.start()
        handler.join(5)
        assert not handler.is_alive(), "the listener waited on the poller's disk write"
        assert asm.get(second) is not None
    finally:
        release.set()
        poller.join(10)
    monkeypatch.setattr(writer_module, "fsync_dir", real_fsync_dir)
    assert json.loads((asm.studies_dir / f"{first}.json").read_text())["study_uid"] == first
    assert asm.save_pending() == 1  # the second study, recorded while the first was being written
    assert (asm.studies_dir / f"{second}.json").exists()


def test_a_state_snapshot_older_than_the_file_is_never_written(env) -> None:
    """Two writers of one study (the poller and a worker's result) may finish in either order: the newer wins."""
    asm, _, _ = env
    study = generate_uid()
    asm.instance_received(event(study))
    with asm._lock:
        older = asm._snapshot(asm._studies[study])
        asm._studies[study].accession_number = "NEWER"
        newer = asm._snapshot(asm._studies[study])
    asm._write(newer)
    asm._write(older)  # arrives late: dropped
    assert json.loads((asm.studies_dir / f"{study}.json").read_text())["accession_number"] == "NEWER"
    assert StudyAssembler(asm.data_dir, QUIET, Queue()).get(study).accession_number == "NEWER"


def test_a_study_whose_state_cannot_be_written_is_not_enqueued_and_is_tried_again(env, monkeypatch) -> None:
    """"Queued" must be on disk before the enqueue: a failed write keeps that study receiving, not the others."""
    asm, clock, queue = env
    good, bad = generate_uid(), generate_uid()
    for study in (good, bad):
        asm.instance_received(event(study, assoc=study))
        asm.association_closed(study)
    asm.save_pending()
    clock.t += QUIET + 1
    real_write = asm._write

    def failing_write(snapshot) -> None:
        if snapshot.study_uid == bad:
            raise OSError(5, "Input/output error")
        real_write(snapshot)

    monkeypatch.setattr(asm, "_write", failing_write)
    assert asm.poll() == [(good, 1)] and queue.items == [(good, 1)]
    assert asm.get(bad).state == "receiving"
    monkeypatch.setattr(asm, "_write", real_write)  # the disk is back
    assert asm.poll() == [(bad, 1)]
    assert json.loads((asm.studies_dir / f"{bad}.json").read_text())["state"] == "queued"


def test_study_state_reads_back_what_it_writes(tmp_path: Path) -> None:
    """The typed state file (issue 26): write, read, same state; where it lives is the data directory's layout."""
    from daemon.assemble.assembler import InstanceRecord, StudyState

    state = StudyState("1.2.3", state="queued", generation=2, calling_ae="MODALITY", first_received_at=1.0,
                       last_instance_at=2.0, instances={"1.2.3.4": InstanceRecord("p.dcm", "1.2.3.5", "1.2.840", "M",
                                                                                    1.5)},
                       sr_refs=[("a", "b", "c", "d")], accession_number="ACC")
    path = StudyState.path(tmp_path, "1.2.3")
    assert path == tmp_path / "studies" / "1.2.3.json"
    state.write(path)
    assert StudyState.read(path) == state
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError):
        StudyState.read(path)
