"""Outcome records: ``data_dir/results/<study>/<generation>.json``, what the worker decided and where it went.

The worker writes one per study generation once its results were sent or dead-lettered; the assembler (its
state, the metric ``bonebridge_studies``), the metric ``bonebridge_results{status=...}`` and the status page read
them. ``bonebridge retry`` delivers a dead-lettered result later, in another process, so it updates the record
here too: otherwise the record, the page and the metric would say dead-lettered for ever.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon.store.atomic import write_json_atomic
from daemon.store.layout import DataDir

LOGGER = logging.getLogger(__name__)

#: Where a dead-lettered record keeps the status it would have had if delivered ("sent", "not-processed").
STATUS_IF_DELIVERED = "status_if_delivered"
#: The status of a record whose analysis is done and whose results wait for the dispatch stage.
READY_TO_SEND = "ready-to-send"
#: ``destinations[name]`` while the dispatch stage has not finished with that destination.
WAITING, RETRYING, SENT = "waiting", "retrying", "sent"


def undelivered(record: dict[str, Any]) -> list[str]:
    """The destinations the dispatch stage has not finished with (waiting or retrying)."""
    return [name for name, value in (record.get("destinations") or {}).items() if str(value) in (WAITING, RETRYING)]


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
                    **fields: Any) -> dict[str, Any] | None:
    """The dispatch stage finished a try for ``destination``: ``state`` is retrying, sent or ``dead-lettered: ...``.

    Once no destination is waiting or retrying the record takes its final status: the one it would have had
    (``sent``, ``not-processed``) when every destination has the results, ``dead-lettered`` when one of them went
    to the dead-letter folder; a ``failed`` record stays failed. Returns the record, None when there is none.
    """
    path = record_path(data_dir, study_uid, generation)
    with record_lock(data_dir, study_uid, generation):
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            LOGGER.warning("study %s generation %d: no outcome record for the delivery to %s", study_uid, generation,
                           destination)
            return None
        record.setdefault("destinations", {})[destination] = state
        record.setdefault("delivery", {}).setdefault(destination, {}).update(fields)
        if not undelivered(record) and record.get("status") == READY_TO_SEND:
            if any(str(v).startswith("dead-lettered") for v in record["destinations"].values()):
                record["status"] = "dead-lettered"  # keeps STATUS_IF_DELIVERED for `bonebridge retry`
            else:
                record["status"] = record.pop(STATUS_IF_DELIVERED, "sent")
                record["delivered_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            record.setdefault("timing", {})["dispatched_at"] = time.time()
        write_record(path, record)
    return record


def record_path(data_dir: Path, study_uid: str, generation: int) -> Path:
    return DataDir(data_dir).outcome_record(study_uid, generation)


def write_record(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write an outcome record atomically (:func:`daemon.store.atomic.write_json_atomic`, the folder fsynced too):
    other processes read it at any moment."""
    write_json_atomic(path, record, indent=2, default=str)
    return record


def record_redelivery(data_dir: Path, study_uid: str, generation: int, destination: str, *, entry_id: str,
                      delivered_at: str, attempts: int) -> dict[str, Any] | None:
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
                       delivered_at: str, attempts: int) -> dict[str, Any] | None:
    path = record_path(data_dir, study_uid, generation)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        LOGGER.warning("study %s generation %d: no outcome record to mark as delivered", study_uid, generation)
        return None
    record.setdefault("destinations", {})[destination] = "sent"
    record.setdefault("redelivered", {})[destination] = {
        "entry": entry_id, "delivered_at": delivered_at, "attempts": attempts, "by": "bonebridge retry",
    }
    if all(str(v) == "sent" for v in record["destinations"].values()):
        record["delivered_at"] = delivered_at
        if record.get("status") == "dead-lettered":
            record["status"] = record.pop(STATUS_IF_DELIVERED, "sent")
    write_record(path, record)
    LOGGER.info("study %s generation %d: outcome record now says %s (delivered to %s by bonebridge retry)",
                study_uid, generation, record.get("status"), destination)
    return record
