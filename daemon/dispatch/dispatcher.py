"""The dispatch stage: results leave through it, to their destinations, with retries and a dead-letter folder.

Analysis ends when the result files are in ``data_dir/outbox/<study>/<generation>/`` and the outcome record says
``ready-to-send``; delivery is a Celery task of its own (:func:`daemon.queue.celery_tasks.deliver_result`, queue ``dispatch``),
one per study generation and destination, so a destination that is down never holds an analysis worker. Between
tries the task is not sleeping: it is a message in Redis with a countdown (:func:`retry_countdown`). What waits to
be sent is on disk too (:class:`daemon.dispatch.dispatch_queue.DispatchQueue`), which is what the status page and the
metrics show and what a restarted ``serve`` re-enqueues.

How a result is delivered depends on the destination's type (:mod:`daemon.dispatch.destinations`: C-STORE or STOW-RS).
After the last try the files are copied to ``data_dir/dead-letter/<id>/`` with a ``reason.json``; ``bonebridge
retry`` calls :meth:`Dispatcher.replay` once the destination is back. :meth:`Dispatcher.send` still makes every
attempt in one call, sleeping in between, for callers that want the answer now (tests, tools).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from daemon.dispatch.destinations import DispatchError, describe
from daemon.dispatch.destinations import send as send_to_destination
from daemon.dispatch.destinations.dicom import MAX_CONTEXTS, WARNING_STATUSES, send_datasets  # noqa: F401 - re-exported
from daemon.store.atomic import fsync_dir, write_json_atomic
from daemon.store.layout import DataDir

LOGGER = logging.getLogger(__name__)

#: Backoff between attempts is capped: a destination down for hours should not wait hours to retry. It must stay
#: well under ``queue.visibility_timeout_s``: Redis hands a message held longer than that to another worker.
MAX_BACKOFF_S = 60.0


class DestinationLike(Protocol):
    """What the dispatcher needs of any destination (``config.DicomDestination``, ``config.DicomWebDestination``)."""

    retries: int
    backoff_s: float


class DeadLettered(DispatchError):
    """All attempts failed; the files are in the dead-letter entry ``entry_id``."""

    def __init__(self, reason: str, entry_id: str, path: Path) -> None:
        super().__init__(reason)
        self.entry_id = entry_id
        self.path = path


def retry_countdown(dest: DestinationLike, retries_so_far: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds before retry ``retries_so_far + 1``: Celery's ``retry_backoff`` formula with jitter.

    ``backoff_s * 2**retries_so_far``, capped at :data:`MAX_BACKOFF_S` (what ``retry_backoff``/``retry_backoff_max``
    compute), then "equal jitter": a random point in the upper half of that, so the results that failed together
    when a PACS went down do not all knock again in the same second, and none retries at once. (Celery's own
    ``retry_jitter`` draws from the whole interval in whole seconds, which with the sub-second backoffs tests use
    would retry at once.)
    """
    ceiling = min(float(dest.backoff_s) * 2 ** max(0, retries_so_far), MAX_BACKOFF_S)
    return ceiling * (0.5 + 0.5 * rng())


