"""``bonebridge evaluate``: measure a checkpoint on a labelled folder, the way the papers it is compared with do.

Evaluation goes through :class:`models.inference.predictor.Predictor`, the code path the daemon uses, not the training
loop's cache, so what is measured is what is deployed (preprocessing, sex handling, clipping). Per task:

- **boneage** (RSNA layout): MAE and RMSE in months, overall and per age band, bias, sex accuracy and AUROC;
  Bland-Altman and scatter plots. PatientSex is given from ``labels.csv``, as the DICOM header would give it.
- **sex** (RSNA layout; a ``sex`` or a ``boneage`` checkpoint): accuracy, AUROC, ROC curve.
- **abnormality** on a FracAtlas-layout folder (``dataset.csv`` + ``images/`` + optional ``fractures.csv``):
  see :mod:`models.eval.abnormality` (AUROC and whether the heatmap points at the radiologists' boxes; default
  split ``test``, the id-block split training held out);
- **abnormality** (MURA-v1.1 ``valid``, the public evaluation split): AUROC, sensitivity, specificity and Cohen's
  kappa at the card's threshold, per image and per study (mean of the study's image probabilities, as MURA
  scores), overall and per body region; ROC and calibration plots.
- **anatomy** (one folder per class, or a named ``clusters.yaml``): top-1 and top-2 accuracy per class and
  overall, confusion matrix; with ``--regions`` (FracAtlas ``dataset.csv``, RSNA ``labels.csv``) also at the
  FracAtlas body-region level against those independent labels, and the share of RSNA hands called ``hand``.

The JSON also holds timings (seconds per image for loading, for inference, and for inference with Grad-CAM) and
every image's prediction. The last line printed is the headline figure.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from models.metrics.classification import binary_metrics
from models.train.classify import anatomy_class_index
from models.metrics.bootstrap import auroc_interval, mean_interval
from models.data.datasets import read_class_folders, read_mura, read_rsna_boneage, split_of
from models.inference.ensemble import EnsemblePredictor, load_model, male_probability
from models.inference.predictor import ImagePrediction, Predictor
from models.eval.plots import plot_bland_altman, plot_calibration, plot_confusion, plot_roc, plot_scatter
from models.data.preprocess import load_image

AGE_BANDS_YEARS = ((0, 2), (2, 6), (6, 10), (10, 14), (14, 19))
HEATMAP_TIMING_IMAGES = 8


@dataclass
class Item:
    """One evaluation image with what is known about it."""

    key: str                 # case id or relative path, as written to the per-image list
    path: Path
    label: float             # age in months, 1 = male / abnormal, or class index
    male: bool | None = None
    group: str = ""          # MURA region, anatomy class
    study: str = ""          # MURA study


# --------------------------------------------------------------------------- data
def rsna_items(data: Path | None, labels: Path | None, split: str) -> tuple[list[Item], str]:
    """Cases of an RSNA-layout folder (``DIR/labels.csv`` + ``DIR/images``), filtered by the id-hash split."""
    if labels is None:
        if data is None:
            raise ValueError("give --data DIR (with DIR/labels.csv) or --labels CSV")
        labels = data / "labels.csv" if data.is_dir() else data
    images = None
    if data is not None and data.is_dir():
        images = data / "images" if (data / "images").is_dir() else data
    cases = read_rsna_boneage(labels, images)
    items = [Item(c.case_id, c.path, c.boneage_months, c.male) for c in cases
             if split == "all" or split_of(c.case_id) == split]
    return items, f"{labels} ({split} split: {len(items)} of {len(cases)} cases)"


def mura_items(data: Path) -> tuple[list[Item], str]:
    """MURA-v1.1 ``valid``: kept out of training by ``train abnormality``, and what MURA's baseline reports on."""
    items = [Item(str(i.path), i.path, float(i.label), group=i.group, study=i.study) for i in read_mura(data, "valid")]
    return items, f"{data} (MURA-v1.1 valid: {len(items)} images)"


