"""``bonebridge evaluate abnormality`` on a FracAtlas-layout folder: detection and whether the heatmap points.

Every image is predicted through :class:`models.inference.predictor.Predictor` (the daemon's path) with its heatmap: the
learnt localisation map for a box-supervised model, Grad-CAM otherwise. Reported, overall and per region (hand,
leg, hip, shoulder; ``mixed`` images count overall only):

- ``auroc``, and sensitivity, specificity and Cohen's kappa at the card's threshold (chosen on validation when
  the model was trained; never here);
- ``pointing_hit_rate``: the fraction of fractured images with boxes whose heatmap maximum lies inside a box
  grown by 3 % of the image's long side on every side; ``pointing_hit_rate_strict``: inside a box;
- ROC and calibration PNGs, and a contact sheet of the worst misses (fractures scored lowest, non-fractured
  images scored highest, and fractures whose heatmap pointed furthest away) with the boxes in green and the
  heatmap's maximum as a red cross.

FracAtlas has one image per study, so image and study figures are the same.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from models.metrics.classification import binary_metrics
from models.metrics.bootstrap import mean_interval
from models.data.fracatlas import REGIONS, FractureCase, case_split, folder_fingerprint, pointing_hit, read_fracatlas
from models.nets.checkpoint import ModelCard
from models.inference.predictor import Predictor
from models.data.preprocess import load_image

LENIENT_GROW = 0.03
SHEET_TILE = 256


def default_split(cases: list[FractureCase], data: Path, card: ModelCard) -> tuple[str, str]:
    """The split to evaluate when none is asked for, and why (issue 29).

    On the folder the model was trained on, only the id-block test split is fair (it saw train and validation); on
    any other folder, every image: taking the id-block test split of a held-back folder silently measured 18 of its
    576 images. The training folder is known by the ids fingerprint the card records; a card from before that field
    by the folder name it names.
    """
    recorded = (card.training or {}).get("training_folder")
    if recorded:
        same = recorded.get("ids_sha256") == folder_fingerprint(cases)["ids_sha256"]
        how = "its image ids match the card's training folder"
    else:
        same = f"FracAtlas ({Path(data).name})" in card.training_data
        how = "its name is the one the card's training data names (the card records no ids fingerprint)"
    if same:
        return "test", f"the model's training folder ({how}): its held-out test split only"
    return "all", "not the model's training folder: every image (--split picks an id-block split)"


def fracatlas_cases(data: Path, split: str) -> tuple[list[FractureCase], str]:
    cases = read_fracatlas(data)
    chosen = [c for c in cases if split == "all" or case_split(c) == split]
    return chosen, (f"{data} (FracAtlas layout, {split} split by id block: {len(chosen)} of {len(cases)} images, "
                    f"{sum(c.fractured for c in chosen)} fractured)")


def _peak_distance(heatmap: np.ndarray, boxes: tuple) -> float:
    """Distance from the heatmap's maximum to the nearest box, as a fraction of the image's long side."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    best = np.inf
    for x, y, w, h in boxes:
        dx = max(x - col, 0.0, col - (x + w))
        dy = max(y - row, 0.0, row - (y + h))
        best = min(best, float(np.hypot(dx, dy)))
    return best / max(heatmap.shape)


