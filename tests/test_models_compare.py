"""``bonebridge compare``: two bone-age reports of the same images, paired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import cli
from models.eval.compare import compare_boneage


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
