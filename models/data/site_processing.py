"""The ways sites *process* a radiograph before it reaches us, as transforms of an image in [0, 1], bone bright.

Framing (:mod:`models.data.framing`) is where the hand sits in the field; processing is how its grey levels look. PACS
exports and other pipelines differ in both, and a model trained on one look gives other answers on another: the
shipped bone-age model 2.1.0 read 60 hands that another pipeline had segmented onto black and contrast-stretched
with a bias of +17.5 months (issue 30). The same functions serve two purposes:

- **evaluation**: ``bonebridge evaluate boneage --variants`` reads the test split through
  ``segmented_equalised`` and ``clahe`` beside the framing variants (:func:`models.data.framing.make_variant`);
- **training**: :func:`restyle_batch` gives a random share of each training batch one random site style
  (``train boneage --site-style-probability``), drawn afresh every batch from the loop's seeded generator, so a run
  that resumes draws the same styles.

Contrast-limited adaptive histogram equalisation and plain histogram equalisation are scikit-image's
(:func:`skimage.exposure.equalize_adapthist`, :func:`skimage.exposure.equalize_hist`); unsharp masking is
:func:`skimage.filters.unsharp_mask`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from skimage import exposure, filters

from models.data.preprocess import otsu_threshold

#: Site styles drawn for training (:func:`restyle`): one per restyled image.
SITE_STYLES: tuple[str, ...] = (
    "histogram_equalised", "clahe", "unsharp", "window", "gamma_strong", "segmented_equalised",
)


def silhouette(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest bright region (the hand and forearm), holes filled."""
    smooth = ndimage.gaussian_filter(image.astype(np.float32), max(1.0, min(image.shape) / 300))
    level = otsu_threshold(smooth.ravel())
    below = smooth[smooth <= level]
    level = (level + float(below.mean())) / 2 if below.size else level
    labels, count = ndimage.label(ndimage.binary_opening(smooth > level, iterations=2))
    if count == 0:
        return np.ones(image.shape, dtype=bool)
    areas = ndimage.sum(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    return ndimage.binary_fill_holes(labels == int(np.argmax(areas)) + 1)


def _stretch(image: np.ndarray, mask: np.ndarray | None = None, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Linear stretch of the ``low``-``high`` percentiles (of the pixels under ``mask``) to [0, 1]."""
    values = image[mask] if mask is not None and mask.any() else image
    lo, hi = np.percentile(values, [low, high]) if values.size else (0.0, 1.0)
    return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0, 1).astype(np.float32)


def histogram_equalised(image: np.ndarray) -> np.ndarray:
    return exposure.equalize_hist(image.astype(np.float32), nbins=256).astype(np.float32)


def clahe(image: np.ndarray, clip_limit: float = 0.01) -> np.ndarray:
    """CLAHE with tiles of about an eighth of the image (scikit-image's default kernel)."""
    return exposure.equalize_adapthist(np.clip(image, 0, 1).astype(np.float64), clip_limit=clip_limit).astype(np.float32)


def unsharp(image: np.ndarray, radius_fraction: float = 0.01, amount: float = 1.5) -> np.ndarray:
    """Edge enhancement as many CR/DX consoles apply it (radius about 1 % of the image side)."""
    radius = max(1.0, radius_fraction * min(image.shape))
    return np.clip(filters.unsharp_mask(image.astype(np.float32), radius=radius, amount=amount), 0, 1).astype(np.float32)


def window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """A narrower (or wider) VOI window than the exporter's: percentiles ``low``-``high`` mapped to [0, 1]."""
    return _stretch(image, None, low, high)


def segmented_equalised(image: np.ndarray) -> np.ndarray:
    """Everything outside the hand set to black, the hand itself contrast-equalised (bones bright, tissue pale).

    What another pipeline that segments hands produces (issue 30's 60 hands): the look changes, not the frame.
    """
    mask = silhouette(image)
    inside = np.zeros_like(image, dtype=np.float32)
    if mask.any():
        values = image[mask]
        ranks = np.searchsorted(np.sort(values), values, side="right") / values.size
        inside[mask] = ranks
    return np.where(mask, inside, 0.0).astype(np.float32)


def restyle(image: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` in one of :data:`SITE_STYLES`, with that style's strength drawn from ``rng``."""
    if style == "histogram_equalised":
        return histogram_equalised(image)
    if style == "clahe":
        return clahe(image, clip_limit=float(rng.uniform(0.005, 0.03)))
    if style == "unsharp":
        return unsharp(image, amount=float(rng.uniform(0.5, 2.0)))
    if style == "window":
        return window(image, float(rng.uniform(0, 20)), float(rng.uniform(85, 100)))
    if style == "gamma_strong":
        return np.clip(image, 0, 1) ** float(np.exp(rng.uniform(-0.7, 0.7)))
    if style == "segmented_equalised":
        return segmented_equalised(image)
    raise ValueError(f"unknown site style {style!r}; choose from {', '.join(SITE_STYLES)}")


def restyle_batch(batch: torch.Tensor, probability: float, seed: int) -> torch.Tensor:
    """A uint8 Bx1xHxW batch with each image, with ``probability``, in one random site style.

    Applied to the cached squares (the network's input size), so it costs a few milliseconds an image on a CPU.
    A site processes the image before we pad it, so only the image's own box (rows and columns that are not all
    zero) is restyled and the padding stays black.
    """
    rng = np.random.default_rng(seed)
    chosen = rng.random(len(batch)) < probability
    if not chosen.any():
        return batch
    out = batch.clone()
    for i in np.flatnonzero(chosen):
        image = batch[i, 0].numpy().astype(np.float32) / 255.0
        rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
        if rows.size < 8 or cols.size < 8:
            continue
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        styled = restyle(image[box], str(rng.choice(SITE_STYLES)), rng)
        out[i, 0][box] = torch.from_numpy(np.round(np.clip(styled, 0, 1) * 255).astype(np.uint8))
    return out
