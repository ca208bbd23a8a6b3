"""An anatomy network's pooled features computed by ONNX Runtime: PyTorch's numbers, in less time.

Why (issue 25, ``models/weights/README.md`` "Anatomy 1.2.3"): anatomy runs first on every study, so its cost lands
on every study's latency, and the network is most of it. After a fresh DICOM decode has pushed the caches out,
PyTorch eager took 19 ms an image for the first member's EfficientNet-Lite0 at 224 px on this 2-core CPU, and ONNX
Runtime 6.6 ms for the same network (random input), with pooled features equal to fp32 rounding (at most 8e-6
apart); the whole anatomy step as the daemon calls it, 16.9 against 34.5 ms (``bench/bench_anatomy.py``). Only the
backbone and its pooling run here; the head, the temperature, the out-of-distribution score and the decision stay
where they are, so nothing that the cards and thresholds were fitted on moves.

The network is exported from the loaded PyTorch module (fp16-stored weights are already fp32 there) once, when it
is first needed, into memory: no extra file in ``models/weights/`` (its 60 MB budget) and nothing written at run
time. Where ``onnxruntime`` or ``onnx`` is not installed, or the model is not on the CPU, PyTorch computes the
features as before (:func:`onnx_runtime_available`).
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings

import numpy as np
import torch
from torch import nn

LOGGER = logging.getLogger(__name__)

__all__ = ["OnnxPooledFeatures", "PooledFeatures", "onnx_runtime_available"]

#: Runtimes an anatomy :class:`~models.inference.predictor.Predictor` can compute its features with.
RUNTIMES = ("onnxruntime", "torch")


def onnx_runtime_available() -> bool:
    """True where both the exporter's ``onnx`` and ``onnxruntime`` import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class PooledFeatures(nn.Module):
    """The backbone and its global average pooling: N x 3 x S x S -> N x D, the features the head and OOD read."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features = model.features
        self.pool = model.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class OnnxPooledFeatures:
    """:class:`PooledFeatures` of one model, run by an ONNX Runtime CPU session built on first use.

    ``threads``: the session's intra-op threads, as many as PyTorch was given (``configure_threads``), so a worker
    keeps the CPU share it was configured for. ``InferenceSession.run`` is thread-safe; the build is locked. A
    session is one process's: a Celery prefork child inherits the parent's session object but not its thread pool,
    so a process that did not build the session builds its own before the first run.
    """

    def __init__(self, model: nn.Module, size: int, threads: int | None = None) -> None:
        self._module = PooledFeatures(model).eval()
        self._size = size
        self._threads = threads or torch.get_num_threads()
        self._session = None
        self._built_in: int | None = None  # the pid that built the session
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Export and build the session now (the daemon's warm-up), so the first study does not wait for it."""
        with self._lock:
            if self._session is None or self._built_in != os.getpid():
                self._session = self._build()
                self._built_in = os.getpid()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N x D, float32) of a normalised batch on the CPU."""
        if self._session is None or self._built_in != os.getpid():
            self.prepare()
        batch = np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())
        return torch.from_numpy(self._session.run(None, {"x": batch})[0])

    def _build(self):
        import onnxruntime

        example = torch.zeros(1, 3, self._size, self._size)
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript-based exporter: it needs no onnxscript and exports this plain CNN exactly; its
            # deprecation and shape-inference notices say nothing about this graph.
            warnings.simplefilter("ignore")
            torch.onnx.export(self._module, (example,), buffer, dynamo=False, input_names=["x"],
                              output_names=["features"], dynamic_axes={"x": {0: "n"}, "features": {0: "n"}},
                              opset_version=17)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        # No busy-waiting after a run: PyTorch's own threads (the study's preprocessing, the next model) want the
        # same two cores right after, and a spinning pool kept the anatomy step at 21 ms an image against 14 ms
        # without (bench/bench_anatomy.py, 15 rounds each, the same session).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its graph-optimisation notices are not the operator's concern
        session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        LOGGER.info("anatomy features run by ONNX Runtime %s (%d threads)", onnxruntime.__version__, self._threads)
        return session
