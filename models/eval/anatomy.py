"""The anatomy model's head on cached features: the figures of ``bonebridge evaluate anatomy --extra ...`` (issue 25).

Accuracy alone hides what matters for routing, so this reports, from one cached feature pass:

- top-1 per set, per class and per view (the test images as they are, and read through CLAHE, histogram
  equalisation and a strong gamma: the processing-style shortcut);
- calibration: expected calibration error of the raw and the temperature-scaled probabilities, and a reliability
  table;
- out of distribution: AUROC of the OOD score, test images of the training sources against images of other sources
  and of parts without a class (the clusters a person discarded), and the share of each set the threshold accepts.
  The training sources are the ones the card names (``training_sources``); a card that names none counts every
  source with training rows in the cache.

The **decision table** (each set run through the daemon's own anatomy decision and routing) is the daemon's:
:mod:`daemon.analyse.decision_table` adds it to :func:`head_figures`' report, and runs the command.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.anatomy_vocabulary import FRACATLAS_REGION

#: Coarse region of each name: FracAtlas's, except that a chest is its own region (FracAtlas files it under shoulder).
REGION: dict[str, str | None] = {**FRACATLAS_REGION, "chest": "chest"}


def head_of(weights: Path) -> tuple[np.ndarray, np.ndarray, list[str], float, Any, float | None]:
    """(W, b, classes, temperature, OOD model or None, OOD threshold) of an anatomy checkpoint, without its backbone."""
    import torch

    from models.nets.anatomy_ood import MahalanobisOOD
    from models.nets.checkpoint import read_card

    card = read_card(weights)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    w = state["head.2.weight"].numpy().astype(np.float64)
    b = state["head.2.bias"].numpy().astype(np.float64)
    calibration = card.calibration or {}
    ood_entry = calibration.get("ood") or {}
    ood = MahalanobisOOD.load(Path(weights).parent / ood_entry["file"], ood_entry.get("sha256")) \
        if ood_entry.get("file") else None
    return w, b, list(card.classes), float(calibration.get("temperature") or 1.0), ood, \
        (float(ood_entry["threshold"]) if ood_entry.get("file") else None)


@dataclass
class HeadFigures:
    """One checkpoint's head on cached features: the report, and per set the rows a decision table reads."""

    report: dict[str, Any]
    #: set name -> (truth, calibrated probabilities, OOD score or None) per image
    sets: dict[str, list[tuple[str, np.ndarray, float | None]]]
    classes: list[str]
    ood_threshold: float | None


def head_figures(arrays: dict[str, np.ndarray], weights: Path, split: str = "test") -> HeadFigures:
    """Every figure of the module docstring for one checkpoint's head on cached features."""
    from models.nets.anatomy_ood import auroc, expected_calibration_error, reliability, softmax
    from models.nets.checkpoint import read_card

    w, b, classes, temperature, ood, threshold = head_of(weights)
    trained_on = read_card(weights).training_sources
    x = arrays["x"]
    logits = x @ w.T + b
    probs = softmax(logits, temperature)
    scores = ood.score(x) if ood is not None else np.full(len(x), np.nan)
    index = {c: i for i, c in enumerate(classes)}
    in_split = arrays["split"] == split
    view = arrays["view"]
    source = arrays["source"]
    label = arrays["label"]
    report: dict[str, Any] = {"weights": str(weights), "classes": classes, "temperature": temperature,
                              "ood_threshold": threshold, "split": split}
    # accuracy per set and view (the set's own labels; a label the model has no class for counts as wrong)
    accuracy: dict[str, dict[str, float]] = {}
    for s in sorted(set(source[in_split])):
        for v in sorted(set(view[in_split & (source == s)])):
            rows = in_split & (source == s) & (view == v) & (label != "")
            if rows.any():
                truth = label[rows]
                predicted = np.array(classes)[probs[rows].argmax(1)]
                accuracy.setdefault(s, {})[v] = float((predicted == truth).mean())
                accuracy[s][f"{v}_region"] = float(np.mean([REGION.get(p) == REGION.get(t)
                                                            for p, t in zip(predicted, truth)]))
                accuracy[s]["n"] = int(rows.sum())
    report["top1"] = accuracy
    known = in_split & np.array([lab in index for lab in label])
    y = np.array([index[lab] for lab in label[known]])
    original = view[known] == "original"
    report["calibration"] = {
        "ece_raw_original": expected_calibration_error(softmax(logits[known][original]), y[original]),
        "ece_calibrated_original": expected_calibration_error(probs[known][original], y[original]),
        "ece_raw_all_views": expected_calibration_error(softmax(logits[known]), y),
        "ece_calibrated_all_views": expected_calibration_error(probs[known], y),
        "reliability_calibrated_original": reliability(probs[known][original], y[original]),
        "n_original": int(original.sum()), "n_all_views": int(len(y)),
    }
    per_class = {c: float((probs[known][original][y[original] == i].argmax(1) == i).mean())
                 for i, c in enumerate(classes) if (y[original] == i).any()}
    report["per_class_recall_original"] = per_class
    if ood is not None:
        training_sources = set(trained_on) or {s for s in set(source) if not s.endswith("-discarded") and s in
                                               set(source[arrays["split"] == "train"])}
        inside = in_split & np.isin(source, list(training_sources)) & (view == "original")
        others = {s for s in set(source) if s not in training_sources}
        ood_report = {"in_distribution_accepted": float((scores[inside] <= threshold).mean()), "auroc": {},
                      "accepted": {}}
        for s in sorted(others):
            rows = (source == s) & (view == "original") & np.isin(arrays["split"], ["val", "test"])
            if rows.any():
                ood_report["auroc"][s] = auroc(scores[inside], scores[rows])
                ood_report["accepted"][s] = float((scores[rows] <= threshold).mean())
        out_all = np.isin(source, list(others)) & (view == "original") & np.isin(arrays["split"], ["val", "test"])
        ood_report["auroc"]["all other sets"] = auroc(scores[inside], scores[out_all])
        for s in sorted(training_sources):
            for v in sorted(set(view)):
                rows = in_split & (source == s) & (view == v)
                if rows.any():
                    ood_report["accepted"][f"{s} ({v})"] = float((scores[rows] <= threshold).mean())
        report["ood"] = ood_report
    # the rows a decision table reads: the original views of the test split of each set with a known truth, and the
    # examples
    sets: dict[str, list] = {}
    for s in sorted(set(source)):
        rows = np.flatnonzero((source == s) & (view == "original") & (label != "") &
                              ((arrays["split"] == split) | np.isin(source, ["mura", "hands-fullres", "pydicom"])))
        if len(rows):
            sets[s] = [(str(label[i]), probs[i], None if ood is None else float(scores[i])) for i in rows]
    return HeadFigures(report, sets, classes, threshold)


def mura_truth(path: str | Path) -> str:
    """The part a MURA example shows, from its file name (``ELBOW.png`` -> ``elbow``)."""
    return Path(path).stem.lower().removeprefix("xr_")


def inference_ms(weights: Path, paths: list[Path], rounds: int = 5, study: int = 4) -> float:
    """Median ms per image of :meth:`Predictor.anatomy_scores` on studies of ``study`` decoded images."""
    from models.inference.predictor import load_predictor
    from models.data.preprocess import load_image

    predictor = load_predictor(weights)
    images = [load_image(p) for p in paths[:study]]
    predictor.anatomy_scores(images)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        predictor.anatomy_scores(images)
        times.append((time.perf_counter() - start) * 1000 / len(images))
    return float(np.median(times))
