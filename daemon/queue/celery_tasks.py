"""The Celery side: one task per complete study, and the worker runtime that carries it out.

Delivery guarantees come from three things together:

- the task is acknowledged late (``acks_late``) and rejected back to the queue if its worker dies
  (``reject_on_worker_lost``); with Redis, an unacknowledged message comes back after the visibility timeout;
- the task is idempotent: result UIDs derive from the input instance UIDs, the route and the model versions, so a
  redelivered task re-creates the same SOP instances and the PACS stores each once;
- the outcome is written to ``data_dir/results/<study>/<generation>.json`` once the results are in the outbox,
  and a task that finds that record does not analyse again (it only makes sure the deliveries are queued).

Delivery is a stage of its own (issue 27): ``process_study`` (queue ``studies``) ends with the result files in
``outbox/<study>/<generation>/``, the record saying ``ready-to-send`` and one ``deliver_result`` task per
destination on the queue ``dispatch``. That task tries once; on failure it asks Celery to run it again later
(``self.retry`` with a countdown, exponential with jitter: :func:`daemon.dispatch.dispatcher.retry_countdown`), the
destination's ``retries`` being the one limit; after the last try the files go to the dead-letter folder as before.
A PACS that is down therefore costs an analysis worker nothing: the waiting is a message in Redis.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pydicom
from celery import Celery

from daemon.config.schema import Config, load_config
from daemon.dispatch.destinations import DispatchError
from daemon.dispatch.dispatcher import Dispatcher, retry_countdown
from daemon.dispatch.dispatch_queue import DispatchQueue
from daemon.store.atomic import fsync_dir
from daemon.store.outcome_record import OutcomeRecord
from daemon.store.outcomes import (
    READY_TO_SEND,
    RETRYING,
    SENT,
    WAITING,
    record_dispatch,
    record_path,
    write_record,
)
from daemon.store.layout import DataDir

LOGGER = logging.getLogger(__name__)

QUEUE = "studies"
#: The dispatch stage's queue: ``deliver_result`` tasks only (see the module's docstring).
DISPATCH_QUEUE = "dispatch"
app = Celery("bonebridge")


def configure_app(config: Config, broker_url: str) -> Celery:
    """Point the Celery app at the broker, with the delivery settings above."""
    app.conf.update(
        broker_url=broker_url,
        task_default_queue=QUEUE,
        task_routes={"bonebridge.deliver_result": {"queue": DISPATCH_QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": config.queue.visibility_timeout_s,
            # sweep for orphaned (unacknowledged) messages every few seconds, not every 100
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
        },
    )
    return app


class WorkerRuntime:
    """Per-process state of a worker: the config, the loaded models, the dispatcher."""

    _instance: "WorkerRuntime | None" = None

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_dir = Path(config.storage.data_dir)
        self._analyser = None
        self.dispatcher = Dispatcher(self.data_dir, config.destinations)
        self.queue = DispatchQueue(self.data_dir)

    @property
    def analyser(self):
        """The models, loaded on first use: a worker that only consumes ``dispatch`` never loads them."""
        if self._analyser is None:
            from daemon.analyse.pipeline import Analyser

            self._analyser = Analyser(self.config)
        return self._analyser

    @classmethod
    def get(cls) -> "WorkerRuntime":
        if cls._instance is None:
            path = os.environ.get("BONEBRIDGE_CONFIG")
            if not path:
                raise RuntimeError("BONEBRIDGE_CONFIG is not set: start workers with `bonebridge worker --config PATH`")
            cls._instance = cls(load_config(path))
        return cls._instance

    def record_path(self, study_uid: str, generation: int) -> Path:
        return record_path(self.data_dir, study_uid, generation)

    def predecessors(self, study_uid: str, generation: int) -> list[tuple[str, str, str, str]]:
        """SRs sent for earlier generations of this study: the new report names them as predecessors."""
        refs = []
        folder = DataDir(self.data_dir).results / study_uid
        for path in sorted(folder.glob("*.json")) if folder.exists() else []:
            record = OutcomeRecord.read(path)  # a corrupt one raises (a ValueError): the task retries, as before
            if record.generation < generation and record.sr:
                refs.append(tuple(record.sr))
        return refs

    def calling_ae(self, study_uid: str) -> str | None:
        state = DataDir(self.data_dir).study_state(study_uid)
        try:
            return json.loads(state.read_text()).get("calling_ae")
        except (OSError, ValueError):
            return None

    def process(self, study_uid: str, generation: int) -> OutcomeRecord:
        """Analyse one study generation and send its results; returns (and stores) the outcome record."""
        record_path = self.record_path(study_uid, generation)
        if record_path.exists():
            LOGGER.info("study %s generation %d already analysed: nothing to do but its deliveries", study_uid,
                        generation)
            record = OutcomeRecord.read(record_path)
            self.enqueue_deliveries(record)  # a worker lost between the record and the enqueue
            return record
        began = time.time()
        files = sorted((DataDir(self.data_dir).incoming / study_uid).glob("*.dcm"))
        if not files:
            return self.write_record(record_path, OutcomeRecord(
                study_uid=study_uid, generation=generation, status="failed",
                reason="no instances on disk for this study"))
        LOGGER.info("processing study %s generation %d (%d instances)", study_uid, generation, len(files))
        datasets = [pydicom.dcmread(p) for p in files]
        analysis = self.analyser.analyse(datasets, self.calling_ae(study_uid), self.predecessors(study_uid, generation))
        analysed = time.time()
        _fault_injection_pause()
        record = OutcomeRecord(study_uid=study_uid, generation=generation, route=analysis.result.route,
                               summary=analysis.summary(), status="sent", destinations={})
        if analysis.route is None:
            record.status = "not-processed"
            record.reason = analysis.result.not_processed_reason
        send_to = list(analysis.route.send_to) if analysis.route else []
        self.stage(record, analysis.outputs, send_to, f"{study_uid}-{generation}")
        finished = time.time()
        record.seconds = round(finished - began, 3)
        # when each stage ended (epoch seconds): bench/bench_latency.py splits a study's latency with these;
        # finished_at is the end of analysis (results ready to send), dispatched_at the end of delivery
        record.timing = {"started_at": began, "analysed_at": analysed, "finished_at": finished}
        LOGGER.info("study %s generation %d: %s (route %s) in %.2f s", study_uid, generation, record.status,
                    record.route, record.seconds)
        record = self.write_record(record_path, record)
        self.enqueue_deliveries(record)
        return record

    def report_failure(self, study_uid: str, generation: int, reason: str, attempts: int) -> OutcomeRecord:
        """A study that failed for good still reaches the PACS: a "not processed" SR that names the failure.

        Nothing here may depend on what failed, so no model runs: the headers that can still be read are routed
        on their DICOM tags alone, and the SR goes to that route's destinations, else to
        ``queue.send_failures_to``. The outcome record keeps ``status: failed`` (what the metrics count and an
        alert watches) and says where the report went.
        """
        from daemon.analyse.rules import route_by_tags
        from daemon.output.sr import build_sr
        from daemon.output.study_result import StudyResult

        record = OutcomeRecord(study_uid=study_uid, generation=generation, status="failed", reason=reason,
                               attempts=attempts, destinations={})
        headers = []
        for path in sorted((DataDir(self.data_dir).incoming / study_uid).glob("*.dcm")):
            try:
                headers.append(pydicom.dcmread(path, stop_before_pixels=True))
            except Exception as exc:  # a damaged file is the likely cause; report on the others
                LOGGER.warning("study %s: %s unreadable: %s", study_uid, path.name, exc)
        headers = [ds for ds in headers if "StudyInstanceUID" in ds and str(ds.StudyInstanceUID) == study_uid]
        if not headers:
            record.reason = f"{reason}; no readable instance left to attach a report to"
            return self.write_record(self.record_path(study_uid, generation), record)
        routing = route_by_tags(self.config, headers[0], self.calling_ae(study_uid))
        decision, anatomy = routing.decision, routing.anatomy
        send_to = list(decision.route.send_to) if decision.route else list(self.config.queue.send_failures_to)
        result = StudyResult(
            study_uid=study_uid, route=decision.route.name if decision.route else "failed", anatomy=anatomy,
            anatomy_source=routing.anatomy_source, anatomy_probability=None,
            not_processed_reason=f"analysis failed after {attempts} attempts: {reason}",
            predecessor_sr=self.predecessors(study_uid, generation),
        )
        if not send_to:
            LOGGER.error("study %s failed for good and no destination is set for its report "
                         "(no route matches its tags; set queue.send_failures_to)", study_uid)
        self.stage(record, [build_sr(headers, result)], send_to, f"{study_uid}-{generation}-failed")
        record = self.write_record(self.record_path(study_uid, generation), record)
        self.enqueue_deliveries(record)
        return record

    def give_up(self, study_uid: str, generation: int, reason: str, attempts: int) -> OutcomeRecord:
        """The end of a study that failed for good: a not-processed report, else at least a ``failed`` record.

        Either way the outcome record exists afterwards, so the assembler marks the study failed (the metric
        ``bonebridge_studies{state="failed"}``) and no restart queues it again.
        """
        try:
            return self.report_failure(study_uid, generation, reason, attempts)
        except Exception:  # the report itself failed: the record and the log line still say why
            LOGGER.exception("study %s: the failure report could not be sent either", study_uid)
            return self.write_record(self.record_path(study_uid, generation), OutcomeRecord(
                study_uid=study_uid, generation=generation, status="failed", reason=reason, attempts=attempts,
                destinations={}))

    def stage(self, record: OutcomeRecord, outputs: list, send_to: list[str], label: str) -> None:
        """The end of analysis: ``outputs`` in the study generation's outbox (fsynced), the record ready to send.

        Fills ``record.sr``, ``record.outputs`` and ``record.destinations`` (each ``waiting``); a record
        with somewhere to send becomes ``ready-to-send`` (a ``failed`` one stays failed) and keeps the status it
        takes once delivered. The caller writes the record, then :meth:`enqueue_deliveries`.
        """
        outbox = DataDir(self.data_dir).outbox_folder(record.study_uid, record.generation)
        outbox.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in outputs:
            path = outbox / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            with open(path, "rb") as handle:  # on disk before the record says ready: a crash loses nothing
                os.fsync(handle.fileno())
            paths.append(path)
        if paths:
            fsync_dir(outbox)
        sr = next((ds for ds in outputs if ds.Modality == "SR"), None)
        if sr is not None:
            record.sr = [str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID), str(sr.SOPClassUID), str(sr.SOPInstanceUID)]
        record.outputs = [str(p.relative_to(self.data_dir)) for p in paths]
        record.label = label
        record.ready_at = time.time()
        record.destinations = {dest: WAITING for dest in send_to}
        if send_to and record.status != "failed":
            record.status_if_delivered = record.status  # what it becomes once delivered (or replayed)
            record.status = READY_TO_SEND

    def enqueue_deliveries(self, record: OutcomeRecord) -> list[str]:
        """One ``deliver_result`` task per destination still waiting, each with its pending file written first.

        Safe to call again (a redelivered analysis task, a restart): a pending file that exists keeps its attempts,
        and a task that finds nothing pending does nothing.
        """
        study_uid, generation = record.study_uid, record.generation
        files = [self.data_dir / f for f in record.outputs]
        queued = []
        for dest in record.undelivered():
            self.queue.add(dest, study_uid, generation, files, record.label or f"{study_uid}-{generation}",
                           float(record.ready_at or time.time()))
            deliver_result.apply_async((study_uid, generation, dest), queue=DISPATCH_QUEUE)
            queued.append(dest)
        if queued:
            LOGGER.info("study %s generation %d: ready to send to %s", study_uid, generation, ", ".join(queued))
        return queued

    def deliver(self, study_uid: str, generation: int, destination: str, retries: int) -> float | None:
        """One try of one delivery. Returns the countdown before the next try, or None when it is finished
        (delivered, dead-lettered, or nothing was pending). ``retries`` is Celery's count of earlier runs; the
        pending file's count wins where it is higher (a copy of the task enqueued again after a restart)."""
        with self.queue.lock(destination, study_uid, generation):
            entry = self.queue.read(destination, study_uid, generation)
            if entry is None:
                LOGGER.info("study %s generation %d to %s: nothing pending (already delivered or dead-lettered)",
                            study_uid, generation, destination)
                return None
            before = max(int(retries), int(entry.get("attempts", 0)))
            files = self.queue.files(entry)
            dest = self.config.destinations.get(destination)
            limit = int(dest.retries) if dest is not None else 0
            label = str(entry.get("label", f"{study_uid}-{generation}"))
            try:
                self.dispatcher.attempt(destination, files)
            except DispatchError as exc:
                attempts = before + 1
                if exc.permanent or attempts > limit:
                    dead = self.dispatcher.dead_letter(destination, files, label, exc.reason, attempts,
                                                       outcome=(study_uid, generation), queued_at=entry.get("queued_at"))
                    self.queue.dead_lettered(entry)
                    record_dispatch(self.data_dir, study_uid, generation, destination, f"dead-lettered: {dead}",
                                    attempts=attempts, entry=dead.entry_id, last_error=exc.reason)
                    return None
                countdown = retry_countdown(dest, before)
                LOGGER.warning("%s: attempt %d/%d for %s failed: %s; retry in %.1f s", destination, attempts,
                               limit + 1, label, exc.reason, countdown)
                self.queue.retrying(entry, attempts, time.time() + countdown, exc.reason)
                record_dispatch(self.data_dir, study_uid, generation, destination, RETRYING, attempts=attempts,
                                last_error=exc.reason, next_try_at=time.time() + countdown)
                return countdown
            self.queue.delivered(entry, before + 1)
            LOGGER.info("%s: sent %d file(s) for %s (attempt %d)", destination, len(files), label, before + 1)
            record_dispatch(self.data_dir, study_uid, generation, destination, SENT, attempts=before + 1,
                            delivered_at=time.time())
            return None

    @staticmethod
    def write_record(path: Path, record: OutcomeRecord) -> OutcomeRecord:
        """Write an outcome record atomically: the assembler and ``bonebridge retry`` read it from other processes."""
        return write_record(path, record)


