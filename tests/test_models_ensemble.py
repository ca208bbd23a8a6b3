"""Output ensembles (``models.<name>.ensemble``): the averaging, the refusals, the config, and a study through them.

Small networks built in the test, no training: each member's answer is known, so the ensemble's must be their mean.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.analyse.pipeline import Analyser
from daemon.config.schema import load_config
from models.data.preprocess import Geometry
from models.inference.ensemble import EnsemblePredictor, load_model
from models.inference.predictor import Predictor
from models.nets.checkpoint import save_checkpoint
from models.nets.networks import BoneAgeSexNet, ClassifierNet
from tests.dicom_factory import make_dx
from tests.test_models_inference import boneage_predictor, card_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _abnormality_checkpoint(path: Path, seed: int, size: int = 32) -> Path:
    torch.manual_seed(seed)
    model = ClassifierNet("tiny_cnn", 1, pretrained=False)
    card = card_for("abnormality", Geometry(size=size), ["normal", "abnormal"], threshold=0.5)
    card.name = f"test-abnormality-{seed}"
    return save_checkpoint(model, card, path)


def _boneage_checkpoint(path: Path) -> Path:
    torch.manual_seed(3)
    card = card_for("boneage", Geometry(size=32), ["female", "male"], target_scaling={"mean": 120.0, "std": 40.0})
    return save_checkpoint(BoneAgeSexNet("tiny_cnn", pretrained=False), card, path)


def test_boneage_ensemble_averages_months_and_sex_and_keeps_the_leads_heatmap() -> None:
    lead = boneage_predictor(male_logit=5.0)  # p(male) 0.993
    other = boneage_predictor(male_logit=-1.0, geometry=Geometry(size=40))  # p(male) 0.269, another input size
    ensemble = EnsemblePredictor([lead, other])
    image = np.random.default_rng(0).random((50, 40), dtype=np.float32)
    sexes = ["F", None]
    got = ensemble.predict([image, image], patient_sex=sexes, with_heatmaps=True)
    a = lead.predict([image, image], patient_sex=sexes, with_heatmaps=True)
    b = other.predict([image, image], patient_sex=sexes, with_heatmaps=False)
    p_male = (torch.sigmoid(torch.tensor(5.0)).item() + torch.sigmoid(torch.tensor(-1.0)).item()) / 2
    for g, x, y in zip(got, a, b):
        assert g.outputs["bone_age_months"] == pytest.approx(
            (x.outputs["bone_age_months"] + y.outputs["bone_age_months"]) / 2)
        assert g.outputs["predicted_sex"] == "M"
        assert g.outputs["predicted_sex_probability"] == pytest.approx(p_male, abs=1e-5)
        np.testing.assert_array_equal(g.heatmap, x.heatmap)
        assert g.outputs["hand_side"] == x.outputs["hand_side"]
    # The lead alone is sure the stated F is wrong (0.993 >= 0.9); the ensemble's 0.63 is not sure enough to flag it.
    assert a[0].outputs["sex_mismatch"] == "yes" and got[0].outputs["sex_mismatch"] == "no"
    assert [c.name for c in ensemble.cards] == [lead.card.name, other.card.name]


def test_abnormality_ensemble_is_the_mean_probability(tmp_path: Path) -> None:
    first = load_model(_abnormality_checkpoint(tmp_path / "a.pt", seed=0))
    assert isinstance(first, Predictor)  # no ensemble: the plain predictor
    second = load_model(_abnormality_checkpoint(tmp_path / "b.pt", seed=1, size=48))
    both = load_model(tmp_path / "a.pt", [tmp_path / "b.pt"])
    assert isinstance(both, EnsemblePredictor) and len(both.cards) == 2
    images = [np.random.default_rng(i).random((64, 48), dtype=np.float32) for i in range(3)]
    expected = [(x.outputs["abnormality_probability"] + y.outputs["abnormality_probability"]) / 2
                for x, y in zip(first.predict(images, with_heatmaps=False), second.predict(images, with_heatmaps=False))]
    got = [p.outputs["abnormality_probability"] for p in both.predict(images, with_heatmaps=False)]
    assert got == pytest.approx(expected, abs=1e-6)
    assert len({round(v, 6) for v in expected}) > 1  # the members really differ per image


def test_the_leads_card_names_the_threshold_of_its_ensemble_and_keeps_its_own(tmp_path: Path) -> None:
    """Fracture 2.0.0: the threshold on the mean was chosen for that ensemble; the lead alone keeps its own, and an
    ensemble with other members than the card names falls back to the lead's own."""
    from models.nets.checkpoint import read_card, sha256_file

    member = _abnormality_checkpoint(tmp_path / "b.pt", seed=1)
    other = _abnormality_checkpoint(tmp_path / "c.pt", seed=2)
    torch.manual_seed(0)
    card = card_for("abnormality", Geometry(size=32), ["normal", "abnormal"], threshold=0.35)
    card.ensemble_thresholds = {sha256_file(member): 0.42}
    lead = save_checkpoint(ClassifierNet("tiny_cnn", 1, pretrained=False), card, tmp_path / "a.pt")
    assert read_card(lead).ensemble_thresholds == {sha256_file(member): 0.42}
    assert load_model(lead).card.threshold == pytest.approx(0.35)
    assert load_model(lead, [member]).card.threshold == pytest.approx(0.42)
    assert load_model(lead, [other]).card.threshold == pytest.approx(0.35)
    assert load_model(lead, [member, other]).card.threshold == pytest.approx(0.35)


