"""Two evaluation reports of the same images, compared pair by pair: is the candidate really better?

A weights-shipping rule reads "lower MAE, with the paired 95 % interval of the per-image difference below zero".
Two MAEs side by side carry their own intervals, which overlap on 127 validation hands even when one model is better
on most of them; the per-image difference of absolute errors, resampled in pairs (:mod:`models.metrics.bootstrap`), is the
figure that can tell. ``bonebridge compare BASE.json CANDIDATE.json`` prints it for two ``bonebridge evaluate
boneage`` reports of the same split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from models.metrics.bootstrap import mean_interval


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


def compare_files(base: Path, candidate: Path) -> dict[str, Any]:
    return compare_boneage(json.loads(Path(base).read_text()), json.loads(Path(candidate).read_text()))
