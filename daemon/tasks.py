"""The Celery side: one task per complete study, and the worker runtime that carries it out.

Delivery guarantees come from three things together:

- the task is acknowledged late (``acks_late``) and rejected back to the queue if its worker dies
  (``reject_on_worker_lost``); with Redis, an unacknowledged message comes back after the visibility timeout;
- the task is idempotent: result UIDs derive from the input instance UIDs, the route and the model versions, so a
  redelivered task re-creates the same SOP instances and the PACS stores each once;
- the outcome is written to ``data_dir/results/<study>/<generation>.json`` only after the results were sent (or
  dead-lettered), and a task that finds that record does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pydicom
from celery import Celery

from daemon.config import Config, load_config
from daemon.dispatch import DeadLettered, Dispatcher
from daemon.outcomes import STATUS_IF_DELIVERED, record_path, write_record
from daemon.pipeline import Analyser

LOGGER = logging.getLogger(__name__)

QUEUE = "studies"
app = Celery("bonebridge")


def configure_app(config: Config, broker_url: str) -> Celery:
    """Point the Celery app at the broker, with the delivery settings above."""
    app.conf.update(
        broker_url=broker_url,
        task_default_queue=QUEUE,
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
        self.analyser = Analyser(config)
        self.dispatcher = Dispatcher(self.data_dir, config.destinations)

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
        folder = self.data_dir / "results" / study_uid
        for path in sorted(folder.glob("*.json")) if folder.exists() else []:
            record = json.loads(path.read_text())
            if record["generation"] < generation and record.get("sr"):
                refs.append(tuple(record["sr"]))
        return refs

    def calling_ae(self, study_uid: str) -> str | None:
        state = self.data_dir / "studies" / f"{study_uid}.json"
        try:
            return json.loads(state.read_text()).get("calling_ae")
        except (OSError, ValueError):
            return None

    def process(self, study_uid: str, generation: int) -> dict:
        """Analyse one study generation and send its results; returns (and stores) the outcome record."""
        record_path = self.record_path(study_uid, generation)
        if record_path.exists():
            LOGGER.info("study %s generation %d already done: nothing to do", study_uid, generation)
            return json.loads(record_path.read_text())
        began = time.time()
        files = sorted((self.data_dir / "incoming" / study_uid).glob("*.dcm"))
        if not files:
            return self.write_record(record_path, {"status": "failed", "reason": "no instances on disk for this study",
                                             "study_uid": study_uid, "generation": generation})
        LOGGER.info("processing study %s generation %d (%d instances)", study_uid, generation, len(files))
        datasets = [pydicom.dcmread(p) for p in files]
        analysis = self.analyser.analyse(datasets, self.calling_ae(study_uid), self.predecessors(study_uid, generation))
        analysed = time.time()
        _fault_injection_pause()
        record = {
            "study_uid": study_uid, "generation": generation, "route": analysis.result.route,
            "summary": analysis.summary(), "status": "sent", "destinations": {},
        }
        if analysis.route is None:
            record["status"] = "not-processed"
            record["reason"] = analysis.result.not_processed_reason
        send_to = list(analysis.route.send_to) if analysis.route else []
        if self.deliver(record, analysis.outputs, send_to, f"{study_uid}-{generation}"):
            record[STATUS_IF_DELIVERED] = record["status"]  # what `bonebridge retry` restores once it delivers
            record["status"] = "dead-lettered"
        finished = time.time()
        record["seconds"] = round(finished - began, 3)
        # when each stage ended (epoch seconds): bench/bench_latency.py splits a study's latency with these
        record["timing"] = {"started_at": began, "analysed_at": analysed, "finished_at": finished}
        LOGGER.info("study %s generation %d: %s (route %s) in %.2f s", study_uid, generation, record["status"],
                    record["route"], record["seconds"])
        return self.write_record(record_path, record)

    def report_failure(self, study_uid: str, generation: int, reason: str, attempts: int) -> dict:
        """A study that failed for good still reaches the PACS: a "not processed" SR that names the failure.

        Nothing here may depend on what failed, so no model runs: the headers that can still be read are routed
        on their DICOM tags alone, and the SR goes to that route's destinations, else to
        ``queue.send_failures_to``. The outcome record keeps ``status: failed`` (what the metrics count and an
        alert watches) and says where the report went.
        """
        from daemon.anatomy_tags import anatomy_from_tags
        from daemon.results import StudyResult, build_sr
        from daemon.rules import decide_route, facts_from_dataset

        record: dict = {"study_uid": study_uid, "generation": generation, "status": "failed",
                        "reason": reason, "attempts": attempts, "destinations": {}}
        headers = []
        for path in sorted((self.data_dir / "incoming" / study_uid).glob("*.dcm")):
            try:
                headers.append(pydicom.dcmread(path, stop_before_pixels=True))
            except Exception as exc:  # a damaged file is the likely cause; report on the others
                LOGGER.warning("study %s: %s unreadable: %s", study_uid, path.name, exc)
        headers = [ds for ds in headers if "StudyInstanceUID" in ds and str(ds.StudyInstanceUID) == study_uid]
        if not headers:
            record["reason"] += "; no readable instance left to attach a report to"
            return self.write_record(self.record_path(study_uid, generation), record)
        anatomy, evidence = anatomy_from_tags(headers[0])
        decision = decide_route(self.config, facts_from_dataset(headers[0], self.calling_ae(study_uid), anatomy,
                                                                 f"DICOM tags ({evidence})"))
        send_to = list(decision.route.send_to) if decision.route else list(self.config.queue.send_failures_to)
        result = StudyResult(
            study_uid=study_uid, route=decision.route.name if decision.route else "failed", anatomy=anatomy,
            anatomy_source=f"DICOM tags ({evidence})", anatomy_probability=None,
            not_processed_reason=f"analysis failed after {attempts} attempts: {reason}",
            predecessor_sr=self.predecessors(study_uid, generation),
        )
        if not send_to:
            LOGGER.error("study %s failed for good and no destination is set for its report "
                         "(no route matches its tags; set queue.send_failures_to)", study_uid)
        self.deliver(record, [build_sr(headers, result)], send_to, f"{study_uid}-{generation}-failed")
        return self.write_record(self.record_path(study_uid, generation), record)

    def give_up(self, study_uid: str, generation: int, reason: str, attempts: int) -> dict:
        """The end of a study that failed for good: a not-processed report, else at least a ``failed`` record.

        Either way the outcome record exists afterwards, so the assembler marks the study failed (the metric
        ``bonebridge_studies{state="failed"}``) and no restart queues it again.
        """
        try:
            return self.report_failure(study_uid, generation, reason, attempts)
        except Exception:  # the report itself failed: the record and the log line still say why
            LOGGER.exception("study %s: the failure report could not be sent either", study_uid)
            return self.write_record(self.record_path(study_uid, generation), {
                "study_uid": study_uid, "generation": generation, "status": "failed",
                "reason": reason, "attempts": attempts, "destinations": {},
            })

    def deliver(self, record: dict, outputs: list, send_to: list[str], entry: str) -> bool:
        """Write ``outputs`` to the study generation's outbox and send them to each destination.

        Fills ``record["sr"]`` and ``record["destinations"]``; returns True when a destination dead-lettered them.
        """
        outbox = self.data_dir / "outbox" / record["study_uid"] / str(record["generation"])
        outbox.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in outputs:
            path = outbox / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        sr = next((ds for ds in outputs if ds.Modality == "SR"), None)
        if sr is not None:
            record["sr"] = [str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID), str(sr.SOPClassUID), str(sr.SOPInstanceUID)]
        dead_lettered = False
        for dest in send_to:
            try:
                self.dispatcher.send(dest, paths, entry, outcome=(record["study_uid"], int(record["generation"])))
                record["destinations"][dest] = "sent"
            except DeadLettered as exc:
                record["destinations"][dest] = f"dead-lettered: {exc}"
                dead_lettered = True
        return dead_lettered

    @staticmethod
    def write_record(path: Path, record: dict) -> dict:
        """Write an outcome record atomically: the assembler and ``bonebridge retry`` read it from other processes."""
        return write_record(path, record)


def _fault_injection_pause() -> None:
    """Crash tests set BONEBRIDGE_FAULT_PAUSE_S to hold a task between analysis and sending, to kill it there."""
    pause = float(os.environ.get("BONEBRIDGE_FAULT_PAUSE_S", "0") or 0)
    if pause > 0:
        marker = os.environ.get("BONEBRIDGE_FAULT_MARKER")
        if marker:
            Path(marker).write_text(str(os.getpid()))
        time.sleep(pause)


@app.task(bind=True, name="bonebridge.process_study", acks_late=True, reject_on_worker_lost=True,
          max_retries=None)  # no Celery default (3): the limit is the config's queue.max_retries, passed below
def process_study(self, study_uid: str, generation: int) -> dict:
    runtime = WorkerRuntime.get()
    try:
        return runtime.process(study_uid, generation)
    except Exception as exc:
        queue = runtime.config.queue
        if self.request.retries >= queue.max_retries:
            LOGGER.exception("study %s generation %d failed for good after %d attempts; sending a not-processed "
                             "report", study_uid, generation, self.request.retries + 1)
            return runtime.give_up(study_uid, generation, f"{type(exc).__name__}: {exc}", self.request.retries + 1)
        countdown = queue.retry_backoff_s * (2 ** self.request.retries)
        LOGGER.warning("study %s generation %d: %s; retry %d of %d in %.1f s", study_uid, generation, exc,
                       self.request.retries + 1, queue.max_retries, countdown)
        raise self.retry(exc=exc, countdown=countdown, max_retries=queue.max_retries)
