"""Issue 25: ``route explain`` runs the daemon's own anatomy decision, so it and ``predict`` decide alike.

A stand-in anatomy model (a tiny network whose head always says "hand 0.80, wrist 0.15": the issue's MURA wrist that
the shipped model misread) with a calibration and an OOD sidecar in its card, as the real one has. A wrist tagged
WRIST at 10 years: the tag is the model's second choice, so the tag decides, the study takes the fracture route
and never bone age, and both commands say so with both witnesses. An untagged image the model is out of its depth
on is "anatomy unknown" in both. No shared data needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from daemon.config.schema import load_config
from daemon.analyse.explain import explain_files
from daemon.analyse.pipeline import Analyser
from models.nets.anatomy_ood import MahalanobisOOD
from models.nets.checkpoint import ModelCard, save_checkpoint
from models.nets.networks import ClassifierNet
from models.data.preprocess import Geometry
from tests.bonebridge_process import REPO, write_config
from tests.dicom_factory import make_dx
from tests.orthanc_fixture import free_port
from tests.test_cli import bonebridge

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["elbow", "hand", "wrist", "knee"]
PROBABILITIES = [0.02, 0.80, 0.15, 0.03]


def stand_in_anatomy(folder: Path, ood_threshold: float, probabilities: list[float] = PROBABILITIES,
                     stem: str = "anatomy", version: str = "0.1.0", classes: list[str] = CLASSES) -> Path:
    """A tiny anatomy checkpoint whose calibrated output is ``probabilities`` for every image; OOD score always 0."""
    geometry = Geometry(size=32, aspect="pad")
    model = ClassifierNet("tiny_cnn", len(classes), pretrained=False)
    linear = model.head[-1]
    torch.nn.init.zeros_(linear.weight)
    linear.bias.data = torch.log(torch.tensor(probabilities)) * 2.0  # temperature 2 in the card undoes the x2
    width = linear.in_features
    sidecar = folder / f"{stem}.ood.npz"
    sha = MahalanobisOOD(np.zeros((len(classes), width), np.float32), np.zeros((width, 2), np.float32)).save(sidecar)
    card = ModelCard(task="anatomy", name="stand-in-anatomy", version=version, architecture="tiny_cnn", input_size=32,
                     normalisation={"mean": list(geometry.mean), "std": list(geometry.std)},
                     preprocessing=geometry.to_dict(), classes=classes, trained=True,
                     calibration={"temperature": 2.0, "ood": {"file": sidecar.name, "sha256": sha,
                                                               "threshold": ood_threshold}})
    return save_checkpoint(model, card, folder / f"{stem}.pt")


def config_with(tmp_path: Path, weights: Path, fallbacks: tuple[Path, ...] = ()) -> Path:
    shipped = yaml.safe_load((REPO / "config" / "bonebridge.yaml").read_text())
    models = {**shipped["models"], "anatomy": {"weights": str(weights), "ensemble": [str(f) for f in fallbacks]}}
    return write_config(tmp_path, pacs_port=free_port(), anatomy_model=True, extra={"models": models})


def test_explain_and_predict_decide_alike_on_a_wrist_tagged_wrist_the_model_reads_as_a_hand(tmp_path: Path) -> None:
    weights = stand_in_anatomy(tmp_path, ood_threshold=10.0)
    config = config_with(tmp_path, weights)
    wrist = tmp_path / "wrist.dcm"
    make_dx(wrist, body_part="WRIST", age="010Y")

    predicted = bonebridge("predict", "--config", str(config), str(wrist))
    assert predicted.returncode == 0, predicted.stderr
    summary = json.loads(predicted.stdout)
    assert summary["anatomy"] == "wrist" and summary["route"] == "fracture"
    assert "bone_age_months" not in summary["findings"]
    evidence = summary["anatomy_evidence"]
    assert evidence["decided_by"] == "tags" and evidence["model_top1"] == "hand 0.80"
    assert "second choice" in evidence["rule"]
    assert "model said hand 0.80" in summary["anatomy_source"]  # the SR and caption say which decided

    explained = bonebridge("route", "explain", "--config", str(config), str(wrist))
    assert explained.returncode == 0, explained.stderr
    out = explained.stdout
    assert "anatomy: wrist (DICOM tags (BodyPartExamined=WRIST); model said hand 0.80)" in out
    assert "witness, DICOM tags: wrist (BodyPartExamined=WRIST)" in out
    assert "witness, anatomy model: first hand 0.80 second wrist 0.15 (in distribution" in out
    assert "anatomy rule: tags decide: the tagged part is the model's second choice" in out
    assert f"decision: route '{summary['route']}'" in out


def test_hand_tag_the_model_reads_as_a_hand_gets_bone_age_route_in_both(tmp_path: Path) -> None:
    weights = stand_in_anatomy(tmp_path, ood_threshold=10.0)
    config = load_config(config_with(tmp_path, weights))
    hand = tmp_path / "hand.dcm"
    make_dx(hand, body_part="HAND", age="010Y")
    text, ok = explain_files(config, [hand], analyser=Analyser(config))
    assert ok and "decision: route 'pediatric-hand'" in text


def test_untagged_and_out_of_distribution_is_anatomy_unknown_in_both(tmp_path: Path) -> None:
    import pydicom

    weights = stand_in_anatomy(tmp_path, ood_threshold=-1.0)  # every image is out of distribution
    config = load_config(config_with(tmp_path, weights))
    untagged = tmp_path / "untagged.dcm"
    make_dx(untagged, body_part=None, study_description="", age="010Y")
    analyser = Analyser(config)
    analysis = analyser.analyse([pydicom.dcmread(untagged)])
    assert analysis.result.anatomy is None
    assert "not processed" in analysis.result.not_processed_reason or "anatomy unknown" in \
        analysis.result.not_processed_reason
    assert "out of distribution" in analysis.result.anatomy_source
    text, ok = explain_files(config, [untagged], analyser=analyser)
    assert ok and "anatomy: unknown (unknown: no anatomy in the DICOM tags and the model is out of distribution" in text
    assert f"decision: route '{analysis.result.route}'" in text and "not-processed report" in text


KNEE = [0.05, 0.03, 0.02, 0.90]  # a fallback that reads every image as a knee


def cascade(tmp_path: Path, first_threshold: float) -> tuple[Path, Path, Path]:
    """(config, first, fallback): the first member reads hand 0.80, in distribution only if the threshold is >= 0."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    first = stand_in_anatomy(tmp_path, ood_threshold=first_threshold)
    fallback = stand_in_anatomy(tmp_path, ood_threshold=10.0, probabilities=KNEE, stem="anatomy-finetuned",
                                version="9.0.0")
    return config_with(tmp_path, first, (fallback,)), first, fallback


