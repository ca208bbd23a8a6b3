"""Precision: whether bf16 autocast runs natively on a device, for training and inference alike.

:mod:`models.train.loop` resolves ``TrainConfig.precision`` with :func:`autocast_enabled`;
:class:`models.inference.predictor.Predictor` runs a card's ``inference_precision: bf16`` only where
:func:`bf16_supported` says so.
"""

from __future__ import annotations

import torch


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively here: a CUDA GPU that says so, or a CPU with AVX-512 BF16 or AMX.

    Elsewhere bf16 on a CPU is emulated and slower than fp32, so ``precision="auto"`` stays in fp32 there.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def autocast_enabled(precision: str, device: torch.device) -> bool:
    """Resolve ``TrainConfig.precision`` for ``device``: True means bf16 autocast."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision == "bf16" or (precision == "auto" and bf16_supported(device))
