"""Process orchestration: ``serve`` (all on one machine), ``listen`` and ``worker`` (split across machines).

``serve`` is the install-and-go mode: it starts the embedded Redis (unless the config names an external broker),
the listener with its study assembler in this process, and the Celery worker as a supervised child process that
is restarted if it dies. Keeping the worker in its own process means a model that crashes or runs out of memory
takes down only the worker; the listener keeps acknowledging instances, and the unacknowledged task comes back.

Results leave through a dispatch worker of their own (queue ``dispatch``, :func:`daemon.queue.celery_tasks.deliver_result`),
a second supervised child beside the analysis worker(s), which consume only ``studies``. A separate process rather
than one worker on both queues, because a try to a PACS that accepts the connection and then says nothing can
hold its slot for a whole network timeout, and that slot must not be the one analysis needs; the dispatch worker
loads no models (about a tenth of an analysis worker's memory) and runs a few deliveries at once in threads, so
one hung destination does not hold up the others. ``bonebridge worker --queues`` runs either half alone.
"""


from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from daemon.assemble.assembler import StudyAssembler, StudyState
from daemon.queue.broker import EmbeddedRedis
from daemon.ops.children import WORKER_PARENT_DEATH_SIGNAL, die_with_parent, stop_orphaned_workers
from daemon.config.schema import Config, load_config
from daemon.receive.listener import start_listener
from daemon.ops.logformat import FloodGuard, SafeFormatter
from daemon.ops.metrics import INSTANCES_RECEIVED, STUDIES_QUEUED, start_metrics
from daemon.ops.status_page import start_status_page
from daemon.analyse.rules import route_by_tags
from daemon.receive.spool import InstanceEvent, Spool
from daemon.store.layout import DataDir

LOGGER = logging.getLogger(__name__)