def folder_items(data: Path, split: str, classes: list[str]) -> tuple[list[Item], str]:
    """``DIR/<class>/`` images, filtered by the same path hash ``train anatomy`` splits with."""
    found, names = read_class_folders(data)
    indices = {name: anatomy_class_index(name, classes) for name in names}
    items = []
    for image in found:
        key = Path(image.path).relative_to(data).as_posix()
        if split == "all" or split_of(key) == split:
            items.append(Item(key, image.path, float(indices[image.group]), group=image.group))
    return items, f"{data} ({split} split: {len(items)} of {len(found)} images)"


def discarded_items(clusters_yaml: Path, split: str) -> list[Item]:
    """Images of the clusters a person discarded, in ``split`` (their class is unknown; their region may not be)."""
    from models.data.datasets import split_key
    from models.train.cluster import read_named_clusters

    return [Item(str(path), path, -1.0, group="discard")
            for listed, path, name in read_named_clusters(clusters_yaml, include_discarded=True)
            if name == "discard" and (split == "all" or split_of(split_key(listed)) == split)]


def cluster_items(clusters_yaml: Path, split: str, classes: list[str]) -> tuple[list[Item], str]:
    """Images of a named clusters file, in the split ``train anatomy --clusters`` put them in."""
    from models.train.anatomy import examples_from_clusters

    found = examples_from_clusters(clusters_yaml)
    chosen = ("train", "val", "test") if split == "all" else (split,)
    items = [Item(str(e.path), e.path, float(anatomy_class_index(e.group, classes)), group=e.group)
             for name in chosen for e in found.splits[name]]
    total = sum(len(v) for v in found.splits.values())
    return items, f"{clusters_yaml} ({split} split: {len(items)} of {total} named images)"


