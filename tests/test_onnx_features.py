"""Anatomy features through ONNX Runtime (issue 25, anatomy 1.2.3): PyTorch's numbers, and only where they can be.

The shipped anatomy networks are exported and run by ONNX Runtime here, so these tests check the real exported
graphs against PyTorch's eager forward on the same batch: the pooled features, the calibrated probabilities and the
out-of-distribution scores the decision reads. Speed is not asserted here (``bench/bench_anatomy.py`` measures it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.inference.predictor import load_predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights"


def _radiograph_like(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """A smooth bright shape on a dark field with noise: features well away from zero, unlike flat noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    body = np.exp(-(((yy - shape[0] * rng.uniform(0.3, 0.7)) / (shape[0] * 0.25)) ** 2
                    + ((xx - shape[1] * rng.uniform(0.3, 0.7)) / (shape[1] * 0.15)) ** 2))
    return np.clip(body * 0.8 + rng.normal(0, 0.03, shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("name", ["anatomy.pt", "anatomy-finetuned.pt"])
def test_shipped_anatomy_networks_give_the_same_scores_through_both_runtimes(name: str) -> None:
    fast = load_predictor(WEIGHTS / name)
    eager = load_predictor(WEIGHTS / name, runtime="torch")
    assert (fast.runtime, eager.runtime) == ("onnxruntime", "torch")
    images = [_radiograph_like(seed, shape) for seed, shape in enumerate([(700, 520), (480, 640), (300, 300)])]
    (batch,) = eager.model_inputs(images)
    with torch.no_grad():
        want, got = eager.pooled_features(batch).numpy(), fast.pooled_features(batch).numpy()
    assert want.shape == got.shape == (3, want.shape[1]) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    (p_want, ood_want), (p_got, ood_got) = eager.anatomy_scores(images), fast.anatomy_scores(images)
    np.testing.assert_allclose(p_got, p_want, atol=1e-5)
    np.testing.assert_allclose(ood_got, ood_want, rtol=1e-4)


def test_only_an_fp32_anatomy_model_on_the_cpu_runs_in_onnx_runtime() -> None:
    fracture = load_predictor(WEIGHTS / "fracture-384.pt")
    assert fracture.runtime == "torch"  # its map and Grad-CAM need PyTorch
    with pytest.raises(ValueError, match="only an fp32 anatomy model"):
        load_predictor(WEIGHTS / "fracture-384.pt", runtime="onnxruntime")
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_predictor(WEIGHTS / "anatomy.pt", runtime="tensorrt")
    in_bf16 = load_predictor(WEIGHTS / "anatomy.pt", precision="bf16")
    assert in_bf16.runtime == ("torch" if in_bf16.bf16 else "onnxruntime")  # autocast is PyTorch's


def test_the_session_is_built_once_by_prepare() -> None:
    predictor = load_predictor(WEIGHTS / "anatomy.pt")
    predictor.prepare()
    session = predictor._onnx._session
    assert session is not None
    predictor.anatomy_scores([_radiograph_like(0, (256, 256))])
    assert predictor._onnx._session is session


def test_a_forked_child_builds_its_own_session_and_reads_the_same() -> None:
    """A Celery prefork child inherits the parent's session object without its thread pool: it must rebuild."""
    import os
    import signal

    predictor = load_predictor(WEIGHTS / "anatomy.pt")
    predictor.prepare()
    image = [_radiograph_like(3, (320, 240))]
    want = predictor.anatomy_scores(image)[0]
    child = os.fork()
    if child == 0:  # the child: a hang would be the failure, so it has a deadline
        signal.alarm(60)
        try:
            same = np.allclose(predictor.anatomy_scores(image)[0], want, atol=1e-6)
            rebuilt = predictor._onnx._built_in == os.getpid()
            os._exit(0 if same and rebuilt else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
