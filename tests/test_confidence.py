"""Bootstrap intervals of evaluation figures (pure logic: synthetic numbers, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.metrics.bootstrap import _resample_indices, auroc_interval, mean_interval, statistic_interval


def test_mean_interval_brackets_the_mean_and_narrows_with_more_images() -> None:
    rng = np.random.default_rng(1)
    small, large = rng.normal(8.0, 6.0, 60), rng.normal(8.0, 6.0, 2000)
    for values in (small, large):
        low, high = mean_interval(values)
        assert low < values.mean() < high
    assert np.diff(mean_interval(large))[0] < np.diff(mean_interval(small))[0] / 3
    # about the normal approximation's width (2 x 1.96 x sd / sqrt(n)) on a large sample
    assert np.diff(mean_interval(large))[0] == pytest.approx(2 * 1.96 * large.std() / math.sqrt(large.size), rel=0.15)


def test_intervals_are_reproducible_and_follow_the_seed() -> None:
    values = np.random.default_rng(2).exponential(5.0, 100)
    assert mean_interval(values) == mean_interval(values)
    assert mean_interval(values, seed=1) != mean_interval(values)


def test_constant_values_have_a_zero_width_interval_and_no_values_none() -> None:
    assert mean_interval([3.0] * 20) == [3.0, 3.0]
    assert all(math.isnan(v) for v in mean_interval([]))


def test_paired_differences_are_narrower_than_either_reading() -> None:
    """Two readings of the same images share most of their error: their difference is known far better."""
    rng = np.random.default_rng(3)
    shared = rng.normal(0, 8.0, 120)
    first, second = np.abs(shared + rng.normal(0, 1.0, 120)), np.abs(shared + rng.normal(0, 1.0, 120) + 0.5)
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    assert width(mean_interval(second - first)) < width(mean_interval(first)) / 3


def test_stratified_resamples_keep_each_class_count() -> None:
    labels = np.array([1] * 7 + [0] * 30)
    draws = _resample_indices(labels.size, 200, np.random.default_rng(0), labels)
    assert draws.shape == (200, 37)
    assert (labels[draws].sum(axis=1) == 7).all()


def test_auroc_interval_brackets_the_auroc_and_handles_edge_cases() -> None:
    rng = np.random.default_rng(4)
    y = np.array([1] * 40 + [0] * 260)
    scores = rng.normal(0, 1, 300) + 1.5 * y
    low, high = auroc_interval(y, scores)
    assert low < roc_auc_score(y, scores) < high and 0.5 < low and high < 1.0
    assert auroc_interval(y, y.astype(float)) == [1.0, 1.0]  # separated perfectly in every resample
    assert all(math.isnan(v) for v in auroc_interval([1, 1, 1], [0.2, 0.5, 0.9]))


def test_statistic_interval_ignores_undefined_resamples() -> None:
    values = np.array([0.0, 1.0, 2.0, 3.0])
    interval = statistic_interval(lambda idx: float("nan") if idx[0] == 0 else float(values[idx].mean()), 4)
    assert all(np.isfinite(interval)) and interval[0] <= interval[1]
