"""Site processing styles (models.data.site_processing): what evaluation's variants and training's restyling do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data.framing import VARIANTS, make_variant
from models.data.site_processing import SITE_STYLES, restyle, restyle_batch, segmented_equalised, silhouette


def hand_on_detector(rng: np.random.Generator, height: int = 120, width: int = 90) -> np.ndarray:
    """A bright 'hand' (soft tissue with denser 'bones' inside) on a dim, noisy detector background."""
    image = rng.normal(0.15, 0.02, (height, width))
    yy, xx = np.mgrid[:height, :width]
    tissue = ((yy - 60) / 45) ** 2 + ((xx - 45) / 28) ** 2 < 1
    bone = tissue & (np.abs(xx - 45) < 6)
    image[tissue] = 0.5 + rng.normal(0, 0.02, tissue.sum())
    image[bone] = 0.8
    return np.clip(image, 0, 1).astype(np.float32)


@pytest.mark.parametrize("style", SITE_STYLES)
def test_every_style_keeps_shape_and_range_and_changes_the_look(style: str) -> None:
    image = hand_on_detector(np.random.default_rng(0))
    out = restyle(image, style, np.random.default_rng(1))
    assert out.shape == image.shape and out.dtype == np.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert not np.allclose(out, image, atol=1e-3)


def test_segmented_equalised_blackens_everything_outside_the_hand_and_keeps_bone_brightest() -> None:
    image = hand_on_detector(np.random.default_rng(0))
    out = segmented_equalised(image)
    mask = silhouette(image)
    assert (out[~mask] == 0).all()
    assert out[60, 45] > np.median(out[mask])  # the bone stays the brightest part of the hand


def test_restyle_batch_is_reproducible_keeps_padding_black_and_respects_the_probability() -> None:
    rng = np.random.default_rng(0)
    squares = torch.zeros((16, 1, 128, 128), dtype=torch.uint8)
    for i in range(16):
        squares[i, 0, :, 19:109] = torch.from_numpy((hand_on_detector(rng, 128, 90) * 255).astype(np.uint8))
    first = restyle_batch(squares, 0.5, seed=7)
    assert torch.equal(first, restyle_batch(squares, 0.5, seed=7))
    assert (first[:, :, :, :19] == 0).all() and (first[:, :, :, 109:] == 0).all()
    changed = sum(not torch.equal(first[i], squares[i]) for i in range(16))
    assert 3 <= changed <= 13
    assert torch.equal(restyle_batch(squares, 0.0, seed=7), squares)


@pytest.mark.parametrize("name", ["segmented_equalised", "clahe"])
def test_processing_variants_are_offered_by_evaluate(name: str) -> None:
    assert name in VARIANTS
    image = hand_on_detector(np.random.default_rng(3))
    out = make_variant(image, name)
    assert out.shape == image.shape and not np.allclose(out, image)
