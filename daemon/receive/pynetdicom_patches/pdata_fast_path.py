"""The middle of a C-STORE data set goes from the socket to the spool file without pynetdicom's per-PDU machinery.

On a 2-core machine that the sender shares, the listener's CPU per instance is what its receive rate follows, and
most of it went to P-DATA-TF PDUs that only carry the next slice of a data set (a 2 MB radiograph from dcmtk is
16 PDUs of 128 KiB, an 8 MB one 64). For each, pynetdicom's DUL copied the PDU three times (``bytestream +=``,
``bytes(bytestream)``, ``data[1:]``), built a PDU object, its items and a P-DATA primitive, passed an event
through its queue and state machine (Sta6 + Evt10, action DT-2) and finally wrote the slice to the file. Profiled
with ``py-spy --gil`` while receiving 2 MB instances, that was about half of the DUL thread's time.

:class:`FastPDataDUL` reads such a PDU whole into one buffer and writes its fragments straight into the
:class:`~daemon.receive.pynetdicom_patches.receive_file.ReceiveFile` pynetdicom opened for the message. It does so only when nothing else can
be affected, and otherwise pynetdicom reads the PDU exactly as before:

- a plain TCP socket (the PDU header is peeked with ``MSG_PEEK``, which TLS sockets do not offer);
- the association in Sta6 (data transfer) with nothing waiting in the DUL's event or PDU queues, so the order of
  fragments cannot change;
- a C-STORE whose command set is decoded and whose data set is streaming into a ``ReceiveFile`` (the spool's);
- every PDV in the PDU a data-set fragment that is *not* the last one: command fragments and the last fragment,
  which completes the message, go through pynetdicom so that it builds the C-STORE indication as always;
- no handler bound to ``EVT_DATA_RECV`` or ``EVT_PDU_RECV`` (those would miss the PDU).

A PDU the fast path has read but cannot take (a last fragment, or a malformed item list) is handed to
pynetdicom's own decoder, as its ``_read_pdu_data`` would have done. Everything else about the association
(timers, release, abort, the response) is pynetdicom's. Written against pynetdicom 3.0 (``pyproject.toml`` pins
it): :func:`install` leaves any other DUL class alone.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
from typing import Any, Literal

from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider

from daemon.receive.pynetdicom_patches.receive_file import ReceiveFile
from daemon.receive.pynetdicom_patches.socket_recv import MAX_PDU_LENGTH, PREALLOCATE_MAX, read_exactly_into

LOGGER = logging.getLogger(__name__)

P_DATA_TF = 0x04
_PDU_HEADER = struct.Struct(">BBL")
_ITEM_LENGTH = struct.Struct(">L")
#: Message control header bits (PS3.8 E.2): bit 0 set = command, bit 1 set = last fragment.
_COMMAND_OR_LAST = 0b11
#: At most this many PDUs per turn of the reactor (dcmtk's 128 KiB PDUs: 4 MiB) before it checks its timers.
PDUS_PER_CALL = 32
#: What :meth:`FastPDataDUL._take_middle_pdu` did with the next PDU.
Outcome = Literal["taken", "not-read", "handled"]


def middle_dataset_fragments(items: memoryview) -> list[memoryview] | None:
    """The data of each PDV in a P-DATA-TF's item list, if all are data-set fragments that are not the last one.

    None for anything else: a command fragment, a last fragment, an empty list, or items whose lengths do not add
    up (pynetdicom's decoder then handles the PDU, and a malformed one, as it always has).
    """
    fragments: list[memoryview] = []
    offset, size = 0, len(items)
    if size == 0:
        return None
    while offset < size:
        if offset + 6 > size:
            return None
        (item_length,) = _ITEM_LENGTH.unpack_from(items, offset)
        end = offset + 4 + item_length
        if item_length < 2 or end > size or items[offset + 5] & _COMMAND_OR_LAST:
            return None
        fragments.append(items[offset + 6:end])
        offset = end
    return fragments


class FastPDataDUL(DULServiceProvider):
    """pynetdicom's DUL, reading the middle P-DATA-TF PDUs of a streamed C-STORE data set itself.

    One call of :meth:`_read_pdu_data` takes up to :data:`PDUS_PER_CALL` consecutive middle PDUs that have
    already arrived, into one buffer reused for the whole association, before it gives the reactor its turn
    again (to check its timers, the kill flag and what it has to send): the reactor's loop, a ``select`` and a
    fresh buffer per PDU were a measurable part of the DUL thread's time for an 8 MB data set's 64 PDUs.
    """

    _pdu_buffer: bytearray | None = None

    def _read_pdu_data(self) -> None:
        target = self._streaming_target()
        if target is None:
            return super()._read_pdu_data()
        taken = 0
        while True:
            outcome = self._take_middle_pdu(target)
            if outcome == "not-read":
                return super()._read_pdu_data()
            if outcome == "handled":
                return None
            taken += 1
            if taken >= PDUS_PER_CALL or self._kill_thread or not self._more_waiting():
                return None
            if self._streaming_target() is not target:
                return None

    def _more_waiting(self) -> bool:
        """True when the next PDU's bytes are already on the socket (the next read will not wait)."""
        sock = self.socket.socket  # type: ignore[union-attr]
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False  # the reactor finds out about the connection its own way
        return bool(readable)

    def _take_middle_pdu(self, target: ReceiveFile) -> Outcome:
        """Read the next PDU if it is a P-DATA-TF and write it out if it holds only middle data-set fragments.

        ``taken``: written to *target*; ``not-read``: nothing consumed, pynetdicom's own read is to run;
        ``handled``: the PDU went to pynetdicom's decoder, or the connection's end was reported.
        """
        sock = self.socket.socket  # type: ignore[union-attr]
        try:
            header = sock.recv(_PDU_HEADER.size, socket.MSG_PEEK)
        except OSError:
            return "not-read"  # pynetdicom reports the broken connection its own way
        if len(header) < _PDU_HEADER.size:
            return "not-read"
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        if pdu_type != P_DATA_TF or length > MAX_PDU_LENGTH:
            return "not-read"
        size = _PDU_HEADER.size + length
        if self._pdu_buffer is None or len(self._pdu_buffer) < min(size, PREALLOCATE_MAX):
            self._pdu_buffer = bytearray(min(size, PREALLOCATE_MAX))
        try:
            got = read_exactly_into(sock, self._pdu_buffer, size)
        except OSError as exc:
            LOGGER.warning("connection closed in the middle of a P-DATA PDU: %s", exc)
            self.event_queue.put("Evt17")  # transport connection closed
            return "handled"
        if got != size:
            LOGGER.warning("connection closed in the middle of a P-DATA PDU (%d of %d bytes)", got, size)
            self.event_queue.put("Evt17")
            return "handled"
        with memoryview(self._pdu_buffer) as whole, whole[:size] as view:
            fragments = middle_dataset_fragments(view[_PDU_HEADER.size:])
            if fragments is None:
                self._decode_as_pynetdicom(bytes(view))  # a copy: the buffer is reused, pynetdicom keeps what it decodes
                return "handled"
            for fragment in fragments:
                target.write(fragment)
            for fragment in fragments:
                fragment.release()
            fragments.clear()
        return "taken"

    def _streaming_target(self) -> ReceiveFile | None:
        """The spool file of the C-STORE being received, when the fast path may write to it; else None."""
        association_socket = self.socket
        if association_socket is None or type(association_socket.socket) is not socket.socket:
            return None  # closed, or TLS: no MSG_PEEK
        if self.state_machine.current_state != "Sta6":
            return None
        if not (self.event_queue.empty() and self._recv_pdu.empty()):
            return None  # a PDU already read is still to be processed: keep the order
        message = self.assoc.dimse.message
        target = getattr(message, "_data_set_file", None)
        if not isinstance(target, ReceiveFile):
            return None
        if self.assoc.get_handlers(evt.EVT_DATA_RECV) or self.assoc.get_handlers(evt.EVT_PDU_RECV):
            return None
        return target

    def _decode_as_pynetdicom(self, pdu: bytes | bytearray) -> None:
        """What pynetdicom's ``_read_pdu_data`` does with a PDU it has read: decode it and queue its event."""
        try:
            decoded, event = self._decode_pdu(pdu)
            self.event_queue.put(event)
        except Exception as exc:  # noqa: BLE001 - pynetdicom's own contract: any decode failure is Evt19
            LOGGER.error("Unable to decode the received PDU data: %s", exc)
            self.event_queue.put("Evt19")  # unrecognised or invalid PDU
            return
        self._recv_pdu.put(decoded)


def install(dul: Any) -> bool:
    """Make the DUL of one association a :class:`FastPDataDUL`; False (and untouched) if it is not pynetdicom's."""
    if type(dul) is not DULServiceProvider:
        return False
    dul.__class__ = FastPDataDUL
    return True