def predict_cases(predictor: Predictor, cases: list[FractureCase], batch_size: int,
                  progress: bool) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per image: probability, heatmap peak (row, col) and pointing; plus timings with and without heatmaps."""
    rows: list[dict[str, Any]] = []
    load_s = infer_s = 0.0
    for start in tqdm(range(0, len(cases), batch_size), disable=not progress, desc="evaluate fractures"):
        chunk = cases[start:start + batch_size]
        began = time.perf_counter()
        images = [load_image(c.path) for c in chunk]
        load_s += time.perf_counter() - began
        began = time.perf_counter()
        preds = predictor.predict(images, with_heatmaps=True)
        infer_s += time.perf_counter() - began
        for case, pred in zip(chunk, preds):
            heat = pred.heatmap
            row: dict[str, Any] = {"image_id": case.image_id, "region": case.region, "fractured": int(case.fractured),
                                   "boxes": len(case.boxes), "probability": float(pred.outputs["abnormality_probability"])}
            if heat is not None:
                peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
                row["peak_row_col"] = [int(peak[0]), int(peak[1])]
                if case.fractured and case.boxes:
                    row["pointing_hit"] = pointing_hit(heat, case.boxes, LENIENT_GROW)
                    row["pointing_hit_strict"] = pointing_hit(heat, case.boxes, 0.0)
                    row["peak_distance"] = _peak_distance(heat, case.boxes)
            rows.append(row)
    n = max(1, len(cases))
    timing: dict[str, float] = {"load_seconds_per_image": load_s / n, "seconds_per_image_with_heatmap": infer_s / n}
    sample = [load_image(c.path) for c in cases[:batch_size]]
    if sample:
        began = time.perf_counter()
        predictor.predict(sample, with_heatmaps=False)
        timing["seconds_per_image"] = (time.perf_counter() - began) / len(sample)
    return rows, timing


def _pointing(rows: list[dict[str, Any]]) -> dict[str, Any]:
    hits = [r for r in rows if "pointing_hit" in r]
    if not hits:
        return {"pointing_hit_rate": float("nan"), "pointing_hit_rate_strict": float("nan"), "pointing_n": 0}
    lenient = [float(r["pointing_hit"]) for r in hits]
    strict = [float(r["pointing_hit_strict"]) for r in hits]
    return {"pointing_hit_rate": float(np.mean(lenient)), "pointing_hit_rate_strict": float(np.mean(strict)),
            "pointing_hit_rate_ci95": mean_interval(lenient), "pointing_hit_rate_strict_ci95": mean_interval(strict),
            "pointing_n": len(hits)}


def fracture_metrics(rows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    def block(subset: list[dict[str, Any]]) -> dict[str, Any]:
        labels, scores = [r["fractured"] for r in subset], [r["probability"] for r in subset]
        found = binary_metrics(labels, scores, threshold, with_interval=True)
        return {**found, "auroc": found.get("auroc", float("nan")), **_pointing(subset)}

    overall = block(rows)
    return {**overall, "by_region": {region: block([r for r in rows if r["region"] == region])
                                     for region in REGIONS if any(r["region"] == region for r in rows)}}


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def worst_misses_sheet(cases: list[FractureCase], rows: list[dict[str, Any]], path: Path, per_kind: int = 6) -> Path:
    """A contact sheet: lowest-scored fractures, highest-scored non-fractures, furthest-pointing fractures."""
    by_id = {c.image_id: c for c in cases}
    fractured = sorted((r for r in rows if r["fractured"]), key=lambda r: r["probability"])[:per_kind]
    normal = sorted((r for r in rows if not r["fractured"]), key=lambda r: -r["probability"])[:per_kind]
    far = sorted((r for r in rows if r.get("peak_distance") is not None), key=lambda r: -r["peak_distance"])[:per_kind]
    groups = [("missed fracture", fractured), ("false alarm", normal), ("heatmap far from box", far)]
    width = per_kind * SHEET_TILE
    sheet = Image.new("RGB", (width, len(groups) * (SHEET_TILE + 24)), "black")
    draw = ImageDraw.Draw(sheet)
    for g, (title, chosen) in enumerate(groups):
        top = g * (SHEET_TILE + 24)
        draw.text((4, top + 2), title, fill="white", font=_font(16))
        for k, row in enumerate(chosen):
            case = by_id[row["image_id"]]
            image = Image.fromarray((load_image(case.path) * 255).astype(np.uint8)).convert("RGB")
            scale = SHEET_TILE / max(image.size)
            tile = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
            pen = ImageDraw.Draw(tile)
            for x, y, w, h in case.boxes:
                pen.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=(0, 255, 0), width=2)
            if "peak_row_col" in row:
                py, px = row["peak_row_col"][0] * scale, row["peak_row_col"][1] * scale
                pen.line([px - 6, py, px + 6, py], fill=(255, 0, 0), width=2)
                pen.line([px, py - 6, px, py + 6], fill=(255, 0, 0), width=2)
            pen.text((3, tile.height - 18), f"{case.image_id} p={row['probability']:.2f}", fill=(255, 255, 0),
                     font=_font(12))
            sheet.paste(tile, (k * SHEET_TILE, top + 24))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def evaluate_fracatlas(predictor: Predictor, data: Path, split: str | None, plots: Path | None, batch_size: int,
                       progress: bool) -> tuple[dict[str, Any], list[Path], str]:
    """The report (top-level ``auroc``, ``pointing_hit_rate``, ``pointing_hit_rate_strict``), plots and headline.

    ``split`` None: :func:`default_split` chooses, and the report's ``split_reason`` says why.
    """
    from models.eval.plots import plot_calibration, plot_roc

    if split is None:
        split, split_reason = default_split(read_fracatlas(data), data, predictor.card)
    else:
        split_reason = "asked for with --split"
    cases, source = fracatlas_cases(data, split)
    if not cases:
        raise ValueError(f"{source}: no images to evaluate")
    card = predictor.card
    threshold = card.threshold if card.threshold is not None else 0.5
    rows, timing = predict_cases(predictor, cases, batch_size, progress)
    metrics = fracture_metrics(rows, threshold)
    plot_paths: list[Path] = []
    if plots:
        y = [r["fractured"] for r in rows]
        p = [r["probability"] for r in rows]
        curves = {"all": (y, p)}
        for region in REGIONS:
            subset = [r for r in rows if r["region"] == region]
            if len({r["fractured"] for r in subset}) == 2:
                curves[region] = ([r["fractured"] for r in subset], [r["probability"] for r in subset])
        plot_paths += [plot_roc(curves, Path(plots) / "fracture_roc.png", f"Fracture, FracAtlas {split}"),
                       plot_calibration(y, p, Path(plots) / "fracture_calibration.png"),
                       worst_misses_sheet(cases, rows, Path(plots) / "fracture_worst_misses.png")]
    heatmap_kind = "learnt localisation map" if card.localisation_head else "Grad-CAM"
    low, high = metrics["auroc_ci95"]
    headline = (f"{split} split ({split_reason}): fracture AUROC {metrics['auroc']:.3f} (95 % CI {low:.3f}-{high:.3f}); "
                f"pointing {metrics['pointing_hit_rate']:.3f} "
                f"(strict {metrics['pointing_hit_rate_strict']:.3f}, {heatmap_kind}); sensitivity "
                f"{metrics['sensitivity']:.3f} specificity {metrics['specificity']:.3f} at {threshold:.3f} "
                f"(n={len(rows)}, {int(metrics['positives'])} fractured)")
    report = {
        "auroc": metrics["auroc"], "auroc_ci95": metrics["auroc_ci95"],
        "pointing_hit_rate": metrics["pointing_hit_rate"],
        "pointing_hit_rate_strict": metrics["pointing_hit_rate_strict"],
        "sensitivity": metrics["sensitivity"], "specificity": metrics["specificity"], "kappa": metrics.get("kappa"),
        "threshold": threshold, "threshold_rule": card.training.get("threshold_rule", "as the card gives"),
        "heatmap": heatmap_kind, "score_rule": card.score_rule, "metrics": metrics, "timing": timing,
        "per_image": rows, "plots": [str(p) for p in plot_paths], "data": source, "split": split,
        "split_reason": split_reason,
    }
    return report, plot_paths, headline
