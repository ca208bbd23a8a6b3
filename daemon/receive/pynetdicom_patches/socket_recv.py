"""A faster receive loop for the listener's associations: whole PDUs in one buffer, woken by data, not a timer.

Profiling the listener receiving 8 MB radiographs (``bench/bench_receive.py`` under py-spy) showed two costs in
pynetdicom's DUL reactor thread, which reads every PDU of an association:

- ``AssociationSocket.recv(nr_bytes)`` gathers each PDU with ``socket.recv(4096)`` calls appended to a
  ``bytearray``: 32 Python-level calls per 128 KiB P-DATA PDU;
- the reactor polls: when no data is waiting it sleeps ``_run_loop_delay`` (1 ms) before looking again, so each
  time the sender is a little slower than we are, up to a millisecond is lost, many times per instance.

:func:`wake_on_data` turns one association's socket into a :class:`WakeOnDataSocket`, whose ``recv`` fills one
preallocated buffer with ``recv_into`` and whose ``ready`` waits in ``select`` for up to
:data:`WAIT_FOR_DATA_S` (the same 1 ms an idle association slept before, so idle CPU use is unchanged) and
returns the moment data arrives; the reactor's own sleep is then set to zero. Both keep pynetdicom's contracts:
``recv`` returns ``nr_bytes`` bytes, or fewer if the peer closed, and lets ``OSError`` and timeouts propagate;
``ready`` reports a broken connection as event 17 (transport closed).

The length a PDU announces comes from the peer, so it is not trusted: the buffer is preallocated up to
:data:`PREALLOCATE_MAX` and grows only with bytes that actually arrived, and a length over :data:`MAX_PDU_LENGTH`
(no DICOM implementation sends PDUs near it; 0xFFFFFFF0 is garbage or an attack) drops the connection at once.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from typing import Any

from pynetdicom.transport import AssociationSocket

from daemon.receive.pynetdicom_patches.reactor_wakeup import SendWakeup, wake_dul_on_send

#: The longest ``ready`` waits for data; the DUL reactor checks its queues and timers in between.
WAIT_FOR_DATA_S = 0.001
#: Bytes allocated ahead of their arrival (dcmtk sends 128 KiB PDUs, pynetdicom 16 KiB).
PREALLOCATE_MAX = 4 * 1024 * 1024
#: A PDU announcing more than this is refused: the connection is dropped before any of it is read.
MAX_PDU_LENGTH = 64 * 1024 * 1024


class AbsurdPduLength(ConnectionError):
    """The peer announced a PDU longer than :data:`MAX_PDU_LENGTH`."""


def read_exactly(sock: socket.socket, nr_bytes: int) -> bytearray:
    """Read *nr_bytes* from *sock* into one new buffer; fewer only if the peer closed the connection first.

    Raises :class:`AbsurdPduLength` (an ``OSError``, which pynetdicom treats as a closed connection) for a length
    over :data:`MAX_PDU_LENGTH`.
    """
    buffer = bytearray(min(nr_bytes, PREALLOCATE_MAX))
    received = read_exactly_into(sock, buffer, nr_bytes)
    if received < len(buffer):
        del buffer[received:]
    return buffer


def read_exactly_into(sock: socket.socket, buffer: bytearray, nr_bytes: int) -> int:
    """Read *nr_bytes* from *sock* into *buffer* (grown only with bytes that arrived); returns how many came.

    Fewer than *nr_bytes* only if the peer closed the connection first. The buffer is the caller's to reuse, so a
    stream of PDUs costs no allocation per PDU. Raises :class:`AbsurdPduLength` as :func:`read_exactly` does.
    """
    if nr_bytes > MAX_PDU_LENGTH:
        raise AbsurdPduLength(f"peer announced a PDU of {nr_bytes} bytes (more than {MAX_PDU_LENGTH}): dropped")
    received = 0
    while received < nr_bytes:
        if received == len(buffer):  # grow with what arrives, never ahead of it by more than the buffer itself
            buffer.extend(bytes(min(len(buffer) or 1, nr_bytes - len(buffer))))
        with memoryview(buffer) as view:
            count = sock.recv_into(view[received:], min(len(buffer), nr_bytes) - received)
        if not count:
            break
        received += count
    return received


def _wait_readable(sock: Any, wake_fd: int | None) -> list[Any]:
    """What of *sock* and *wake_fd* becomes readable within :data:`WAIT_FOR_DATA_S` (raises if the socket fails).

    A failing *wake_fd* is not a failing connection: the wakeup may have been closed as the association ended,
    so the socket alone is then looked at once more, without waiting.
    """
    if wake_fd is not None:
        try:
            return select.select([sock, wake_fd], [], [], WAIT_FOR_DATA_S)[0]
        except (OSError, ValueError):
            return select.select([sock], [], [], 0)[0]
    return select.select([sock], [], [], WAIT_FOR_DATA_S)[0]


class WakeOnDataSocket(AssociationSocket):
    """An ``AssociationSocket`` that reads whole PDUs at once and wakes its reactor when data arrives.

    With a :class:`~daemon.receive.pynetdicom_patches.reactor_wakeup.SendWakeup` it also wakes when the DUL has something to send (a
    C-STORE response), instead of finishing its wait for data the peer will not send before that response.
    """

    send_wakeup: SendWakeup | None = None

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            time.sleep(WAIT_FOR_DATA_S)  # the reactor no longer sleeps itself: never let it spin
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes already buffered, which select cannot see
        wakeup = self.send_wakeup
        wake_fd = wakeup.fd if wakeup is not None else None
        try:
            readable = _wait_readable(sock, wake_fd)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if wakeup is not None and wake_fd in readable:
            wakeup.drain()
        return sock in readable

    def close(self) -> None:
        super().close()
        if self.send_wakeup is not None:
            self.send_wakeup.close()

    def recv(self, nr_bytes: int) -> bytearray:
        assert self.socket is not None
        return read_exactly(self.socket, nr_bytes)


def wake_on_data(dul: Any) -> None:
    """Give the association of DUL reactor *dul* a :class:`WakeOnDataSocket` and no reactor sleep."""
    association_socket = getattr(dul, "socket", None)
    if type(association_socket) is not AssociationSocket:
        return  # something else than what this was written for: leave it alone
    association_socket.__class__ = WakeOnDataSocket
    association_socket.send_wakeup = wake_dul_on_send(dul)
    dul._run_loop_delay = 0


def release_send_wakeup(dul: Any) -> None:
    """Close the send wakeup of *dul*'s socket when its connection is closed (pynetdicom does not always close the
    socket through ``close()``: a peer that drops the connection before the A-ASSOCIATE-AC is one such path).

    Call it from the DUL's own thread (``EVT_CONN_CLOSE``): at ``EVT_RELEASED`` the DUL still has the A-RELEASE
    response to send and may be waiting on the wakeup.
    """
    wakeup = getattr(getattr(dul, "socket", None), "send_wakeup", None)
    if wakeup is not None:
        wakeup.close()
