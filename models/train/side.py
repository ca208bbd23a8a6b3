"""Which hand is this? A side head for the bone-age network, fitted on its frozen features.

Bone age is read on the left hand, and every RSNA training image is one. A right hand reaches the model mirrored
relative to what it learnt: on validation that costs the sex head all of its accuracy (75.6 % -> 53.5 %) and the
age 0.6 months. When the header states the side, :class:`models.inference.predictor.Predictor` mirrors a right hand back.
Many headers do not, so this module fits a linear "right hand?" logit on the network's pooled features, with
labels that cost nothing: each training image as sent is a left hand, its mirror image a right one. Each
training image is first reframed one of the ways a PACS sends hands (:mod:`models.data.framing`), so the head holds
when the framing differs.

The backbone is not touched, so the age and sex outputs stay exactly those of the checkpoint it came from; the
head costs one 1280 x 1 product at inference. Its threshold is chosen on validation by one rule: the lowest
probability at which no left hand of the validation split (as sent and reframed) would be mirrored, so the head
only acts where it is sure and a left hand is not turned into a right one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.nets.checkpoint import load_checkpoint, save_checkpoint
from models.data.datasets import read_rsna_boneage, split_of
from models.data.framing import make_variant
from models.data.preprocess import load_image, to_model_input

LOGGER = logging.getLogger(__name__)

#: Reframings a training image may be given before both orientations are taken (one per image, at random).
TRAIN_FRAMINGS: tuple[str | None, ...] = (None, None, "tight_crop_black", "zoomed_out", "rotated_plus_15",
                                          "rotated_minus_15")
#: Framings the threshold is chosen on (validation), each in both orientations.
VALIDATION_FRAMINGS: tuple[str | None, ...] = (None, "tight_crop_black", "zoomed_out", "rotated_plus_15",
                                               "rotated_minus_15")
REGULARISATION = (0.01, 0.1, 1.0)  # inverse L2 strengths tried, chosen on validation log-loss
THRESHOLD_FLOOR = 0.5
NEVER = 1.01  # a threshold no probability reaches


@dataclass
class SideFeatures:
    features: np.ndarray  # N x width pooled features
    right: np.ndarray     # N, 1 = mirrored (a right hand)


def pooled_features(model: torch.nn.Module, images: list[np.ndarray], geometry, batch_size: int = 16) -> np.ndarray:
    """The bone-age network's pooled features, exactly as inference computes them."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_model_input(images[start:start + batch_size], geometry).contiguous(memory_format=torch.channels_last)
            rows.append(model.pool(model.features(x)).flatten(1).float().numpy())
    return np.concatenate(rows)


def side_features(model, paths: list[Path], geometry, framings: tuple[str | None, ...], *, every_framing: bool,
                  seed: int = 0, progress: bool = True) -> SideFeatures:
    """Both orientations of each image, reframed by one random framing or (validation) by every one."""
    rng = np.random.default_rng(seed)
    feats, right = [], []
    for start in tqdm(range(0, len(paths), 16), desc="side features", disable=not progress, leave=False):
        originals = [load_image(p) for p in paths[start:start + 16]]
        if every_framing:
            framed = [make_variant(img, f) if f else img for f in framings for img in originals]
        else:
            framed = [make_variant(img, f) if f else img
                      for img, f in zip(originals, rng.choice(np.array(framings, dtype=object), len(originals)))]
        for flip in (0, 1):
            batch = [np.ascontiguousarray(img[:, ::-1]) if flip else img for img in framed]
            feats.append(pooled_features(model, batch, geometry))
            right += [flip] * len(batch)
    return SideFeatures(np.concatenate(feats), np.array(right))


def fit_logistic(train: SideFeatures, val: SideFeatures) -> tuple[np.ndarray, float, float, dict[str, float]]:
    """Standardised L2 logistic regression, its strength chosen on validation; folded back to raw features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train.features)
    best = None
    for c in REGULARISATION:
        clf = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(train.features), train.right)
        loss = log_loss(val.right, clf.predict_proba(scaler.transform(val.features))[:, 1])
        LOGGER.info("side head C=%g: validation log-loss %.4f", c, loss)
        if best is None or loss < best[0]:
            best = (loss, c, clf)
    loss, c, clf = best
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weight = clf.coef_[0] / scale
    bias = float(clf.intercept_[0] - np.sum(clf.coef_[0] * scaler.mean_ / scale))
    return weight.astype(np.float32), bias, c, {"validation_log_loss": float(loss)}


def choose_threshold(p_right: np.ndarray, right: np.ndarray) -> float:
    """The lowest threshold at which no validation left hand is mirrored (never below 0.5).

    The next float32 above the most right-looking left hand: inference compares float32 probabilities with it.
    """
    left_max = np.float32(p_right[right == 0].max()) if np.any(right == 0) else np.float32(0.0)
    if left_max >= 1.0:  # a left hand at p = 1 in float32: the head can never be sure enough, it never acts
        return NEVER
    return max(THRESHOLD_FLOOR, float(np.nextafter(left_max, np.float32(1.0))))


def side_report(p_right: np.ndarray, right: np.ndarray, threshold: float) -> dict[str, float]:
    flagged = p_right >= threshold
    return {
        "n": int(len(right)),
        "accuracy_at_0.5": float(((p_right >= 0.5) == right.astype(bool)).mean()),
        "right_hands_caught": float(flagged[right == 1].mean()) if np.any(right == 1) else float("nan"),
        "left_hands_mirrored": float(flagged[right == 0].mean()) if np.any(right == 0) else float("nan"),
    }


def fit_side_head(weights: Path, labels_csv: Path, out: Path, images: Path | None = None,
                  progress: bool = True) -> tuple[Path, dict]:
    """Fit the side head of a bone-age checkpoint on its training split; write ``out`` with the head in its card."""
    model, card = load_checkpoint(weights)
    if card.task != "boneage":
        raise SystemExit(f"{weights}: a side head is for bone-age models, not {card.task!r}")
    model = model.to(memory_format=torch.channels_last).eval()
    cases = read_rsna_boneage(labels_csv, images)
    paths = {split: [c.path for c in cases if split_of(c.case_id) == split] for split in ("train", "val")}
    LOGGER.info("side head: %d training and %d validation radiographs", len(paths["train"]), len(paths["val"]))
    geometry = card.geometry
    train = side_features(model, paths["train"], geometry, TRAIN_FRAMINGS, every_framing=False, progress=progress)
    val = side_features(model, paths["val"], geometry, VALIDATION_FRAMINGS, every_framing=True, progress=progress)
    weight, bias, c, fit = fit_logistic(train, val)
    p_val = 1.0 / (1.0 + np.exp(-(val.features @ weight + np.float32(bias))))  # float32, as at inference
    threshold = choose_threshold(p_val, val.right)
    report = {**fit, "regularisation_C": c, "threshold": threshold, "threshold_rule":
              "lowest probability at which no left hand of the validation split (as sent and reframed) is mirrored",
              "validation": side_report(p_val, val.right, threshold),
              "training_images": len(paths["train"]), "training_framings": [f or "as sent" for f in TRAIN_FRAMINGS],
              "validation_framings": [f or "as sent" for f in VALIDATION_FRAMINGS]}
    head = torch.nn.Linear(weight.shape[0], 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight)[None])
        head.bias.fill_(bias)
    model.side_head = head
    card = card.model_copy(update={"side_head": True, "side_threshold": threshold,
                                   "training": {**card.training, "side_head": report}})
    return save_checkpoint(model.to(memory_format=torch.contiguous_format), card, out), report
