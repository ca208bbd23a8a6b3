"""``bonebridge compare``: two bone-age reports of the same images, paired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import cli
from models.eval.compare import compare_abnormality, compare_boneage


def report(errors: dict[str, float]) -> dict:
    return {"task": "boneage", "per_image": [{"id": k, "true_months": 100.0, "pred_months": 100.0 + e}
                                             for k, e in errors.items()]}


def test_a_candidate_better_on_every_image_has_an_interval_below_zero() -> None:
    base = report({str(i): 10.0 + i % 3 for i in range(40)})
    candidate = report({str(i): -(8.0 + i % 3) for i in range(40)})  # signs differ: absolute errors compared
    result = compare_boneage(base, candidate)
    assert result["n"] == 40 and result["mae_difference_months"] == pytest.approx(-2.0)
    assert result["mae_difference_ci95"][1] < 0 and result["candidate_better_on"] == 1.0


def test_only_shared_images_are_compared_and_a_tie_straddles_zero() -> None:
    base = report({str(i): (5.0 if i % 2 else 1.0) for i in range(40)} | {"extra": 50.0})
    candidate = report({str(i): (1.0 if i % 2 else 5.0) for i in range(40)})
    result = compare_boneage(base, candidate)
    assert result["n"] == 40 and result["only_in_base"] == 1
    low, high = result["mae_difference_ci95"]
    assert low < 0 < high


def test_the_cli_prints_the_paired_difference(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.json").write_text(json.dumps(report({"1": 4.0, "2": 6.0})))
    (tmp_path / "b.json").write_text(json.dumps(report({"1": 2.0, "2": 3.0})))
    assert cli.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "candidate - base: -2.50 months" in capsys.readouterr().out


def test_other_tasks_are_refused() -> None:
    with pytest.raises(ValueError, match="bone-age reports"):
        compare_boneage({"task": "anatomy", "per_image": []}, report({}))


def fracture_report(probabilities: dict[str, float], hits: dict[str, int]) -> dict:
    """An ``evaluate abnormality`` report: ids ``f*`` fractured (boxed, with a pointing hit or miss), ``n*`` not."""
    rows = []
    for image_id, p in probabilities.items():
        row = {"image_id": image_id, "fractured": int(image_id.startswith("f")), "probability": p}
        if image_id in hits:
            row["pointing_hit"] = row["pointing_hit_strict"] = hits[image_id]
        rows.append(row)
    return {"task": "abnormality", "per_image": rows}


def test_abnormality_reports_are_compared_by_auroc_and_pointing_in_pairs(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    ids_f, ids_n = [f"f{i}" for i in range(30)], [f"n{i}" for i in range(60)]
    # base: half the fractured images score below every other image; candidate: every fractured one above.
    base = fracture_report({i: (0.9 if k % 2 else 0.1) for k, i in enumerate(ids_f)} | {i: 0.5 for i in ids_n},
                           {i: k % 2 for k, i in enumerate(ids_f)})
    candidate = fracture_report({i: 0.9 for i in ids_f} | {i: 0.5 for i in ids_n}, {i: 1 for i in ids_f})
    result = compare_abnormality(base, candidate, resamples=300)
    assert result["base_auroc"] == pytest.approx(0.5) and result["candidate_auroc"] == pytest.approx(1.0)
    assert result["auroc_difference_ci95"][0] > 0 and result["pointing_difference"] == pytest.approx(0.5)
    assert result["pointing_difference_ci95"][0] > 0 and result["pointing_n"] == 30
    same = compare_abnormality(base, base, resamples=300)
    assert same["auroc_difference"] == 0 and same["auroc_difference_ci95"] == [0.0, 0.0]
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(candidate))
    assert cli.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "candidate - base, AUROC: 1.000 - 0.500 = +0.500" in capsys.readouterr().out


def test_abnormality_reports_of_different_labels_are_refused() -> None:
    base = fracture_report({"f1": 0.9, "n1": 0.1}, {})
    relabelled = {"task": "abnormality", "per_image": [dict(r, fractured=1 - r["fractured"]) for r in base["per_image"]]}
    with pytest.raises(ValueError, match="labels? a shared image differently"):
        compare_abnormality(base, relabelled)
