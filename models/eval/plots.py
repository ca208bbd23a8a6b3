"""The figures an evaluation report draws: Bland-Altman and scatter for bone age, ROC and calibration for a
classifier, the anatomy confusion matrix. Matplotlib with the Agg backend, so they draw on a machine without a
screen; each function saves one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_bland_altman(true: np.ndarray, pred: np.ndarray, path: Path) -> Path:
    plt = _pyplot()
    mean, diff = (true + pred) / 2, pred - true
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(mean, diff, s=8, alpha=0.5)
    for value, style, text in ((bias, "-", "bias"), (bias + 1.96 * sd, "--", "+1.96 SD"),
                               (bias - 1.96 * sd, "--", "-1.96 SD")):
        ax.axhline(value, color="k", linestyle=style, linewidth=1)
        ax.annotate(f"{text} {value:.1f}", (ax.get_xlim()[1], value), ha="right", va="bottom", fontsize=8)
    ax.set_xlabel("mean of predicted and reference bone age (months)")
    ax.set_ylabel("predicted - reference (months)")
    ax.set_title(f"Bland-Altman (n={len(true)})")
    return _save(fig, path)


def plot_scatter(true: np.ndarray, pred: np.ndarray, path: Path, mae: float) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true, pred, s=8, alpha=0.5)
    top = float(max(true.max(initial=0), pred.max(initial=0), 1.0))
    ax.plot([0, top], [0, top], "k--", linewidth=1)
    ax.set_xlabel("reference bone age (months)")
    ax.set_ylabel("predicted bone age (months)")
    ax.set_title(f"MAE {mae:.2f} months (n={len(true)})")
    return _save(fig, path)


def plot_roc(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, p) in curves.items():
        if len(set(np.asarray(y) > 0.5)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_calibration(y: Sequence[float], p: Sequence[float], path: Path) -> Path:
    from sklearn.calibration import calibration_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    frac, mean = calibration_curve(np.asarray(y) > 0.5, p, n_bins=10, strategy="quantile")
    ax.plot(mean, frac, "o-", label="model")
    ax.plot([0, 1], [0, 1], "k:", linewidth=1, label="perfect")
    ax.set_xlabel("predicted probability of abnormal")
    ax.set_ylabel("observed fraction abnormal")
    ax.set_title("Calibration (image level, quantile bins)")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    peak = matrix.max(initial=0)
    for r in range(matrix.shape[0]):
        for c in range(matrix.shape[1]):
            if matrix[r, c]:
                ax.text(c, r, int(matrix[r, c]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[r, c] > peak / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Anatomy confusion matrix")
    return _save(fig, path)