# --------------------------------------------------------------------------- running the model
def run_predictions(predictor: Predictor, items: list[Item], *, give_sex: bool, tta: bool, batch_size: int,
                    progress: bool) -> tuple[list[ImagePrediction], dict[str, float]]:
    """Predict every item (no heatmaps), timing loading and inference separately; then time Grad-CAM on a few."""
    preds: list[ImagePrediction] = []
    load_s = infer_s = 0.0
    bar = tqdm(total=len(items), desc=f"evaluate {predictor.task}", disable=not progress, unit="img")
    first_batch: list[np.ndarray] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        began = time.perf_counter()
        images = [load_image(item.path) for item in chunk]
        load_s += time.perf_counter() - began
        sexes = [("M" if item.male else "F") if give_sex and item.male is not None else None for item in chunk]
        began = time.perf_counter()
        preds += predictor.predict(images, patient_sex=sexes, with_heatmaps=False, tta=tta)
        infer_s += time.perf_counter() - began
        if not first_batch:
            first_batch = images[:HEATMAP_TIMING_IMAGES]
        bar.update(len(chunk))
    bar.close()
    n = max(1, len(items))
    timing = {
        "device": str(predictor.device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "load_seconds_per_image": load_s / n,
        "seconds_per_image": infer_s / n,
    }
    if first_batch:
        began = time.perf_counter()
        predictor.predict(first_batch, with_heatmaps=True)
        timing["seconds_per_image_with_heatmap"] = (time.perf_counter() - began) / len(first_batch)
    return preds, timing


# --------------------------------------------------------------------------- metrics per task
def boneage_report(items: list[Item], preds: list[ImagePrediction]) -> tuple[dict, list[dict], str]:
    true = np.array([i.label for i in items], dtype=float)
    pred = np.array([float(p.outputs["bone_age_months"]) for p in preds])
    err = pred - true
    metrics: dict[str, Any] = {
        "n": len(items),
        "mae_months": float(np.abs(err).mean()),
        "rmse_months": float(np.sqrt((err ** 2).mean())),
        "bias_months": float(err.mean()),
        "mae_months_ci95": mean_interval(np.abs(err)),
        "bias_months_ci95": mean_interval(err),
        "by_age_band": {},
    }
    for low, high in AGE_BANDS_YEARS:
        last = high == AGE_BANDS_YEARS[-1][1]
        in_band = (true >= low * 12) & ((true <= high * 12) if last else (true < high * 12))
        band = {"n": int(in_band.sum())}
        if in_band.any():
            band["mae_months"] = float(np.abs(err[in_band]).mean())
            band["rmse_months"] = float(np.sqrt((err[in_band] ** 2).mean()))
        metrics["by_age_band"][f"{low}-{high}y"] = band
    metrics.update(sex_metrics(items, preds))
    # How often a correctly labelled study (PatientSex given, true) is flagged as a possible sex mismatch.
    metrics["sex_mismatch_rate"] = float(np.mean([p.outputs.get("sex_mismatch") == "yes" for p in preds]))
    rows = [{"id": i.key, "true_months": i.label, "pred_months": float(p.outputs["bone_age_months"]),
             "male": i.male, "predicted_sex": p.outputs["predicted_sex"],
             "predicted_sex_probability": p.outputs["predicted_sex_probability"],
             "sex_mismatch": p.outputs["sex_mismatch"]} for i, p in zip(items, preds)]
    low, high = metrics["mae_months_ci95"]
    headline = f"boneage MAE {metrics['mae_months']:.2f} months (95 % CI {low:.2f}-{high:.2f}, n={len(items)})"
    return metrics, rows, headline


def variant_reports(predictor: Predictor, items: list[Item], batch_size: int, progress: bool,
                    base_errors: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """MAE, bias and sex accuracy of the same test images reframed each way of :mod:`models.data.framing`.

    Given the signed errors of the images as sent (``base_errors``), each variant also gets its MAE's difference
    from theirs with a paired interval: the issue's "within 1.0 month of (b)" is a statement about that difference.
    """
    from models.data.framing import VARIANT_LATERALITY, VARIANTS, make_variant

    out: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        preds: list[ImagePrediction] = []
        for start in tqdm(range(0, len(items), batch_size), desc=name, disable=not progress, leave=False):
            chunk = items[start:start + batch_size]
            images = [make_variant(load_image(item.path), name) for item in chunk]
            sexes = [("M" if item.male else "F") if item.male is not None else None for item in chunk]
            sides = [VARIANT_LATERALITY.get(name)] * len(chunk)
            preds += predictor.predict(images, patient_sex=sexes, with_heatmaps=False, laterality=sides)
        err = np.array([float(p.outputs["bone_age_months"]) for p in preds]) - np.array([i.label for i in items])
        out[name] = {"n": len(items), "mae_months": float(np.abs(err).mean()), "bias_months": float(err.mean()),
                     "mae_months_ci95": mean_interval(np.abs(err)), **sex_metrics(items, preds)}
        if base_errors is not None:
            paired = np.abs(err) - np.abs(base_errors)
            out[name]["mae_difference_months"] = float(paired.mean())
            out[name]["mae_difference_ci95"] = mean_interval(paired)
    return out


def sex_metrics(items: list[Item], preds: list[ImagePrediction]) -> dict[str, Any]:
    male = np.array([bool(i.male) for i in items])
    p_male = np.array([male_probability(p.outputs) for p in preds])
    decided = np.array([p.outputs["predicted_sex"] == "M" for p in preds])
    metrics: dict[str, Any] = {"sex_accuracy": float((decided == male).mean()),
                               "sex_accuracy_ci95": mean_interval(decided == male)}
    if 0 < male.sum() < len(male):
        from sklearn.metrics import roc_auc_score

        metrics["sex_auroc"] = float(roc_auc_score(male, p_male))
        metrics["sex_auroc_ci95"] = auroc_interval(male, p_male)
    return metrics


def sex_report(items: list[Item], preds: list[ImagePrediction]) -> tuple[dict, list[dict], str]:
    metrics: dict[str, Any] = {"n": len(items), **sex_metrics(items, preds)}
    rows = [{"id": i.key, "male": i.male, "male_probability": male_probability(p.outputs)} for i, p in zip(items, preds)]
    auroc = metrics.get("sex_auroc", float("nan"))
    return metrics, rows, f"sex AUROC {auroc:.3f} accuracy {metrics['sex_accuracy']:.3f} (n={len(items)})"


def _grouped(keys: Sequence[str], values: Sequence[float], labels: Sequence[float]) -> tuple[list, list, list]:
    """Mean probability per key (a MURA study), with the key's label (all images of a study share it)."""
    probs: dict[str, list[float]] = defaultdict(list)
    label: dict[str, float] = {}
    for key, value, y in zip(keys, values, labels):
        probs[key].append(value)
        label[key] = y
    names = sorted(probs)
    return names, [float(np.mean(probs[k])) for k in names], [label[k] for k in names]


def abnormality_report(items: list[Item], preds: list[ImagePrediction],
                       threshold: float) -> tuple[dict, list[dict], str]:
    y = [i.label for i in items]
    p = [float(pr.outputs["abnormality_probability"]) for pr in preds]
    studies, study_p, study_y = _grouped([i.study for i in items], p, y)
    study_region = {i.study: i.group for i in items}
    metrics: dict[str, Any] = {
        "threshold": threshold,
        "image": binary_metrics(y, p, threshold, with_interval=True),
        "study": binary_metrics(study_y, study_p, threshold, with_interval=True),
        "image_by_region": {},
        "study_by_region": {},
    }
    for region in sorted({i.group for i in items}):
        idx = [k for k, i in enumerate(items) if i.group == region]
        metrics["image_by_region"][region] = binary_metrics([y[k] for k in idx], [p[k] for k in idx], threshold,
                                                            with_interval=True)
        sidx = [k for k, s in enumerate(studies) if study_region[s] == region]
        metrics["study_by_region"][region] = binary_metrics([study_y[k] for k in sidx], [study_p[k] for k in sidx],
                                                            threshold, with_interval=True)
    rows = [{"path": i.key, "study": i.study, "region": i.group, "abnormal": int(i.label), "probability": q}
            for i, q in zip(items, p)]
    study = metrics["study"]
    headline = (f"abnormality study AUROC {study.get('auroc', float('nan')):.3f} "
                f"kappa {study.get('kappa', float('nan')):.3f} (n={len(studies)} studies, {len(items)} images)")
    return metrics, rows, headline


def region_report(items: list[Item], preds: list[ImagePrediction], regions: dict[Path, str],
                  rsna: set[Path]) -> dict[str, Any]:
    """Top-1/top-2 at the FracAtlas body-region level against independent labels (single-region images only)."""
    from models.anatomy_vocabulary import FRACATLAS_REGION

    rows = []
    for item, pred in zip(items, preds):
        truth = regions.get(Path(item.path).resolve())
        if truth is None or truth == "mixed":
            continue
        first = FRACATLAS_REGION.get(str(pred.outputs["anatomy"]))
        second = FRACATLAS_REGION.get(str(pred.outputs.get("anatomy_top2")))
        rows.append((truth, first, second))
    out: dict[str, Any] = {"n": len(rows)}
    if rows:
        out["top1_accuracy"] = sum(t == a for t, a, _ in rows) / len(rows)
        out["top2_accuracy"] = sum(t in (a, b) for t, a, b in rows) / len(rows)
        out["per_region"] = {
            region: {"n": sum(t == region for t, _, _ in rows),
                     "recall": sum(t == a == region for t, a, _ in rows) / max(1, sum(t == region for t, _, _ in rows))}
            for region in sorted({t for t, _, _ in rows})
        }
    hands = [str(p.outputs["anatomy"]) for i, p in zip(items, preds) if Path(i.path).resolve() in rsna]
    if hands:
        out["rsna_hands"] = {"n": len(hands), "called_hand": sum(h == "hand" for h in hands) / len(hands)}
    return out


def anatomy_report(items: list[Item], preds: list[ImagePrediction], classes: list[str]) -> tuple[dict, list[dict], str]:
    truth = [classes[int(i.label)] if int(i.label) < len(classes) else i.group for i in items]
    top1 = [p.outputs["anatomy"] for p in preds]
    top2 = [p.outputs.get("anatomy_top2") for p in preds]
    n = max(1, len(items))
    metrics: dict[str, Any] = {
        "n": len(items),
        "top1_accuracy": sum(t == a for t, a in zip(truth, top1)) / n,
        "top2_accuracy": sum(t in (a, b) for t, a, b in zip(truth, top1, top2)) / n,
        "top1_accuracy_ci95": mean_interval([t == a for t, a in zip(truth, top1)]),
        "top2_accuracy_ci95": mean_interval([t in (a, b) for t, a, b in zip(truth, top1, top2)]),
        "per_class": {},
    }
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(truth, top1, labels=classes)
    metrics["confusion_matrix"] = {"labels": classes, "rows_true_columns_predicted": matrix.tolist()}
    for k, name in enumerate(classes):
        support = int(matrix[k].sum())
        if support:
            metrics["per_class"][name] = {"n": support, "recall": float(matrix[k, k] / support)}
    rows = [{"path": i.key, "true": t, "anatomy": p.outputs["anatomy"],
             "anatomy_probability": p.outputs["anatomy_probability"]} for i, t, p in zip(items, truth, preds)]
    return metrics, rows, f"anatomy top-1 accuracy {metrics['top1_accuracy']:.3f} (n={len(items)})"


# --------------------------------------------------------------------------- the command
def _jsonable(value: Any) -> Any:
    """NaN/inf become null: the JSON must stay standard for other tools to read."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def evaluate(task: str, weights: Path, data: Path | None, *, labels: Path | None = None, split: str | None = None,
             mask: bool | None = None, tta: bool = False, json_out: Path | None = None, plots: Path | None = None,
             batch_size: int = 16, device: str | None = None, progress: bool = True,
             regions: Sequence[Path] | None = None, variants: bool = False, precision: str | None = None,
             ensemble: Sequence[Path] = (), flip: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Evaluate ``weights`` on a labelled folder; writes the JSON and plots, returns the report.

    ``precision`` ("fp32", "bf16") overrides the card's inference precision: reading validation both ways is how a
    card earns ``inference_precision: bf16``. ``ensemble`` names further checkpoints averaged with ``weights``
    exactly as the daemon's ``models.<name>.ensemble`` does (:mod:`models.inference.ensemble`).
    """
    predictor = load_model(weights, list(ensemble), device=device, mask_labels=mask, batch_size=batch_size,
                           precision=precision)
    if flip:  # issue 29's test-time flip, measured before a card may turn it on
        for member in getattr(predictor, "members", [predictor]):
            member.test_time_flip = True
    card = predictor.card
    if task == "sex" and card.task not in ("sex", "boneage"):
        raise ValueError(f"{weights} is a {card.task} model; sex needs a sex or bone-age checkpoint")
    if task != "sex" and card.task != task:
        raise ValueError(f"{weights} is a {card.task} model, not {task}")
    notes = []
    if task == "abnormality" and data is not None and _is_fracatlas(data):
        return _evaluate_fracatlas(predictor, weights, data, split, json_out, plots, batch_size, progress,
                                   echo)
    if task in ("boneage", "sex"):
        split = split or "all"
        items, source = rsna_items(data, labels, split)
    elif task == "abnormality":
        if data is None:
            raise ValueError("abnormality needs --data MURA_ROOT")
        if split not in (None, "all"):
            notes.append(f"--split {split} ignored: abnormality is always evaluated on MURA-v1.1 valid")
        split = "valid"
        items, source = mura_items(data)
    elif task == "anatomy":
        if data is None:
            raise ValueError("anatomy needs --data CLASS_FOLDERS or --data clusters.yaml")
        split = split or "all"
        if data.suffix.lower() in (".yaml", ".yml"):
            items, source = cluster_items(data, split, card.classes)
        else:
            items, source = folder_items(data, split, card.classes)
    else:
        raise ValueError(f"unknown task {task!r}")
    if not items:
        raise ValueError(f"{source}: no images to evaluate")
    if tta and task != "boneage":
        notes.append("--tta is meant for bone age; applied anyway")
    preds, timing = run_predictions(predictor, items, give_sex=task == "boneage", tta=tta, batch_size=batch_size,
                                    progress=progress)
    plot_paths: list[Path] = []
    plots = Path(plots) if plots else None
    if task == "boneage":
        metrics, rows, headline = boneage_report(items, preds)
        if variants:
            base_errors = np.array([r["pred_months"] - r["true_months"] for r in rows])
            metrics["variants"] = variant_reports(predictor, items, batch_size, progress, base_errors)
            from models.data.framing import SIDE_VARIANTS

            framings = {k: v for k, v in metrics["variants"].items() if k not in SIDE_VARIANTS}
            worst = max(abs(v["mae_months"] - metrics["mae_months"]) for v in framings.values())
            unstated = metrics["variants"]["right_hand_unstated"]["mae_months"]
            headline += (f"; framing variants within {worst:.2f} months of it; a right hand without its side in the "
                         f"header {unstated:.2f}")
        if plots:
            true = np.array([r["true_months"] for r in rows])
            pred = np.array([r["pred_months"] for r in rows])
            plot_paths += [plot_bland_altman(true, pred, plots / "boneage_bland_altman.png"),
                           plot_scatter(true, pred, plots / "boneage_scatter.png", metrics["mae_months"])]
    elif task == "sex":
        metrics, rows, headline = sex_report(items, preds)
        if plots:
            curve = ([float(bool(r["male"])) for r in rows], [r["male_probability"] for r in rows])
            plot_paths.append(plot_roc({"sex (male)": curve}, plots / "sex_roc.png", "Sex from the radiograph"))
    elif task == "abnormality":
        threshold = card.threshold if card.threshold is not None else 0.5
        metrics, rows, headline = abnormality_report(items, preds, threshold)
        if plots:
            y = [r["abnormal"] for r in rows]
            p = [r["probability"] for r in rows]
            studies, sp, sy = _grouped([r["study"] for r in rows], p, y)
            plot_paths += [plot_roc({"image": (y, p), "study (mean)": (sy, sp)}, plots / "abnormality_roc.png",
                                    "Abnormality, MURA-v1.1 valid"),
                           plot_calibration(y, p, plots / "abnormality_calibration.png")]
    else:
        metrics, rows, headline = anatomy_report(items, preds, card.classes)
        if regions:
            from models.data.region_labels import layout_of, read_all_region_labels, read_region_labels

            known = read_all_region_labels(list(regions))
            rsna = {p for f in regions if layout_of(f) == "rsna" for p in read_region_labels(f)}
            metrics["region_level"] = region_report(items, preds, known, rsna)
            if data.suffix.lower() in (".yaml", ".yml"):
                # The same split's images of the clusters the person discarded (composites, mixed parts): a
                # PACS sends those too, so the region figure over everything is reported beside the named one.
                extra = discarded_items(data, split)
                if extra:
                    extra_preds, _ = run_predictions(predictor, extra, give_sex=False, tta=False,
                                                     batch_size=batch_size, progress=progress)
                    metrics["region_level_including_discarded"] = region_report(
                        items + extra, preds + extra_preds, known, rsna)
            level = metrics["region_level"]
            if "top1_accuracy" in level:
                headline += (f"; region level top-1 {level['top1_accuracy']:.3f} top-2 {level['top2_accuracy']:.3f}"
                             f" (n={level['n']})")
        if plots:
            matrix = np.array(metrics["confusion_matrix"]["rows_true_columns_predicted"])
            plot_paths.append(plot_confusion(matrix, card.classes, plots / "anatomy_confusion.png"))
    report = {
        "task": task,
        "headline": headline,
        # The headline figures at the top level, where scripts and the acceptance checks read them.
        **({"mae": metrics["mae_months"], "sex_accuracy": metrics["sex_accuracy"],
            "mae_ci95": metrics["mae_months_ci95"]} if task == "boneage" else {}),
        "model": _model_entry(weights, card, predictor),
        "data": source,
        "split": split,
        "preprocessing": {**predictor.geometry.to_dict(), "tta": tta, "bf16": predictor.bf16},
        "metrics": metrics,
        "timing": timing,
        "plots": [str(p) for p in plot_paths],
        "notes": notes,
        "per_image": rows,
    }
    _write_report(report, json_out)
    for note in notes:
        echo(f"note: {note}")
    if json_out:
        echo(f"wrote {json_out}")
    for path in plot_paths:
        echo(f"wrote {path}")
    echo(f"{timing['seconds_per_image']:.4f} s/image inference on {timing['device']}")
    echo(headline)  # the last line: scripts and the README read the headline from here
    return report


def _model_entry(weights: Path, card: Any, predictor: Any = None) -> dict[str, Any]:
    """Which checkpoint a report measured (and, for an output ensemble, every other member)."""
    entry: dict[str, Any] = {"weights": str(weights), "name": card.name, "version": card.version, "task": card.task,
                             "architecture": card.architecture, "sha256": card.sha256,
                             "code_version": card.code_version}
    if isinstance(predictor, EnsemblePredictor):
        entry["ensemble"] = [{"weights": str(m.weights), "name": m.card.name, "version": m.card.version,
                              "sha256": m.card.sha256} for m in predictor.members[1:]]
    return entry


def _write_report(report: dict, json_out: Path | None) -> bool:
    """Write the report as standard JSON (NaN as null); False when no path was given."""
    if not json_out:
        return False
    json_out = Path(json_out)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    return True


def _is_fracatlas(data: Path) -> bool:
    from models.data.fracatlas import is_fracatlas

    return Path(data).is_dir() and is_fracatlas(data)


def _evaluate_fracatlas(predictor: Predictor, weights: Path, data: Path, split: str | None, json_out: Path | None,
                        plots: Path | None, batch_size: int, progress: bool, echo: Callable[[str], None]) -> dict:
    """FracAtlas layout: detection and pointing (see :mod:`models.eval.abnormality`).

    Default split: ``test`` on the model's own training folder, every image on any other (the headline says which).
    """
    from models.eval.abnormality import evaluate_fracatlas

    body, plot_paths, headline = evaluate_fracatlas(predictor, data, split, plots, batch_size, progress)
    card = predictor.card
    report = {
        "task": "abnormality", "headline": headline,
        "model": _model_entry(weights, card, predictor),
        "preprocessing": {**predictor.geometry.to_dict(), "test_time_flip": predictor.test_time_flip}, **body,
    }
    if _write_report(report, json_out):
        echo(f"wrote {json_out}")
    for path in plot_paths:
        echo(f"wrote {path}")
    echo(f"{report['timing']['seconds_per_image_with_heatmap']:.4f} s/image with heatmap on {predictor.device}")
    echo(headline)
    return report


def run_evaluate(args: argparse.Namespace) -> int:
    evaluate(
        args.task, args.weights, args.data, labels=args.labels, split=args.split, mask=args.mask, tta=args.tta,
        json_out=args.json, plots=args.plots, batch_size=args.batch_size, device=args.device,
        progress=not args.no_progress, regions=getattr(args, "regions", None),
        variants=getattr(args, "variants", False), precision=getattr(args, "precision", None),
        ensemble=getattr(args, "ensemble", None) or (), flip=getattr(args, "flip", False),
    )
    return 0