def test_a_cascade_asks_the_fallback_only_where_the_first_is_out_of_distribution(tmp_path: Path) -> None:
    from models.inference.anatomy_cascade import AnatomyCascade, study_anatomy

    image = np.full((64, 64), 0.5, np.float32)
    for threshold, expected in ((10.0, ("0.1.0", 0, "hand")), (-1.0, ("9.0.0", 1, "knee"))):
        config = load_config(cascade(tmp_path / str(threshold), threshold)[0])
        predictor = Analyser(config).predictor("anatomy")
        assert isinstance(predictor, AnatomyCascade)
        answer = study_anatomy(predictor, [image, image])
        assert (answer.card.version, answer.position, CLASSES[int(np.argmax(answer.probabilities))]) == expected
        assert bool(answer.passed_over) == (expected[1] == 1)


def test_untagged_study_the_first_does_not_know_is_decided_by_the_fallback_alike_in_explain_and_predict(
        tmp_path: Path) -> None:
    config, _, _ = cascade(tmp_path, first_threshold=-1.0)
    untagged = tmp_path / "untagged.dcm"
    make_dx(untagged, body_part=None, study_description="", age="040Y")
    predicted = bonebridge("predict", "--config", str(config), str(untagged))
    assert predicted.returncode == 0, predicted.stderr
    summary = json.loads(predicted.stdout)
    assert summary["anatomy"] == "knee" and summary["route"] == "fracture"
    evidence = summary["anatomy_evidence"]
    assert evidence["decided_by"] == "model" and evidence["model_top1"] == "knee 0.90"
    assert "stand-in-anatomy 0.1.0 out of distribution" in evidence["model_fallback"]
    explained = bonebridge("route", "explain", "--config", str(config), str(untagged))
    assert explained.returncode == 0, explained.stderr
    assert "anatomy cascade: second witness answered: stand-in-anatomy 0.1.0 out of distribution" in explained.stdout
    assert f"decision: route '{summary['route']}'" in explained.stdout


def test_a_fallback_never_overrules_a_tag(tmp_path: Path) -> None:
    import pydicom

    config = load_config(cascade(tmp_path, first_threshold=-1.0)[0])
    wrist = tmp_path / "wrist.dcm"
    make_dx(wrist, body_part="WRIST", age="040Y")
    result = Analyser(config).analyse([pydicom.dcmread(wrist)]).result
    # the fallback is sure (knee 0.90), in distribution, and wrist is not among its two best: a first witness would
    # overrule; a fallback leaves it to the tags, and says so
    assert result.anatomy == "wrist"
    assert "a fallback does not overrule tags" in result.anatomy_evidence["rule"]
    assert "model said knee 0.90" in result.anatomy_source


