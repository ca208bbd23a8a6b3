"""Replacements of pynetdicom internals on the receive path, behind one :func:`install`.

What they do (about 700 lines, written against pynetdicom 3.0):

- :mod:`~.receive_file`: pynetdicom's ``dimse_messages.NamedTemporaryFile`` becomes the spool's own file, so a
  chunked C-STORE data set is streamed once, straight to ``data_dir/tmp/`` (no second copy);
- :mod:`~.reactor_wakeup`: ``association.time`` becomes a clock whose ``sleep`` ends when the association's DIMSE
  queue gets a message (no 1 ms polling per association);
- :mod:`~.socket_recv`: an association's socket becomes :class:`~.socket_recv.WakeOnDataSocket` (``__class__``
  swap): reads wait in ``select`` for data or for something to send;
- :mod:`~.pdata_fast_path`: the association's DUL becomes :class:`~.pdata_fast_path.FastPDataDUL` (``__class__``
  swap): the middle fragments of a data set go from the socket to the spool file without PDU objects.

:func:`install` runs once per process (the listener's :func:`daemon.receive.listener.build_ae` calls it). It checks
the installed pynetdicom against :data:`KNOWN_VERSIONS`; on any other version it logs one line and installs
nothing, and the per-association hooks (:func:`on_connection_open`, :func:`on_connection_closed`) then leave every
association on pynetdicom's stock code path. Each patch also checks the exact object it replaces and leaves it
alone when that is not what it was written for.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pynetdicom

from daemon.receive.pynetdicom_patches import pdata_fast_path, reactor_wakeup, receive_file
from daemon.receive.pynetdicom_patches.receive_file import ReceiveTarget
from daemon.receive.pynetdicom_patches.socket_recv import release_send_wakeup, wake_on_data

__all__ = ["KNOWN_VERSIONS", "install", "installed", "on_connection_closed", "on_connection_open"]

LOGGER = logging.getLogger(__name__)

#: The pynetdicom releases these patches were written and tested against (``major.minor.`` prefixes).
KNOWN_VERSIONS: tuple[str, ...] = ("3.0.",)

_LOCK = threading.Lock()
_INSTALLED: bool | None = None  # None: install() not called yet; False: refused (unknown version)


def install(version: str | None = None) -> bool:
    """Install the process-wide patches once; True when they are in place, False on an unknown pynetdicom.

    ``version`` defaults to the installed ``pynetdicom.__version__`` (tests pass another to see the refusal).
    """
    global _INSTALLED
    with _LOCK:
        if _INSTALLED is not None and version is None:
            return _INSTALLED
        version = str(getattr(pynetdicom, "__version__", "?")) if version is None else version
        if not version.startswith(KNOWN_VERSIONS):
            LOGGER.warning("pynetdicom %s is not one these receive-path patches know (%s): not installed, "
                           "associations use pynetdicom's stock code path", version,
                           ", ".join(v + "x" for v in KNOWN_VERSIONS))
            _INSTALLED = False
            return False
        receive_file.install()
        reactor_wakeup.install()
        _INSTALLED = True
        return True


def installed() -> bool:
    """Whether :func:`install` ran and put the patches in place."""
    return bool(_INSTALLED)


def on_connection_open(assoc: Any, target: ReceiveTarget) -> None:
    """``EVT_CONN_OPEN``: stream this association's data sets into *target*, wake its reactor on data, fast P-DATA.

    Does nothing unless :func:`install` put the patches in place.
    """
    if not _INSTALLED:
        return
    receive_file.receive_into(assoc.dul, target)
    wake_on_data(assoc.dul)
    reactor_wakeup.wake_association(assoc)
    pdata_fast_path.install(assoc.dul)


def on_connection_closed(assoc: Any, *, connection_closed: bool) -> int:
    """``EVT_RELEASED`` / ``EVT_ABORTED`` / ``EVT_CONN_CLOSE``: free what the patches hold for *assoc*.

    ``connection_closed`` (``EVT_CONN_CLOSE``, the DUL's own thread) also closes the send wakeup. Returns how many
    partial files of an unfinished data set were discarded.
    """
    if not _INSTALLED:
        return 0
    if connection_closed:
        release_send_wakeup(assoc.dul)
    return receive_file.discard_unclaimed(assoc.dul)
