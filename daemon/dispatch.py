"""Dispatcher: C-STORE results to their destinations, with retries and a dead-letter folder.

Results are sent exactly as they were written (``STORE_SEND_CHUNKED_DATASET``: streamed from the
file, never decoded), so each file needs a presentation context that matches its SOP class *and*
transfer syntax; :func:`send_datasets` proposes one context per pair actually present.

A destination that stays down must not lose results. :class:`Dispatcher` retries with exponential
backoff and, after the last attempt, copies the files to ``data_dir/dead-letter/<id>/`` with a
``reason.json``; ``bonebridge retry`` calls :meth:`Dispatcher.replay` once the destination is back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt

from daemon.spool import fsync_dir

LOGGER = logging.getLogger(__name__)

#: A-ASSOCIATE-RQ can carry at most 128 presentation contexts (odd IDs 1..255).
MAX_CONTEXTS = 128
#: Backoff between attempts is capped: a destination down for hours should not wait hours to retry.
MAX_BACKOFF_S = 60.0
#: C-STORE warning statuses (PS3.4 B.2.3): stored, with coercion / discrepancies. Counted as sent.
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


class DestinationLike(Protocol):
    """What the dispatcher needs of ``config.Destination``."""

    ae_title: str
    host: str
    port: int
    calling_ae: str
    retries: int
    backoff_s: float


class DispatchError(Exception):
    """Sending to a destination failed; ``reason`` says why in words an operator can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DeadLettered(DispatchError):
    """All attempts failed; the files are in the dead-letter entry ``entry_id``."""

    def __init__(self, reason: str, entry_id: str, path: Path) -> None:
        super().__init__(reason)
        self.entry_id = entry_id
        self.path = path


def _contexts(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) of each file, from its File Meta only."""
    pairs: list[tuple[str, str]] = []
    for p in paths:
        try:
            meta = read_file_meta_info(p)
            pairs.append((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception as exc:  # noqa: BLE001 - any unreadable file makes the batch unsendable
            raise DispatchError(f"{p}: cannot read File Meta Information: {exc}") from exc
    return pairs


def _batches(paths: Sequence[Path], pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
    """Split the files into groups needing at most MAX_CONTEXTS distinct contexts each."""
    batches: list[list[int]] = []
    seen: set[tuple[str, str]] = set()
    current: list[int] = []
    for i, pair in enumerate(pairs):
        if pair not in seen and len(seen) == MAX_CONTEXTS:
            batches.append(current)
            current, seen = [], set()
        seen.add(pair)
        current.append(i)
    if current:
        batches.append(current)
    return batches


def send_datasets(dest: DestinationLike, paths: Sequence[Path]) -> None:
    """C-STORE every file in *paths* to *dest* over one association (per 128 contexts).

    Raises :class:`DispatchError` if the association cannot be established, a context is not
    accepted, the connection drops, or any C-STORE answers a failure status. Warning statuses
    (stored with coercion) count as success and are logged.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return
    pairs = _contexts(paths)
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream files: never decode a result to send it
    for batch in _batches(paths, pairs):
        _send_batch(dest, [paths[i] for i in batch], [pairs[i] for i in batch])


def _send_batch(dest: DestinationLike, paths: list[Path], pairs: list[tuple[str, str]]) -> None:
    """One association: a context per distinct (SOP class, transfer syntax), then every C-STORE."""
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    ae = AE(ae_title=dest.calling_ae)
    for sop_class, ts in dict.fromkeys(pairs):
        ae.add_requested_context(sop_class, ts)
    connected: list[bool] = []

    def on_open(event: evt.Event) -> None:
        """Record that TCP connected (to tell 'down' from 'aborted') and switch off Nagle."""
        connected.append(True)
        try:
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass

    tls = getattr(dest, "tls", None)
    tls_args = None
    if tls is not None:
        from daemon.tls import client_args

        tls_args = client_args(tls)
    assoc = ae.associate(
        dest.host, int(dest.port), ae_title=dest.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
        tls_args=tls_args,
    )
    if not assoc.is_established:
        if not connected:
            why = "no connection (destination down or unreachable)"
        elif assoc.is_rejected and assoc.acceptor.primitive is not None:
            rj = assoc.acceptor.primitive
            why = f"association rejected (result {rj.result}, source {rj.result_source}, reason {rj.diagnostic})"
        elif assoc.is_aborted:
            why = "association aborted by the peer"
        else:
            why = "association not established (timed out)"
        raise DispatchError(f"{where}: {why}")
    try:
        for path in paths:
            try:
                status = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted context for this SOP class / transfer syntax
                raise DispatchError(f"{where}: {path.name}: {exc}") from exc
            if "Status" not in status:
                raise DispatchError(f"{where}: {path.name}: no response (connection lost or timed out)")
            code = int(status.Status)
            if code in WARNING_STATUSES:
                LOGGER.warning("%s: %s stored with warning 0x%04X", where, path.name, code)
            elif code != 0x0000:
                comment = status.get("ErrorComment", "")
                raise DispatchError(f"{where}: {path.name}: C-STORE status 0x{code:04X} {comment}".rstrip())
    finally:
        if assoc.is_established:
            assoc.release()


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
        sender: Callable[[DestinationLike, Sequence[Path]], None] = send_datasets,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.dead_letter_dir = self.data_dir / "dead-letter"
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
                continue
            LOGGER.info("%s: sent %d file(s) for %s", dest_name, len(paths), label)
            return
        raise self._dead_letter(dest_name, dest, paths, label, error, attempts=attempts, outcome=outcome)

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
        outcome record of the study generation the entry belongs to (:func:`daemon.outcomes.record_redelivery`),
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
                _write_json_atomic(entry / "reason.json", reason)
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
        from daemon.outcomes import record_redelivery

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
            "ae_title": getattr(dest, "ae_title", None),
            "host": getattr(dest, "host", None),
            "port": getattr(dest, "port", None),
            "label": label,
            "error": error,
            "attempts": attempts,
            "time": _now_iso(),
            "files": names,
        }
        if outcome is not None:
            reason["study_uid"], reason["generation"] = str(outcome[0]), int(outcome[1])
        _write_json_atomic(building / "reason.json", reason)
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


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
