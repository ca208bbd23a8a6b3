"""Anatomy from DICOM tags on real pydicom-data files and on small synthetic datasets."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from daemon.dicom.anatomy_tags import ANATOMY_CLASSES, TAG_SOURCES, anatomy_from_tags, anatomy_from_text

NO_ANATOMY = "no anatomy in BodyPartExamined, StudyDescription, SeriesDescription, ProtocolName"


def data_store_file(name: str) -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data" / name


def tags(**attrs: str) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def test_labels_are_the_one_vocabulary() -> None:
    from models.anatomy_vocabulary import VOCABULARY

    assert ANATOMY_CLASSES == VOCABULARY
    assert ANATOMY_CLASSES[:7] == ("elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist")
    assert {"knee", "pelvis", "chest", "other"} <= set(ANATOMY_CLASSES)
    assert TAG_SOURCES == ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")


def test_real_cr_chest_is_chest() -> None:
    ds = pydicom.dcmread(data_store_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert ds.BodyPartExamined == "CHEST"  # the file's actual tag
    assert anatomy_from_tags(ds) == ("chest", "BodyPartExamined=CHEST")


def test_real_cr_leg_generic_body_part_falls_back_to_description() -> None:
    ds = pydicom.dcmread(data_store_file("RG3_UNCR.dcm"), stop_before_pixels=True)
    assert ds.BodyPartExamined == "EXTREMITY"  # says nothing about which one
    label, evidence = anatomy_from_tags(ds)
    assert label == "leg"
    assert evidence.startswith(f"StudyDescription={ds.StudyDescription}")
    assert "TIBIA" in evidence


def test_real_nm_whole_body_is_other() -> None:
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"), stop_before_pixels=True)
    assert anatomy_from_tags(ds) == ("other", "BodyPartExamined=WHOLE BODY")


def test_real_file_without_anatomy() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    assert anatomy_from_tags(ds) == (None, NO_ANATOMY)


@pytest.mark.parametrize(
    ("body_part", "label"),
    [("HAND", "hand"), ("FINGER", "finger"), ("THUMB", "finger"), ("WRIST", "wrist"), ("FOREARM", "forearm"),
     ("ELBOW", "elbow"), ("HUMERUS", "humerus"), ("SHOULDER", "shoulder"), ("CLAVICLE", "shoulder"),
     ("SCAPULA", "shoulder"), ("KNEE", "knee"), ("ANKLE", "ankle"), ("FOOT", "foot"), ("PELVIS", "pelvis"),
     ("HIP", "hip"), ("FEMUR", "femur"), ("TIBIA", "leg"), ("SKULL", "skull"), ("ABDOMEN", "abdomen"),
     ("LSPINE", "spine"), ("THORAX", "chest"), ("DENTAL", "other")],
)
def test_body_part_examined_terms(body_part: str, label: str) -> None:
    assert anatomy_from_tags(tags(BodyPartExamined=body_part)) == (label, f"BodyPartExamined={body_part}")


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("XR_WRIST_LT", "wrist"),
        ("xr hand 2 views", "hand"),
        ("Bone age study", "hand"),
        ("BONEAGE", "hand"),
        ("HANDS BOTH PA", "hand"),
        ("DISTAL RADIUS", "forearm"),
        ("RIGHT UPPER ARM", "humerus"),
        ("HUMERAL HEAD", "shoulder"),  # longer term beats HEAD/HUMERAL at the same position
        ("RADIAL HEAD VIEW", "elbow"),
        ("L-SPINE", "spine"),
        ("FEMORAL HEAD", "hip"),
        ("LOWER EXTREMITY", None),  # a limb, not a region
        ("Wrist and hand", "wrist"),  # earliest mention wins
        ("HANDLE OF DOOR", None),  # word boundaries
        ("FOREARM", "forearm"),  # not ARM
        ("ARM", None),  # too general
    ],
)
def test_free_text(text: str, label: str | None) -> None:
    assert anatomy_from_text(text)[0] == label


def test_order_of_sources_and_generic_terms_are_skipped() -> None:
    ds = tags(BodyPartExamined="EXTREMITY", StudyDescription="XR", SeriesDescription="PA FINGER",
              ProtocolName="HAND")
    label, evidence = anatomy_from_tags(ds)
    assert (label, evidence) == ("finger", "SeriesDescription=PA FINGER (matched 'FINGER')")


def test_body_part_wins_over_description() -> None:
    ds = tags(BodyPartExamined="ELBOW", StudyDescription="XR WRIST")
    assert anatomy_from_tags(ds) == ("elbow", "BodyPartExamined=ELBOW")


def test_bone_age_description_implies_hand() -> None:
    label, evidence = anatomy_from_tags(tags(StudyDescription="BONE AGE LEFT"))
    assert label == "hand" and evidence == "StudyDescription=BONE AGE LEFT (matched 'BONE AGE')"


def test_nothing_found_lists_what_was_seen() -> None:
    assert anatomy_from_tags(Dataset()) == (None, NO_ANATOMY)
    label, evidence = anatomy_from_tags(tags(BodyPartExamined="EXTREMITY", StudyDescription="HANDLE"))
    assert label is None
    assert evidence.startswith(NO_ANATOMY)
    assert "BodyPartExamined=EXTREMITY is not specific" in evidence
    assert "StudyDescription=HANDLE is not recognised" in evidence


def test_empty_values_are_ignored() -> None:
    ds = tags(BodyPartExamined="", StudyDescription="  ", ProtocolName="XR SHOULDER AP")
    assert anatomy_from_tags(ds) == ("shoulder", "ProtocolName=XR SHOULDER AP (matched 'SHOULDER')")
