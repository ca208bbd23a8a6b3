"""``type: dicom``: C-STORE SCU to a PACS (DICOM TLS optional).

Results are sent exactly as they were written (``STORE_SEND_CHUNKED_DATASET``: streamed from the file, never
decoded), so each file needs a presentation context that matches its SOP class *and* transfer syntax; :func:`send`
proposes one context per pair actually present. Re-sending the same SOP instances is harmless: a PACS answers
success or a warning (stored with coercion), and both count as delivered.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt

from daemon.dispatch.destinations import DispatchError

LOGGER = logging.getLogger("daemon.dispatch.dispatcher")

#: A-ASSOCIATE-RQ can carry at most 128 presentation contexts (odd IDs 1..255).
MAX_CONTEXTS = 128
#: C-STORE warning statuses (PS3.4 B.2.3): stored, with coercion / discrepancies. Counted as sent.
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


class DicomDestinationLike(Protocol):
    """What C-STORE needs of ``config.DicomDestination``."""

    ae_title: str
    host: str
    port: int
    calling_ae: str


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


def send_datasets(dest: DicomDestinationLike, paths: Sequence[Path]) -> None:
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


def _send_batch(dest: DicomDestinationLike, paths: list[Path], pairs: list[tuple[str, str]]) -> None:
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
        from daemon.dicom.tls import client_args

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



def send(dest: DicomDestinationLike, paths: Sequence[Path]) -> None:
    """The destination-type interface (:mod:`daemon.dispatch.destinations`)."""
    send_datasets(dest, paths)
