"""Receive C-STORE data sets straight into the spool's own temporary folder: every byte written once.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom 3 streams each received data set into a
``tempfile.NamedTemporaryFile`` (looked up as ``pynetdicom.dimse_messages.NamedTemporaryFile`` when the first
P-DATA of a C-STORE request arrives, in the association's DUL thread), writes the File Meta it builds from the
request, then every P-DATA fragment, and unlinks the file after the ``EVT_C_STORE`` handler returned. Left as it
is, that file lives in the system temp folder (often another filesystem), so the spool had to copy every byte
once more before it could rename it into place.

:func:`install` replaces that factory with one that, for the DUL threads of associations a listener registered
with :func:`receive_into`, returns a :class:`ReceiveFile` in the spool's ``tmp/`` folder instead. The spool then
fsyncs it and renames it into ``incoming/`` (pynetdicom's later unlink finds nothing, which it tolerates). Every
other thread (a client association, a listener nobody registered) gets pynetdicom's usual temporary file.

A :class:`ReceiveFile` also

- starts the kernel's writeback every :data:`WRITEBACK_EVERY` bytes while the data set streams in, so the fsync
  before the C-STORE response only waits for the last few megabytes;
- refuses *before writing anything* when the filesystem has less free space than the spool's floor: it then
  swallows the data set and the handler answers 0xA700 (out of resources), so a filling disk is never filled to
  the last byte by a half-written instance;
- remembers a write error (``ENOSPC`` when the disk fills mid-instance) instead of raising it into pynetdicom,
  which would abort the association; the handler answers 0xA700 and deletes the partial file.

A data set whose association ends before it was complete never reaches a handler, and pynetdicom then neither
closes nor deletes its file: the listener calls :func:`discard_unclaimed` when an association ends, which closes
and deletes every file of that association no handler has :meth:`~ReceiveFile.claim`-ed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

#: Start writeback each time this many bytes arrived since the last start.
WRITEBACK_EVERY = 1024 * 1024

#: ``SYNC_FILE_RANGE_WRITE`` (linux/fs.h): start writeback of dirty pages in the range, do not wait.
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None where it does not exist; Python's ``os`` lacks it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` to disk now, without waiting for it."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on the filesystem holding *path*."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def under_floor(directory: Path, min_free_bytes: int) -> str | None:
    """Why nothing may be written to *directory* now (its filesystem is under the floor), or None (raises OSError)."""
    if min_free_bytes <= 0:
        return None
    free = free_bytes(directory)
    if free >= min_free_bytes:
        return None
    return (f"{free // 2**20} MiB free in {directory}, under the floor of {min_free_bytes // 2**20} MiB "
            f"(storage.min_free_mb)")


@dataclass(frozen=True)
class ReceiveTarget:
    """Where an association's data sets go, and how much free space must remain there."""

    directory: Path
    min_free_bytes: int = 0


class ReceiveFile:
    """The file pynetdicom streams one C-STORE data set into (it uses ``write``, ``file.flush``, ``name``, ``close``).

    Exactly one of three outcomes, which the spool reads after the data set arrived: ``refused`` (a reason: the
    floor was reached before anything was written), ``error`` (a write failed part-way; the partial file is the
    spool's to delete), or neither (the whole data set is in ``name``, written but not yet fsynced: :meth:`sync`).
    """

    def __init__(self, target: ReceiveTarget) -> None:
        self.name = str(target.directory / f"{uuid.uuid4().hex}.recv")
        self._lock = threading.Lock()
        self._claimed = False
        self._discarded = False
        self.refused: str | None = None
        self.error: OSError | None = None
        self._fd: int | None = None
        self._written = 0
        self._writeback_from = 0
        try:
            self.refused = under_floor(target.directory, target.min_free_bytes)
            if self.refused is not None:
                return
            self._fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            self.error = exc

    @property
    def file(self) -> ReceiveFile:
        """pynetdicom calls ``file.flush()`` after each fragment; writes here are unbuffered already."""
        return self

    def flush(self) -> None:
        """Nothing to flush: :meth:`write` hands every fragment to the kernel at once."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write one fragment; a failure is remembered, never raised (pynetdicom would abort the association)."""
        size = len(data)
        if self._fd is None or self.error is not None:
            return size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.error = exc
            return size
        self._written += size
        if self._written - self._writeback_from >= WRITEBACK_EVERY:
            start_writeback(self._fd, self._writeback_from, self._written - self._writeback_from)
            self._writeback_from = self._written
        return size

    def sync(self) -> None:
        """fsync what was written (raises ``OSError``); after the writeback started, this waits for little."""
        if self._fd is None:
            raise OSError("no file was written")
        os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def claim(self) -> bool:
        """Called by the C-STORE handler before it uses the file; False if the association's end discarded it."""
        with self._lock:
            self._claimed = not self._discarded
            return self._claimed

    def discard(self) -> bool:
        """Close and delete the file unless a handler claimed it; True if it was discarded."""
        with self._lock:
            if self._claimed or self._discarded:
                return False
            self._discarded = True
        self.close()
        try:
            os.unlink(self.name)
        except OSError:
            pass
        return True


_TARGETS: weakref.WeakKeyDictionary[threading.Thread, ReceiveTarget] = weakref.WeakKeyDictionary()
_OPEN: weakref.WeakKeyDictionary[threading.Thread, list[ReceiveFile]] = weakref.WeakKeyDictionary()
_TARGETS_LOCK = threading.Lock()
_INSTALLED = False


def receive_into(dul_thread: threading.Thread, target: ReceiveTarget) -> None:
    """Send the data sets that *dul_thread* (an association's DUL reactor) receives to *target*."""
    with _TARGETS_LOCK:
        _TARGETS[dul_thread] = target


def _temporary_file(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``NamedTemporaryFile`` inside ``pynetdicom.dimse_messages``."""
    with _TARGETS_LOCK:
        target = _TARGETS.get(threading.current_thread())
    if target is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    received = ReceiveFile(target)
    with _TARGETS_LOCK:
        files = _OPEN.setdefault(threading.current_thread(), [])
        files[:] = [f for f in files if not f._claimed]
        files.append(received)
    return received


def discard_unclaimed(dul_thread: threading.Thread) -> int:
    """Close and delete the files of *dul_thread*'s association that no handler claimed; returns how many."""
    with _TARGETS_LOCK:
        files = _OPEN.pop(dul_thread, [])
        _TARGETS.pop(dul_thread, None)
    return sum(1 for received in files if received.discard())


def install() -> bool:
    """Route pynetdicom's chunked C-STORE data sets through :func:`_temporary_file` (idempotent).

    Returns False, and changes nothing, if this pynetdicom has no such hook; the spool then copies as before.
    """
    global _INSTALLED
    from pynetdicom import dimse_messages

    if _INSTALLED:
        return True
    if not hasattr(dimse_messages, "NamedTemporaryFile"):
        LOGGER.warning("pynetdicom %s has no NamedTemporaryFile hook: received data sets are copied once more",
                       getattr(__import__("pynetdicom"), "__version__", "?"))
        return False
    dimse_messages.NamedTemporaryFile = _temporary_file  # type: ignore[attr-defined]
    _INSTALLED = True
    return True
