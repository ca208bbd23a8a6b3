"""Two evaluation reports of the same images, compared pair by pair: is the candidate really better?

A weights-shipping rule reads "lower MAE, with the paired 95 % interval of the per-image difference below zero".
Two MAEs side by side carry their own intervals, which overlap on 127 validation hands even when one model is better
on most of them; the per-image difference of absolute errors, resampled in pairs (:mod:`models.metrics.bootstrap`), is the
figure that can tell. ``bonebridge compare BASE.json CANDIDATE.json`` prints it for two ``bonebridge evaluate
boneage`` reports of the same split.

Two ``evaluate abnormality`` reports of the same FracAtlas images are compared the same way (issue 29's rule): the
AUROC difference over resamples of the shared images (fractured and other images drawn separately, each resample
scored by both models), and the pointing difference over the fractured images with boxes, paired per image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sklearn.metrics import roc_auc_score

from models.metrics.bootstrap import mean_interval, statistic_interval

#: Resamples for the abnormality comparison (the weights README's fracture rule names 2,000).
ABNORMALITY_RESAMPLES = 2000


def _rows_by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if report.get("task") != "boneage":
        raise ValueError(f"compare reads bone-age reports, not {report.get('task')!r} ones")
    return {str(row["id"]): row for row in report["per_image"]}


def compare_boneage(base: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """MAEs of both on the images they share, the paired MAE difference (candidate - base) and its interval."""
    a, b = _rows_by_id(base), _rows_by_id(candidate)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two reports share no image")
    err_a = np.array([abs(a[i]["pred_months"] - a[i]["true_months"]) for i in shared])
    err_b = np.array([abs(b[i]["pred_months"] - b[i]["true_months"]) for i in shared])
    diff = err_b - err_a
    return {
        "n": len(shared),
        "only_in_base": len(set(a) - set(b)),
        "only_in_candidate": len(set(b) - set(a)),
        "base_mae_months": float(err_a.mean()),
        "candidate_mae_months": float(err_b.mean()),
        "mae_difference_months": float(diff.mean()),
        "mae_difference_ci95": mean_interval(diff),
        "candidate_better_on": float((diff < 0).mean()),
    }


def compare_abnormality(base: dict[str, Any], candidate: dict[str, Any],
                        resamples: int = ABNORMALITY_RESAMPLES) -> dict[str, Any]:
    """AUROC and pointing of both on the images they share, and the paired differences (candidate - base)."""
    for report in (base, candidate):
        if report.get("task") != "abnormality":
            raise ValueError(f"compare reads two reports of one task, not {report.get('task')!r} with abnormality")
    a = {str(r["image_id"]): r for r in base["per_image"]}
    b = {str(r["image_id"]): r for r in candidate["per_image"]}
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two reports share no image")
    if any(a[i]["fractured"] != b[i]["fractured"] for i in shared):
        raise ValueError("the two reports label a shared image differently: not the same data")
    y = np.array([a[i]["fractured"] for i in shared]) > 0
    if y.all() or not y.any():
        raise ValueError("the shared images do not hold both fractured and other images")
    pa = np.array([a[i]["probability"] for i in shared], dtype=float)
    pb = np.array([b[i]["probability"] for i in shared], dtype=float)
    auroc_a, auroc_b = float(roc_auc_score(y, pa)), float(roc_auc_score(y, pb))
    interval = statistic_interval(lambda idx: roc_auc_score(y[idx], pb[idx]) - roc_auc_score(y[idx], pa[idx]),
                                  len(shared), strata=y, resamples=resamples)
    boxed = [i for i in shared if "pointing_hit" in a[i] and "pointing_hit" in b[i]]
    out: dict[str, Any] = {
        "n": len(shared), "fractured": int(y.sum()),
        "only_in_base": len(set(a) - set(b)), "only_in_candidate": len(set(b) - set(a)),
        "base_auroc": auroc_a, "candidate_auroc": auroc_b,
        "auroc_difference": auroc_b - auroc_a, "auroc_difference_ci95": interval, "pointing_n": len(boxed),
    }
    for key in ("pointing_hit", "pointing_hit_strict"):
        hit_a = np.array([float(a[i][key]) for i in boxed])
        hit_b = np.array([float(b[i][key]) for i in boxed])
        name = key.replace("pointing_hit", "pointing")
        out[f"base_{name}"] = float(hit_a.mean()) if boxed else float("nan")
        out[f"candidate_{name}"] = float(hit_b.mean()) if boxed else float("nan")
        out[f"{name}_difference"] = float((hit_b - hit_a).mean()) if boxed else float("nan")
        out[f"{name}_difference_ci95"] = mean_interval(hit_b - hit_a, resamples=resamples)
    return out


def abnormality_lines(result: dict[str, Any], label: str = "candidate - base") -> list[str]:
    """One line per figure (AUROC, pointing, strict pointing) of :func:`compare_abnormality`'s result."""
    lines = []
    for name, key in (("AUROC", "auroc"), ("pointing", "pointing"), ("strict pointing", "pointing_strict")):
        low, high = result[f"{key}_difference_ci95"]
        lines.append(f"{label}, {name}: {result[f'candidate_{key}']:.3f} - {result[f'base_{key}']:.3f} = "
                     f"{result[f'{key}_difference']:+.3f} (95 % CI {low:+.3f} to {high:+.3f}, paired, n={result['n']}, "
                     f"{result['fractured']} fractured, {result['pointing_n']} boxed)")
    return lines


def compare_files(base: Path, candidate: Path) -> dict[str, Any]:
    """Two reports of one task (bone age or abnormality) read from disk and compared pair by pair."""
    first, second = json.loads(Path(base).read_text()), json.loads(Path(candidate).read_text())
    if first.get("task") == "abnormality":
        return compare_abnormality(first, second)
    return compare_boneage(first, second)
