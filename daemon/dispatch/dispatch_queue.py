"""What waits to be sent, on disk: ``data_dir/dispatch/``, read by the status page, the metrics and a restart.

The ``dispatch`` Celery queue lives in Redis, which the status page never talks to and which keeps up to a second
of writes in memory. So every delivery also has a small file here, written before its task is enqueued:

- ``pending/<destination>/<study>-<generation>.json``: waiting for its first try, or retrying (``attempts``,
  ``next_try_at``, ``last_error``); the files to send, relative to ``data_dir``; when the result was ready;
- ``delivered/<destination>/<study>-<generation>.json``: the same file moved there once the destination took it
  (its modification time is the delivery's: the page counts the last hour's with one ``stat`` each; entries
  older than a day are pruned now and then);
- a delivery that ends in the dead-letter folder leaves ``pending/`` (the dead-letter entry is the record).

A restarted ``serve`` (or ``listen``) re-enqueues every pending file (:meth:`DispatchQueue.pending`), so a
``kill -9`` while results wait to be sent loses none; a task that finds no pending file has nothing to do, so
a delivery enqueued twice is sent once (and sending twice would be harmless anyway: see
:mod:`daemon.dispatch.destinations`). One lock per delivery (``flock`` on ``pending/<destination>/.<key>.lock``) keeps
two copies of the same task from trying at the same moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from daemon.store.atomic import fsync_dir, write_json_atomic
from daemon.store.layout import DataDir

#: Delivered markers older than this are pruned (the page and metrics look back one hour).
KEEP_DELIVERED_S = 24 * 3600
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name) or "_"




def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class DispatchQueue:
    """The ``data_dir/dispatch`` folder: one file per delivery waiting, one per delivery done in the last day."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.root = DataDir(self.data_dir).dispatch

    # ------------------------------------------------------------------ paths
    def pending_path(self, destination: str, study_uid: str, generation: int) -> Path:
        return self.root / "pending" / _safe(destination) / f"{_safe(study_uid)}-{int(generation)}.json"

    def delivered_path(self, destination: str, study_uid: str, generation: int) -> Path:
        return self.root / "delivered" / _safe(destination) / f"{_safe(study_uid)}-{int(generation)}.json"

    # ------------------------------------------------------------------ writes
    def add(self, destination: str, study_uid: str, generation: int, files: list[Path], label: str,
            queued_at: float) -> dict[str, Any]:
        """A delivery waiting for its first try; an existing one is kept as it is (its attempts count on)."""
        path = self.pending_path(destination, study_uid, generation)
        existing = _read_json(path)
        if existing is not None:
            return existing
        entry = {"study_uid": study_uid, "generation": int(generation), "destination": destination,
                 "files": [str(Path(f).relative_to(self.data_dir)) for f in files], "label": label,
                 "queued_at": float(queued_at), "attempts": 0, "state": "waiting", "next_try_at": None,
                 "last_error": None}
        write_json_atomic(path, entry)
        return entry

    def read(self, destination: str, study_uid: str, generation: int) -> dict[str, Any] | None:
        return _read_json(self.pending_path(destination, study_uid, generation))

    def files(self, entry: Mapping[str, Any]) -> list[Path]:
        return [self.data_dir / f for f in entry.get("files", [])]

    def retrying(self, entry: dict[str, Any], attempts: int, next_try_at: float, error: str) -> None:
        entry.update(attempts=int(attempts), state="retrying", next_try_at=float(next_try_at), last_error=error)
        write_json_atomic(self.pending_path(entry["destination"], entry["study_uid"], entry["generation"]), entry)

    def delivered(self, entry: dict[str, Any], attempts: int) -> None:
        """Move the entry to ``delivered/`` (a rename: it is never in both, nor in neither)."""
        source = self.pending_path(entry["destination"], entry["study_uid"], entry["generation"])
        target = self.delivered_path(entry["destination"], entry["study_uid"], entry["generation"])
        entry.update(attempts=int(attempts), state="delivered", delivered_at=time.time(), next_try_at=None)
        write_json_atomic(source, entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        fsync_dir(target.parent)
        if random.random() < 0.02:  # now and then, not at every delivery: a scan of a day's markers
            self.prune(target.parent)

    def dead_lettered(self, entry: Mapping[str, Any]) -> None:
        self.pending_path(entry["destination"], entry["study_uid"], entry["generation"]).unlink(missing_ok=True)

    def prune(self, folder: Path, now: float | None = None) -> int:
        now = time.time() if now is None else now
        removed = 0
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for item in entries:
                with contextlib.suppress(OSError):
                    if now - item.stat().st_mtime > KEEP_DELIVERED_S:
                        os.unlink(item.path)
                        removed += 1
        return removed

    @contextlib.contextmanager
    def lock(self, destination: str, study_uid: str, generation: int) -> Iterator[None]:
        """One try of one delivery at a time, across processes (and machines, where the filesystem locks)."""
        pending = self.pending_path(destination, study_uid, generation)
        pending.parent.mkdir(parents=True, exist_ok=True)
        lock_path = pending.with_name(f".{pending.stem}.lock")
        with open(lock_path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if not pending.exists():  # done: whoever waits on this lock finds nothing pending either
                    lock_path.unlink(missing_ok=True)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reads
    def pending(self) -> list[dict[str, Any]]:
        """Every delivery waiting or retrying, oldest first (what a restart re-enqueues)."""
        found = []
        for path in (self.root / "pending").glob("*/*.json"):
            entry = _read_json(path)
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: e.get("queued_at") or 0)

    def summary(self, destinations: Mapping[str, Any], now: float | None = None) -> list[dict[str, Any]]:
        """Per destination: waiting, retrying (and the next try), delivered in the last hour, dead-lettered, and the
        age of its oldest undelivered result (pending or dead-lettered) in seconds. Destinations that are no
        longer configured but still have something waiting are listed too."""
        now = time.time() if now is None else now
        rows: dict[str, dict[str, Any]] = {}

        def row(name: str) -> dict[str, Any]:
            if name not in rows:
                dest = destinations.get(name)
                rows[name] = {"destination": name, "where": _where(dest), "type": getattr(dest, "type", "dicom"),
                              "configured": dest is not None, "waiting": 0, "retrying": 0, "next_try_at": None,
                              "last_error": None, "delivered_last_hour": 0, "dead_lettered": 0, "oldest_ready_at": None}
            return rows[name]

        def older(item: dict[str, Any], ready_at: Any) -> None:
            if isinstance(ready_at, (int, float)) and (item["oldest_ready_at"] is None or ready_at < item["oldest_ready_at"]):
                item["oldest_ready_at"] = float(ready_at)

        for name in destinations:
            row(name)
        for entry in self.pending():
            item = row(str(entry.get("destination", "?")))
            if entry.get("state") == "retrying":
                item["retrying"] += 1
                next_try = entry.get("next_try_at")
                if isinstance(next_try, (int, float)) and (item["next_try_at"] is None or next_try < item["next_try_at"]):
                    item["next_try_at"] = float(next_try)
                    item["last_error"] = entry.get("last_error")
            else:
                item["waiting"] += 1
            older(item, entry.get("queued_at"))
        delivered = self.root / "delivered"
        if delivered.is_dir():
            for folder in delivered.iterdir():
                if not folder.is_dir():
                    continue
                name = next((n for n in destinations if _safe(n) == folder.name), folder.name)
                count = 0
                with os.scandir(folder) as entries:
                    for marker in entries:
                        with contextlib.suppress(OSError):
                            if now - marker.stat().st_mtime <= 3600:
                                count += 1
                if count or name in rows:
                    row(name)["delivered_last_hour"] = count
        dead = DataDir(self.data_dir).dead_letter
        if dead.is_dir():
            for entry_dir in dead.iterdir():
                if not entry_dir.is_dir() or entry_dir.name.startswith("."):
                    continue
                reason = _read_json(entry_dir / "reason.json") or {}
                item = row(str(reason.get("destination", "?")))
                item["dead_lettered"] += 1
                older(item, reason.get("queued_at") or _epoch(reason.get("time")))
        for item in rows.values():
            ready = item.pop("oldest_ready_at")
            item["oldest_undelivered_s"] = round(max(0.0, now - ready), 1) if ready is not None else 0.0
        return list(rows.values())


def _where(dest: Any) -> str:
    if dest is None:
        return "not configured"
    describe = getattr(dest, "describe", None)
    return describe() if callable(describe) else f"{getattr(dest, 'ae_title', '?')} at {getattr(dest, 'host', '?')}:{getattr(dest, 'port', '?')}"


def _epoch(iso: Any) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except (TypeError, ValueError):
        return None
