"""Child processes that cannot outlive the daemon that started them.

``bonebridge serve`` starts an embedded ``redis-server`` and worker processes. When ``serve`` is killed hard
(``kill -9``, the OOM killer, a crashed supervisor) its ``finally`` blocks never run, and children left behind keep
the data directory's append-only file open: the next ``serve`` then starts a second Redis on the same files. On
Linux the kernel can deliver a signal to a child the moment its parent dies (``prctl(PR_SET_PDEATHSIG)``); this
module asks for that before the child program starts. Elsewhere it is a no-op, and the stale-process check in
:mod:`daemon.broker` is what protects the data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from typing import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when this process dies.

    SIGTERM by default, so Redis still flushes its append-only file and a Celery worker hands its task back.
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
