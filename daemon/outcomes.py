"""Outcome records: ``data_dir/results/<study>/<generation>.json``, what the worker decided and where it went.

The worker writes one per study generation once its results were sent or dead-lettered; the assembler (its
state, the metric ``bonebridge_studies``), the metric ``bonebridge_results{status=...}`` and the status page read
them. ``bonebridge retry`` delivers a dead-lettered result later, in another process, so it updates the record
here too: otherwise the record, the page and the metric would say dead-lettered for ever.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

#: Where a dead-lettered record keeps the status it would have had if delivered ("sent", "not-processed").
STATUS_IF_DELIVERED = "status_if_delivered"


def record_path(data_dir: Path, study_uid: str, generation: int) -> Path:
    return Path(data_dir) / "results" / study_uid / f"{int(generation)}.json"


def write_record(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write an outcome record atomically (tmp, fsync, rename): other processes read it at any moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as handle:
        json.dump(record, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return record


def record_redelivery(data_dir: Path, study_uid: str, generation: int, destination: str, *, entry_id: str,
                      delivered_at: str, attempts: int) -> dict[str, Any] | None:
    """A dead-lettered result reached ``destination`` by ``bonebridge retry``: say so in the outcome record.

    The destination becomes ``sent``; ``redelivered[destination]`` keeps the dead-letter entry, when and after how
    many attempts in all. Once every destination has it, a ``dead-lettered`` record takes the status it would have
    had (``sent`` or ``not-processed``) and ``delivered_at``. A ``failed`` record stays failed (the study did fail:
    only its report was late). Returns the updated record, or None when there is none to update.
    """
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
