"""Outcome records: ``data_dir/results/<study>/<generation>.json``, what the worker decided and where it went.

The worker writes one per study generation once its results were sent or dead-lettered; the assembler (its
state, the metric ``bonebridge_studies``), the metric ``bonebridge_results{status=...}`` and the status page read
them. ``bonebridge retry`` delivers a dead-lettered result later, in another process, so it updates the record
here too: otherwise the record, the page and the metric would say dead-lettered for ever.

What enters: a study generation, a destination and what happened to it. What leaves: the record, updated under a
lock and written atomically. The record's fields, and how it is read and written, are
:class:`daemon.store.outcome_record.OutcomeRecord` (issue 26); this module holds the read-modify-write cycles that
more than one process runs on the same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon.store.outcome_record import (
    READY_TO_SEND,
    RETRYING,
    SENT,
    STATUS_IF_DELIVERED,
    WAITING,
    Delivery,
    OutcomeRecord,
    OutcomeRecordError,
    Redelivery,
)

__all__ = [
    "READY_TO_SEND", "RETRYING", "SENT", "STATUS_IF_DELIVERED", "WAITING", "OutcomeRecord", "OutcomeRecordError",
    "record_dispatch", "record_lock", "record_path", "record_redelivery", "undelivered", "write_record",
]

LOGGER = logging.getLogger(__name__)


def undelivered(record: OutcomeRecord) -> list[str]:
    """The destinations the dispatch stage has not finished with (waiting or retrying)."""
    return record.undelivered()


@contextlib.contextmanager
def record_lock(data_dir: Path, study_uid: str, generation: int) -> Iterator[None]:
    """Read-modify-write of one outcome record, one process at a time: the dispatch tasks of its destinations and
    ``bonebridge retry`` update the same file (an ``flock`` on a hidden file beside it)."""
    path = record_path(data_dir, study_uid, generation)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.stem}.lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def record_dispatch(data_dir: Path, study_uid: str, generation: int, destination: str, state: str,
                    **fields: Any) -> OutcomeRecord | None:
    """The dispatch stage finished a try for ``destination``: ``state`` is retrying, sent or ``dead-lettered: ...``.

    Once no destination is waiting or retrying the record takes its final status: the one it would have had
    (``sent``, ``not-processed``) when every destination has the results, ``dead-lettered`` when one of them went
    to the dead-letter folder; a ``failed`` record stays failed. ``fields`` go to ``delivery[destination]``
    (:class:`~daemon.store.outcome_record.Delivery`). Returns the record, None when there is none; a record that is
    not one raises :class:`~daemon.store.outcome_record.OutcomeRecordError` (a ValueError).
    """
    path = record_path(data_dir, study_uid, generation)
    with record_lock(data_dir, study_uid, generation):
        try:
            record = OutcomeRecord.read(path)
        except FileNotFoundError:
            LOGGER.warning("study %s generation %d: no outcome record for the delivery to %s", study_uid, generation,
                           destination)
            return None
        record.destinations[destination] = state
        delivery = record.delivery.setdefault(destination, Delivery())
        for name, value in fields.items():
            setattr(delivery, name, value)
        if not record.undelivered() and record.status == READY_TO_SEND:
            if any(v.startswith("dead-lettered") for v in record.destinations.values()):
                record.status = "dead-lettered"  # keeps STATUS_IF_DELIVERED for `bonebridge retry`
            else:
                record.status = record.take_status_if_delivered()
                record.delivered_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            record.timing["dispatched_at"] = time.time()
        return record.write(path)


def record_path(data_dir: Path, study_uid: str, generation: int) -> Path:
    """``data_dir/results/<study>/<generation>.json``."""
    return OutcomeRecord.path(data_dir, study_uid, generation)


def write_record(path: Path, record: OutcomeRecord | Mapping[str, Any]) -> OutcomeRecord:
    """Write an outcome record atomically (:meth:`OutcomeRecord.write`: fsynced, the folder too), as other processes
    read it at any moment. A plain mapping (a test's, a script's) is checked as an :class:`OutcomeRecord` first."""
    if not isinstance(record, OutcomeRecord):
        record = OutcomeRecord.from_json(record, path)
    return record.write(path)


def record_redelivery(data_dir: Path, study_uid: str, generation: int, destination: str, *, entry_id: str,
                      delivered_at: str, attempts: int) -> OutcomeRecord | None:
    """A dead-lettered result reached ``destination`` by ``bonebridge retry``: say so in the outcome record.

    The destination becomes ``sent``; ``redelivered[destination]`` keeps the dead-letter entry, when and after how
    many attempts in all. Once every destination has it, a ``dead-lettered`` record takes the status it would have
    had (``sent`` or ``not-processed``) and ``delivered_at``. A ``failed`` record stays failed (the study did fail:
    only its report was late). Returns the updated record, or None when there is none to update.
    """
    with record_lock(data_dir, study_uid, generation):
        return _record_redelivery(data_dir, study_uid, generation, destination, entry_id=entry_id,
                                  delivered_at=delivered_at, attempts=attempts)


def _record_redelivery(data_dir: Path, study_uid: str, generation: int, destination: str, *, entry_id: str,
                       delivered_at: str, attempts: int) -> OutcomeRecord | None:
    path = record_path(data_dir, study_uid, generation)
    try:
        record = OutcomeRecord.read(path)
    except FileNotFoundError:
        LOGGER.warning("study %s generation %d: no outcome record to mark as delivered", study_uid, generation)
        return None
    record.destinations[destination] = SENT
    record.redelivered[destination] = Redelivery(entry=entry_id, delivered_at=delivered_at, attempts=attempts,
                                                 by="bonebridge retry")
    if all(v == SENT for v in record.destinations.values()):
        record.delivered_at = delivered_at
        if record.status == "dead-lettered":
            record.status = record.take_status_if_delivered()
    record = record.write(path)
    LOGGER.info("study %s generation %d: outcome record now says %s (delivered to %s by bonebridge retry)",
                study_uid, generation, record.status, destination)
    return record
