"""daemon.output.sr and daemon.output.sc: the TID 1500 SR and heatmap Secondary Captures survive a write/read round trip.

Sources are small synthetic DX instances from ``tests.dicom_factory``; every object is written to
bytes and read back (SRs with ``highdicom.sr.srread``) before anything is asserted, so the tests see
what a PACS would store.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from daemon.output.own_output import (
    MANUFACTURER,
    SC_SERIES_DESCRIPTION,
    SC_SERIES_NUMBER,
    SR_SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    is_own_output,
)
from daemon.output.sc import build_heatmap_sc
from daemon.output.sr import build_sr, referenced_instances
from daemon.output.study_result import ModelProvenance, StudyResult
from daemon.dicom.header_values import value_problem
from daemon.output.heatmap_render import RESEARCH_NOTICE, picture_shape
from tests.bad_headers import BAD_VALUES, BadValue, write_with_bad_value
from tests.dicom_factory import make_study

MODELS = [
    ModelProvenance(name="mura-densenet169", version="1.2.0", sha256="a" * 64, task="abnormality"),
    ModelProvenance(name="rsna-boneage", version="0.9.1", sha256="b" * 64, task="bone_age"),
    ModelProvenance(name="anatomy-effnet", version="2.0.0", sha256="c" * 64, task="anatomy"),
]


# --------------------------------------------------------------------------- helpers
def _roundtrip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _read_sr(sr: Dataset) -> hd.sr.ComprehensiveSR:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence", []) or []:
        yield child
        yield from _walk(child)


def _texts(node: Dataset, meaning: str) -> list[str]:
    return [
        str(i.TextValue)
        for i in _walk(node)
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def _code_value(concept: hd.sr.CodedConcept) -> tuple[str, str]:
    return concept.value, concept.scheme_designator


@pytest.fixture
def sources(tmp_path: Path) -> list[Dataset]:
    return [pydicom.dcmread(ds.filename) for ds in make_study(tmp_path / "src", count=2, size=32)]


@pytest.fixture
def findings(sources: list[Dataset]) -> StudyResult:
    return StudyResult(
        study_uid=str(sources[0].StudyInstanceUID),
        route="paediatric-hand",
        anatomy="hand",
        anatomy_source="model",
        anatomy_probability=0.97,
        findings={
            "abnormality_probability": 0.81,
            "abnormality_decision": "abnormal",
            "abnormality_threshold": 0.5,
            "bone_age_months": 123.4,
            "predicted_sex": "F",
            "predicted_sex_probability": 0.88,
            "sex_source": "model",
            "sex_mismatch": "yes",
            "hand_side": "right hand (header), mirrored to the left-hand standard",
        },
        models=list(MODELS),
        not_processed_reason=None,
        predecessor_sr=[],
    )


# ------------------------------------------------------------------------------- SR
def test_findings_sr_round_trip(sources: list[Dataset], findings: StudyResult) -> None:
    sr = _read_sr(build_sr(sources, findings))

    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert sr.PatientID == sources[0].PatientID and sr.PatientName == sources[0].PatientName
    assert sr.AccessionNumber == sources[0].AccessionNumber
    assert (sr.Manufacturer, sr.SeriesNumber, sr.SeriesDescription) == (
        MANUFACTURER, SR_SERIES_NUMBER, SR_SERIES_DESCRIPTION,
    )
    assert _code_value(sr.ConceptNameCodeSequence[0]) == ("126000", "DCM")  # Imaging Measurement Report
    assert "PredecessorDocumentsSequence" not in sr

    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.tracking_identifier == "BoneBridge paediatric-hand"
    assert [_code_value(s.value) for s in group.finding_sites] == [("85562004", "SCT")]

    measured = {m.name.meaning: m for m in group.get_measurements()}
    bone_age = measured["Bone age"]
    assert _code_value(bone_age.name) == ("85151-9", "LN")
    assert bone_age.value == pytest.approx(123.4)
    assert bone_age.unit.value == "mo"
    assert measured["Abnormality probability"].value == pytest.approx(0.81)
    assert measured["Abnormality probability"].unit.value == "{probability}"
    assert measured["Abnormality decision threshold"].value == pytest.approx(0.5)
    assert measured["Predicted sex probability"].value == pytest.approx(0.88)
    assert measured["Anatomy probability"].value == pytest.approx(0.97)

    evaluated = {q.name.meaning: _code_value(q.value) for q in group.get_qualitative_evaluations()}
    assert evaluated["Abnormality decision"] == ("263654008", "SCT")
    assert evaluated["Predicted sex"] == ("248152002", "SCT")
    assert evaluated["Predicted sex differs from DICOM sex"] == ("373066001", "SCT")

    # Algorithm identification (TID 4019) names the model that produced each number.
    assert _texts(bone_age[0], "Algorithm Name") == ["rsna-boneage"]
    assert _texts(bone_age[0], "Algorithm Version") == ["0.9.1"]
    assert _texts(measured["Abnormality probability"][0], "Algorithm Name") == ["mura-densenet169"]

    root = group[0]
    assert _texts(root, "Sex source") == ["model"]
    assert _texts(root, "Hand side bone age was read on") == ["right hand (header), mirrored to the left-hand standard"]
    assert _texts(root, "Anatomy") == ["hand"]
    assert _texts(root, "Anatomy source") == ["model"]
    assert _texts(root, "BoneBridge route") == ["paediatric-hand"]
    assert sorted(_texts(root, "Model name")) == sorted(m.name for m in MODELS)
    assert sorted(_texts(root, "Model weights SHA-256")) == sorted(m.sha256 for m in MODELS)
    assert sorted(_texts(root, "Model version")) == sorted(m.version for m in MODELS)
    assert _texts(root, "Not processed") == []

    # The device observer is BoneBridge.
    assert MANUFACTURER in _texts(sr, "Device Observer Manufacturer")
    assert _texts(sr, "Device Observer Model Name") == [" + ".join(m.name for m in MODELS)]


def test_sr_references_every_source_image(sources: list[Dataset], findings: StudyResult) -> None:
    sr = _read_sr(build_sr(sources, findings))
    expected = {str(ds.SOPInstanceUID) for ds in sources}
    group = sr.content.get_image_measurement_groups()[0]
    assert {s.referenced_sop_instance_uid for s in group.source_images} == expected
    assert set(referenced_instances(sr)) == expected
    library = [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in _walk(sr)
        if item.ValueType == "IMAGE" and "ReferencedSOPSequence" in item
    ]
    assert expected <= set(library)


def test_predecessor_documents_are_listed(sources: list[Dataset], findings: StudyResult) -> None:
    study = str(sources[0].StudyInstanceUID)
    findings.predecessor_sr = [
        (study, "1.2.3.9901", ComprehensiveSRStorage, "1.2.3.9901.1"),
        (study, "1.2.3.9901", ComprehensiveSRStorage, "1.2.3.9901.2"),
    ]
    sr = _read_sr(build_sr(sources, findings))
    (study_item,) = sr.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == study
    (series_item,) = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == "1.2.3.9901"
    assert [r.ReferencedSOPInstanceUID for r in series_item.ReferencedSOPSequence] == ["1.2.3.9901.1", "1.2.3.9901.2"]
    assert all(r.ReferencedSOPClassUID == ComprehensiveSRStorage for r in series_item.ReferencedSOPSequence)


def test_not_processed_sr_has_reason_and_no_measurements(sources: list[Dataset]) -> None:
    result = StudyResult(
        study_uid=str(sources[0].StudyInstanceUID),
        route="",
        anatomy="other",
        anatomy_source="BodyPartExamined=CHEST",
        anatomy_probability=None,
        findings={},
        models=[],
        not_processed_reason="no route matches anatomy 'other'",
        predecessor_sr=[],
    )
    sr = _read_sr(build_sr(sources[:1], result))
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.SeriesNumber == SR_SERIES_NUMBER
    group = sr.content.get_image_measurement_groups()[0]
    assert group.get_measurements() == []
    assert group.get_qualitative_evaluations() == []
    assert group.finding_sites == []  # "other" has no SNOMED code
    assert _texts(group[0], "Not processed") == ["no route matches anatomy 'other'"]
    assert _texts(group[0], "Anatomy") == ["other"]
    assert [s.referenced_sop_instance_uid for s in group.source_images] == [sources[0].SOPInstanceUID]
    assert is_own_output(sr)


def test_sr_uids_are_derived_and_stable(sources: list[Dataset], findings: StudyResult) -> None:
    first = build_sr(sources, findings)
    again = build_sr(list(reversed(sources)), findings)  # source order must not matter
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)

    newer = dataclasses.replace(findings, models=[dataclasses.replace(MODELS[0], version="1.3.0"), *MODELS[1:]])
    rebuilt = build_sr(sources, newer)
    assert rebuilt.SeriesInstanceUID == first.SeriesInstanceUID
    assert rebuilt.SOPInstanceUID != first.SOPInstanceUID

    late = build_sr(sources[:1], findings)  # a different set of instances is a different report
    assert late.SOPInstanceUID != first.SOPInstanceUID
    for uid in (first.SOPInstanceUID, first.SeriesInstanceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64


def test_sr_rejects_sources_from_another_study(sources: list[Dataset], findings: StudyResult) -> None:
    with pytest.raises(ValueError, match="sources belong"):
        build_sr(sources, dataclasses.replace(findings, study_uid="1.2.3"))
    with pytest.raises(ValueError):
        build_sr([], findings)


def test_sr_tolerates_sources_missing_type2_attributes(sources: list[Dataset], findings: StudyResult) -> None:
    del sources[0].AccessionNumber, sources[0].PatientBirthDate
    sr = _read_sr(build_sr(sources, findings))
    assert sr.StudyInstanceUID == findings.study_uid
    assert sr.AccessionNumber in ("", None)
    assert "PixelData" in sources[0]  # the caller's datasets are left alone


# ------------------------------------------------------------------------------- SC
def _hot_corner(rows: int = 20, cols: int = 20) -> np.ndarray:
    heat = np.zeros((rows, cols), dtype=np.float32)
    heat[: rows // 2, : cols // 2] = 1.0
    return heat


def test_heatmap_sc_round_trip(sources: list[Dataset], findings: StudyResult) -> None:
    sc = _roundtrip(build_heatmap_sc(sources[1], _hot_corner(), findings, 1))

    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == sources[1].StudyInstanceUID
    assert sc.PatientID == sources[1].PatientID
    assert sc.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert (sc.Manufacturer, sc.SeriesNumber, sc.SeriesDescription, sc.InstanceNumber) == (
        MANUFACTURER, SC_SERIES_NUMBER, SC_SERIES_DESCRIPTION, 2,
    )
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.ConversionType == "WSD"
    assert "mura-densenet169" in sc.DerivationDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[1].SOPInstanceUID
    assert list(sc.PatientOrientation) == list(sources[1].PatientOrientation)

    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    pixels = sc.pixel_array
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    rows, cols = picture_shape(sources[1].Rows, sources[1].Columns)  # a 32 px source is enlarged to 512
    assert rows == 512
    assert pixels.shape[0] > rows  # the caption band is added below
    assert pixels.shape[1] > cols  # the colour scale strip is added at the right
    # turbo: hot = red; below the floor the radiograph stays grey (no red-blue difference at all).
    image = pixels[:rows, :cols].astype(int)
    redness = image[..., 0] - image[..., 2]
    assert redness[: rows * 3 // 8, : cols * 3 // 8].mean() > 40
    assert np.abs(redness[rows * 5 // 8:, cols * 5 // 8:]).max() == 0


def test_heatmap_sc_caps_long_side(tmp_path: Path, findings: StudyResult) -> None:
    (big,) = make_study(tmp_path / "big", count=1, size=1100, study_uid=findings.study_uid)
    sc = build_heatmap_sc(big, _hot_corner(), findings, 0)
    assert picture_shape(1100, 1100) == (1024, 1024)
    assert sc.Columns <= 1024 + 96 and sc.Rows > 1024  # the radiograph at 1024, the caption below it


def test_heatmap_sc_from_compressed_source(sources: list[Dataset], findings: StudyResult) -> None:
    source = sources[0]
    source.compress(RLELossless)
    sc = _roundtrip(build_heatmap_sc(source, _hot_corner(), findings, 0))
    assert sc.pixel_array.shape[:2] == (sc.Rows, sc.Columns) and sc.Rows > picture_shape(source.Rows, source.Columns)[0]


def test_heatmap_sc_uids_are_stable(sources: list[Dataset], findings: StudyResult) -> None:
    one = build_heatmap_sc(sources[0], _hot_corner(), findings, 0)
    two = build_heatmap_sc(sources[0], _hot_corner(8, 8), findings, 0)
    other = build_heatmap_sc(sources[1], _hot_corner(), findings, 1)
    assert (one.SeriesInstanceUID, one.SOPInstanceUID) == (two.SeriesInstanceUID, two.SOPInstanceUID)
    assert other.SeriesInstanceUID == one.SeriesInstanceUID
    assert other.SOPInstanceUID != one.SOPInstanceUID
    assert build_sr(sources, findings).SeriesInstanceUID != one.SeriesInstanceUID


def test_heatmap_must_be_2d(sources: list[Dataset], findings: StudyResult) -> None:
    with pytest.raises(ValueError, match="2-D"):
        build_heatmap_sc(sources[0], np.zeros((2, 3, 4)), findings, 0)


# ---------------------------------------------------------------------- own outputs
def test_is_own_output(sources: list[Dataset], findings: StudyResult) -> None:
    sr = _roundtrip(build_sr(sources, findings))
    sc = _roundtrip(build_heatmap_sc(sources[0], _hot_corner(), findings, 0))
    assert is_own_output(sr) and is_own_output(sc)
    assert not any(is_own_output(ds) for ds in sources)


def test_is_own_output_without_private_tags(sources: list[Dataset], findings: StudyResult) -> None:
    # Some PACS drop private elements; Manufacturer plus our series number or description remain.
    for built in (build_sr(sources, findings), build_heatmap_sc(sources[0], _hot_corner(), findings, 0)):
        stripped = _roundtrip(built)
        stripped.remove_private_tags()
        assert is_own_output(stripped)
        stripped.SeriesNumber = 3
        stripped.SeriesDescription = "renamed by PACS"
        # The SR still names BoneBridge as its device observer; the SC has nothing left.
        assert is_own_output(stripped) == (stripped.Modality == "SR")


def test_foreign_object_with_similar_manufacturer_is_not_ours(sources: list[Dataset]) -> None:
    source = sources[0]
    source.Manufacturer = "BoneBridge"  # e.g. a test factory
    source.SeriesNumber = 1
    source.SeriesDescription = "HAND PA"
    assert not is_own_output(source)
    source.Manufacturer = "Acme"
    source.SeriesNumber = SR_SERIES_NUMBER
    assert not is_own_output(source)


def _reencode(ds: Dataset, tsyntax: str) -> Dataset:
    """Write ``ds`` in another uncompressed transfer syntax, as a PACS may when it forwards it."""
    ds = _roundtrip(ds)
    ds.file_meta.TransferSyntaxUID = tsyntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def test_private_block_alone_identifies_our_output(sources: list[Dataset], findings: StudyResult) -> None:
    for built in (build_sr(sources, findings), build_heatmap_sc(sources[0], _hot_corner(), findings, 0)):
        assert built.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        # Implicit VR turns the private elements into UN bytes; the marker must still be recognised.
        hopped = _reencode(built, ImplicitVRLittleEndian)
        hopped.Manufacturer = "PACS rewrote this"
        hopped.SeriesNumber = 1
        hopped.SeriesDescription = "renamed"
        hopped.ContentSequence = []
        assert is_own_output(hopped)
        hopped.remove_private_tags()
        assert not is_own_output(hopped)


def test_heatmap_sc_keeps_lossy_flag_of_source(sources: list[Dataset], findings: StudyResult) -> None:
    assert build_heatmap_sc(sources[0], _hot_corner(), findings, 0).LossyImageCompression == "00"
    sources[0].LossyImageCompression = "01"
    sources[0].LossyImageCompressionRatio = 10
    sc = build_heatmap_sc(sources[0], _hot_corner(), findings, 0)
    assert sc.LossyImageCompression == "01"
    assert float(sc.LossyImageCompressionRatio) == 10.0


def test_sr_is_readable_by_dcmtk(tmp_path: Path, sources: list[Dataset], findings: StudyResult) -> None:
    """dcmtk's SR parser checks the document's structure against the Comprehensive SR IOD rules."""
    if shutil.which("dsrdump") is None:
        pytest.skip("dcmtk dsrdump not installed")
    path = tmp_path / "sr.dcm"
    build_sr(sources, findings).save_as(path, enforce_file_format=True)
    run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "W:" not in run.stderr and "E:" not in run.stderr, run.stderr
    assert '"Bone age")="123.4"' in run.stdout
    assert "(263654008,SCT,\"Abnormal\")" in run.stdout


def test_heatmap_sc_accepts_already_decoded_image(sources: list[Dataset], findings: StudyResult) -> None:
    from models.display_image import read_display_image

    decoded_here = build_heatmap_sc(sources[0], _hot_corner(), findings, 0)
    given = build_heatmap_sc(sources[0], _hot_corner(), findings, 0, display_image=read_display_image(sources[0]))
    np.testing.assert_array_equal(given.pixel_array, decoded_here.pixel_array)
    blank = build_heatmap_sc(sources[0], _hot_corner(), findings, 0, display_image=np.zeros((32, 32)))
    assert not np.array_equal(blank.pixel_array, decoded_here.pixel_array)


def test_sr_keeps_both_anatomy_witnesses_and_flags_disagreement(sources: list[Dataset], findings: StudyResult) -> None:
    from dataclasses import replace

    from tests.bonebridge_process import sr_values

    evidence = {"model_top1": "knee 0.91", "model_top2": "leg 0.06", "tags": "hand (BodyPartExamined=HAND)",
                "decided_by": "model", "disagreement": "yes"}
    values = sr_values(_read_sr(build_sr(sources, replace(findings, anatomy="knee", anatomy_evidence=evidence))))
    assert values["Anatomy model first choice"] == "knee 0.91"
    assert values["Anatomy model second choice"] == "leg 0.06"
    assert values["Anatomy from DICOM tags"] == "hand (BodyPartExamined=HAND)"
    assert values["Anatomy decided by"] == "model"
    assert values["Anatomy model disagrees with DICOM tags"] == "Yes"
    assert values["Finding Site"] == "Knee"  # the finding site follows the decided anatomy, coded in SNOMED CT

    agreeing = replace(findings, anatomy_evidence={**evidence, "disagreement": "no"})
    assert sr_values(_read_sr(build_sr(sources, agreeing)))["Anatomy model disagrees with DICOM tags"] == "No"
    silent = sr_values(_read_sr(build_sr(sources, findings)))  # no evidence recorded: no such items
    assert "Anatomy decided by" not in silent
    assert "Anatomy model fallback" not in values  # the first model answered

    because = "second witness answered: bonebridge-anatomy 1.1.1 out of distribution (5000 vs threshold 3394)"
    fallback = sr_values(_read_sr(build_sr(sources, replace(findings, anatomy_evidence={**evidence,
                                                                                          "model_fallback": because}))))
    assert fallback["Anatomy model fallback"] == because


def test_fracture_sr_codes_the_finding_and_each_image(tmp_path: Path, sources: list[Dataset],
                                                      findings: StudyResult) -> None:
    """A fracture model's SR: SNOMED CT "Fracture of bone" present/absent, and one probability per source image
    that references its image; dcmtk renders the tree without a warning."""
    from dataclasses import replace

    from daemon.output.study_result import ImageProbability

    per_image = [ImageProbability(str(ds.SOPClassUID), str(ds.SOPInstanceUID), p) for ds, p in zip(sources, (0.9, 0.72))]
    fracture = replace(findings, findings={**findings.findings, "fracture": "present"}, image_probabilities=per_image)
    sr = _read_sr(build_sr(sources, fracture))
    group = sr.content.get_image_measurement_groups()[0]
    evaluated = {_code_value(q.name): _code_value(q.value) for q in group.get_qualitative_evaluations()}
    assert evaluated[("125605004", "SCT")] == ("52101004", "SCT")  # Fracture of bone: Present
    referenced = {}
    for m in group.get_measurements():
        for item in m[0].get("ContentSequence", []):
            if item.ValueType == "IMAGE":
                referenced[str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)] = m.value
    assert referenced == {str(ds.SOPInstanceUID): pytest.approx(p) for ds, p in zip(sources, (0.9, 0.72))}

    absent = replace(fracture, findings={**fracture.findings, "fracture": "absent"})
    group = _read_sr(build_sr(sources, absent)).content.get_image_measurement_groups()[0]
    evaluated = {_code_value(q.name): _code_value(q.value) for q in group.get_qualitative_evaluations()}
    assert evaluated[("125605004", "SCT")] == ("272519000", "SCT")
    if shutil.which("dsrdump") is not None:
        path = tmp_path / "fracture-sr.dcm"
        build_sr(sources, fracture).save_as(path, enforce_file_format=True)
        run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "W:" not in run.stderr and "E:" not in run.stderr, run.stderr
        assert 'CODE:(,,"Fracture of bone")=(52101004,SCT,"Present")' in run.stdout


def test_fracture_sr_names_the_map_peak_of_each_positive_image(tmp_path: Path, sources: list[Dataset],
                                                                findings: StudyResult) -> None:
    """Each image at or above the threshold gets a TID 1410 group: a SCOORD POINT at its map's peak on that image,
    finding type "Fracture of bone", the map's probability there; an image below the threshold gets none."""
    from dataclasses import replace

    from daemon.output.study_result import ImageProbability, MapPeak

    peaks = [MapPeak(column=12.5, row=30.5, probability=0.81), MapPeak(column=3.5, row=4.5, probability=0.2)]
    per_image = [ImageProbability(str(ds.SOPClassUID), str(ds.SOPInstanceUID), p, map_peak=peak)
                 for ds, p, peak in zip(sources, (0.9, 0.1), peaks)]
    result = replace(findings, findings={**findings.findings, "fracture": "present", "abnormality_threshold": 0.4},
                     image_probabilities=per_image)
    sr = _read_sr(build_sr(sources, result))
    regions = sr.content.get_planar_roi_measurement_groups()
    assert len(regions) == 1
    region = regions[0].roi
    assert region.graphic_type.value == "POINT"
    np.testing.assert_allclose(region.value, [[12.5, 30.5]])
    (image,) = [item for item in region.ContentSequence if item.ValueType == "IMAGE"]
    assert str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == str(sources[0].SOPInstanceUID)
    assert _code_value(regions[0].finding_type) == ("125605004", "SCT")
    (peak_probability,) = regions[0].get_measurements()
    assert peak_probability.value == pytest.approx(0.81)
    assert len(sr.content.get_image_measurement_groups()) == 1  # the study's own group is unchanged

    below = replace(result, image_probabilities=[replace(i, probability=0.1) for i in per_image])
    assert _read_sr(build_sr(sources, below)).content.get_planar_roi_measurement_groups() == []
    if shutil.which("dsrdump") is not None:
        path = tmp_path / "peak-sr.dcm"
        build_sr(sources, result).save_as(path, enforce_file_format=True)
        run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "W:" not in run.stderr and "E:" not in run.stderr, run.stderr
        assert "=(POINT,12.5/30.5)>" in run.stdout, run.stdout


