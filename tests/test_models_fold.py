"""Batch norms folded into convolutions for inference: same outputs, fewer layers, and a refusal when unsure."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from daemon.output.heatmap_render import blend_above_floor, to_grey8
from models.nets.networks import BoneAgeSexNet, FractureNet, fold_for_inference


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Give every batch norm non-trivial statistics, as training would (fresh ones are the identity)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("network", [FractureNet, BoneAgeSexNet])
def test_folded_lite0_computes_the_same_with_no_batch_norm_left(network: type[nn.Module]) -> None:
    model = _randomise_norms(network(pretrained=False))
    example = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    folded = fold_for_inference(model, example)
    assert folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original must be left as it was"
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))  # another batch than the check's
    with torch.no_grad():
        pairs = (zip(model.forward_maps(x), folded.forward_maps(x)) if hasattr(model, "forward_maps")
                 else zip(model(x), folded(x)))
        for before, after in pairs:
            torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_grad_cam_still_has_gradients_after_folding() -> None:
    model = _randomise_norms(FractureNet(pretrained=False))
    folded = fold_for_inference(model, torch.randn(1, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    logit, _ = folded.forward_maps(x)
    logit.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


class NormBeforeConvolution(nn.Module):
    """Registered conv then norm, but applies the norm first: folding by registration order would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


def test_a_network_whose_order_differs_is_left_unfolded() -> None:
    model = _randomise_norms(NormBeforeConvolution())
    folded = fold_for_inference(model, torch.randn(1, 4, 16, 16))
    assert folded is model
    assert isinstance(folded.norm, nn.BatchNorm2d)


def test_to_grey8_rounds_as_the_float_formula() -> None:
    values = np.concatenate([np.linspace(-0.5, 1.5, 4001, dtype=np.float32), [0.0, 1.0, 0.5 / 255]]).astype(np.float32)
    expected = (np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    assert np.array_equal(to_grey8(values), expected)


def test_blend_takes_uint8_or_float_grey_alike() -> None:
    rng = np.random.default_rng(0)
    grey = rng.random((40, 30), dtype=np.float32)
    heat = np.zeros((40, 30), dtype=np.float32)
    heat[10:20, 5:15] = 0.9
    assert np.array_equal(blend_above_floor(grey, heat), blend_above_floor(to_grey8(grey), heat))


@pytest.mark.parametrize(("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_cli_makes_openmp_threads_sleep_unless_told_otherwise(preset: str | None, expected: str) -> None:
    """libgomp reads the policy once, when torch loads: the CLI must set it before its parser imports torch."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import sys, os; import daemon.cli as cli; assert 'torch' not in sys.modules; cli.build_parser(); "
            "assert 'torch' in sys.modules; print(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
