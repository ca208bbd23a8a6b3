"""Bootstrap confidence intervals for evaluation figures: how far a figure on a few hundred images can move.

Our held-out splits are small (FracAtlas validation: 307 images, 46 fractured; RSNA validation: 127 hands), so a
figure read off them carries an error that decides whether one model is really better than another: two fracture
models 0.01 of AUROC apart on 46 fractures are, as far as the split can tell, the same model. Every headline figure of
an evaluation report therefore comes with its 95 % interval.

The intervals are percentile bootstraps over images (resampled with replacement, a fixed seed so a report is
reproducible). For AUROC the fractured and the other images are resampled separately, so every resample has both
classes and the class balance of the split; for a difference between two readings of the same images (a framing
variant against the image as sent) the images are resampled in pairs, which is what makes the interval of the
difference narrower than the two intervals side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


def _percentiles(values: np.ndarray, level: float) -> list[float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [float("nan"), float("nan")]
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]


def _resample_indices(n: int, resamples: int, rng: np.random.Generator,
                      strata: np.ndarray | None = None) -> np.ndarray:
    """``resamples`` x ``n`` indices drawn with replacement, within each stratum when ``strata`` is given."""
    if strata is None:
        return rng.integers(0, n, size=(resamples, n))
    out = np.empty((resamples, n), dtype=np.int64)
    column = 0
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        out[:, column:column + members.size] = members[rng.integers(0, members.size, size=(resamples, members.size))]
        column += members.size
    return out


def mean_interval(values: Sequence[float], *, resamples: int = RESAMPLES, level: float = LEVEL,
                  seed: int = SEED) -> list[float]:
    """The interval of a mean (an MAE from absolute errors, a bias from signed ones, an accuracy from 0/1 hits).

    For a difference of paired readings pass the per-image differences: the pairing is kept by construction.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    return _percentiles(data[_resample_indices(data.size, resamples, rng)].mean(axis=1), level)


def statistic_interval(statistic: Callable[[np.ndarray], float], n: int, *, strata: Sequence | None = None,
                       resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> list[float]:
    """The interval of ``statistic(indices)`` over bootstrap resamples of ``n`` images (stratified if asked)."""
    if n == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    groups = None if strata is None else np.asarray(strata)
    draws = _resample_indices(n, resamples, rng, groups)
    return _percentiles(np.array([statistic(idx) for idx in draws], dtype=float), level)


def auroc_interval(labels: Sequence[float], scores: Sequence[float], **kwargs) -> list[float]:
    """The interval of an AUROC, resampling positives and negatives separately; nan without both classes."""
    y = np.asarray(labels, dtype=float) > 0.5
    p = np.asarray(scores, dtype=float)
    if y.all() or not y.any():
        return [float("nan"), float("nan")]
    return statistic_interval(lambda idx: roc_auc_score(y[idx], p[idx]), len(y), strata=y, **kwargs)