def _fault_injection_pause() -> None:
    """Crash tests set BONEBRIDGE_FAULT_PAUSE_S to hold a task between analysis and sending, to kill it there.

    With BONEBRIDGE_FAULT_MARKER the pause happens once: the first task writes the marker (its pid) and waits; a task
    that finds the marker already there (the worker serve restarted after the test killed the first) goes on, so
    the test measures the recovery and not a second pause.
    """
    pause = float(os.environ.get("BONEBRIDGE_FAULT_PAUSE_S", "0") or 0)
    if pause > 0:
        marker = os.environ.get("BONEBRIDGE_FAULT_MARKER")
        if marker:
            if Path(marker).exists():
                return
            Path(marker).write_text(str(os.getpid()))
        time.sleep(pause)


@app.task(bind=True, name="bonebridge.process_study", acks_late=True, reject_on_worker_lost=True,
          max_retries=None)  # no Celery default (3): the limit is the config's queue.max_retries, passed below
def process_study(self, study_uid: str, generation: int) -> dict:
    runtime = WorkerRuntime.get()
    try:
        return runtime.process(study_uid, generation).to_json()  # a task returns plain JSON, as before
    except Exception as exc:
        queue = runtime.config.queue
        if self.request.retries >= queue.max_retries:
            LOGGER.exception("study %s generation %d failed for good after %d attempts; sending a not-processed "
                             "report", study_uid, generation, self.request.retries + 1)
            return runtime.give_up(study_uid, generation, f"{type(exc).__name__}: {exc}",
                                   self.request.retries + 1).to_json()
        countdown = queue.retry_backoff_s * (2 ** self.request.retries)
        LOGGER.warning("study %s generation %d: %s; retry %d of %d in %.1f s", study_uid, generation, exc,
                       self.request.retries + 1, queue.max_retries, countdown)
        raise self.retry(exc=exc, countdown=countdown, max_retries=queue.max_retries)


@app.task(bind=True, name="bonebridge.deliver_result", acks_late=True, reject_on_worker_lost=True,
          max_retries=None)  # the limit is the destination's `retries`: deliver() dead-letters after the last try
def deliver_result(self, study_uid: str, generation: int, destination: str) -> None:
    """The dispatch stage: one try to deliver a study generation's results to one destination (queue ``dispatch``).

    On failure Celery runs it again after :func:`daemon.dispatch.dispatcher.retry_countdown` (``self.retry``: a new message with
    a countdown, this one acknowledged), never sleeping in a worker. Idempotent: a copy that finds nothing pending
    does nothing, and re-sending the same SOP instances is harmless to a PACS.
    """
    runtime = WorkerRuntime.get()
    countdown = runtime.deliver(study_uid, generation, destination, self.request.retries)
    if countdown is not None:
        dest = runtime.config.destinations.get(destination)
        raise self.retry(countdown=countdown, max_retries=int(dest.retries) if dest is not None else 0)
