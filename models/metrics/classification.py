"""Classifier metrics shared by training (per-epoch validation), the task trainers and evaluation: the Youden
threshold, AUROC with sensitivity, specificity and kappa at a threshold, top-k accuracy. Plain functions of arrays;
they import no task, so every trainer and report can use them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score, roc_curve

from models.metrics.bootstrap import auroc_interval


def youden_threshold(y_true: Sequence[float], prob: Sequence[float]) -> float:
    """The probability threshold maximising sensitivity + specificity - 1; 0.5 when it cannot be computed."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(prob, dtype=float)
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p)
    finite = np.isfinite(thresholds)
    if not finite.any():
        return 0.5
    j = np.where(finite, tpr - fpr, -np.inf)
    return float(np.clip(thresholds[int(np.argmax(j))], 0.0, 1.0))


def binary_metrics(y_true: Sequence[float], prob: Sequence[float], threshold: float = 0.5, *,
                   with_interval: bool = False) -> dict[str, Any]:
    """AUROC, accuracy, sensitivity, specificity and Cohen's kappa at ``threshold`` (decision: prob >= threshold).

    ``with_interval`` adds ``auroc_ci95``, the AUROC's 95 % bootstrap interval (:func:`models.metrics.bootstrap.auroc_interval`,
    nan without both classes). It is a keyword because a thousand resamples are for evaluation reports, where every
    block of figures (overall, per region, per study) should carry one, not for training's per-epoch validation.
    """
    y = np.asarray(y_true, dtype=float) > 0.5
    p = np.asarray(prob, dtype=float)
    decision = p >= threshold
    positives, negatives = int(y.sum()), int((~y).sum())
    metrics: dict[str, float] = {
        "n": float(len(y)),
        "positives": float(positives),
        "accuracy": float((decision == y).mean()) if len(y) else float("nan"),
        "sensitivity": float((decision & y).sum() / positives) if positives else float("nan"),
        "specificity": float((~decision & ~y).sum() / negatives) if negatives else float("nan"),
        "threshold": float(threshold),
    }
    if positives and negatives:
        metrics["auroc"] = float(roc_auc_score(y, p))
    # Kappa is undefined when both raters use a single label; sklearn then returns nan with a warning.
    if len(np.unique(y)) > 1 or len(np.unique(decision)) > 1:
        metrics["kappa"] = float(cohen_kappa_score(y, decision))
    if with_interval:
        metrics["auroc_ci95"] = auroc_interval(y, p)
    return metrics


def topk_accuracy(y_true: Sequence[int], scores: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the ``k`` highest scores."""
    scores = np.asarray(scores)
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == np.asarray(y_true)[:, None]).any(axis=1).mean())