@dataclass(frozen=True)
class ReplayResult:
    """Outcome of replaying one dead-letter entry."""

    entry_id: str
    destination: str
    ok: bool
    error: str | None = None


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Dispatcher:
    """Sends to named destinations with retries; dead-letters what cannot be delivered.

    ``dest.retries`` is the number of *re*-tries: a send makes ``1 + retries`` attempts, waiting
    ``backoff_s * 2**i`` seconds (capped at :data:`MAX_BACKOFF_S`) before retry ``i + 1``.
    *sender* and *sleep* are injectable so that tests and the CLI can run without waiting.
    """

    def __init__(
        self,
        data_dir: str | Path,
        destinations: Mapping[str, DestinationLike],
        *,
        sender: Callable[[DestinationLike, Sequence[Path]], None] = send_to_destination,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.dead_letter_dir = DataDir(self.data_dir).dead_letter
        self.dead_letter_dir.mkdir(parents=True, exist_ok=True)
        self.destinations = destinations
        self._sender = sender
        self._sleep = sleep

    def send(self, dest_name: str, paths: Sequence[Path], label: str,
             outcome: tuple[str, int] | None = None) -> None:
        """Deliver *paths* to *dest_name* or dead-letter them (raises :class:`DeadLettered`).

        *outcome* is the (study UID, generation) whose outcome record these results belong to: a dead-letter
        entry keeps it, so that ``bonebridge retry`` can update that record once it delivers them.
        """
        paths = [Path(p) for p in paths]
        dest = self.destinations.get(dest_name)
        if dest is None:
            error = f"unknown destination {dest_name!r}"
            raise self._dead_letter(dest_name, None, paths, label, error, attempts=0, outcome=outcome)
        attempts = 1 + max(0, int(dest.retries))
        error = ""
        for attempt in range(attempts):
            if attempt:
                delay = min(float(dest.backoff_s) * 2 ** (attempt - 1), MAX_BACKOFF_S)
                LOGGER.info("%s: retry %d/%d in %.1f s", dest_name, attempt, attempts - 1, delay)
                self._sleep(delay)
            try:
                self._sender(dest, paths)
            except DispatchError as exc:
                error = exc.reason
                LOGGER.warning("%s: attempt %d/%d failed: %s", dest_name, attempt + 1, attempts, error)
                if exc.permanent:  # the destination says the request itself is wrong: no retry can help
                    attempts = attempt + 1
                    break
                continue
            LOGGER.info("%s: sent %d file(s) for %s", dest_name, len(paths), label)
            return
        raise self._dead_letter(dest_name, dest, paths, label, error, attempts=attempts, outcome=outcome)

    def attempt(self, dest_name: str, paths: Sequence[Path]) -> None:
        """One try, no retry: what the ``dispatch`` task does each time Celery runs it. Raises DispatchError."""
        dest = self.destinations.get(dest_name)
        if dest is None:
            raise DispatchError(f"unknown destination {dest_name!r}", permanent=True)
        self._sender(dest, [Path(p) for p in paths])

    def dead_letter(self, dest_name: str, paths: Sequence[Path], label: str, error: str, attempts: int,
                    outcome: tuple[str, int] | None = None, queued_at: float | None = None) -> DeadLettered:
        """Copy *paths* into a new dead-letter entry (as :meth:`send` does after its last attempt); returns it."""
        return self._dead_letter(dest_name, self.destinations.get(dest_name), [Path(p) for p in paths], label,
                                 error, attempts, outcome=outcome, queued_at=queued_at)

    # -- dead letters ---------------------------------------------------------------------------

    def dead_letters(self) -> list[str]:
        """Ids of the dead-letter entries, oldest first."""
        return sorted(
            p.name for p in self.dead_letter_dir.iterdir() if p.is_dir() and (p / "reason.json").is_file()
        )

    def read_reason(self, entry_id: str) -> dict[str, Any]:
        return json.loads((self.dead_letter_dir / entry_id / "reason.json").read_text(encoding="utf-8"))

    def replay(self, entry_id: str | None = None) -> list[ReplayResult]:
        """Re-send one dead-letter entry (or all); entries that succeed are removed.

        One attempt each, no backoff: an operator runs this and wants the answer now. A failure is
        recorded in the entry's ``reason.json`` (``replay_attempts``, ``last_replay_error``); a delivery in the
        outcome record of the study generation the entry belongs to (:func:`daemon.store.outcomes.record_redelivery`),
        so the status page and the metrics stop saying dead-lettered.
        """
        ids = [entry_id] if entry_id is not None else self.dead_letters()
        results: list[ReplayResult] = []
        for eid in ids:
            entry = self.dead_letter_dir / eid
            if not (entry / "reason.json").is_file():
                results.append(ReplayResult(eid, "", False, "no such dead-letter entry"))
                continue
            reason = self.read_reason(eid)
            name = str(reason.get("destination", ""))
            files = [entry / f for f in reason.get("files", [])]
            dest = self.destinations.get(name)
            try:
                if dest is None:
                    raise DispatchError(f"unknown destination {name!r}")
                self._sender(dest, files)
            except DispatchError as exc:
                reason["replay_attempts"] = int(reason.get("replay_attempts", 0)) + 1
                reason["last_replay_error"] = exc.reason
                reason["last_replay_time"] = _now_iso()
                write_json_atomic(entry / "reason.json", reason)
                LOGGER.warning("dead letter %s to %s still failing: %s", eid, name, exc.reason)
                results.append(ReplayResult(eid, name, False, exc.reason))
                continue
            self._record_delivery(eid, reason)
            shutil.rmtree(entry)
            LOGGER.info("dead letter %s delivered to %s and removed", eid, name)
            results.append(ReplayResult(eid, name, True))
        return results

    def _record_delivery(self, entry_id: str, reason: dict[str, Any]) -> None:
        """Tell the entry's outcome record that it was delivered; the delivery itself stands if this fails."""
        outcome = _entry_outcome(reason)
        if outcome is None:
            LOGGER.warning("dead letter %s names no study: no outcome record to update", entry_id)
            return
        from daemon.store.outcomes import record_redelivery

        attempts = int(reason.get("attempts", 0)) + int(reason.get("replay_attempts", 0)) + 1
        try:
            record_redelivery(self.data_dir, outcome[0], outcome[1], str(reason.get("destination", "")),
                              entry_id=entry_id, delivered_at=_now_iso(), attempts=attempts)
        except (OSError, ValueError) as exc:
            LOGGER.error("dead letter %s delivered, but its outcome record could not be updated: %s", entry_id, exc)

    def _dead_letter(
        self,
        dest_name: str,
        dest: DestinationLike | None,
        paths: list[Path],
        label: str,
        error: str,
        attempts: int,
        outcome: tuple[str, int] | None = None,
        queued_at: float | None = None,
    ) -> DeadLettered:
        """Copy *paths* into a new entry, built under a hidden name and renamed when complete."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        entry_id = f"{stamp}-{_SAFE.sub('_', label)[:80] or 'result'}-{uuid.uuid4().hex[:8]}"
        building = self.dead_letter_dir / f".{entry_id}.partial"
        building.mkdir()
        names: list[str] = []
        for i, p in enumerate(paths):
            name = f"{i:04d}-{_SAFE.sub('_', p.name)}"
            shutil.copyfile(p, building / name)
            with open(building / name, "rb") as f:
                os.fsync(f.fileno())
            names.append(name)
        reason = {
            "destination": dest_name,
            **(describe(dest) if dest is not None else {"ae_title": None, "host": None, "port": None}),
            "label": label,
            "error": error,
            "attempts": attempts,
            "time": _now_iso(),
            "files": names,
        }
        if outcome is not None:
            reason["study_uid"], reason["generation"] = str(outcome[0]), int(outcome[1])
        if queued_at is not None:
            reason["queued_at"] = float(queued_at)  # when the result was ready: the age of what is undelivered
        write_json_atomic(building / "reason.json", reason)
        final = self.dead_letter_dir / entry_id
        os.replace(building, final)
        fsync_dir(self.dead_letter_dir)
        LOGGER.error(
            "%s: %d file(s) for %s dead-lettered as %s after %d attempt(s): %s",
            dest_name,
            len(paths),
            label,
            entry_id,
            attempts,
            error,
        )
        return DeadLettered(f"{dest_name}: {error}", entry_id, final)


def _entry_outcome(reason: dict[str, Any]) -> tuple[str, int] | None:
    """The (study UID, generation) a dead-letter entry belongs to; entries written before the field existed
    are read from their label, ``<study>-<generation>`` or ``<study>-<generation>-failed``."""
    if reason.get("study_uid") and reason.get("generation") is not None:
        return str(reason["study_uid"]), int(reason["generation"])
    match = _LABEL.fullmatch(str(reason.get("label", "")))
    return (match["study"], int(match["generation"])) if match else None


_LABEL = re.compile(r"(?P<study>[0-9]+(?:\.[0-9]+)*)-(?P<generation>[0-9]+)(?:-failed)?")


