"""Prometheus metrics for ``serve`` and ``listen``: what radiology IT graphs and alerts on.

Counters are incremented where things happen (instances received, studies queued). Gauges are read from the
assembler's state and the data directory at scrape time, so they are right after a restart too: studies per
state, outcomes per status, dead-letter entries waiting for `bonebridge retry`.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from pathlib import Path
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.assemble.assembler import StudyAssembler
from daemon.store.layout import DataDir
from daemon.store.outcome_record import OutcomeRecord

LOGGER = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
INSTANCES_RECEIVED = Counter("bonebridge_instances_received", "Instances stored in the spool and acknowledged",
                             ["calling_ae"], registry=REGISTRY)
STUDIES_QUEUED = Counter("bonebridge_studies_queued", "Complete studies handed to the queue", registry=REGISTRY)


class StateCollector(Collector):
    """Scrape-time gauges from the assembler and the data directory."""

    def __init__(self, assembler: StudyAssembler, data_dir: Path, destinations: dict | None = None) -> None:
        self.assembler = assembler
        self.data_dir = Path(data_dir)
        self.destinations = destinations or {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = GaugeMetricFamily("bonebridge_studies", "Studies known to the assembler, by state", labels=["state"])
        tally = Tally(self.assembler.get(uid).state for uid in self.assembler.studies())
        for state in ("receiving", "queued", "done", "failed"):
            states.add_metric([state], tally.get(state, 0))
        yield states
        outcomes = GaugeMetricFamily("bonebridge_results", "Study outcomes recorded by workers, by status",
                                     labels=["status"])
        statuses: Tally[str] = Tally()
        for path in (DataDir(self.data_dir).results).glob("*/*.json"):
            try:
                statuses[OutcomeRecord.read(path).status] += 1
            except (OSError, ValueError):  # gone, or not an outcome record (OutcomeRecordError): not counted
                continue
        for status, count in statuses.items():
            outcomes.add_metric([status], count)
        yield outcomes
        dead = DataDir(self.data_dir).dead_letter
        entries = sum(1 for p in dead.iterdir() if p.is_dir()) if dead.exists() else 0
        yield GaugeMetricFamily("bonebridge_dead_letter_entries", "Results waiting for `bonebridge retry`",
                                value=entries)
        yield from dispatch_gauges(self.data_dir, self.destinations)


def dispatch_gauges(data_dir: Path, destinations: dict) -> Iterator[GaugeMetricFamily]:
    """The dispatch queue per destination (``daemon.dispatch.dispatch_queue``), the same figures the status page shows.

    ``bonebridge_dispatch_oldest_undelivered_seconds`` is the one to alert on: the age of the oldest result that is
    ready but not in the PACS (waiting, retrying or dead-lettered), 0 when everything is delivered.
    """
    from daemon.dispatch.dispatch_queue import DispatchQueue

    rows = DispatchQueue(data_dir).summary(destinations)
    families = {
        "waiting": GaugeMetricFamily("bonebridge_dispatch_waiting", "Results waiting for their first try, "
                                     "by destination", labels=["destination"]),
        "retrying": GaugeMetricFamily("bonebridge_dispatch_retrying", "Results whose delivery failed and waits "
                                      "for its next try, by destination", labels=["destination"]),
        "next_try_at": GaugeMetricFamily("bonebridge_dispatch_next_try_timestamp_seconds", "When the next retry "
                                         "to the destination is due (Unix time; 0 when none)", labels=["destination"]),
        "delivered_last_hour": GaugeMetricFamily("bonebridge_dispatch_delivered_last_hour", "Results delivered in "
                                                 "the last hour, by destination", labels=["destination"]),
        "dead_lettered": GaugeMetricFamily("bonebridge_dispatch_dead_lettered", "Dead-letter entries, by "
                                           "destination", labels=["destination"]),
        "oldest_undelivered_s": GaugeMetricFamily("bonebridge_dispatch_oldest_undelivered_seconds", "Age of the "
                                                  "oldest result ready but not delivered (waiting, retrying or in the "
                                                  "dead-letter folder), by destination; 0 when none",
                                                  labels=["destination"]),
    }
    for row in rows:
        for key, family in families.items():
            family.add_metric([row["destination"]], float(row[key] or 0))
    yield from families.values()


def start_metrics(host: str, port: int, assembler: StudyAssembler, data_dir: Path,
                  destinations: dict | None = None) -> None:
    if not port:
        return
    REGISTRY.register(StateCollector(assembler, data_dir, destinations))
    start_http_server(port, addr=host, registry=REGISTRY)
    LOGGER.info("Prometheus metrics on http://%s:%d/metrics", host, port)
