"""Bone age end to end on synthetic hands: train, predict through the daemon's Predictor, evaluate via the CLI.

The synthetic "hand" is a bright blob whose size grows with age (a square for boys, a disk for girls) on noise,
saved as PNGs in the RSNA layout (``labels.csv`` + ``images/<id>.png``) with varied aspect ratios so the pad
geometry is exercised. A tiny CNN learns it in seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import cli
from models.train.boneage import rsna_examples, train_boneage
from models.nets.checkpoint import read_card
from models.train.classify import ClassifierSource, train_classifier
from models.data.datasets import read_rsna_boneage, split_of
from models.inference.predictor import load_predictor
from models.data.preprocess import Geometry, load_image
from models.train.loop import TrainConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_image(age: float, male: bool, rng: np.random.Generator) -> np.ndarray:
    height, width = int(rng.integers(56, 72)), int(rng.integers(44, 64))
    yy, xx = np.mgrid[:height, :width]
    image = rng.normal(0.2, 0.05, (height, width))
    radius = 4 + age / 228 * 18
    cy, cx = height / 2 + rng.uniform(-3, 3), width / 2 + rng.uniform(-3, 3)
    if male:
        blob = (np.abs(yy - cy) < radius * 0.85) & (np.abs(xx - cx) < radius * 0.85)
    else:
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius * radius
    image[blob] = 0.8
    return image.clip(0, 1)


def build_rsna(root: Path, count: int, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = ["id,boneage,male"]
    for i in range(count):
        age, male = float(rng.uniform(6, 228)), bool(rng.integers(0, 2))
        case = str(2000 + i)
        Image.fromarray((hand_image(age, male, rng) * 255).astype(np.uint8)).save(root / "images" / f"{case}.png")
        rows.append(f"{case},{age:.1f},{'True' if male else 'False'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def rsna(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rsna(tmp_path_factory.mktemp("rsna"), count=170)


@pytest.fixture(scope="module")
def boneage_model(rsna: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ba") / "boneage.pt"
    cfg = TrainConfig(out=out, epochs=10, batch_size=32, lr=3e-3, patience=10, resume=False, progress=False)
    return train_boneage(rsna / "labels.csv", out, Geometry(size=48), cfg, "tiny_cnn")


def test_boneage_learns_far_better_than_the_mean(boneage_model: tuple[Path, dict], rsna: Path) -> None:
    path, best = boneage_model
    splits = rsna_examples(rsna / "labels.csv")
    train_mean = np.mean([e.target for e in splits["train"]])
    baseline = np.mean([abs(e.target - train_mean) for e in splits["val"]])
    assert best["mae_months"] < 0.5 * baseline, (best, baseline)
    card = read_card(path)
    assert card.task == "boneage" and card.trained and card.target_scaling["std"] > 0


def test_predictor_outputs_heatmaps_and_sex_source(boneage_model: tuple[Path, dict], rsna: Path) -> None:
    path, _ = boneage_model
    cases = [c for c in read_rsna_boneage(rsna / "labels.csv") if split_of(c.case_id) == "test"][:5]
    images = [load_image(c.path) for c in cases]
    predictor = load_predictor(path)
    sexes = ["M" if c.male else "F" for c in cases]
    sexes[0] = None  # one image without PatientSex
    preds = predictor.predict(images, patient_sex=sexes)
    for case, image, given, pred in zip(cases, images, sexes, preds):
        assert set(pred.outputs) == {"bone_age_months", "predicted_sex", "predicted_sex_probability", "sex_source",
                                     "sex_mismatch", "hand_side"}
        assert pred.outputs["sex_source"] == ("model" if given is None else "dicom")
        assert pred.outputs["predicted_sex"] in ("M", "F") and 0.5 <= pred.outputs["predicted_sex_probability"] <= 1
        assert pred.outputs["sex_mismatch"] in ("yes", "no")
        assert abs(pred.outputs["bone_age_months"] - case.boneage_months) < 60
        assert pred.heatmap is not None and pred.heatmap.shape == image.shape
        assert pred.heatmap.min() >= 0 and pred.heatmap.max() <= 1 and pred.heatmap.max() > 0
    # Without any PatientSex the model's own sex is used for every image.
    plain = predictor.predict(images, with_heatmaps=False)
    assert [p.outputs["sex_source"] for p in plain] == ["model"] * len(images)
    assert plain[0].outputs["bone_age_months"] == pytest.approx(preds[0].outputs["bone_age_months"], abs=1e-3)


def test_evaluate_boneage_writes_json_plots_and_headline(boneage_model: tuple[Path, dict], rsna: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = boneage_model
    assert cli.main(["evaluate", "boneage", "--weights", str(path), "--data", str(rsna), "--split", "test",
                     "--json", str(tmp_path / "ba.json"), "--plots", str(tmp_path / "plots"), "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads((tmp_path / "ba.json").read_text())
    rows = report["per_image"]
    expected_ids = {c.case_id for c in read_rsna_boneage(rsna / "labels.csv") if split_of(c.case_id) == "test"}
    assert {r["id"] for r in rows} == expected_ids
    mae = np.mean([abs(r["pred_months"] - r["true_months"]) for r in rows])
    assert report["metrics"]["mae_months"] == pytest.approx(mae)
    low, high = report["metrics"]["mae_months_ci95"]
    assert low <= mae <= high and report["mae_ci95"] == [low, high]
    assert last == f"boneage MAE {mae:.2f} months (95 % CI {low:.2f}-{high:.2f}, n={len(expected_ids)})"
    bands = report["metrics"]["by_age_band"]
    assert list(bands) == ["0-2y", "2-6y", "6-10y", "10-14y", "14-19y"]
    assert sum(b["n"] for b in bands.values()) == len(rows)
    assert "sex_accuracy" in report["metrics"] and report["timing"]["seconds_per_image"] > 0
    assert report["mae"] == report["metrics"]["mae_months"] and 0 <= report["sex_accuracy"] <= 1
    assert 0 <= report["metrics"]["sex_mismatch_rate"] <= 1
    for name in ("boneage_bland_altman.png", "boneage_scatter.png"):
        with Image.open(tmp_path / "plots" / name) as img:
            assert img.format == "PNG" and img.size[0] > 200

    # The whole folder by default, and --tta changes the predictions (it averages shifted views).
    assert cli.main(["evaluate", "boneage", "--weights", str(path), "--labels", str(rsna / "labels.csv"),
                     "--data", str(rsna), "--tta", "--json", str(tmp_path / "all.json"), "--no-progress"]) == 0
    everything = json.loads((tmp_path / "all.json").read_text())
    assert everything["metrics"]["n"] == 170 and everything["preprocessing"]["tta"] is True
    tta_pred = {r["id"]: r["pred_months"] for r in everything["per_image"]}
    assert any(abs(tta_pred[r["id"]] - r["pred_months"]) > 1e-3 for r in rows)
    assert re.fullmatch(r"boneage MAE [0-9.]+ months \(95 % CI [0-9.]+-[0-9.]+, n=170\)",
                        capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_boneage_reports_every_framing_variant(boneage_model: tuple[Path, dict], rsna: Path,
                                                        tmp_path: Path) -> None:
    from models.data.framing import VARIANTS

    path, _ = boneage_model
    assert cli.main(["evaluate", "boneage", "--weights", str(path), "--data", str(rsna), "--split", "test",
                     "--variants", "--json", str(tmp_path / "v.json"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "v.json").read_text())
    variants = report["metrics"]["variants"]
    assert list(variants) == list(VARIANTS)
    for figures in variants.values():
        assert figures["n"] == report["metrics"]["n"] and figures["mae_months"] >= 0 and "sex_accuracy" in figures
    assert "framing variants within" in report["headline"]
    # A right hand whose header says so is mirrored back: exactly the figures of the images as sent.
    assert variants["right_hand_stated"]["mae_months"] == pytest.approx(report["metrics"]["mae_months"], abs=1e-3)
    # Each variant's MAE minus the as-sent MAE, with its paired interval around it.
    base = report["metrics"]["mae_months"]
    for figures in variants.values():
        assert figures["mae_difference_months"] == pytest.approx(figures["mae_months"] - base, abs=1e-6)
        low, high = figures["mae_difference_ci95"]
        assert low <= figures["mae_difference_months"] + 1e-9 and figures["mae_difference_months"] <= high + 1e-9
    assert variants["right_hand_stated"]["mae_difference_ci95"] == pytest.approx([0.0, 0.0], abs=1e-3)


def test_sex_classifier_trains_and_evaluates(rsna: Path, boneage_model: tuple[Path, dict], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sex.pt"
    args = ClassifierSource(task="sex", data=rsna, images=None, arch="tiny_cnn")
    cfg = TrainConfig(out=out, epochs=2, batch_size=32, lr=3e-3, resume=False, progress=False)
    path, best = train_classifier(args, Geometry(size=48), cfg)
    card = read_card(path)
    assert card.task == "sex" and card.classes == ["female", "male"] and "auroc" in best
    # Sex can be evaluated from a sex model or from the bone-age model's sex head.
    for weights in (path, boneage_model[0]):
        assert cli.main(["evaluate", "sex", "--weights", str(weights), "--data", str(rsna), "--split", "all",
                         "--json", str(tmp_path / "sex.json"), "--plots", str(tmp_path), "--no-progress"]) == 0
        report = json.loads((tmp_path / "sex.json").read_text())
        rows = report["per_image"]
        accuracy = np.mean([(r["male_probability"] >= 0.5) == r["male"] for r in rows])
        assert report["metrics"]["sex_accuracy"] == pytest.approx(accuracy)
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith("sex AUROC ") and last.endswith("(n=170)")
        assert (tmp_path / "sex_roc.png").exists()


def test_a_stopped_run_resumes_where_it_stopped(rsna: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill training after its second epoch; the next run continues at epoch 3 instead of starting over."""
    import models.train.boneage as boneage

    out = tmp_path / "ba.pt"
    real_spec = boneage.boneage_spec

    def spec_counting_epochs(counter: dict, die_at: int | None = None):
        """The real task spec, with its per-epoch validation counted (and a power cut at epoch ``die_at``)."""

        def build(card, **options):
            spec = real_spec(card, **options)
            evaluate = spec.evaluate

            def counted(*args):
                counter["n"] += 1
                if counter["n"] == die_at:
                    raise KeyboardInterrupt("power cut")
                return evaluate(*args)

            spec.evaluate = counted
            return spec

        return build

    cfg = TrainConfig(out=out, epochs=3, batch_size=32, lr=3e-3, patience=10, resume=True, progress=False)
    monkeypatch.setattr(boneage, "boneage_spec", spec_counting_epochs({"n": 0}, die_at=3))
    with pytest.raises(KeyboardInterrupt):
        train_boneage(rsna / "labels.csv", out, Geometry(size=32), cfg, "tiny_cnn")
    evaluated = {"n": 0}
    monkeypatch.setattr(boneage, "boneage_spec", spec_counting_epochs(evaluated))
    import torch

    interrupted = torch.load(out.with_suffix(".state.pt"), weights_only=False)["history"]
    assert [h["epoch"] for h in interrupted] == [0, 1]

    train_boneage(rsna / "labels.csv", out, Geometry(size=32), cfg, "tiny_cnn")
    import json

    history = json.loads(out.with_suffix(".history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert evaluated["n"] == 1  # only epoch 3 was trained and validated in the resumed run
    assert history[:2] == interrupted


def test_init_weights_transfers_a_trained_model_to_another_geometry(boneage_model: tuple[Path, dict], rsna: Path,
                                                                     tmp_path: Path) -> None:
    """``--init-weights`` for bone age: a model trained at one input size starts another at a new size (its heads
    keep their age scaling), so its first epoch is already far better than a start from scratch."""
    source, _ = boneage_model
    source_card = read_card(source)
    results = {}
    for name, init in (("scratch", None), ("transferred", source)):
        out = tmp_path / f"{name}.pt"
        cfg = TrainConfig(out=out, epochs=1, batch_size=32, lr=1e-4, resume=False, progress=False, init_weights=init)
        _, best = train_boneage(rsna / "labels.csv", out, Geometry(size=56), cfg, "tiny_cnn")
        results[name] = best["mae_months"]
    card = read_card(tmp_path / "transferred.pt")
    assert card.target_scaling == source_card.target_scaling
    assert source.name in card.training_data and card.training["initialised_from"] == str(source)
    assert results["transferred"] < 0.7 * results["scratch"], results


def test_init_weights_refuses_a_checkpoint_of_another_task(rsna: Path, tmp_path: Path) -> None:
    from models.nets.checkpoint import ModelCard, save_checkpoint
    from models.nets.networks import ClassifierNet

    other = tmp_path / "sex.pt"
    save_checkpoint(ClassifierNet("tiny_cnn", 1), ModelCard(task="sex", name="s", version="1", architecture="tiny_cnn",
                                                             input_size=32, normalisation={"mean": [0.5] * 3, "std": [0.25] * 3},
                                                             trained=True), other)
    cfg = TrainConfig(out=tmp_path / "x.pt", epochs=1, batch_size=32, resume=False, progress=False, init_weights=other)
    with pytest.raises(ValueError, match="not a boneage one"):
        train_boneage(rsna / "labels.csv", tmp_path / "x.pt", Geometry(size=32), cfg, "tiny_cnn")


def test_fit_side_adds_a_right_hand_head_and_leaves_age_and_sex_alone(boneage_model: tuple[Path, dict], rsna: Path,
                                                                      tmp_path: Path) -> None:
    path, _ = boneage_model
    out = tmp_path / "sided.pt"
    assert cli.main(["fit-side", "--weights", str(path), "--data", str(rsna / "labels.csv"), "--out", str(out),
                     "--no-progress"]) == 0
    card = read_card(out)
    assert card.side_head and 0.5 <= card.side_threshold <= 1.01
    report = card.training["side_head"]
    assert report["validation"]["left_hands_mirrored"] == 0.0  # the threshold rule, on validation
    assert report["validation"]["n"] == 2 * 5 * sum(1 for c in read_rsna_boneage(rsna / "labels.csv")
                                                    if split_of(c.case_id) == "val")
    images = [load_image(c.path) for c in read_rsna_boneage(rsna / "labels.csv") if split_of(c.case_id) == "test"]
    before, after = load_predictor(path), load_predictor(out)
    sides = ["L"] * len(images)  # a stated side: the head is not consulted, the backbone and heads are the source's
    for a, b in zip(before.predict(images, laterality=sides), after.predict(images, laterality=sides)):
        assert a.outputs == b.outputs
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-5)


def test_training_on_reframed_copies_is_recorded_and_reframes(rsna: Path, tmp_path: Path) -> None:
    """``--reframe-probability`` draws training images from a copy cropped tightly on black or zoomed out."""
    from models.train.loop import build_reframed_cache, build_cache

    examples = rsna_examples(rsna / "labels.csv")["train"][:12]
    geometry = Geometry(size=48, crop_to_body=True)
    plain, reframed = build_cache(examples, geometry, progress=False), build_reframed_cache(examples, geometry,
                                                                                            progress=False)
    assert reframed.shape == plain.shape and reframed.dtype == torch.uint8
    assert (reframed.float() - plain.float()).abs().mean() > 5  # another framing, not the same squares
    assert torch.equal(reframed, build_reframed_cache(examples, geometry, progress=False))  # fixed per seed
    out = tmp_path / "reframed.pt"
    assert cli.main(["train", "boneage", "--data", str(rsna / "labels.csv"), "--out", str(out), "--arch", "tiny_cnn",
                     "--size", "48", "--epochs", "1", "--reframe-probability", "0.5", "--no-progress"]) == 0
    assert read_card(out).training["reframe_probability"] == 0.5


def test_training_with_mirrored_hands_is_recorded_and_mirrors(tmp_path: Path, rsna: Path) -> None:
    """``--hflip`` mirrors half the training batch (and nothing when off); the card says which way it was trained."""
    from models.train.boneage import SEX_LOSS_WEIGHT, boneage_spec

    out = tmp_path / "mirrored.pt"
    assert cli.main(["train", "boneage", "--data", str(rsna / "labels.csv"), "--out", str(out), "--arch", "tiny_cnn",
                     "--size", "48", "--epochs", "1", "--hflip", "--no-progress"]) == 0
    trained = read_card(out)
    assert trained.training["hflip"] is True
    assert trained.training["sex_loss_weight"] == SEX_LOSS_WEIGHT  # the default, resolved before the card is written
    # the augmentation mirrors: a left-right ramp comes back reversed in about half the images, never without --hflip
    ramp = torch.linspace(0, 1, 48).view(1, 1, 1, 48).expand(64, 1, 48, 48).contiguous()
    for hflip, expect_mirrored in ((True, True), (False, False)):
        augment = boneage_spec(trained, hflip=hflip).augment
        augment.generator = torch.Generator().manual_seed(0)
        geometric = augment.geometric(ramp)
        mirrored = (geometric[:, 0, 24, 30] < geometric[:, 0, 24, 18]).float().mean().item()
        assert (0.3 < mirrored < 0.7) if expect_mirrored else mirrored == 0.0


def test_sex_loss_weight_scales_the_sex_term_and_is_recorded(tmp_path: Path, rsna: Path) -> None:
    """``--sex-loss-weight``: the loss is the age's L1 plus this weight times the sex head's cross-entropy."""
    import torch.nn.functional as F

    from models.train.boneage import boneage_spec

    out = tmp_path / "sexweighted.pt"
    assert cli.main(["train", "boneage", "--data", str(rsna / "labels.csv"), "--out", str(out), "--arch", "tiny_cnn",
                     "--size", "48", "--epochs", "1", "--sex-loss-weight", "2.0", "--no-progress"]) == 0
    card = read_card(out)
    assert card.training["sex_loss_weight"] == 2.0
    age_out, sex_logit = torch.tensor([0.5, -0.2]), torch.tensor([1.5, -0.5])
    age, male = torch.tensor([100.0, 60.0]), torch.tensor([1.0, 1.0])

    def fixed_outputs(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return age_out, sex_logit

    mean, std = card.target_scaling["mean"], card.target_scaling["std"]
    age_term = F.l1_loss(age_out, (age - mean) / std)
    sex_term = F.binary_cross_entropy_with_logits(sex_logit, male)
    for weight in (0.0, 0.3, 2.0):
        loss = boneage_spec(card, sex_loss_weight=weight).loss(fixed_outputs, torch.zeros(2), age, male)
        assert float(loss) == pytest.approx(float(age_term + weight * sex_term), rel=1e-6)


def test_a_resumed_run_reaches_the_weights_of_an_uninterrupted_one(rsna: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 30's recipe options (EMA, site styles, smooth L1, wide augmentation, bf16 where the CPU has it): a run
    cut after its second epoch and resumed ends with exactly the weights (and EMA) of a run that never stopped."""
    import models.train.boneage as boneage

    options = dict(epochs=3, batch_size=32, lr=3e-3, patience=10, progress=False, ema_decay=0.9,
                   site_style_probability=0.5, smooth_l1_beta=0.1, augment="wide", weight_decay=0.01)
    whole = tmp_path / "whole" / "ba.pt"
    train_boneage(rsna / "labels.csv", whole, Geometry(size=32), TrainConfig(out=whole, resume=False, **options),
                  "tiny_cnn")

    cut = tmp_path / "cut" / "ba.pt"
    real_spec = boneage.boneage_spec
    calls = {"n": 0}

    def dying_spec(card, **kwargs):
        spec = real_spec(card, **kwargs)
        evaluate = spec.evaluate

        def counted(*args):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("power cut")
            return evaluate(*args)

        spec.evaluate = counted
        return spec

    monkeypatch.setattr(boneage, "boneage_spec", dying_spec)
    with pytest.raises(KeyboardInterrupt):
        train_boneage(rsna / "labels.csv", cut, Geometry(size=32), TrainConfig(out=cut, resume=True, **options),
                      "tiny_cnn")
    monkeypatch.setattr(boneage, "boneage_spec", real_spec)
    train_boneage(rsna / "labels.csv", cut, Geometry(size=32), TrainConfig(out=cut, resume=True, **options),
                  "tiny_cnn")

    a = torch.load(whole.with_suffix(".state.pt"), weights_only=False)
    b = torch.load(cut.with_suffix(".state.pt"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    card = read_card(cut)
    assert card.training["ema_decay"] == 0.9 and card.training["smooth_l1_beta"] == 0.1
    assert card.training["augment"] == "wide" and card.training["site_style_probability"] == 0.5


def test_precision_follows_the_hardware_unless_forced() -> None:
    from models.nets.precision import autocast_enabled, bf16_supported

    cpu = torch.device("cpu")
    assert autocast_enabled("auto", cpu) == bf16_supported(cpu)
    assert autocast_enabled("bf16", cpu) is True
    assert autocast_enabled("fp32", cpu) is False
    with pytest.raises(ValueError, match="precision"):
        autocast_enabled("fp16", cpu)


def test_bf16_inference_reads_like_fp32_and_keeps_its_heatmap(boneage_model: tuple[Path, dict], rsna: Path) -> None:
    """The card's precision can be overridden for evaluation; bf16 runs only where the CPU has it natively."""
    from models.nets.precision import bf16_supported

    path, _ = boneage_model
    images = [load_image(p) for p in sorted((rsna / "images").glob("*.png"))[:8]]
    fp32 = load_predictor(path, precision="fp32")
    bf16 = load_predictor(path, precision="bf16")
    assert fp32.bf16 is False and bf16.bf16 is bf16_supported(torch.device("cpu"))
    a = fp32.predict(images, patient_sex=["M"] * 8)
    b = bf16.predict(images, patient_sex=["M"] * 8)
    for x, y in zip(a, b):
        assert abs(x.outputs["bone_age_months"] - y.outputs["bone_age_months"]) < 3.0
        assert y.heatmap is not None and y.heatmap.shape == x.heatmap.shape and np.isfinite(y.heatmap).all()


def test_a_card_asking_for_bf16_says_so_where_the_cpu_cannot(boneage_model: tuple[Path, dict],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A host without native bf16 (AVX2 only) runs a bf16 card in fp32 and logs it once at load, so an operator
    comparing speeds across hosts knows which precision ran; a host with it logs nothing of the kind."""
    import logging

    import models.inference.predictor as predictor_module

    path, _ = boneage_model
    for native, expected in ((False, True), (True, False)):
        monkeypatch.setattr(predictor_module, "bf16_supported", lambda device, native=native: native)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=predictor_module.LOGGER.name):
            predictor = load_predictor(path, precision="bf16")
        assert predictor.bf16 is native
        assert any("runs in fp32: its card asks for bf16" in r.getMessage() for r in caplog.records) is expected
