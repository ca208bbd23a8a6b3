"""Child processes that cannot outlive the daemon that started them.

``bonebridge serve`` starts an embedded ``redis-server`` and worker processes. When ``serve`` is killed hard
(``kill -9``, the OOM killer, a crashed supervisor) its ``finally`` blocks never run, and children left behind keep
the data directory's append-only file open: the next ``serve`` then starts a second Redis on the same files. On
Linux the kernel can deliver a signal to a child the moment its parent dies (``prctl(PR_SET_PDEATHSIG)``); this
module asks for that before the child program starts. Elsewhere it is a no-op, and the stale-process check in
:mod:`daemon.queue.broker` is what protects the data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

LOGGER = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


#: The parent-death signal of a Celery worker. Not SIGTERM: Celery reads that as a *warm* shutdown ("finish the
#: current task first"), and a worker whose ``serve`` was killed then lived on as an orphan for a minute, sleeping
#: between delivery retries and delivering beside the worker of the next ``serve``. SIGKILL cannot be turned into
#: anything else; the task it held stays unacknowledged in Redis and comes back (tasks are idempotent).
WORKER_PARENT_DEATH_SIGNAL = signal.SIGKILL


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when this process dies.

    SIGTERM by default, so Redis still flushes its append-only file; workers use
    :data:`WORKER_PARENT_DEATH_SIGNAL`.
    The parent's pid is captured now: if the parent already died between fork and exec, the child exits at once
    instead of running as an orphan (the kernel only signals deaths that happen after the request).
    """
    parent = os.getpid()
    # libc is loaded here, in the parent: between fork and exec the child must not take the loader's locks,
    # which another thread of the daemon may have held at the moment of the fork.
    libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl if libc_name else None

    def preexec() -> None:
        if prctl is None:
            return
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def stop_orphaned_workers(run_dir: Path) -> list[int]:
    """SIGKILL workers a dead ``serve`` left behind (named in ``run/worker*.pid``); returns their pids.

    Where the parent-death signal exists a worker cannot outlive its ``serve``; this is the second line, for
    systems without it and for a worker whose ``serve`` died between fork and the signal's request. A process
    counts as such a worker only if its command line is a ``bonebridge worker`` and its parent is not a live
    ``serve`` (an orphan is adopted by init or a subreaper), so a live serve's worker is never touched.
    """
    stopped = []
    for pid_file in sorted(Path(run_dir).glob("worker*.pid")):
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        command = _cmdline(pid)
        if "daemon.cli\0worker" not in command and "bonebridge\0worker" not in command:
            continue
        if "serve" in _cmdline(_parent_of(pid)):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        LOGGER.warning("stopped worker %d left by a serve that is gone: it must not share the new broker", pid)
        stopped.append(pid)
    return stopped


def _cmdline(pid: int | None) -> str:
    if not pid:
        return ""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
