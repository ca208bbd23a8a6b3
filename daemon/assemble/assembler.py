"""Study assembler: decides when a study has fully arrived, and remembers it across restarts.

DICOM has no "end of study" message. Senders spread a study over one or many associations, and
late images (a repeat view, a forgotten series) arrive minutes later. mercure waits on folder
timestamps for 60-900 s; we know more: which associations are still open. A study is *complete*
when none of the associations that delivered it is open any more and ``quiet_period_s`` (seconds)
has passed since its last instance. Completion enqueues one task ``(study_uid, generation)``.

An instance that arrives after completion re-opens the study with ``generation + 1``; the SR
references reported for earlier generations are kept so the next report can name them as
predecessors. Duplicates of instances already processed (a sender's blind retry) do not re-open a
finished study: they change nothing. An instance re-sent with *other* content under the same UID does: the spool
kept the earlier file (``InstanceEvent.superseded``) and the new generation's report supersedes the old one.

State lives in ``data_dir/studies/<study_uid>.json``, each write atomic (tmp + fsync + rename), so
:meth:`StudyAssembler.recover` can resume after a crash: studies that were receiving get a fresh
quiet period (the crash closed their associations), studies that were queued are enqueued again
(tasks are idempotent), and instances found in the spool but missing from the state (a crash between
the file rename and the state write) are adopted.

Because of that adoption, an instance added to a study that is already receiving does not have to reach the
state file before its C-STORE response: the spooled file itself is the durable record. Such changes are written
by the poller (every few hundred milliseconds) and always before the study is enqueued, which takes two fsyncs
and a rename off every instance's critical path. Changes a restart could not rebuild from the spool (a finished
study re-opened as a new generation) are written at once.

Writes happen outside the lock that guards the in-memory state: the state is serialised under it (a snapshot
with a per-study version) and written after it is released, so the listener's threads, which take that lock
for every instance, never wait on a disk flush the poller started. Writes of one study are serialised by their
own lock and a snapshot older than the one already on disk is dropped, so the file never goes back in time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from daemon.receive.spool import InstanceEvent, SpoolError, describe_spooled, is_valid_uid
from daemon.store.atomic import write_text_atomic
from daemon.store.layout import DataDir
from daemon.store.outcome_record import OutcomeRecord

LOGGER = logging.getLogger(__name__)

StudyStateName = Literal["receiving", "queued", "done", "failed"]
SRRef = tuple[str, str, str, str]  # (study, series, SOP class, SOP instance) of a report we sent

_STATE_VERSION = 1


@dataclass(frozen=True)
class _Snapshot:
    """A study's state serialised under the assembler's lock, to be written after it is released."""

    study_uid: str
    version: int
    text: str


@dataclass
class InstanceRecord:
    """One instance of a study, as the worker needs to find it."""

    path: str
    series_uid: str
    sop_class_uid: str
    calling_ae: str
    received_at: float


@dataclass
class StudyState:
    """Everything the assembler knows about one study (the JSON file, typed)."""

    study_uid: str
    state: StudyStateName = "receiving"
    generation: int = 1
    instances: dict[str, InstanceRecord] = field(default_factory=dict)  # SOP Instance UID -> record
    calling_ae: str | None = None  # the caller of the first instance (routes can match on it)
    first_received_at: float = 0.0
    last_instance_at: float = 0.0  # the quiet period counts from here
    open_associations: list[str] = field(default_factory=list)
    sr_refs: list[SRRef] = field(default_factory=list)  # reports sent for earlier generations
    queued_at: float | None = None
    finished_at: float | None = None
    failure_reason: str | None = None
    accession_number: str = ""  # the first instance's, so the status page can find the study by it

    def to_json(self) -> dict[str, Any]:
        """The state as plain JSON types, built field by field: ``dataclasses.asdict`` deep-copies recursively and
        was most of the assembler's time while a study of hundreds of instances streamed in (it is saved at every
        tick of the poller, under the lock the C-STORE handlers wait for)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["instances"] = {uid: dict(vars(record)) for uid, record in self.instances.items()}
        data["open_associations"] = list(self.open_associations)
        data["sr_refs"] = [list(ref) for ref in self.sr_refs]
        data["version"] = _STATE_VERSION
        return data

    @staticmethod
    def path(data_dir: Path, study_uid: str) -> Path:
        """Where a study's state lives: ``data_dir/studies/<study_uid>.json`` (:class:`DataDir`)."""
        return DataDir(data_dir).studies / f"{study_uid}.json"

    @classmethod
    def read(cls, path: Path) -> StudyState:
        """A state file read back (``OSError``, ``ValueError`` or ``TypeError`` for one that cannot be)."""
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def write(self, path: Path) -> None:
        """Write this state atomically (write, fsync, rename, fsync the folder). The assembler itself writes
        versioned snapshots made under its lock (:meth:`StudyAssembler._write`); this is for tools and tests."""
        write_text_atomic(Path(path), json.dumps(self.to_json(), sort_keys=True))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudyState:
        data = dict(data)
        data.pop("version", None)
        data["instances"] = {k: InstanceRecord(**v) for k, v in data.get("instances", {}).items()}
        data["sr_refs"] = [tuple(ref) for ref in data.get("sr_refs", [])]
        data["open_associations"] = list(data.get("open_associations", []))
        return cls(**data)


