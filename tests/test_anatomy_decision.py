"""Issue 25: the anatomy decision table (tags against a calibrated, OOD-aware model) and its calibration maths.

Pure logic: the model witness is a stand-in with fixed numbers, so every row of the decision table is pinned.
"""

from __future__ import annotations

import numpy as np
import pytest

from daemon.analyse.anatomy_decision import ModelWitness, boneage_block, decide_anatomy
from models.nets.anatomy_ood import (
    MahalanobisOOD, auroc, expected_calibration_error, fit_temperature, softmax, threshold_for_acceptance,
)

MIN_P = 0.5
THRESHOLD = 100.0


def model(first: str, p1: float, second: str = "wrist", p2: float = 0.05, ood: float = 10.0) -> ModelWitness:
    return ModelWitness(top=((first, p1), (second, p2)), ood_score=ood, ood_threshold=THRESHOLD)


def test_a_sure_in_distribution_model_overrules_a_tag_not_among_its_two_best() -> None:
    d = decide_anatomy("hand", "BodyPartExamined=HAND", model("leg", 0.95, "ankle"), MIN_P)
    assert (d.label, d.decided_by, d.disagreement) == ("leg", "model", True)
    assert d.evidence["disagreement"] == "yes" and "overrul" in d.rule and "overruling" in d.source


@pytest.mark.parametrize("witness, why", [
    (model("knee", 0.89, "leg", ood=500.0), "out of distribution"),      # the MURA elbow case of the issue
    (model("knee", 0.40, "leg"), "unsure"),
    (model("hand", 0.80, "elbow"), "second choice"),
])
def test_the_tag_decides_and_the_disagreement_is_said(witness: ModelWitness, why: str) -> None:
    d = decide_anatomy("elbow", "BodyPartExamined=ELBOW", witness, MIN_P)
    assert (d.label, d.decided_by, d.disagreement) == ("elbow", "tags", True)
    assert why in d.rule
    assert f"model said {witness.best[0]} {witness.best[1]:.2f}" in d.source  # "elbow (tags); model said knee 0.89"


def test_agreement_sure_model_decides_unsure_model_leaves_it_to_the_tags() -> None:
    sure = decide_anatomy("hand", "BodyPartExamined=HAND", model("hand", 0.97), MIN_P)
    assert (sure.label, sure.decided_by, sure.disagreement, sure.evidence["disagreement"]) == ("hand", "model", False, "no")
    unsure = decide_anatomy("hand", "BodyPartExamined=HAND", model("hand", 0.45), MIN_P)
    assert (unsure.label, unsure.decided_by) == ("hand", "tags")


def test_no_tag_sure_model_decides_else_unknown_with_the_reason() -> None:
    assert decide_anatomy(None, "no anatomy", model("knee", 0.9), MIN_P).label == "knee"
    ood = decide_anatomy(None, "no anatomy", model("pelvis", 0.9, ood=300.0), MIN_P)
    assert ood.label is None and ood.decided_by == "none" and "out of distribution" in ood.rule
    unsure = decide_anatomy(None, "no anatomy", model("pelvis", 0.30), MIN_P)
    assert unsure.label is None and "unsure" in unsure.rule and "pelvis 0.30" in unsure.source
    nothing = decide_anatomy(None, "no anatomy", None, MIN_P)
    assert nothing.label is None and "no anatomy model" in nothing.rule


def test_no_model_tags_decide() -> None:
    d = decide_anatomy("wrist", "BodyPartExamined=WRIST", None, MIN_P)
    assert (d.label, d.decided_by, d.disagreement) == ("wrist", "tags", None)


def test_without_an_ood_measure_the_model_counts_as_in_distribution() -> None:
    witness = ModelWitness(top=(("leg", 0.9), ("ankle", 0.05)))
    assert witness.in_distribution
    assert decide_anatomy("hand", "x", witness, MIN_P).label == "leg"


def test_bone_age_only_on_a_hand_the_model_also_calls_a_hand() -> None:
    wrist_tagged_hand_looking = decide_anatomy("wrist", "BodyPartExamined=WRIST", model("hand", 0.80, "wrist"), MIN_P)
    assert wrist_tagged_hand_looking.label == "wrist"  # the tag decides: wrist is the model's second choice
    assert boneage_block(wrist_tagged_hand_looking, model("hand", 0.80, "wrist")) is not None
    tagged_hand_model_wrist = model("wrist", 0.7, "hand")
    d = decide_anatomy("hand", "BodyPartExamined=HAND", tagged_hand_model_wrist, MIN_P)
    assert d.label == "hand" and "does not call it a hand" in boneage_block(d, tagged_hand_model_wrist)
    ok = model("hand", 0.95)
    assert boneage_block(decide_anatomy("hand", "x", ok, MIN_P), ok) is None
    unknown = decide_anatomy(None, "x", model("hand", 0.95, ood=1e4), MIN_P)
    assert boneage_block(unknown, model("hand", 0.95, ood=1e4)) is not None
    tags_only = decide_anatomy("hand", "x", None, MIN_P)
    assert boneage_block(tags_only, None) is None
    assert boneage_block(decide_anatomy("knee", "x", None, MIN_P), None) is not None


