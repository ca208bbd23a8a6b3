"""The models that ship in models/weights/ (bone age and sex, fracture): their cards, and how they do on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.nets.checkpoint import load_checkpoint, read_card, sha256_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights" / "boneage-sex.pt"


def test_shipped_card_verifies_and_says_research_use() -> None:
    card = read_card(WEIGHTS)
    assert card.sha256 == sha256_file(WEIGHTS)
    assert card.trained and card.task == "boneage"
    assert "not for clinical use" in card.intended_use.lower()
    assert "RSNA" in card.licence_note
    assert card.metrics["mae_months"] > 0 and card.metrics_split
    load_checkpoint(WEIGHTS)  # loads: sha256 matches, card present, trained


def test_shipped_model_on_held_out_rsna_images(shared_data: Path) -> None:
    """Needs ../shared/data (skipped without it): the hashed test split's radiographs at real framing (100 of
    rsna-boneage-512), never trained on at either size."""
    from models.train.boneage import rsna_examples
    from models.inference.predictor import load_predictor
    from models.data.preprocess import load_image

    folder = shared_data / "rsna-boneage-512"
    if not (folder / "labels.csv").exists():
        pytest.skip("rsna-boneage-512 not in shared data")
    test = rsna_examples(folder / "labels.csv")["test"]
    predictor = load_predictor(WEIGHTS)
    sexes = ["M" if e.male else "F" for e in test]
    preds = predictor.predict([load_image(e.path) for e in test], sexes, with_heatmaps=False)
    ages = np.array([p.outputs["bone_age_months"] for p in preds])
    truth = np.array([e.target for e in test])
    mae = float(np.abs(ages - truth).mean())
    baseline = float(np.abs(truth - truth.mean()).mean())  # always answering the mean
    assert mae < 0.4 * baseline, (mae, baseline)
    predicted_male = np.array([p.outputs["predicted_sex"] == "M" for p in preds])
    assert (predicted_male == np.array([e.male > 0.5 for e in test])).mean() > 0.75


def configured_fracture_lead() -> Path:
    """The fracture model the shipped configuration runs (the lead of its ensemble: its map and card)."""
    from daemon.config.schema import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "config" / "bonebridge.yaml")
    return Path(config.models["abnormality"].weights)


FRACTURE = configured_fracture_lead()


def test_shipped_fracture_card_says_what_it_was_trained_and_measured_on() -> None:
    card = read_card(FRACTURE)
    assert card.sha256 == sha256_file(FRACTURE) and card.trained
    assert card.task == "abnormality" and card.localisation_head and card.classes == ["no fracture", "fracture"]
    assert "CC BY 4.0" in card.licence_note and "not for clinical use" in card.intended_use.lower()
    assert 0.0 < float(card.threshold) < 1.0 and "Youden" in card.training["threshold_rule"]
    assert "blocks of 20 consecutive image ids" in card.training_data
    for key in ("auroc", "pointing_hit_rate", "pointing_hit_rate_strict", "sensitivity", "specificity"):
        assert 0.0 <= card.metrics[key] <= 1.0, key
    assert "test" in card.metrics_split


def test_shipped_fracture_model_gives_its_map_on_a_real_cr() -> None:
    """pydicom-data's real CR of a lower leg through the daemon's decoder: a probability and a learnt map over it."""
    import data_store
    import pydicom

    from models.display_image import read_display_image
    from models.inference.predictor import load_predictor

    image = read_display_image(pydicom.dcmread(Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm"))
    pred = load_predictor(FRACTURE).predict([image])[0]
    assert 0.0 <= pred.outputs["abnormality_probability"] <= 1.0
    assert pred.heatmap is not None and pred.heatmap.shape == image.shape
    assert float(pred.heatmap.max()) <= pred.outputs["localisation_peak_probability"] + 1e-3
    # where the SR's SCOORD point goes: the centre of the heatmap's brightest pixel, in the image's own pixels
    column, row = pred.outputs["localisation_peak_column"], pred.outputs["localisation_peak_row"]
    assert pred.heatmap[int(row), int(column)] == pred.heatmap.max()
    assert column % 1 == 0.5 and row % 1 == 0.5


def test_shipped_fracture_model_on_held_out_fracatlas(shared_data: Path) -> None:
    """Needs ../shared/data (skipped without it): the id-block test split, never trained on or tuned on."""
    from models.eval.abnormality import fracatlas_cases, fracture_metrics, predict_cases
    from models.inference.predictor import load_predictor

    folder = shared_data / "fracatlas"
    if not (folder / "dataset.csv").exists():
        pytest.skip("fracatlas not in shared data")
    cases, _ = fracatlas_cases(folder, "test")
    predictor = load_predictor(FRACTURE)
    rows, _ = predict_cases(predictor, cases, batch_size=16, progress=False)
    metrics = fracture_metrics(rows, float(predictor.card.threshold))
    assert metrics["auroc"] > 0.85 and metrics["pointing_hit_rate"] > 0.4, metrics


def test_the_weights_folder_stays_within_its_budget() -> None:
    """All of models/weights/ at most 60 MB (the repository's rule), and every file is named in its README."""
    folder = WEIGHTS.parent
    files = [p for p in folder.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 60_000_000
    readme = (folder / "README.md").read_text(encoding="utf-8")
    for path in files:
        if path.suffix == ".pt":
            assert f"`{path.name}`" in readme, path.name


def test_the_configured_bone_age_model_loads_every_member_as_shipped() -> None:
    """The shipped configuration's bone-age model (an output ensemble when it names members): every member verifies."""
    from daemon.config.schema import load_config
    from models.inference.ensemble import load_model

    ref = load_config(Path(__file__).resolve().parents[1] / "config" / "bonebridge.yaml").models["boneage"]
    model = load_model(ref.weights, ref.ensemble)
    cards = getattr(model, "cards", [model.card])
    assert len(cards) == 1 + len(ref.ensemble)
    for path, card in zip(ref.all_weights(), cards):
        assert card.task == "boneage" and card.sha256 == sha256_file(path)
        assert "not for clinical use" in card.intended_use.lower()


def test_the_configured_anatomy_model_loads_every_member_of_its_cascade_as_shipped() -> None:
    """The shipped anatomy configuration (a cascade when it names fallbacks): every member verifies, with its OOD
    sidecar, and they share one class list."""
    from daemon.config.schema import load_config
    from models.inference.ensemble import load_model

    ref = load_config(Path(__file__).resolve().parents[1] / "config" / "bonebridge.yaml").models["anatomy"]
    model = load_model(ref.weights, ref.ensemble)
    members = list(getattr(model, "members", [model]))
    assert len(members) == 1 + len(ref.ensemble)
    for path, member in zip(ref.all_weights(), members):
        assert member.card.task == "anatomy" and member.card.sha256 == sha256_file(path)
        assert member.ood_threshold is not None
        assert list(member.card.classes) == list(members[0].card.classes)
