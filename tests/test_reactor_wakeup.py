"""Waking pynetdicom's reactors: the pieces, each on real threads, queues, sockets and eventfds."""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from daemon.receive.pynetdicom_patches import reactor_wakeup
from daemon.receive.pynetdicom_patches.reactor_wakeup import SendWakeup, _ReactorClock, wake_association, wake_dul_on_send
from daemon.receive.pynetdicom_patches.socket_recv import WakeOnDataSocket, release_send_wakeup

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "eventfd"), reason="needs os.eventfd (Linux)")


def test_a_woken_reactor_sleep_ends_when_its_queue_gets_a_message() -> None:
    """The association thread's 1 ms poll becomes a wait that a message on its DIMSE queue ends at once."""
    msg_queue: queue.Queue = queue.Queue()
    woke_after: list[float] = []

    class Assoc(threading.Thread):
        dimse = SimpleNamespace(msg_queue=msg_queue)

        def run(self) -> None:
            wake_association(self)
            started.set()
            began = time.monotonic()
            _ReactorClock.sleep(5.0)  # what pynetdicom's reactor does, with a long delay to make the point
            woke_after.append(time.monotonic() - began)

    started = threading.Event()
    assoc = Assoc()
    assoc.start()
    started.wait(5)
    time.sleep(0.05)
    msg_queue.put((1, "C-STORE-RQ"))
    assoc.join(5)
    assert woke_after and woke_after[0] < 2.0
    assert msg_queue.get_nowait() == (1, "C-STORE-RQ")  # the message is still there for the reactor


def test_other_threads_sleep_as_pynetdicom_wrote_it() -> None:
    began = time.monotonic()
    _ReactorClock.sleep(0.05)
    assert time.monotonic() - began >= 0.045
    assert _ReactorClock().monotonic() > 0  # everything else is the time module's


def test_install_replaces_the_association_modules_clock_once() -> None:
    from pynetdicom import association

    assert reactor_wakeup.install() and reactor_wakeup.install()
    assert isinstance(association.time, _ReactorClock)


def test_send_wakeup_is_readable_after_notify_and_quiet_after_drain() -> None:
    wakeup = SendWakeup()
    fd = wakeup.fd
    assert fd is not None
    assert select.select([fd], [], [], 0)[0] == []
    wakeup.notify()
    wakeup.notify()
    assert select.select([fd], [], [], 0)[0] == [fd]
    wakeup.drain()
    assert select.select([fd], [], [], 0)[0] == []
    wakeup.close()
    wakeup.close()  # twice is harmless
    wakeup.notify()  # and so is a primitive queued after the association ended
    wakeup.drain()
    assert wakeup.fd is None


def _dul_with_socket() -> tuple[SimpleNamespace, socket.socket, WakeOnDataSocket]:
    ours, theirs = socket.socketpair()
    dul = SimpleNamespace(to_provider_queue=queue.Queue(), event_queue=queue.Queue())
    wrapped = WakeOnDataSocket.__new__(WakeOnDataSocket)
    wrapped.socket = ours
    wrapped._is_connected = True
    wrapped._assoc = SimpleNamespace(dul=dul)
    wrapped.send_wakeup = wake_dul_on_send(dul)
    dul.socket = wrapped
    return dul, theirs, wrapped


def test_the_dul_stops_waiting_for_data_when_it_has_something_to_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a long wait for data, a queued primitive ends it at once; the answer is still "no data"."""
    monkeypatch.setattr("daemon.receive.pynetdicom_patches.socket_recv.WAIT_FOR_DATA_S", 5.0)
    dul, peer, wrapped = _dul_with_socket()
    try:
        threading.Timer(0.05, dul.to_provider_queue.put, args=("C-STORE-RSP",)).start()
        began = time.monotonic()
        assert wrapped.ready is False
        assert time.monotonic() - began < 2.0
        assert dul.to_provider_queue.get_nowait() == "C-STORE-RSP"
        peer.sendall(b"x")
        assert wrapped.ready is True  # data still wakes it, and the drained eventfd does not
    finally:
        release_send_wakeup(dul)
        peer.close()
        wrapped.socket.close()
    assert wrapped.send_wakeup is not None and wrapped.send_wakeup.fd is None


def test_a_wakeup_closed_under_the_dul_is_not_a_closed_connection() -> None:
    """If the wakeup's descriptor is gone while the DUL selects on it (the association ended in another thread),
    the DUL must not report the transport closed: it still has the A-RELEASE response to send."""
    import os

    dul, peer, wrapped = _dul_with_socket()
    try:
        stale = os.eventfd(0)
        os.close(stale)  # a descriptor number that is no longer open, as a racing close leaves it
        wrapped.send_wakeup.close()
        wrapped.send_wakeup.fd = stale
        assert wrapped.ready is False
        assert dul.event_queue.empty()
        peer.sendall(b"x")
        assert wrapped.ready is True
    finally:
        wrapped.send_wakeup.fd = None
        peer.close()
        wrapped.socket.close()