def test_temperature_scaling_fixes_overconfident_logits_and_lowers_ece() -> None:
    rng = np.random.default_rng(0)
    n, c = 4000, 4
    labels = rng.integers(0, c, n)
    true_logits = rng.normal(0, 1, (n, c))
    true_logits[np.arange(n), labels] += 1.5
    # Sample what is "really" right from the true probabilities, then make the model 3x overconfident.
    p = softmax(true_logits)
    outcome = np.array([rng.choice(c, p=row) for row in p])
    over = true_logits * 3.0
    t = fit_temperature(over, outcome)
    assert 2.4 < t < 3.6
    before = expected_calibration_error(softmax(over), outcome)
    after = expected_calibration_error(softmax(over, t), outcome)
    assert after < before / 2 and after < 0.03
    assert np.array_equal(softmax(over, t).argmax(1), softmax(over).argmax(1))  # top-1 unchanged


def test_ece_of_a_perfectly_calibrated_and_a_wrong_model() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == 0.0
    assert expected_calibration_error(probs, np.array([1, 0])) == 1.0


def test_mahalanobis_scores_far_features_higher_and_the_threshold_accepts_the_share_asked(tmp_path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 20))
    y = rng.integers(0, 3, 600)
    x = centres[y] + rng.normal(0, 1, (600, 20))
    ood = MahalanobisOOD.fit(x, y)
    inside = ood.score(centres[y[:200]] + rng.normal(0, 1, (200, 20)))
    outside = ood.score(rng.normal(0, 1, (200, 20)) + 30)
    assert auroc(inside, outside) > 0.99
    threshold = threshold_for_acceptance(inside, 0.95)
    assert abs((inside <= threshold).mean() - 0.95) < 0.01
    sha = ood.save(tmp_path / "ood.npz")
    again = MahalanobisOOD.load(tmp_path / "ood.npz", sha)
    assert np.allclose(again.score(x[:5]), ood.score(x[:5]), rtol=1e-2)
    with pytest.raises(ValueError, match="sha256"):
        MahalanobisOOD.load(tmp_path / "ood.npz", "0" * 64)


def test_auroc_ties_count_half() -> None:
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5


def test_a_tag_naming_a_part_the_model_has_no_class_for_is_never_overruled() -> None:
    witness = ModelWitness(top=(("hand", 0.97), ("wrist", 0.02)), ood_score=1.0, ood_threshold=THRESHOLD,
                           classes=("hand", "wrist", "knee"))
    d = decide_anatomy("finger", "BodyPartExamined=FINGER", witness, MIN_P)
    assert (d.label, d.decided_by, d.disagreement) == ("finger", "tags", True)
    assert "no class for finger" in d.rule
    assert decide_anatomy("knee", "x", witness, MIN_P).decided_by == "model"  # a part it knows: overruled


def test_bone_age_never_runs_where_the_model_overruled_a_tag_naming_another_part() -> None:
    wrist_read_as_hand = model("hand", 0.96, "knee")  # the MURA wrist: wrist not even among the two best
    d = decide_anatomy("wrist", "BodyPartExamined=WRIST", wrist_read_as_hand, MIN_P)
    assert d.label == "hand" and d.decided_by == "model"
    assert "DICOM tags say wrist" in boneage_block(d, wrist_read_as_hand)


def test_a_fallback_witness_decides_untagged_studies_but_never_overrules_a_tag() -> None:
    fallback = ModelWitness(top=(("knee", 0.95), ("leg", 0.03)), ood_score=10.0, ood_threshold=100.0,
                            fallback_because="first 1.1.1 out of distribution (5000 vs threshold 3394)")
    assert not fallback.may_overrule
    untagged = decide_anatomy(None, "no anatomy", fallback, 0.5)
    assert untagged.label == "knee" and untagged.decided_by == "model"
    assert "out of distribution (5000" in untagged.evidence["model_fallback"]
    tagged = decide_anatomy("elbow", "BodyPartExamined=ELBOW", fallback, 0.5)
    assert tagged.label == "elbow" and tagged.decided_by == "tags" and tagged.disagreement
    assert "a fallback does not overrule tags" in tagged.rule
    # the same witness as a first model overrules
    first = ModelWitness(top=fallback.top, ood_score=10.0, ood_threshold=100.0)
    assert decide_anatomy("elbow", "BodyPartExamined=ELBOW", first, 0.5).label == "knee"


