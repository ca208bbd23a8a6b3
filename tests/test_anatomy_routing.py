"""Routing on the shipped anatomy model, with real radiographs.

- pydicom-data's RG3 (a Fuji CR of a lower leg, MONOCHROME1, tagged EXTREMITY with a TIBIA description) runs
  everywhere: the model must call it a lower-limb part, agree with the tags, and flag a study whose header says
  HAND. Nothing of it may reach bone age.
- With ``../shared/data`` present, the issue's acceptance check: an *untagged* DX made from a held-out RSNA hand
  goes to bone age with anatomy ``hand`` decided by the model, and an untagged held-out FracAtlas leg does not.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from daemon.config.schema import load_config
from daemon.analyse.pipeline import Analyser
from models.data.datasets import split_key
from models.anatomy_vocabulary import FRACATLAS_REGION
from models.data.datasets import split_of
from models.data.preprocess import load_image
from tests.bonebridge_process import REPO
from tests.dicom_factory import make_dx

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = load_config(REPO / "config" / "bonebridge.yaml")
ANATOMY_READY = CONFIG.model_status().get("anatomy") is None
needs_anatomy = pytest.mark.skipif(not ANATOMY_READY, reason="shipped anatomy weights not present")
LOWER_LIMB = {name for name, region in FRACATLAS_REGION.items() if region == "leg"}


@pytest.fixture(scope="module")
def analyser() -> Analyser:
    return Analyser(CONFIG)


def _rg3() -> pydicom.Dataset:
    import data_store

    return pydicom.dcmread(Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm")


@needs_anatomy
def test_real_leg_cr_is_a_lower_limb_by_the_model_and_never_bone_age(analyser: Analyser) -> None:
    analysis = analyser.analyse([_rg3()])
    result = analysis.result
    assert result.anatomy in LOWER_LIMB, result.anatomy_evidence
    assert result.anatomy_source.startswith("model bonebridge-anatomy")
    evidence = result.anatomy_evidence
    assert evidence["decided_by"] == "model" and evidence["tags"].startswith("leg (StudyDescription=")
    assert evidence["model_top1"].split()[0] == result.anatomy and "model_top2" in evidence
    assert evidence["disagreement"] == "no"  # the tags' "leg" is among the model's two best guesses
    assert result.route != "pediatric-hand" and "bone_age_months" not in result.findings
    assert any(m.task == "anatomy" for m in result.models)  # the SR names the anatomy model that decided


@needs_anatomy
def test_model_and_tags_disagreeing_is_flagged_in_the_sr(analyser: Analyser) -> None:
    from tests.bonebridge_process import sr_values

    ds = _rg3()
    ds.BodyPartExamined = "HAND"  # a mislabelled study: the header says hand, the image is a leg
    ds.PatientAge = "010Y"
    analysis = analyser.analyse([ds])
    assert analysis.result.anatomy_evidence["disagreement"] == "yes"
    assert analysis.result.route != "pediatric-hand"  # the image decides: no bone age of a leg
    values = sr_values(analysis.outputs[0])
    text = " ".join(f"{k}={v}" for k, v in values.items())
    assert "Anatomy model disagrees with DICOM tags" in text and "hand (BodyPartExamined=HAND)" in text


def _untagged_dx(tmp_path: Path, image_path: Path, name: str, age: str) -> Path:
    out = tmp_path / f"{name}.dcm"
    make_dx(out, pixels=load_image(image_path), body_part=None, study_description="", age=age, sex="")
    return out


@needs_anatomy
def test_untagged_held_out_hand_reaches_bone_age_and_leg_does_not(shared_data: Path, tmp_path: Path,
                                                                  analyser: Analyser) -> None:
    with open(shared_data / "rsna-boneage-512" / "labels.csv", newline="") as handle:
        hand_id = next(row["id"] for row in csv.DictReader(handle) if split_of(row["id"]) == "test")
    with open(shared_data / "fracatlas" / "dataset.csv", newline="") as handle:
        leg_id = next(row["image_id"] for row in csv.DictReader(handle)
                      if row["leg"] == "1" and row["mixed"] == "0"
                      and split_of(split_key(f"fracatlas/images/{row['image_id']}")) == "test")
    hand = _untagged_dx(tmp_path, shared_data / "rsna-boneage-512" / "images" / f"{hand_id}.jpg", "hand", "010Y")
    leg = _untagged_dx(tmp_path, shared_data / "fracatlas" / "images" / leg_id, "leg", "010Y")

    hand_result = analyser.analyse([pydicom.dcmread(hand)]).result
    assert hand_result.anatomy == "hand" and hand_result.anatomy_evidence["decided_by"] == "model"
    assert hand_result.route == "pediatric-hand" and hand_result.findings["bone_age_months"] > 0

    leg_result = analyser.analyse([pydicom.dcmread(leg)]).result
    assert FRACATLAS_REGION[leg_result.anatomy] == "leg", leg_result.anatomy_evidence
    assert leg_result.route != "pediatric-hand" and "bone_age_months" not in leg_result.findings
    assert np.isfinite(leg_result.anatomy_probability)


@needs_anatomy
def test_a_right_hand_is_mirrored_to_the_left_before_bone_age(shared_data: Path, tmp_path: Path,
                                                              analyser: Analyser) -> None:
    """The same held-out hand sent as a left hand, and mirrored with ImageLaterality R, gets the same bone age and
    sex; the SR says which side was read. Without the header's side the mirrored hand reads differently."""
    with open(shared_data / "rsna-boneage-512" / "labels.csv", newline="") as handle:
        hand_id = next(row["id"] for row in csv.DictReader(handle) if split_of(row["id"]) == "test")
    image = load_image(shared_data / "rsna-boneage-512" / "images" / f"{hand_id}.jpg")
    mirror = np.ascontiguousarray(image[:, ::-1])
    results = {}
    for name, pixels, side in (("left", image, "L"), ("right", mirror, "R"), ("unstated", mirror, "")):
        make_dx(tmp_path / f"{name}.dcm", pixels=pixels, sex="F", laterality=side)
        results[name] = analyser.analyse([pydicom.dcmread(tmp_path / f"{name}.dcm")]).result.findings
    left, right, unstated = results["left"], results["right"], results["unstated"]
    assert right["bone_age_months"] == pytest.approx(left["bone_age_months"], abs=0.15)
    assert right["predicted_sex_probability"] == pytest.approx(left["predicted_sex_probability"], abs=0.01)
    assert unstated["bone_age_months"] != pytest.approx(left["bone_age_months"], abs=0.05)
    assert left["hand_side"] == "left hand (header)"
    assert "mirrored" in right["hand_side"] and "not stated" in unstated["hand_side"]
