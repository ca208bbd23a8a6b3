"""OpenMP threads that sleep when idle: set before PyTorch loads, for every BoneBridge process.

PyTorch's CPU kernels run on GNU OpenMP, whose idle threads by default spin for a while before sleeping, so
that the next parallel region starts a little sooner. A network's forward pass is hundreds of short parallel
regions, and on the worker that spinning was a third of the models' CPU time (measured with
``bench/bench_analysis.py``: anatomy 73 ms of CPU spinning against 48 ms sleeping, fracture 149 against 96, for
the same image). On a small machine that CPU belongs to the listener receiving the next study, or to another
worker. libgomp reads ``OMP_WAIT_POLICY`` once, when it is loaded, so this must run before ``import torch``;
an administrator's own ``OMP_WAIT_POLICY`` (``ACTIVE`` for the lowest latency on a dedicated machine) wins.
"""

from __future__ import annotations

import os
import sys

DEFAULT_WAIT_POLICY = "PASSIVE"


def prefer_sleeping_threads() -> bool:
    """Set ``OMP_WAIT_POLICY`` to PASSIVE unless it is set; False when torch was already loaded (too late)."""
    os.environ.setdefault("OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)
    return "torch" not in sys.modules
