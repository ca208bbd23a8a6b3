"""Wake pynetdicom's two reactors of a listener association when they have work, not at their next poll.

An association has two threads that poll each other's queues. Between the last fragment of a C-STORE and the
response that lets the sender go on, each poll cost up to a millisecond:

- the **association reactor** (``Association._run_reactor``) sleeps ``time.sleep(0.001)`` between looks at the
  DIMSE message queue, so a complete C-STORE waited up to 1 ms before its handler ran;
- the **DUL reactor** waits in :attr:`daemon.receive.pynetdicom_patches.socket_recv.WakeOnDataSocket.ready` for up to 1 ms of socket data
  before it looks at what it has to send, and the sender sends nothing until it has the response: the response
  waited up to 1 ms more.

At 2 MB per instance that was a tenth of the time per instance (``bench/bench_receive.py``, CR case). Here:

- :func:`wake_association` puts an event on the DIMSE message queue's ``put``; the association thread's
  reactor sleep (``time`` inside ``pynetdicom.association`` is replaced by :class:`_ReactorClock`) waits on that
  event for at most the same millisecond, so it behaves as before, only it returns as soon as a message came;
- :func:`wake_dul_on_send` gives the DUL's outgoing-primitive queue an ``eventfd`` that
  :class:`~daemon.receive.pynetdicom_patches.socket_recv.WakeOnDataSocket` selects on beside the socket.

Nothing changes for other threads (client associations of the dispatcher sleep as pynetdicom wrote it), and
nothing is dropped: the events only shorten waits that were polls anyway.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

LOGGER = logging.getLogger(__name__)

_WAKE: weakref.WeakKeyDictionary[threading.Thread, threading.Event] = weakref.WeakKeyDictionary()
_WAKE_LOCK = threading.Lock()
_INSTALLED = False


class _ReactorClock:
    """The ``time`` module as ``pynetdicom.association`` sees it: ``sleep`` ends early when the thread is woken."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        event = _WAKE.get(threading.current_thread())
        if event is None:
            time.sleep(seconds)
        elif event.wait(seconds):
            event.clear()


def _on_put(target_queue: Any, wake: Any) -> None:
    """Call ``wake()`` after every item *target_queue* takes (its ``_put`` runs under the queue's own lock)."""
    original = target_queue._put

    def put_and_wake(item: Any) -> None:
        original(item)
        wake()

    target_queue._put = put_and_wake


def install() -> bool:
    """Route ``pynetdicom.association``'s ``time`` through :class:`_ReactorClock` (idempotent)."""
    global _INSTALLED
    from pynetdicom import association

    if _INSTALLED:
        return True
    if getattr(association, "time", None) is not time:
        LOGGER.warning("pynetdicom.association has no plain time module: its reactor keeps polling")
        return False
    association.time = _ReactorClock()  # type: ignore[attr-defined]
    _INSTALLED = True
    return True


def wake_association(assoc: Any) -> None:
    """Wake *assoc*'s reactor thread when its DIMSE provider has a complete message for it."""
    msg_queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if msg_queue is None or not install():
        return
    event = threading.Event()
    with _WAKE_LOCK:
        _WAKE[assoc] = event
    _on_put(msg_queue, event.set)


class SendWakeup:
    """An ``eventfd`` that becomes readable when the DUL has something to send.

    Closed when its association ends (:func:`daemon.receive.pynetdicom_patches.socket_recv.release_send_wakeup`) or its socket closes,
    whichever comes first; a finaliser closes it if neither happened, so no path leaks a descriptor.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fd: int | None = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._finalizer = weakref.finalize(self, os.close, self.fd)

    def notify(self) -> None:
        with self._lock:
            if self.fd is not None:
                try:
                    os.eventfd_write(self.fd, 1)
                except OSError:  # counter saturated: it is readable already
                    pass

    def drain(self) -> None:
        with self._lock:
            if self.fd is not None:
                try:
                    os.eventfd_read(self.fd)
                except OSError:  # nothing to read (already drained)
                    pass

    def close(self) -> None:
        """Close the descriptor once; a later notify or drain does nothing."""
        with self._lock:
            self.fd = None
            self._finalizer()  # closes it now, and only the first call does anything


def wake_dul_on_send(dul: Any) -> SendWakeup | None:
    """A :class:`SendWakeup` signalled by every primitive queued on *dul* to send (None where eventfd is missing)."""
    if not hasattr(os, "eventfd"):
        return None
    wakeup = SendWakeup()
    _on_put(dul.to_provider_queue, wakeup.notify)
    return wakeup