def test_cascade_rows_take_the_first_member_in_distribution() -> None:
    from daemon.analyse.decision_table import cascade_sets
    from models.eval.anatomy import HeadFigures

    hand, knee = np.array([0.1, 0.9]), np.array([0.8, 0.2])
    first = HeadFigures({}, {"s": [("hand", hand, 1.0), ("knee", hand, 50.0)]}, ["knee", "hand"], 10.0)
    second = HeadFigures({}, {"s": [("hand", knee, 1.0), ("knee", knee, 2.0)]}, ["knee", "hand"], 5.0)
    rows = cascade_sets([first, second])["s"]
    assert rows[0][1] is hand and rows[0][3] == 10.0 and rows[0][4] is None
    assert rows[1][1] is knee and rows[1][3] == 5.0 and "member 1 out of distribution (50 vs threshold 10)" in rows[1][4]
    with pytest.raises(ValueError):
        cascade_sets([first, HeadFigures({}, {"s": [("knee", knee, 1.0), ("knee", knee, 2.0)]}, ["knee", "hand"], 5.0)])


def test_a_fallback_overrules_a_tag_only_toward_a_part_that_runs_no_model() -> None:
    fallback = ModelWitness(top=(("chest", 0.97), ("shoulder", 0.02)), ood_score=10.0, ood_threshold=100.0,
                            fallback_because="first out of distribution")
    nowhere = {"chest"}
    found = decide_anatomy("hand", "BodyPartExamined=HAND", fallback, 0.5, runs_no_model=lambda p: p in nowhere)
    assert found.label == "chest" and found.decided_by == "model" and found.disagreement
    assert "a fallback, toward chest, on which no route runs a model" in found.rule
    # the same reading toward a part a route runs a model on: the tag stands
    knee = ModelWitness(top=(("knee", 0.97), ("leg", 0.02)), ood_score=10.0, ood_threshold=100.0,
                        fallback_because="first out of distribution")
    kept = decide_anatomy("hand", "BodyPartExamined=HAND", knee, 0.5, runs_no_model=lambda p: p in nowhere)
    assert kept.label == "hand" and "toward a part a route runs a model on" in kept.rule
    # unsure or out of distribution: never
    unsure = ModelWitness(top=(("chest", 0.45), ("hand", 0.40)), ood_score=10.0, ood_threshold=100.0,
                          fallback_because="first out of distribution")
    assert decide_anatomy("elbow", "BodyPartExamined=ELBOW", unsure, 0.5, runs_no_model=lambda p: True).label == "elbow"


def test_ood_figures_count_only_the_sources_the_card_says_the_model_trained_on(tmp_path) -> None:
    """A cascade's first member trained on FracAtlas and RSNA: knees in the cache's training rows (another member
    trained on them) are out of distribution for it, and its report measures them so; a card naming no sources
    keeps the old reading (every source with training rows counts as known)."""
    import json
    import shutil
    from pathlib import Path

    from models.eval.anatomy import head_figures

    shipped = Path(__file__).resolve().parents[1] / "models" / "weights"
    for name in ("anatomy.pt", "anatomy.card.json", "anatomy.ood.npz"):
        shutil.copy(shipped / name, tmp_path / name)
    card = json.loads((tmp_path / "anatomy.card.json").read_text())
    assert card["training_sources"] == ["fracatlas", "rsna"]
    rng = np.random.default_rng(0)
    rows = [("fracatlas", "train", "hand")] * 20 + [("fracatlas", "test", "hand")] * 10 + \
        [("knee-oai-224", "train", "knee")] * 20 + [("knee-oai-224", "test", "knee")] * 10
    arrays = {"x": rng.normal(size=(len(rows), 1280)).astype(np.float32),
              "source": np.array([r[0] for r in rows]), "split": np.array([r[1] for r in rows]),
              "label": np.array([r[2] for r in rows]), "view": np.array(["original"] * len(rows))}
    named = head_figures(arrays, tmp_path / "anatomy.pt").report["ood"]
    assert "knee-oai-224" in named["auroc"] and "knee-oai-224" in named["accepted"]
    card["training_sources"] = []
    (tmp_path / "anatomy.card.json").write_text(json.dumps(card))
    unnamed = head_figures(arrays, tmp_path / "anatomy.pt").report["ood"]
    assert "knee-oai-224" not in unnamed["auroc"] and "knee-oai-224 (original)" in unnamed["accepted"]