class StudyAssembler:
    """Groups instances into studies and enqueues each study once it is complete.

    Thread-safe: the listener calls :meth:`instance_received` / :meth:`association_closed` from
    association threads while a poller thread calls :meth:`poll` and workers report back through
    :meth:`mark_done` / :meth:`mark_failed`. ``enqueue`` is called without the lock held.
    """

    def __init__(
        self,
        data_dir: str | Path,
        quiet_period_s: float,
        enqueue: Callable[[str, int], None],
        *,
        clock: Callable[[], float] = time.time,
        quiet_period_for: Callable[[StudyState], float | None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.studies_dir = DataDir(self.data_dir).studies
        self.incoming_dir = DataDir(self.data_dir).incoming
        self.studies_dir.mkdir(parents=True, exist_ok=True)
        self.quiet_period_s = float(quiet_period_s)
        self._enqueue = enqueue
        self._clock = clock
        # Per-route quiet periods: the caller pre-routes a study on its header; None means the global value.
        self._quiet_period_for = quiet_period_for
        self._lock = threading.RLock()
        # Serialises state-file writes; taken after self._lock when both are held, never the other way round.
        self._write_lock = threading.Lock()
        self._versions: dict[str, int] = {}  # last snapshot taken of each study (under self._lock)
        self._written: dict[str, int] = {}  # last snapshot on disk (under self._write_lock)
        self._studies: dict[str, StudyState] = {}
        self._by_assoc: dict[str, set[str]] = {}
        self._unsaved: set[str] = set()  # studies whose state file lags behind memory (see the module docstring)
        self._load()

    # -- listener side --------------------------------------------------------------------------

    def instance_received(self, ev: InstanceEvent) -> None:
        """Record an instance that is durably in the spool (called before the C-STORE response)."""
        if ev.own_output:
            LOGGER.info("ignoring our own output %s of study %s", ev.sop_instance_uid, ev.study_uid)
            return
        now = self._clock()
        snapshot: _Snapshot | None = None
        with self._lock:
            st = self._studies.get(ev.study_uid)
            reopened = False
            if st is None:
                st = StudyState(study_uid=ev.study_uid, calling_ae=ev.calling_ae or None, first_received_at=now,
                                accession_number=ev.accession_number)
                self._studies[ev.study_uid] = st
                LOGGER.info("study %s: first instance from %s", ev.study_uid, ev.calling_ae)
            elif st.state != "receiving":
                if ev.sop_instance_uid in st.instances and st.state != "failed" and not ev.superseded:
                    LOGGER.info(
                        "study %s: duplicate of %s after %s; nothing new, not re-opening",
                        ev.study_uid,
                        ev.sop_instance_uid,
                        st.state,
                    )
                    return
                st.generation += 1
                if ev.superseded:  # other content under a UID already reported on: the report must be redone
                    LOGGER.warning(
                        "study %s: instance %s re-sent with other content after %s (the earlier file is kept as "
                        "%s); re-opened as generation %d, whose report supersedes the earlier one",
                        ev.study_uid, ev.sop_instance_uid, st.state, ev.superseded, st.generation,
                    )
                else:
                    LOGGER.info(
                        "study %s: late instance after %s; re-opened as generation %d",
                        ev.study_uid,
                        st.state,
                        st.generation,
                    )
                st.state = "receiving"
                st.queued_at = st.finished_at = None
                st.failure_reason = None
                reopened = True
            st.instances[ev.sop_instance_uid] = InstanceRecord(
                path=str(ev.path),
                series_uid=ev.series_uid,
                sop_class_uid=ev.sop_class_uid,
                calling_ae=ev.calling_ae,
                received_at=now,
            )
            st.last_instance_at = now
            if ev.assoc_id and ev.assoc_id not in st.open_associations:
                st.open_associations.append(ev.assoc_id)
                self._by_assoc.setdefault(ev.assoc_id, set()).add(ev.study_uid)
            if reopened:
                snapshot = self._snapshot(st)
            else:
                self._unsaved.add(st.study_uid)
        if snapshot is not None:
            self._write(snapshot)  # before the C-STORE response: a restart could not rebuild a new generation

    def association_closed(self, assoc_id: str) -> None:
        """An association ended (released, aborted, or its connection dropped). Idempotent."""
        with self._lock:
            for study_uid in self._by_assoc.pop(assoc_id, set()):
                st = self._studies.get(study_uid)
                if st is not None and assoc_id in st.open_associations:
                    st.open_associations.remove(assoc_id)
                    self._unsaved.add(study_uid)

    def save_pending(self) -> int:
        """Write every state file that lags behind memory; returns how many. The poller calls it."""
        with self._lock:
            pending = [self._snapshot(self._studies[uid]) for uid in sorted(self._unsaved) if uid in self._studies]
        for done, snapshot in enumerate(pending):
            try:
                self._write(snapshot)
            except BaseException:
                with self._lock:  # not on disk: the next poll tries these again
                    self._unsaved.update(s.study_uid for s in pending[done:] if s.study_uid in self._studies)
                raise
        return len(pending)

    # -- completion -----------------------------------------------------------------------------

    def poll(self, now: float | None = None) -> list[tuple[str, int]]:
        """Enqueue every study that became complete; return what was enqueued.

        The state is written as ``queued`` *before* ``enqueue`` runs: a crash in between is
        repaired by :meth:`recover` (re-enqueue; the task is idempotent). If ``enqueue`` raises
        (broker down) the study goes back to ``receiving`` and is tried again on the next poll.
        """
        now = self._clock() if now is None else now
        ready: list[tuple[str, int]] = []
        snapshots: list[_Snapshot] = []
        self.save_pending()
        with self._lock:
            for st in self._studies.values():
                if (
                    st.state == "receiving"
                    and st.instances
                    and not st.open_associations
                    and now - st.last_instance_at >= self._quiet_period(st)
                ):
                    st.state = "queued"
                    st.queued_at = now
                    snapshots.append(self._snapshot(st))
                    ready.append((st.study_uid, st.generation))
        written: list[tuple[str, int]] = []
        for snapshot, (study_uid, generation) in zip(snapshots, ready):
            try:
                self._write(snapshot)  # "queued" is on disk before the enqueue; recover() repairs a crash in between
            except OSError:
                LOGGER.exception("study %s: cannot write its state; it stays receiving and is tried again", study_uid)
                self._back_to_receiving(study_uid, generation, write_now=False)  # the disk failed: do not insist
                continue
            written.append((study_uid, generation))
        enqueued: list[tuple[str, int]] = []
        for study_uid, generation in written:
            try:
                self._enqueue(study_uid, generation)
            except Exception:  # noqa: BLE001 - keep the study, retry on the next poll
                LOGGER.exception("study %s: enqueue failed; will retry", study_uid)
                self._back_to_receiving(study_uid, generation, write_now=True)
                continue
            LOGGER.info("study %s: complete, enqueued generation %d", study_uid, generation)
            enqueued.append((study_uid, generation))
        return enqueued

    def _back_to_receiving(self, study_uid: str, generation: int, *, write_now: bool) -> None:
        """Undo a "queued" whose state write or enqueue failed, so the next poll tries the study again."""
        with self._lock:
            st = self._studies[study_uid]
            if st.state == "queued" and st.generation == generation:
                st.state = "receiving"
                st.queued_at = None
                if write_now:
                    self._save(st)
                else:
                    self._unsaved.add(study_uid)

    def _quiet_period(self, st: StudyState) -> float:
        if self._quiet_period_for is not None:
            try:
                value = self._quiet_period_for(st)
            except Exception:  # noqa: BLE001 - an unreadable header must not stall the study
                LOGGER.exception("study %s: per-route quiet period failed; using the global one", st.study_uid)
                value = None
            if value is not None:
                return float(value)
        return self.quiet_period_s

    def mark_done(self, study_uid: str, generation: int, sr_ref: SRRef | None) -> None:
        """The worker finished *generation*; remember its SR so later reports can supersede it."""
        with self._lock:
            st = self._require(study_uid)
            if sr_ref is not None:
                ref = tuple(str(x) for x in sr_ref)
                if ref not in st.sr_refs:
                    st.sr_refs.append(ref)  # type: ignore[arg-type]
            if st.generation == generation and st.state == "queued":
                st.state = "done"
                st.finished_at = self._clock()
            elif st.generation != generation:
                LOGGER.info(
                    "study %s: generation %d done while generation %d is current; SR kept as predecessor",
                    study_uid,
                    generation,
                    st.generation,
                )
            snapshot = self._snapshot(st)
        self._write(snapshot)

    def mark_failed(self, study_uid: str, generation: int, reason: str) -> None:
        """The worker gave up on *generation* (after its own retries)."""
        with self._lock:
            st = self._require(study_uid)
            if st.generation != generation or st.state != "queued":
                LOGGER.info("study %s: stale failure of generation %d ignored: %s", study_uid, generation, reason)
                return
            st.state = "failed"
            st.failure_reason = reason
            st.finished_at = self._clock()
            LOGGER.error("study %s: generation %d failed: %s", study_uid, generation, reason)
            snapshot = self._snapshot(st)
        self._write(snapshot)

    # -- queries --------------------------------------------------------------------------------

    def get(self, study_uid: str) -> StudyState | None:
        """A copy of the study's state (None if unknown)."""
        with self._lock:
            st = self._studies.get(study_uid)
            return None if st is None else StudyState.from_json(st.to_json())

    def list_instances(self, study_uid: str) -> list[Path]:
        """Paths of the study's instances, in order of arrival."""
        with self._lock:
            st = self._require(study_uid)
            records = sorted(st.instances.values(), key=lambda r: r.received_at)
            return [Path(r.path) for r in records]

    def studies(self) -> list[str]:
        with self._lock:
            return sorted(self._studies)

    # -- restart --------------------------------------------------------------------------------

    def recover(self) -> list[tuple[str, int]]:
        """Resume after a restart. Returns the studies re-enqueued.

        Call it once at start-up, before the listener accepts associations.
        """
        now = self._clock()
        requeue: list[tuple[str, int]] = []
        self._adopt_orphans()
        self.absorb_results()
        with self._lock:
            self._by_assoc.clear()
            for st in self._studies.values():
                if st.state == "receiving":
                    if st.open_associations:
                        LOGGER.info(
                            "study %s: clearing %d association(s) a restart closed",
                            st.study_uid,
                            len(st.open_associations),
                        )
                    st.open_associations = []
                    st.last_instance_at = now
                    self._save(st)
                elif st.state == "queued":
                    requeue.append((st.study_uid, st.generation))
        done: list[tuple[str, int]] = []
        for study_uid, generation in requeue:
            try:
                self._enqueue(study_uid, generation)
                done.append((study_uid, generation))
                LOGGER.info("study %s: re-enqueued generation %d after restart", study_uid, generation)
            except Exception:  # noqa: BLE001
                LOGGER.exception("study %s: re-enqueue failed; it will be retried", study_uid)
                with self._lock:
                    st = self._studies[study_uid]
                    if st.state == "queued" and st.generation == generation:
                        st.state = "receiving"
                        self._save(st)
        return done

    def requeue_unfinished(self) -> list[tuple[str, int]]:
        """Enqueue again every queued study without a result: for when the broker lost what it held.

        An embedded Redis fsyncs its append-only file once a second, so one that dies right after an enqueue can
        come back without that message. The assembler's own state still says ``queued``, so it is the source of
        truth: each such study is enqueued again (the task is idempotent, so a message that did survive costs a
        no-op). Unlike :meth:`recover`, associations still open are left alone.
        """
        self.absorb_results()
        with self._lock:
            queued = [(st.study_uid, st.generation) for st in self._studies.values() if st.state == "queued"]
        done = []
        for study_uid, generation in queued:
            try:
                self._enqueue(study_uid, generation)
                done.append((study_uid, generation))
                LOGGER.warning("study %s: re-enqueued generation %d after the broker restarted", study_uid, generation)
            except Exception:  # noqa: BLE001 - the next broker restart or serve restart tries again
                LOGGER.exception("study %s: re-enqueue after the broker restart failed", study_uid)
        return done

    def absorb_results(self) -> int:
        """Adopt the outcomes workers wrote to ``results/<study>/<generation>.json``.

        Workers run in other processes (or on other machines sharing the data directory), so they report back
        through these files rather than through this object. Without this, every queued study would be
        re-enqueued at each restart. Returns how many studies changed state.
        """
        with self._lock:
            queued = [(uid, st.generation) for uid, st in self._studies.items() if st.state == "queued"]
        changed = 0
        for study_uid, generation in queued:
            path = OutcomeRecord.path(self.data_dir, study_uid, generation)
            if not path.exists():
                continue
            try:
                record = OutcomeRecord.read(path)
            except (OSError, ValueError):  # OutcomeRecordError is a ValueError
                continue  # being written; next poll
            if record.status == "failed":
                self.mark_failed(study_uid, generation, record.reason or "")
            else:
                self.mark_done(study_uid, generation, tuple(record.sr) if record.sr else None)
            changed += 1
        return changed

    def run_poller(self, stop_event: threading.Event, interval_s: float = 0.5) -> threading.Thread:
        """Start a daemon thread that calls :meth:`poll` every *interval_s* until *stop_event*."""

        def loop() -> None:
            while not stop_event.wait(interval_s):
                try:
                    self.absorb_results()
                    self.poll()
                except Exception:  # noqa: BLE001 - the poller must survive a bad study
                    LOGGER.exception("assembler poll failed")

        thread = threading.Thread(target=loop, name="study-assembler-poller", daemon=True)
        thread.start()
        return thread

    # -- persistence ----------------------------------------------------------------------------

    def _state_path(self, study_uid: str) -> Path:
        return StudyState.path(self.data_dir, study_uid)

    def _save(self, st: StudyState) -> None:
        """Write ``st`` now, lock held: for the rare paths (restart, a failed enqueue) where waiting is harmless."""
        self._write(self._snapshot(st))

    def _snapshot(self, st: StudyState) -> _Snapshot:
        """Serialise ``st`` with the next version of its file; the caller holds ``self._lock``."""
        self._unsaved.discard(st.study_uid)
        version = self._versions.get(st.study_uid, 0) + 1
        self._versions[st.study_uid] = version
        # json.dumps without indent takes the C encoder; json.dump and any indent take the pure-Python one.
        return _Snapshot(st.study_uid, version, json.dumps(st.to_json(), sort_keys=True))

    def _write(self, snapshot: _Snapshot) -> None:
        """Atomic replace: a reader (or a crash) sees the old or the new state, never half, and never an older one."""
        with self._write_lock:
            if self._written.get(snapshot.study_uid, 0) >= snapshot.version:
                return  # a later snapshot of this study is already on disk
            path = self._state_path(snapshot.study_uid)
            write_text_atomic(path, snapshot.text)
            self._written[snapshot.study_uid] = snapshot.version

    def _load(self) -> None:
        for tmp in self.studies_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # an interrupted write; the previous state is intact
        for path in sorted(self.studies_dir.glob("*.json")):
            try:
                st = StudyState.read(path)
            except (OSError, ValueError, TypeError) as exc:
                bad = path.with_suffix(".corrupt")
                LOGGER.error("study state %s unreadable (%s); moved to %s", path, exc, bad.name)
                os.replace(path, bad)
                continue
            self._studies[st.study_uid] = st
            for assoc_id in st.open_associations:
                self._by_assoc.setdefault(assoc_id, set()).add(st.study_uid)

    def _adopt_orphans(self) -> None:
        """Record spooled instances the state does not know (crash between rename and state write)."""
        if not self.incoming_dir.is_dir():
            return
        for study_dir in sorted(self.incoming_dir.iterdir()):
            if not study_dir.is_dir() or not is_valid_uid(study_dir.name):
                continue
            with self._lock:
                st = self._studies.get(study_dir.name)
                known = set(st.instances) if st else set()
            for f in sorted(study_dir.glob("*.dcm")):
                if f.stem in known:
                    continue
                try:
                    ev = describe_spooled(f)
                except SpoolError as exc:
                    LOGGER.error("spooled file %s unusable: %s", f, exc.reason)
                    continue
                LOGGER.info("study %s: adopting %s found in the spool", ev.study_uid, f.name)
                self.instance_received(ev)

    def _require(self, study_uid: str) -> StudyState:
        st = self._studies.get(study_uid)
        if st is None:
            raise KeyError(f"unknown study {study_uid}")
        return st
