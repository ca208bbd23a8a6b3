"""models.inference.predictor / models.nets.cam / checkpoint refusals, with small networks built in the test (no training).

The Grad-CAM geometry is checked end to end with a network whose evidence is known exactly: a 1x1 convolution
that passes brightness to a linear head, so Grad-CAM must light up the bright part of the image, wherever the
stretch or the padding put it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.nets.cam import render_overlay, to_original
from models.nets.checkpoint import CheckpointError, ModelCard, card_path, save_checkpoint
from models.inference.predictor import ImagePrediction, Predictor, load_predictor, study_abnormality
from models.nets.networks import BoneAgeSexNet, ClassifierNet
from models.data.preprocess import Geometry


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def card_for(task: str, geometry: Geometry, classes: list[str] | None = None, **extra) -> ModelCard:
    return ModelCard(
        task=task, name=f"test-{task}", version="0.0.1", architecture="tiny_cnn", input_size=geometry.size,
        normalisation={"mean": list(geometry.mean), "std": list(geometry.std)}, preprocessing=geometry.to_dict(),
        classes=classes or [], trained=True, **extra,
    )


@pytest.fixture
def abnormality_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    geometry = Geometry(size=32)
    model = ClassifierNet("tiny_cnn", 1, pretrained=False)
    return save_checkpoint(model, card_for("abnormality", geometry, ["normal", "abnormal"], threshold=0.5),
                           tmp_path / "abn.pt")


# --------------------------------------------------------------------------- checkpoint refusals
def test_load_predictor_accepts_a_checkpoint_with_its_card(abnormality_checkpoint: Path) -> None:
    predictor = load_predictor(abnormality_checkpoint)
    assert predictor.card.task == "abnormality"
    out = predictor.predict([np.random.default_rng(0).random((40, 30), dtype=np.float32)], with_heatmaps=False)
    assert 0.0 <= out[0].outputs["abnormality_probability"] <= 1.0


def test_missing_card_is_refused(abnormality_checkpoint: Path) -> None:
    card_path(abnormality_checkpoint).unlink()
    with pytest.raises(CheckpointError, match="no model card"):
        load_predictor(abnormality_checkpoint)


def test_tampered_weights_are_refused(abnormality_checkpoint: Path) -> None:
    state = torch.load(abnormality_checkpoint, weights_only=True)
    key = next(k for k, v in state.items() if v.dtype.is_floating_point)
    state[key] = state[key] + 0.01  # a subtly different model, same card
    torch.save(state, abnormality_checkpoint)
    with pytest.raises(CheckpointError, match="sha256"):
        load_predictor(abnormality_checkpoint)


def test_untrained_card_is_refused(abnormality_checkpoint: Path) -> None:
    cfile = card_path(abnormality_checkpoint)
    card = json.loads(cfile.read_text())
    card["trained"] = False
    cfile.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="not trained"):
        load_predictor(abnormality_checkpoint)


# --------------------------------------------------------------------------- outputs per task
def boneage_predictor(male_logit: float, geometry: Geometry = Geometry(size=32)) -> Predictor:
    """A bone-age network whose sex head says ``male_logit`` whatever the image (a known, confident answer)."""
    torch.manual_seed(1)
    net = BoneAgeSexNet("tiny_cnn", pretrained=False)
    with torch.no_grad():
        net.sex_head[-1].weight.zero_()
        net.sex_head[-1].bias.fill_(male_logit)
    card = card_for("boneage", geometry, ["female", "male"], target_scaling={"mean": 120.0, "std": 40.0})
    return Predictor(net, card)


def test_boneage_sex_source_and_mismatch() -> None:
    predictor = boneage_predictor(male_logit=5.0)  # p(male) = 0.993
    rng = np.random.default_rng(2)
    image = rng.random((50, 40), dtype=np.float32)
    given_m, given_f, unknown, other = predictor.predict([image] * 4, patient_sex=["M", "F", None, "O"],
                                                         with_heatmaps=False)
    keys = {"bone_age_months", "predicted_sex", "predicted_sex_probability", "sex_source", "sex_mismatch", "hand_side"}
    for pred in (given_m, given_f, unknown, other):
        assert set(pred.outputs) == keys
        assert pred.outputs["predicted_sex"] == "M"
        assert pred.outputs["predicted_sex_probability"] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())
        assert 0.0 <= pred.outputs["bone_age_months"] <= 240.0
    assert [p.outputs["sex_source"] for p in (given_m, given_f, unknown, other)] == ["dicom", "dicom", "model", "model"]
    assert [p.outputs["sex_mismatch"] for p in (given_m, given_f, unknown, other)] == ["no", "yes", "no", "no"]
    # The age head used the header's sex where there was one, the predicted (male) sex otherwise.
    assert unknown.outputs["bone_age_months"] == pytest.approx(given_m.outputs["bone_age_months"], abs=1e-4)
    assert given_f.outputs["bone_age_months"] != pytest.approx(given_m.outputs["bone_age_months"], abs=1e-3)


def test_unconfident_sex_head_flags_no_mismatch() -> None:
    predictor = boneage_predictor(male_logit=1.0)  # p(male) = 0.73 < 0.9
    pred = predictor.predict([np.zeros((20, 20), np.float32)], patient_sex=["F"], with_heatmaps=False)[0]
    assert pred.outputs["predicted_sex"] == "M" and pred.outputs["sex_mismatch"] == "no"


def test_a_stated_right_hand_is_read_as_the_mirrored_left_hand() -> None:
    """A right hand (ImageLaterality R) gives what its mirror image gives as a left hand, heatmap on the image as
    sent; a left hand, an unpaired or an unknown side is read as sent; other tasks never mirror."""
    predictor = boneage_predictor(male_logit=0.0)
    rng = np.random.default_rng(3)
    left = rng.random((48, 36), dtype=np.float32)
    left[:, :12] += 1.0  # an asymmetric image: mirroring it changes what the network sees
    left /= left.max()
    right = np.ascontiguousarray(left[:, ::-1])
    as_left, right_stated, right_unstated, both = predictor.predict(
        [left, right, right, right], patient_sex=["F"] * 4, laterality=["L", "R", None, "B"])
    assert right_stated.outputs["bone_age_months"] == pytest.approx(as_left.outputs["bone_age_months"], abs=1e-4)
    assert right_unstated.outputs["bone_age_months"] != pytest.approx(as_left.outputs["bone_age_months"], abs=1e-3)
    assert both.outputs["bone_age_months"] == pytest.approx(right_unstated.outputs["bone_age_months"], abs=1e-5)
    np.testing.assert_allclose(right_stated.heatmap, as_left.heatmap[:, ::-1], atol=1e-5)
    assert "mirrored" in right_stated.outputs["hand_side"]
    assert as_left.outputs["hand_side"] == "left hand (header)"
    assert "not stated" in right_unstated.outputs["hand_side"] and "not stated" in both.outputs["hand_side"]
    with pytest.raises(ValueError, match="laterality"):
        predictor.predict([left], laterality=["R", "L"])
    unmirrored = brightness_predictor("pad")
    image = np.full((30, 40), 0.1, np.float32)
    image[:, :10] = 1.0
    stated, unstated = unmirrored.predict([image, image], laterality=["R", None])
    np.testing.assert_array_equal(stated.heatmap, unstated.heatmap)
    assert "hand_side" not in stated.outputs


def test_side_head_mirrors_an_unstated_hand_it_calls_right() -> None:
    """With a side head, a hand without a side in its header is mirrored when p(right) reaches the card's threshold,
    exactly as a stated right hand is, heatmap back on the image as sent; a stated side is never second-guessed."""
    predictor = boneage_predictor(male_logit=0.0)
    width = predictor.model.features.out_channels
    predictor.model.side_head = nn.Linear(width, 1)
    predictor.card = predictor.card.model_copy(update={"side_head": True, "side_threshold": 0.9})
    rng = np.random.default_rng(4)
    right = rng.random((48, 36), dtype=np.float32)
    right[:, 24:] = 1.0
    with torch.no_grad():
        predictor.model.side_head.weight.zero_()
        predictor.model.side_head.bias.fill_(5.0)  # p(right) = 0.993 for every image
    stated, unstated, stated_left = predictor.predict([right] * 3, patient_sex=["M"] * 3, laterality=["R", None, "L"])
    assert unstated.outputs["bone_age_months"] == pytest.approx(stated.outputs["bone_age_months"], abs=1e-4)
    np.testing.assert_allclose(unstated.heatmap, stated.heatmap, atol=1e-4)
    assert "looks like a right hand (p=0.99)" in unstated.outputs["hand_side"]
    assert stated_left.outputs["hand_side"] == "left hand (header)"
    assert stated_left.outputs["bone_age_months"] != pytest.approx(stated.outputs["bone_age_months"], abs=1e-3)
    with torch.no_grad():
        predictor.model.side_head.bias.fill_(1.0)  # p(right) = 0.73: below the threshold, read as sent
    unsure = predictor.predict([right], patient_sex=["M"])[0]
    assert unsure.outputs["bone_age_months"] == pytest.approx(stated_left.outputs["bone_age_months"], abs=1e-4)
    assert "read as a left hand" in unsure.outputs["hand_side"]


def test_boneage_age_is_scaled_and_clipped() -> None:
    predictor = boneage_predictor(male_logit=0.0)
    with torch.no_grad():
        predictor.model.age_head[-1].weight.zero_()
        predictor.model.age_head[-1].bias.fill_(1.5)  # 120 + 1.5 * 40 = 180 months
    image = np.full((30, 30), 0.5, np.float32)
    assert predictor.predict([image], with_heatmaps=False)[0].outputs["bone_age_months"] == pytest.approx(180.0)
    with torch.no_grad():
        predictor.model.age_head[-1].bias.fill_(10.0)  # 520 months: clipped
    assert predictor.predict([image], with_heatmaps=False)[0].outputs["bone_age_months"] == 240.0


def test_anatomy_outputs_top2_and_sex_outputs() -> None:
    classes = ["elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist", "other"]
    net = ClassifierNet("tiny_cnn", len(classes), pretrained=False)
    with torch.no_grad():
        net.head[-1].weight.zero_()
        net.head[-1].bias.copy_(torch.tensor([0, 0, 0, 3.0, 0, 0, 2.0, 0]))
    pred = Predictor(net, card_for("anatomy", Geometry(size=32), classes)).predict(
        [np.zeros((40, 20), np.float32)], with_heatmaps=False)[0]
    probs = torch.softmax(torch.tensor([0, 0, 0, 3.0, 0, 0, 2.0, 0]), 0)
    assert pred.outputs["anatomy"] == "hand" and pred.outputs["anatomy_top2"] == "wrist"
    assert pred.outputs["anatomy_probability"] == pytest.approx(probs[3].item(), rel=1e-5)
    assert pred.outputs["anatomy_top2_probability"] == pytest.approx(probs[6].item(), rel=1e-5)

    sex_net = ClassifierNet("tiny_cnn", 1, pretrained=False)
    with torch.no_grad():
        sex_net.head[-1].weight.zero_()
        sex_net.head[-1].bias.fill_(-2.0)
    sex = Predictor(sex_net, card_for("sex", Geometry(size=32), ["female", "male"], threshold=0.5)).predict(
        [np.zeros((20, 20), np.float32)], with_heatmaps=False)[0]
    assert sex.outputs == {"predicted_sex": "F",
                           "predicted_sex_probability": pytest.approx(1 - torch.sigmoid(torch.tensor(-2.0)).item())}


def test_study_abnormality_is_the_mean_of_images() -> None:
    preds = [ImagePrediction({"abnormality_probability": p}) for p in (0.2, 0.5, 0.8, 0.9)]
    study = study_abnormality(preds, threshold=0.6)
    assert study == {"abnormality_probability": pytest.approx(0.6), "abnormality_decision": "abnormal",
                     "abnormality_threshold": 0.6}
    assert study_abnormality(preds[:2], threshold=0.6)["abnormality_decision"] == "normal"
    with pytest.raises(ValueError):
        study_abnormality([], 0.5)


def test_predict_batches_many_images_in_order(abnormality_checkpoint: Path) -> None:
    predictor = load_predictor(abnormality_checkpoint, batch_size=3)
    rng = np.random.default_rng(3)
    images = [rng.random((int(rng.integers(20, 40)), int(rng.integers(20, 40))), dtype=np.float32) for _ in range(7)]
    batched = [p.outputs["abnormality_probability"] for p in predictor.predict(images, with_heatmaps=False)]
    single = [predictor.predict([img], with_heatmaps=False)[0].outputs["abnormality_probability"] for img in images]
    assert batched == pytest.approx(single, abs=1e-5)


# --------------------------------------------------------------------------- Grad-CAM geometry
class BrightnessFeatures(nn.Module):
    """Feature map = brightness at full resolution: Grad-CAM of a linear head on it must follow the image."""

    out_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / 3)
        self.cam_layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.conv(x))


def brightness_predictor(aspect: str) -> Predictor:
    net = ClassifierNet("tiny_cnn", 1, pretrained=False, dropout=0.0)
    net.features = BrightnessFeatures()
    net.head = nn.Sequential(nn.Flatten(), nn.Linear(1, 1))
    with torch.no_grad():
        net.head[1].weight.fill_(1.0)
        net.head[1].bias.zero_()
    return Predictor(net, card_for("abnormality", Geometry(size=32, aspect=aspect), ["normal", "abnormal"]))


@pytest.mark.parametrize("aspect", ["pad", "stretch"])
@pytest.mark.parametrize("shape", [(30, 90), (96, 40), (50, 50)])
def test_heatmap_lies_on_the_original_image(aspect: str, shape: tuple[int, int]) -> None:
    height, width = shape
    image = np.full(shape, 0.1, np.float32)
    image[: height // 3, : width // 3] = 1.0  # bright top-left block: the only evidence
    pred = brightness_predictor(aspect).predict([image])[0]
    heat = pred.heatmap
    assert heat is not None and heat.shape == shape and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() == pytest.approx(1.0)
    inside = heat[: height // 3 - 3, : width // 3 - 3].mean()
    outside = heat[height // 3 + 3:, width // 3 + 3:].mean()
    assert inside > 0.8 and outside < 0.1, (inside, outside)
    assert np.corrcoef(heat.ravel(), image.ravel())[0, 1] > 0.9


def test_to_original_crops_the_padding() -> None:
    square = np.zeros((32, 32), np.float32)
    square[8:24, :] = np.linspace(0, 1, 32, dtype=np.float32)[None, :]  # the 16x32 image region of a 2:1 image
    out = to_original(square, (40, 80), Geometry(size=32, aspect="pad"))
    assert out.shape == (40, 80)
    assert out[:, 0].max() < 0.05 and out[:, -1].min() > 0.9  # left-to-right ramp, no black bands from the pad
    assert np.all(np.diff(out[20]) >= -1e-6)


def test_render_overlay_shape_colour_and_scale_bar() -> None:
    image = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))
    heat = np.zeros((48, 64), np.float32)
    heat[:10, :10] = 1.0
    out = render_overlay(image, heat)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[0] == 48 and out.shape[2] == 3
    assert out.shape[1] > 64  # the scale bar is appended on the right
    cold = out[40, 40]
    assert cold[0] == cold[1] == cold[2] == round(image[40, 40] * 255)  # no evidence: radiograph unchanged
    hot = out[2, 2].astype(int)
    assert hot[0] > hot[2] + 40  # turbo's top is red
    bar = out[:, -2].astype(int)
    assert bar[0, 0] > bar[0, 2] and bar[-1, 2] > bar[-1, 0]  # red at the top, blue at the bottom
    assert render_overlay((image * 255).astype(np.uint8), heat).shape == out.shape


@pytest.mark.parametrize("architecture", ["tiny_cnn", "efficientnet_lite0"])
def test_single_pass_boneage_grad_cam_equals_the_librarys(architecture: str) -> None:
    """Grad-CAM of the age from the feature map inference already has equals pytorch-grad-cam's own GradCAM (a
    second forward and backward pass), for older- and younger-than-average predictions and either sex input."""
    from models.nets.cam import boneage_grad_cam, grad_cam
    from models.nets.networks import BoneAgeSexNet

    torch.manual_seed(0)
    model = BoneAgeSexNet(architecture, pretrained=False).eval()
    x = torch.randn(4, 3, 96, 96)
    male = torch.tensor([0.0, 1.0, 1.0, 0.0])
    with torch.no_grad():
        feature_map = model.features(x)
    direction = torch.tensor([1.0, -1.0, 1.0, -1.0])  # explained as older / younger than average
    fast = boneage_grad_cam(model, feature_map, male, direction, (96, 96))
    library = grad_cam(model, x, "boneage", male, direction)
    assert fast.shape == library.shape == (4, 96, 96)
    np.testing.assert_allclose(fast, library, atol=1e-4)


def test_fp16_storage_halves_the_file_and_keeps_the_outputs(tmp_path: Path) -> None:
    """``weights_storage: fp16`` (issue 30: two bone-age models within the weights budget) loads back to fp32."""
    torch.manual_seed(0)
    net = BoneAgeSexNet("tiny_cnn", pretrained=False)
    card = card_for("boneage", Geometry(size=32), ["female", "male"], target_scaling={"mean": 120.0, "std": 40.0})
    full = save_checkpoint(net, card, tmp_path / "full.pt")
    half = save_checkpoint(net, card.model_copy(update={"weights_storage": "fp16"}), tmp_path / "half.pt")
    stored = torch.load(half, weights_only=True)
    assert any(v.dtype == torch.float16 for v in stored.values())
    assert all(v.dtype != torch.float16 for k, v in stored.items() if "running" in k or v.dim() < 2)
    assert half.stat().st_size < 0.75 * full.stat().st_size
    image = np.random.default_rng(0).random((40, 40), dtype=np.float32)
    a = load_predictor(full).predict([image], with_heatmaps=False)[0].outputs
    b = load_predictor(half).predict([image], with_heatmaps=False)[0].outputs
    assert b["bone_age_months"] == pytest.approx(a["bone_age_months"], abs=0.05)
    assert next(load_predictor(half).model.parameters()).dtype == torch.float32


def test_fracture_test_time_flip_averages_the_image_and_its_mirror() -> None:
    """Issue 29's flip: probability and map are the means of the image's and its mirror's readings."""
    from models.nets.networks import FractureNet

    torch.manual_seed(0)
    card = card_for("abnormality", Geometry(size=64), ["normal", "fracture"], threshold=0.5, localisation_head=True)
    card.architecture = "efficientnet_lite0"
    plain = Predictor(FractureNet(pretrained=False), card)
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    mirror = np.ascontiguousarray(image[:, ::-1])
    a, b = (plain.predict([img], with_heatmaps=True)[0] for img in (image, mirror))
    plain.test_time_flip = True
    both = plain.predict([image], with_heatmaps=True)[0]
    expected = (a.outputs["abnormality_probability"] + b.outputs["abnormality_probability"]) / 2
    assert both.outputs["abnormality_probability"] == pytest.approx(expected, abs=1e-5)
    np.testing.assert_allclose(both.heatmap, (a.heatmap + b.heatmap[:, ::-1]) / 2, atol=1e-4)
