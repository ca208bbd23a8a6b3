"""Routing rules: age parsing, facts from DICOM, first-match decisions with readable reasons, explain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from daemon.config.schema import Config, load_config
from daemon.analyse.explain import explain_files_text
from daemon.analyse.rules import (
    StudyFacts,
    age_from_dates,
    decide_route,
    evaluate_route,
    facts_from_dataset,
    parse_age_string,
)
from tests.dicom_factory import make_dx


def make_config(tmp_path: Path, *, trained: bool = True, extra_routes: list[dict] | None = None) -> Config:
    """The shipped routes, with a boneage checkpoint in tmp_path that is trained (or not)."""
    weights = tmp_path / "boneage.pt"
    weights.write_bytes(b"weights")
    weights.with_suffix(".card.json").write_text(json.dumps({"task": "boneage", "trained": trained}))
    routes = [
        {"name": "pediatric-hand", "when": {"anatomy": ["hand"], "patient_age_years": {"max": 18}},
         "run": ["boneage"], "send_to": ["pacs"]},
        {"name": "upper-extremity",
         "when": {"anatomy": ["elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist"]},
         "run": ["abnormality"], "send_to": ["pacs"]},
        *(extra_routes or []),
        {"name": "other", "when": {}, "report": "not-processed", "send_to": ["pacs"]},
    ]
    return Config.model_validate(
        {
            "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}},
            "models": {"boneage": {"weights": str(weights)}, "abnormality": {"weights": None}},
            "anatomy": {"model": None},
            "routes": routes,
        }
    )


def facts(**overrides: object) -> StudyFacts:
    base: dict[str, object] = dict(
        anatomy="hand", anatomy_source="BodyPartExamined=HAND", modality="DX", patient_age_years=10.0,
        patient_sex="M", calling_ae="STORESCU", study_description="XR HAND 2 VIEWS", body_part_examined="HAND",
    )
    base.update(overrides)
    return StudyFacts(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- ages


@pytest.mark.parametrize(
    ("text", "years"),
    [("012Y", 12.0), ("006M", 0.5), ("010W", 70 / 365.25), ("003D", 3 / 365.25), ("018y", 18.0),
     ("", None), ("12", None), ("abcY", None), ("0120Y", None), (None, None)],
)
def test_parse_age_string(text: str | None, years: float | None) -> None:
    result = parse_age_string(text)
    assert result == pytest.approx(years) if years is not None else result is None


def test_age_from_dates() -> None:
    assert age_from_dates("20000101", "20100101") == pytest.approx(10.0, abs=0.01)
    assert age_from_dates("20100101", "20000101") is None  # study before birth
    assert age_from_dates("", "20100101") is None
    assert age_from_dates("20000230", "20100101") is None  # not a date


def _ds(**attrs: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def test_facts_from_dataset_prefers_patient_age() -> None:
    ds = _ds(PatientAge="006M", PatientBirthDate="19800101", StudyDate="20200101", PatientSex="F",
             Modality="DX", StudyDescription=" XR HAND ", BodyPartExamined="HAND")
    f = facts_from_dataset(ds, "STORESCU", "Hand", "BodyPartExamined=HAND")
    assert f.patient_age_years == pytest.approx(0.5)
    assert (f.anatomy, f.patient_sex, f.modality, f.calling_ae) == ("hand", "F", "DX", "STORESCU")
    assert f.study_description == "XR HAND"


def test_facts_from_dataset_age_from_dates_then_unknown() -> None:
    ds = _ds(PatientAge="", PatientBirthDate="20100615", StudyDate="20200615", Modality="CR")
    assert facts_from_dataset(ds, None, None, "tags").patient_age_years == pytest.approx(10.0, abs=0.01)
    unknown = facts_from_dataset(_ds(PatientBirthDate="20100615", Modality="CR"), None, None, "tags")
    assert unknown.patient_age_years is None
    assert unknown.patient_sex is None and unknown.calling_ae is None


def test_facts_from_real_cr_file() -> None:
    import data_store
    import pydicom

    path = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    f = facts_from_dataset(ds, "ORTHANC", "other", "BodyPartExamined=CHEST")
    # No PatientAge in this file: age comes from PatientBirthDate and StudyDate.
    assert "PatientAge" not in ds
    assert f.patient_age_years == pytest.approx(age_from_dates(ds.PatientBirthDate, ds.StudyDate))
    assert 64 < f.patient_age_years < 65
    assert (f.modality, f.patient_sex, f.body_part_examined) == ("CR", "F", "CHEST")


# --------------------------------------------------------------------------- decisions


def test_child_hand_takes_pediatric_route(tmp_path: Path) -> None:
    decision = decide_route(make_config(tmp_path), facts(patient_age_years=10.0))
    assert decision.route is not None and decision.route.name == "pediatric-hand"
    assert decision.disabled_reason is None
    assert [v.route for v in decision.verdicts] == ["pediatric-hand", "upper-extremity", "other"]
    assert [v.matched for v in decision.verdicts] == [True, True, True]
    assert decision.verdicts[0].reasons == ["anatomy 'hand' in [hand]", "patient age 10.0 y within max 18"]


def test_adult_hand_falls_through_with_age_reason(tmp_path: Path) -> None:
    decision = decide_route(make_config(tmp_path), facts(patient_age_years=25.0))
    assert decision.route is not None and decision.route.name == "upper-extremity"
    first = decision.verdicts[0]
    assert not first.matched and "patient age 25.0 y > max 18" in first.reasons
    # upper-extremity runs abnormality, whose weights are null: disabled, with the reason.
    assert decision.disabled_reason is not None and "abnormality" in decision.disabled_reason


def test_chest_goes_to_catch_all(tmp_path: Path) -> None:
    decision = decide_route(make_config(tmp_path), facts(anatomy="other", body_part_examined="CHEST"))
    assert decision.route is not None and decision.route.name == "other"
    assert decision.verdicts[0].reasons[0] == "anatomy 'other' not in [hand]"
    assert decision.verdicts[2].reasons == ["no conditions: matches every study"]


def test_unknown_age_does_not_match_and_says_so(tmp_path: Path) -> None:
    decision = decide_route(make_config(tmp_path), facts(patient_age_years=None))
    verdict = decision.verdicts[0]
    assert not verdict.matched
    assert any("patient age unknown" in r and "max 18" in r for r in verdict.reasons)
    assert decision.route is not None and decision.route.name == "upper-extremity"


def test_unknown_anatomy_does_not_match(tmp_path: Path) -> None:
    decision = decide_route(make_config(tmp_path), facts(anatomy=None, anatomy_source="no anatomy in tags"))
    assert decision.route is not None and decision.route.name == "other"
    assert decision.verdicts[0].reasons[0].startswith("anatomy unknown (no anatomy in tags)")


def test_age_boundaries_are_inclusive(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert decide_route(config, facts(patient_age_years=18.0)).route.name == "pediatric-hand"  # type: ignore[union-attr]
    assert decide_route(config, facts(patient_age_years=18.01)).route.name == "upper-extremity"  # type: ignore[union-attr]


def test_untrained_model_disables_matching_route(tmp_path: Path) -> None:
    decision = decide_route(make_config(tmp_path, trained=False), facts())
    assert decision.route is not None and decision.route.name == "pediatric-hand"
    assert decision.disabled_reason is not None and "not trained" in decision.disabled_reason


def test_string_conditions_are_case_insensitive(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        extra_routes=[{
            "name": "room1-knee",
            "when": {"modality": ["cr", "dx"], "calling_ae": ["storescu"], "study_description": ["knee"],
                     "body_part_examined": ["knee"], "patient_sex": ["m"], "patient_age_years": {"min": 40}},
            "report": "not-processed", "send_to": ["pacs"],
        }],
    )
    knee = facts(anatomy="other", study_description="XR Knee 3 views", body_part_examined="Knee", patient_age_years=50.0)
    decision = decide_route(config, knee)
    assert decision.route is not None and decision.route.name == "room1-knee"
    assert "study description 'XR Knee 3 views' contains 'knee'" in decision.verdicts[2].reasons
    young_woman = facts(anatomy="other", study_description="XR KNEE", body_part_examined="KNEE",
                        patient_sex="F", patient_age_years=30.0, calling_ae="OTHER_AE")
    verdict = decide_route(config, young_woman).verdicts[2]
    assert not verdict.matched
    assert "patient age 30.0 y < min 40" in verdict.reasons
    assert "patient sex 'F' not in [m]" in verdict.reasons
    assert "calling AE 'OTHER_AE' not in [storescu]" in verdict.reasons


def test_no_route_matches(tmp_path: Path) -> None:
    config = Config.model_validate(
        {
            "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}},
            "anatomy": {"model": None},
            "routes": [{"name": "dx-only", "when": {"modality": ["DX"]}, "report": "not-processed",
                        "send_to": ["pacs"]}],
        }
    )
    decision = decide_route(config, facts(modality="CR"))
    assert decision.route is None and decision.disabled_reason is None
    assert decision.verdicts[0].reasons == ["modality 'CR' not in [DX]"]


def test_rule_values_are_data_not_code(tmp_path: Path) -> None:
    """A description condition that looks like code is only ever a substring."""
    route = make_config(
        tmp_path,
        extra_routes=[{"name": "sneaky", "when": {"study_description": ["__import__('os').system('false')"]},
                       "report": "not-processed", "send_to": ["pacs"]}],
    ).routes[2]
    assert not evaluate_route(route, facts()).matched
    assert evaluate_route(route, facts(study_description="x __IMPORT__('OS').SYSTEM('FALSE') y")).matched


# --------------------------------------------------------------------------- route explain


def test_explain_files_text_shows_facts_verdicts_and_decision(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    child = make_dx(tmp_path / "child.dcm", body_part="HAND", age="008Y", size=16)
    adult = make_dx(tmp_path / "adult.dcm", body_part="HAND", age="040Y", size=16)
    text = explain_files_text(config, [Path(child.filename), Path(adult.filename), tmp_path / "boneage.pt"],
                              calling_ae="STORESCU")
    blocks = text.split("\n\n")
    assert len(blocks) == 3
    assert "anatomy: hand (BodyPartExamined=HAND)" in blocks[0]
    assert "patient age: 8.0 y" in blocks[0]
    assert "pediatric-hand: MATCH" in blocks[0]
    assert "decision: route 'pediatric-hand': run [boneage]" in blocks[0]
    assert "pediatric-hand: no" in blocks[1] and "patient age 40.0 y > max 18" in blocks[1]
    assert "route 'upper-extremity' matches but is disabled" in blocks[1]
    assert "cannot read as DICOM" in blocks[2]


def test_explain_uses_given_anatomy_function(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ds = make_dx(tmp_path / "x.dcm", body_part="HAND", age="008Y", size=16)
    seen: list[str] = []

    def model(d: Dataset) -> tuple[str | None, str]:
        seen.append(d.SOPInstanceUID)
        return "wrist", "anatomy model p=0.93"

    text = explain_files_text(config, [Path(ds.filename)], anatomy_of=model)
    assert seen == [ds.SOPInstanceUID]
    assert "anatomy: wrist (anatomy model p=0.93)" in text
    assert "anatomy 'wrist' not in [hand]" in text


def test_explain_with_shipped_config_on_chest(tmp_path: Path) -> None:
    import data_store

    from daemon.config.schema import default_config_path

    config = load_config(default_config_path())
    path = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    text = explain_files_text(config, [path])
    assert "anatomy: chest (BodyPartExamined=CHEST)" in text
    assert "other: MATCH" in text
    assert "decision: route 'other': a not-processed report goes to [pacs]" in text