def test_heatmap_caption_says_the_finding_in_words(sources: list[Dataset], findings: StudyResult) -> None:
    from dataclasses import replace

    from daemon.output.sc import heatmap_caption
    from daemon.output.study_result import ImageProbability

    assert heatmap_caption(findings, sources[0])[0] == (
        "Bone age 10 y 3 mo (123 months); sex F (predicted by the model); read as a right hand, mirrored to the "
        "left-hand standard")
    findings = replace(findings, findings={k: v for k, v in findings.findings.items() if k != "hand_side"})
    lines = heatmap_caption(findings, sources[0])
    assert lines[0] == "Bone age 10 y 3 mo (123 months); sex F (predicted by the model)"
    # The header gave the sex: the caption names it (the age was computed for it), and the model's contradiction.
    from_header = replace(findings, findings={**findings.findings, "sex_source": "dicom", "predicted_sex": "F",
                                              "sex_mismatch": "yes"})
    male = sources[0].copy()
    male.PatientSex = "M"
    assert heatmap_caption(from_header, male)[0] == (
        "Bone age 10 y 3 mo (123 months); sex M (from DICOM PatientSex); the model reads F, contradicting the header")
    agreeing = replace(from_header, findings={**from_header.findings, "predicted_sex": "M", "sex_mismatch": "no"})
    assert heatmap_caption(agreeing, male)[0] == "Bone age 10 y 3 mo (123 months); sex M (from DICOM PatientSex)"
    assert lines[1].startswith("Abnormality probability 0.81 (study) - ABNORMAL at threshold 0.50")
    assert lines[2] == "Anatomy: hand 0.97 (model)"
    assert "mura-densenet169 1.2.0" in lines[3] and "anatomy-effnet" not in lines[3]
    assert not any(str(sources[0].PatientName) in line or str(sources[0].PatientID) in line for line in lines)
    fracture = replace(findings, findings={"abnormality_probability": 0.2, "abnormality_threshold": 0.35,
                                           "fracture": "absent"},
                       image_probabilities=[ImageProbability("1.2", str(sources[0].SOPInstanceUID), 0.25)])
    assert heatmap_caption(fracture, sources[0])[0] == (
        "Fracture probability 0.20 (study) - no fracture at threshold 0.35; this image 0.25")
    sc = build_heatmap_sc(sources[0], _hot_corner(), fracture, 0)
    band = sc.pixel_array[picture_shape(sources[0].Rows, sources[0].Columns)[0]:]
    assert band.max() >= 250 and ((band[..., 0] > 200) & (band[..., 2] < 50)).any()  # white text, amber notice
    assert RESEARCH_NOTICE.startswith("RESEARCH USE ONLY")