def setup_logging(level: str = "INFO") -> None:
    """One line per record on stderr; control characters a peer sent are escaped (:mod:`daemon.ops.logformat`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    handler.addFilter(FloodGuard())
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def log_route_status(config: Config) -> None:
    for route, reason in config.route_status().items():
        if reason:
            LOGGER.warning("route %r is DISABLED: %s (its studies get a 'not processed' report)", route, reason)
        else:
            LOGGER.info("route %r enabled", route)


class ReceivingSide:
    """The receiving half: spool, assembler, DICOM server, and the poller that enqueues complete studies.

    Not the DICOM listener itself (that is :class:`daemon.receive.listener.ListenerAE`): this wires it to the spool
    and the assembler, which is why it lives here beside the worker's half and not in ``daemon/receive``.
    """

    def __init__(self, config: Config, broker_url: str) -> None:
        from daemon.queue.celery_tasks import configure_app, process_study

        configure_app(config, broker_url)
        self.config = config
        self.data_dir = Path(config.storage.data_dir)
        self.spool = Spool(self.data_dir, min_free_bytes=config.storage.min_free_mb * 2**20)
        removed = self.spool.clean_tmp()
        if removed:
            LOGGER.warning("removed %d partial files left by an earlier crash (never acknowledged)", removed)
        self._process_study = process_study
        self._quiet_periods: dict[tuple[str, int], float | None] = {}
        self._route_status = config.route_status()
        per_route = any(route.quiet_period_s is not None for route in config.routes)
        self.assembler = StudyAssembler(self.data_dir, config.assembly.quiet_period_s, self._enqueue,
                                        quiet_period_for=self._quiet_period if per_route else None)
        self.stop_event = threading.Event()
        self.server = None
        self.status_server = None

    def _quiet_period(self, study: StudyState) -> float | None:
        """The quiet period of the route the study's header points to (read once per study generation).

        Routing proper happens in the worker, after the anatomy model; here only the DICOM tags can say which
        route a study is heading for, which is enough to choose how long to wait for more of its images.
        """
        key = (study.study_uid, study.generation)
        if key not in self._quiet_periods:
            first = next(iter(study.instances.values()))
            header = pydicom.dcmread(first.path, stop_before_pixels=True)
            route = route_by_tags(self.config, header, study.calling_ae, self._route_status).decision.route
            self._quiet_periods[key] = route.quiet_period_s if route is not None else None
        return self._quiet_periods[key]

    def _enqueue(self, study_uid: str, generation: int) -> None:
        self._process_study.apply_async((study_uid, generation))
        STUDIES_QUEUED.inc()
        LOGGER.info("study %s generation %d complete: queued", study_uid, generation)

    def _on_instance(self, event: InstanceEvent) -> None:
        self.assembler.instance_received(event)
        INSTANCES_RECEIVED.labels(event.calling_ae or "").inc()

    def start(self) -> None:
        recovered = self.assembler.recover()
        if recovered:
            LOGGER.info("re-queued %d studies left queued by an earlier run", len(recovered))
        self.requeue_deliveries()
        self.server = start_listener(self.config.listener, self.spool, self._on_instance,
                                     self.assembler.association_closed)
        self.assembler.run_poller(self.stop_event, interval_s=0.2)
        start_metrics(self.config.metrics.host, self.config.metrics.port, self.assembler, self.data_dir,
                      self.config.destinations)
        self.status_server = start_status_page(self.config.status.host, self.config.status.port, self.config,
                                               self.data_dir)
        LOGGER.info("listening as %s on %s:%d", self.config.listener.ae_title, self.config.listener.host,
                    self.config.listener.port)

    def requeue_deliveries(self) -> int:
        """Every delivery waiting on disk (``dispatch/pending``) back on the ``dispatch`` queue, each at its next try.

        Redis may have lost it (its last second of writes, or a restart), or hold it unacknowledged by a worker
        that was killed until the visibility timeout: either way it goes now. A copy that arrives later finds
        nothing pending and does nothing (:meth:`daemon.queue.celery_tasks.WorkerRuntime.deliver`).
        """
        from daemon.dispatch.dispatch_queue import DispatchQueue
        from daemon.queue.celery_tasks import DISPATCH_QUEUE, deliver_result

        now, count = time.time(), 0
        for entry in DispatchQueue(self.data_dir).pending():
            next_try = entry.get("next_try_at") or now
            try:
                deliver_result.apply_async((entry["study_uid"], int(entry["generation"]), entry["destination"]),
                                           queue=DISPATCH_QUEUE, retries=int(entry.get("attempts", 0)),
                                           countdown=max(0.0, float(next_try) - now))
                count += 1
            except Exception:  # noqa: BLE001 - the next restart tries again; the file stays
                LOGGER.exception("could not re-queue the delivery of %s to %s", entry.get("label"),
                                 entry.get("destination"))
        if count:
            LOGGER.info("re-queued %d result deliveries waiting on disk", count)
        return count

    def stop(self) -> None:
        self.stop_event.set()
        if self.server is not None:
            self.server.shutdown()
        self.assembler.save_pending()
        if self.status_server is not None:
            self.status_server.shutdown()


class SupervisedWorker:
    """A ``bonebridge worker`` child process, restarted when it exits."""

    def __init__(self, config_path: Path, broker_url: str, run_dir: Path, share_of_cpus: int = 1,
                 queues: str = "studies") -> None:
        # serve's --log-level reaches its workers (and through them Celery's), so DEBUG means DEBUG everywhere
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self.args = [sys.executable, "-m", "daemon.cli", "--log-level", level, "worker", "--config", str(config_path),
                     "--broker", broker_url, "--queues", queues]
        self.env = dict(os.environ)
        if share_of_cpus > 1 and "BONEBRIDGE_TORCH_THREADS" not in self.env:
            # N workers x all cores each would oversubscribe the CPU; OpenMP threads then wait on each other
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            self.env["BONEBRIDGE_TORCH_THREADS"] = str(max(1, cpus // share_of_cpus))
        self.pid_file = run_dir / "worker.pid"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, env=self.env,
                                        preexec_fn=die_with_parent(WORKER_PARENT_DEATH_SIGNAL))
        self.pid_file.write_text(str(self.process.pid))
        LOGGER.info("worker started (pid %d)", self.process.pid)

    def supervise(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            self.restarts += 1
            LOGGER.error("worker exited with %s; restarting (restart %d)", self.process.returncode, self.restarts)
            self.start()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # Celery warm shutdown: finish or hand back the task
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Stop:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        LOGGER.info("signal %d: shutting down", signum)
        self.requested = True


def _broker(config: Config) -> tuple[str, EmbeddedRedis | None]:
    if config.broker != "embedded":
        return config.broker, None
    redis_server = EmbeddedRedis(Path(config.storage.data_dir))
    redis_server.start()
    return redis_server.url, redis_server


def _start_demo_pacs(config: Config, run_dir: Path):
    """``--demo``: Orthanc as the config's local destination; its web address logged and in ``run/demo-pacs.url``."""
    from daemon.ops.demo_pacs import DemoPacs, demo_destination

    name, dest = demo_destination(config)
    pacs = DemoPacs(DataDir(config.storage.data_dir).demo_pacs, dest.ae_title, int(dest.port)).start()
    (run_dir / "demo-pacs.url").write_text(pacs.url + "\n")
    LOGGER.info("demo mode: destination %r is a private Orthanc; open %s to see the studies and their results",
                name, pacs.url)
    print(f"Demo PACS (Orthanc, destination {name!r}): {pacs.url}", flush=True)
    return pacs


