"""The bone-age and sex model that ships in models/weights/: its card, and its accuracy on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import load_checkpoint, read_card, sha256_file

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
    """Needs ../shared/data (skipped without it): 150 images of the hashed test split, never trained on."""
    from models.boneage import rsna_examples
    from models.inference import load_predictor
    from models.preprocess import load_image

    folder = shared_data / "rsna-boneage-100px"
    if not (folder / "labels.csv").exists():
        pytest.skip("rsna-boneage-100px not in shared data")
    test = rsna_examples(folder / "labels.csv")["test"][:150]
    predictor = load_predictor(WEIGHTS)
    sexes = ["M" if e.male else "F" for e in test]
    preds = predictor.predict([load_image(e.path) for e in test], sexes, with_heatmaps=False)
    ages = np.array([p.outputs["bone_age_months"] for p in preds])
    truth = np.array([e.target for e in test])
    mae = float(np.abs(ages - truth).mean())
    baseline = float(np.abs(truth - truth.mean()).mean())  # always answering the mean
    assert mae < 0.5 * baseline, (mae, baseline)
    predicted_male = np.array([p.outputs["predicted_sex"] == "M" for p in preds])
    assert (predicted_male == np.array([e.male > 0.5 for e in test])).mean() > 0.6