# ------------------------------------------------------------------- bad source headers
@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda bad: bad.case)
def test_builders_never_fail_on_a_bad_source_header(tmp_path: Path, sources: list[Dataset], findings: StudyResult,
                                                    bad: BadValue) -> None:
    """A value invalid for its VR (PatientBirthDate ``abc``, InstanceNumber ``abc``, two PatientSex values...) is
    left out of what the SR and the SC copy, the SR names the attribute, and neither builder raises."""
    source = write_with_bad_value(Path(sources[0].filename), tmp_path / "bad.dcm", bad)
    sources = [source, sources[1]]
    report = _read_sr(build_sr(sources, findings))
    named = [text for text in _texts(report, "Unreadable source attribute") if text.startswith(bad.keyword + ":")]
    not_processed = _read_sr(build_sr(sources, dataclasses.replace(findings, not_processed_reason="it failed")))
    sc = _roundtrip(build_heatmap_sc(source, _hot_corner(), findings, 0, display_image=np.zeros((32, 32))))
    if bad.unreadable:
        assert named == [named[0]] and "in 1 of 2 images" in named[0], named
        assert any(text.startswith(bad.keyword + ":")
                   for text in _texts(not_processed, "Unreadable source attribute"))
        for written in (report, not_processed, sc):  # what was written holds no invalid value for it
            assert bad.keyword not in written or value_problem(written[bad.keyword]) is None
    else:
        assert named == []
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_sr_names_no_unreadable_attribute_for_a_clean_header(sources: list[Dataset], findings: StudyResult) -> None:
    assert _texts(_read_sr(build_sr(sources, findings)), "Unreadable source attribute") == []