def test_explain_exits_2_on_a_file_it_cannot_read(tmp_path: Path) -> None:
    config = write_config(tmp_path, pacs_port=free_port())
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    out = bonebridge("route", "explain", "--config", str(config), str(tmp_path / "junk.dcm"))
    assert out.returncode == 2 and "cannot read as DICOM" in out.stdout


@pytest.mark.parametrize("part, age", [("ELBOW", "045Y"), ("WRIST", "010Y")])
def test_shipped_anatomy_on_the_issues_mura_cases_decides_alike_in_predict_explain_and_the_daemon(
        shared_data: Path, tmp_path: Path, part: str, age: str) -> None:
    """Issue 25's cases, with the shipped cascade: the MURA elbow tagged ELBOW (once "knee 0.89", decided, finding
    site Knee) and the wrist tagged WRIST of a 10-year-old (once a bone age of 196.8 months on an adult wrist).
    ``predict``, ``route explain`` and the daemon's analysis must decide alike, and neither case may go wrong."""
    import pydicom
    from PIL import Image

    png = shared_data / "examples" / "mura" / f"{part}.png"
    if not png.exists():
        pytest.skip(f"{png} not in the shared data")
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255.0
    study = tmp_path / f"{part.lower()}.dcm"
    make_dx(study, body_part=part, age=age, pixels=pixels)
    config = write_config(tmp_path, pacs_port=free_port(), anatomy_model=True)  # the shipped models and routes

    analysis = Analyser(load_config(config)).analyse([pydicom.dcmread(study)])
    predicted = bonebridge("predict", "--config", str(config), str(study))
    assert predicted.returncode == 0, predicted.stderr
    summary = json.loads(predicted.stdout)
    explained = bonebridge("route", "explain", "--config", str(config), str(study))
    assert explained.returncode == 0, explained.stderr

    assert summary["anatomy"] == analysis.result.anatomy and summary["route"] == analysis.result.route
    assert f"decision: route '{analysis.result.route}'" in explained.stdout
    assert f"anatomy: {analysis.result.anatomy} (" in explained.stdout
    if part == "ELBOW":
        assert analysis.result.anatomy == "elbow"  # the tag stands: the model is unsure or out of its depth
    else:
        assert "bone_age_months" not in summary["findings"] and analysis.result.route != "pediatric-hand"


def test_a_cascade_preprocesses_a_study_once_for_members_of_one_geometry(tmp_path: Path, monkeypatch) -> None:
    from models.inference import predictor as predictor_module
    from models.inference.anatomy_cascade import study_anatomy

    config = load_config(cascade(tmp_path, first_threshold=-1.0)[0])
    cascade_model = Analyser(config).predictor("anatomy")
    calls = []
    real = predictor_module.to_model_input
    monkeypatch.setattr(predictor_module, "to_model_input", lambda *a, **k: calls.append(1) or real(*a, **k))
    image = np.full((64, 64), 0.5, np.float32)
    answer = study_anatomy(cascade_model, [image, image, image])
    assert answer.position == 1 and len(calls) == 1  # both members read, one preprocessing (one batch of three)
    alone = cascade_model.members[1].anatomy_scores([image, image, image])[0].mean(axis=0)
    np.testing.assert_allclose(answer.probabilities, alone, rtol=1e-6)


def test_a_fallback_overrules_a_hand_tag_on_a_chest_because_no_route_runs_a_model_on_a_chest(tmp_path: Path) -> None:
    """A chest tagged HAND that the first model does not know and the fallback reads as a chest: overruled, flagged,
    and no model runs (1.2.0 sent every such study to the fracture model)."""
    import pydicom

    classes = ["chest", "hand", "wrist", "knee"]
    first = stand_in_anatomy(tmp_path, ood_threshold=-1.0, probabilities=[0.05, 0.80, 0.10, 0.05], classes=classes)
    fallback = stand_in_anatomy(tmp_path, ood_threshold=10.0, probabilities=[0.94, 0.01, 0.02, 0.03],
                                stem="anatomy-finetuned", version="9.0.0", classes=classes)
    config = load_config(config_with(tmp_path, first, (fallback,)))
    study = tmp_path / "chest-tagged-hand.dcm"
    make_dx(study, body_part="HAND", age="040Y")
    analysis = Analyser(config).analyse([pydicom.dcmread(study)])
    result = analysis.result
    assert result.anatomy == "chest" and result.anatomy_evidence["decided_by"] == "model"
    assert result.anatomy_evidence["disagreement"] == "yes"
    assert "toward chest, on which no route runs a model" in result.anatomy_evidence["rule"]
    assert not [m for m in result.models if m.task != "anatomy"]  # neither fracture nor bone age ran