def serve(config_path: Path, workers: int = 1, demo: bool = False) -> int:
    config = load_config(config_path)
    data_dir = Path(config.storage.data_dir)
    run_dir = DataDir(data_dir).run
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = _Stop()
    demo_pacs = None
    broker_url, embedded = _broker(config)  # refuses to start beside a live serve of this data directory
    log_route_status(config)  # after the refusal, so a refused serve prints its one line only
    stop_orphaned_workers(run_dir)  # so no worker of a dead serve shares the new broker
    (run_dir / "broker.url").write_text(broker_url)
    listener = ReceivingSide(config, broker_url)
    pool = [SupervisedWorker(config_path, broker_url, run_dir, max(1, workers)) for _ in range(max(1, workers))]
    if workers > 1:
        for i, worker in enumerate(pool):
            worker.pid_file = run_dir / f"worker-{i}.pid"
    dispatcher = SupervisedWorker(config_path, broker_url, run_dir, queues="dispatch")
    dispatcher.pid_file = run_dir / "worker-dispatch.pid"
    pool.append(dispatcher)  # supervised, restarted and stopped like the others
    try:
        if demo:
            demo_pacs = _start_demo_pacs(config, run_dir)
        for worker in pool:
            worker.start()
        listener.start()
        (run_dir / "serve.pid").write_text(str(os.getpid()))
        while not stop.requested:
            time.sleep(0.5)
            if stop.requested:
                break  # a worker that exits because of the same signal must not be restarted
            if embedded is not None and embedded.supervise():
                # Its last second of writes may be lost: the assembler's state says what must be queued.
                listener.assembler.requeue_unfinished()
                listener.requeue_deliveries()
            for worker in pool:
                worker.supervise()
    finally:
        listener.stop()
        for worker in pool:
            worker.stop()
        if embedded is not None:
            embedded.stop()
        if demo_pacs is not None:
            demo_pacs.stop()
    return 0


def listen(config_path: Path) -> int:
    config = load_config(config_path)
    if config.broker == "embedded":
        LOGGER.error("`bonebridge listen` runs beside workers on other machines and needs a shared broker: "
                     "set `broker: redis://HOST:6379/0` (or use `bonebridge serve` on one machine)")
        return 2
    log_route_status(config)
    stop = _Stop()
    listener = ReceivingSide(config, config.broker)
    listener.start()
    try:
        while not stop.requested:
            time.sleep(0.5)
    finally:
        listener.stop()
    return 0


def worker(config_path: Path, broker_url: str | None = None, concurrency: int | None = None,
           queues: str = "studies,dispatch") -> int:
    config = load_config(config_path)
    url = broker_url or config.broker
    if url == "embedded":
        LOGGER.error("`bonebridge worker` needs a broker URL: set `broker: redis://HOST:6379/0`")
        return 2
    from daemon.queue.celery_tasks import DISPATCH_QUEUE, QUEUE, WorkerRuntime, configure_app

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in (QUEUE, DISPATCH_QUEUE)]
    if not names or unknown:
        LOGGER.error("--queues takes %s, %s or both (comma-separated); got %r", QUEUE, DISPATCH_QUEUE, queues)
        return 2
    dispatch_only = names == [DISPATCH_QUEUE]
    if concurrency is None:
        concurrency = 4 if dispatch_only else 1  # deliveries wait on the network, not the CPU: a few at once
    os.environ["BONEBRIDGE_CONFIG"] = str(Path(config_path).resolve())
    app = configure_app(config, url)
    runtime = WorkerRuntime.get()  # load the config (and fail early) before taking any task
    if QUEUE in names:
        LOGGER.info("models loaded: %s", ", ".join(runtime.analyser.warm_up()) or "none")
    else:
        LOGGER.info("dispatch worker: delivers results to %s", ", ".join(runtime.config.destinations) or "nowhere")
    ready_file = DataDir(config.storage.data_dir).run / f"worker-{os.getpid()}.ready"

    @worker_ready.connect(weak=False)
    def _announce_ready(**_: object) -> None:
        """Tell supervisors (and tests) that this worker has its models loaded and consumes the queue."""
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        ready_file.write_text(str(time.time()))

    @worker_shutdown.connect(weak=False)
    def _withdraw_ready(**_: object) -> None:
        ready_file.unlink(missing_ok=True)

    pool = "threads" if dispatch_only else ("solo" if concurrency == 1 else "prefork")
    if pool == "prefork":
        @worker_process_init.connect(weak=False)
        def _prepare_in_child(**_: object) -> None:
            """A forked child has the parent's models but not their ONNX Runtime thread pools: build its own
            sessions before its first study (``models.inference.onnx_features``)."""
            runtime.analyser.warm_up()

    argv = ["worker", "--loglevel", logging.getLevelName(logging.getLogger().getEffectiveLevel()), "-Q", ",".join(names), "--pool", pool,
            "--concurrency", str(concurrency), "--without-gossip", "--without-mingle", "--hostname",
            f"bonebridge-{'dispatch-' if dispatch_only else ''}{os.getpid()}@%h"]
    app.worker_main(argv)
    return 0