def test_a_replaced_source_gives_new_result_uids(tmp_path: Path, findings: StudyResult) -> None:
    """A source whose content the spool replaced (an earlier file under ``superseded/``) is another revision: the
    report and heatmap made from it get new UIDs, so the PACS keeps both reports; unreplaced sources keep theirs."""
    from daemon.output.sc import sc_uids
    from daemon.output.sr import sr_uids

    folder = tmp_path / "incoming" / findings.study_uid
    sources = [pydicom.dcmread(ds.filename) for ds in make_study(folder, count=2, size=32,
                                                                  study_uid=findings.study_uid)]
    before_sr, before_sc = sr_uids(sources, findings), sc_uids(sources[0], findings, 0)
    other_sc = sc_uids(sources[1], findings, 1)
    kept = Path(sources[0].filename).parent / "superseded" / (Path(sources[0].filename).stem + ".20260101T000000Z-1.dcm")
    kept.parent.mkdir()
    shutil.copyfile(sources[0].filename, kept)
    assert sr_uids(sources, findings) != before_sr and sc_uids(sources[0], findings, 0) != before_sc
    assert sc_uids(sources[1], findings, 1) == other_sc
    assert sr_uids(sources, findings) == sr_uids(sources, findings)  # still derived: a redelivered task agrees
