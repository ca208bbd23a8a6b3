"""Calibrated probabilities and an out-of-distribution score for the anatomy probe (issue 25). Numpy and scipy only.

- **Temperature scaling** (Guo et al. 2017): one scalar ``T`` dividing the probe's logits, fitted on the validation
  split by minimising the negative log-likelihood (:func:`fit_temperature`); the class order and top-1 are unchanged,
  only how sure the probabilities say the model is. :func:`expected_calibration_error` measures it (15 equal-width
  bins of the top-1 probability).
- **Out of distribution**: the squared Mahalanobis distance of an image's pooled backbone features to the nearest
  class mean, with one covariance shared by the classes (Lee et al. 2018), estimated with Ledoit-Wolf shrinkage
  (1,280 features, a few thousand images). Features of a radiograph unlike any training image lie far from every
  class mean even when the linear head still gives one class most of the softmax. The model is kept in a small
  sidecar (``NAME.ood.npz``) the card names with its sha256: the class means and the whitening matrix in a
  reduced basis (:class:`MahalanobisOOD`).
- **Threshold**: the rule is fixed before any test image is read: accept (call in-distribution) the fraction
  ``accept`` (95 %) of the *validation* images, i.e. the threshold is that quantile of their scores
  (:func:`threshold_for_acceptance`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Bins of :func:`expected_calibration_error`.
ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    p = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising the validation NLL (a bounded search over log T with scipy)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=int)
    found = minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
                            bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                            options={"xatol": 1e-4})
    return float(np.exp(found.x))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width bins of the top-1 confidence: |accuracy - mean confidence| x share of images."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        return float("nan")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict]:
    """Per bin of top-1 confidence: count, mean confidence, accuracy (for a reliability plot or table)."""
    confidence = np.asarray(probabilities).max(axis=1)
    correct = np.asarray(probabilities).argmax(axis=1) == np.asarray(labels, dtype=int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [{"bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}", "n": int((which == b).sum()),
             "confidence": float(confidence[which == b].mean()) if (which == b).any() else None,
             "accuracy": float(correct[which == b].mean()) if (which == b).any() else None}
            for b in range(bins)]


def threshold_for_acceptance(scores: np.ndarray, accept: float = 0.95) -> float:
    """The OOD score at or below which the share ``accept`` of (validation, in-distribution) images fall."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), accept))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(an out-of-distribution image scores higher than an in-distribution one), ties counted half."""
    a, b = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    order = np.concatenate([a, b]).argsort(kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([a, b])[order]
    # average ranks for ties
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = ranks[len(a):].sum()
    return float((rank_sum - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


@dataclass
class MahalanobisOOD:
    """Minimum squared Mahalanobis distance to the class means, with a shared (shrunk) covariance.

    Stored as ``means`` (C x D) and ``whiten`` (D x K): the distance is ``|(x - mean) @ whiten|^2``. ``K`` is the
    number of principal directions kept (all of them, or fewer to keep the sidecar small); the directions dropped
    carry the least variance of the pooled features.
    """

    means: np.ndarray
    whiten: np.ndarray

    def __post_init__(self) -> None:
        # The whitened class means, once: recomputing them (C x D x K) at every call was most of the anatomy step's
        # cost on a loaded machine (bench/README.md, "Restructure, issue 26").
        self._whitened_means = (self.means.astype(np.float32) @ self.whiten.astype(np.float32)).astype(np.float32)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, components: int | None = None) -> "MahalanobisOOD":
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels, dtype=int)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        lookup = np.zeros(labels.max() + 1, dtype=int)
        lookup[classes] = np.arange(len(classes))
        centred = features - means[lookup[labels]]
        covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
        values, vectors = np.linalg.eigh(covariance)
        order = np.argsort(values)[::-1][: components or len(values)]
        whiten = vectors[:, order] / np.sqrt(np.maximum(values[order], 1e-12))
        return cls(means.astype(np.float32), whiten.astype(np.float32))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Per row: the squared distance to the nearest class mean (higher = less like the training images)."""
        x = np.asarray(features, dtype=np.float32) @ self.whiten          # N x K
        m = self._whitened_means                                            # C x K
        d = (x * x).sum(1)[:, None] - 2 * x @ m.T + (m * m).sum(1)[None, :]
        return np.maximum(d.min(axis=1), 0.0).astype(np.float64)

    def save(self, path: Path) -> str:
        """Write the sidecar; returns its sha256 (the card records it)."""
        path = Path(path)
        with open(path, "wb") as handle:
            # float16 halves the file; kept only where every value fits it (shrinkage keeps the whitening bounded)
            small = float(np.abs(self.whiten).max()) < 6e4
            np.savez(handle, means=self.means.astype(np.float32),
                     whiten=self.whiten.astype(np.float16 if small else np.float32))
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def load(cls, path: Path, sha256: str | None = None) -> "MahalanobisOOD":
        path = Path(path)
        data = path.read_bytes()
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"{path}: sha256 does not match the card's")
        with np.load(path, allow_pickle=False) as stored:
            return cls(stored["means"].astype(np.float32), stored["whiten"].astype(np.float32))