def test_ensembles_of_mixed_or_unaveraged_tasks_are_refused(tmp_path: Path) -> None:
    abnormality = load_model(_abnormality_checkpoint(tmp_path / "a.pt", seed=0))
    with pytest.raises(ValueError, match="not abnormality"):
        EnsemblePredictor([abnormality, boneage_predictor(1.0)])
    with pytest.raises(ValueError, match="at least two"):
        EnsemblePredictor([abnormality])
    anatomy = Predictor(ClassifierNet("tiny_cnn", 3, pretrained=False),
                        card_for("anatomy", Geometry(size=32), ["hand", "knee", "chest"]))
    with pytest.raises(ValueError, match="not anatomy"):
        EnsemblePredictor([anatomy, anatomy])


def _config(tmp_path: Path, models: str) -> Path:
    path = tmp_path / "bonebridge.yaml"
    path.write_text(textwrap.dedent(f"""\
        storage: {{data_dir: {tmp_path / 'data'}}}
        destinations:
          pacs: {{ae_title: ORTHANC, host: 127.0.0.1, port: 4242}}
        models:
        {textwrap.indent(textwrap.dedent(models), '  ')}
        anatomy: {{model: null}}
        routes:
          - name: fracture
            when: {{anatomy: [hand]}}
            run: [abnormality]
            send_to: [pacs]
        """), encoding="utf-8")
    return path


def test_config_names_a_member_that_cannot_run(tmp_path: Path) -> None:
    _abnormality_checkpoint(tmp_path / "a.pt", seed=0)
    _boneage_checkpoint(tmp_path / "age.pt")
    missing = load_config(_config(tmp_path, "abnormality: {weights: a.pt, ensemble: [gone.pt]}"))
    assert missing.models["abnormality"].ensemble == [tmp_path / "gone.pt"]  # relative to the config file
    assert "gone.pt not found" in missing.model_status()["abnormality"]
    assert "gone.pt not found" in missing.route_status()["fracture"]
    other_task = load_config(_config(tmp_path, "abnormality: {weights: a.pt, ensemble: [age.pt]}"))
    assert "is a boneage model, not abnormality" in other_task.model_status()["abnormality"]
    with pytest.raises(Exception, match="ensemble"):
        load_config(_config(tmp_path, "abnormality: {weights: a.pt, ensemble: a.pt}"))


def test_a_study_through_an_ensemble_names_every_member_in_the_sr(tmp_path: Path) -> None:
    _abnormality_checkpoint(tmp_path / "a.pt", seed=0)
    _abnormality_checkpoint(tmp_path / "b.pt", seed=1, size=48)
    config = load_config(_config(tmp_path, "abnormality: {weights: a.pt, ensemble: [b.pt]}"))
    assert config.model_status()["abnormality"] is None
    ds = make_dx(tmp_path / "hand.dcm", body_part="HAND", size=64, seed=4)
    analysis = Analyser(config).analyse([ds])
    assert [m.name for m in analysis.result.models] == ["test-abnormality-0", "test-abnormality-1"]
    single = Analyser(load_config(_config(tmp_path, "abnormality: {weights: a.pt}"))).analyse([ds])
    other = Analyser(load_config(_config(tmp_path, "abnormality: {weights: b.pt}"))).analyse([ds])
    mean = (single.result.findings["abnormality_probability"] + other.result.findings["abnormality_probability"]) / 2
    assert analysis.result.findings["abnormality_probability"] == pytest.approx(mean, abs=1e-6)
    sr = analysis.outputs[0]
    text = str(sr)
    assert "test-abnormality-0 + test-abnormality-1" in text  # TID 4019 algorithm name of the finding
