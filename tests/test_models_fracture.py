"""The fracture model's data, training, inference and evaluation on a small synthetic FracAtlas-layout folder.

The folder is written the way FracAtlas publishes it (``dataset.csv`` with the data set's own columns,
``images/``, ``fractures.csv``); each "radiograph" is a bright bar (a bone) on a dark field, broken by a dark gap
inside the box on fractured images. A real-data test checks the reader against ``../shared/data/fracatlas`` and
is skipped where that folder is absent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.fracatlas import (
    box_mask, case_split, image_and_mask_squares, is_fracatlas, pointing_hit, read_fracatlas, split_cases,
)
from models.data.preprocess import Augment, Geometry

SHARED_FRACATLAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "fracatlas"
COLUMNS = "image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,lateral,oblique"


def write_fracatlas(folder: Path, count: int = 90, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows, boxes = [], []
    for i in range(count):
        image_id = f"IMG{i * 7:07d}.jpg"  # 32 id blocks of 20, so every split gets some
        pixels = np.full((120, 96), 20, dtype=np.uint8)
        pixels[10:110, 40:56] = 200
        fractured = i % 3 == 0
        if fractured:
            y = int(rng.integers(25, 85))
            pixels[y:y + 4, 40:56] = 30
            boxes.append((image_id, 36.0, y - 4.0, 24.0, 12.0))
        Image.fromarray(pixels).save(folder / "images" / image_id, quality=95)
        region = ("hand", "leg", "hip", "shoulder")[i % 4]
        flags = {name: int(name == region) for name in ("hand", "leg", "hip", "shoulder")}
        rows.append([image_id, flags["hand"], flags["leg"], flags["hip"], flags["shoulder"], 0, 0, 0, int(fractured),
                     int(fractured), 1, 0, 0])
    with open(folder / "dataset.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS.split(","))
        writer.writerows(rows)
    with open(folder / "fractures.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "x", "y", "width", "height"])
        writer.writerows(boxes)
    return folder


@pytest.fixture
def fracatlas(tmp_path: Path) -> Path:
    return write_fracatlas(tmp_path / "fracatlas")


def test_reader_keeps_labels_regions_and_boxes(fracatlas: Path) -> None:
    assert is_fracatlas(fracatlas) and not is_fracatlas(fracatlas / "images")
    cases = read_fracatlas(fracatlas)
    assert len(cases) == 90
    assert sum(c.fractured for c in cases) == 30
    assert all(len(c.boxes) == 1 for c in cases if c.fractured) and all(not c.boxes for c in cases if not c.fractured)
    assert {c.region for c in cases} == {"hand", "leg", "hip", "shoulder"}


def test_missing_image_is_named(fracatlas: Path) -> None:
    (fracatlas / "images" / "IMG0000035.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="IMG0000035.jpg"):
        read_fracatlas(fracatlas)


def test_split_keeps_id_blocks_together(fracatlas: Path) -> None:
    cases = read_fracatlas(fracatlas)
    by_block: dict[int, set[str]] = {}
    for case in cases:
        by_block.setdefault(int(case.image_id[3:10]) // 20, set()).add(case_split(case))
    assert all(len(splits) == 1 for splits in by_block.values())
    assert sum(len(v) for v in split_cases(cases).values()) == len(cases)


def test_mask_follows_the_image_through_padding() -> None:
    image = np.zeros((100, 50), dtype=np.float32)
    image[60:70, 10:20] = 1.0
    square, mask = image_and_mask_squares(image, ((10.0, 60.0, 10.0, 10.0),), Geometry(size=50, aspect="pad"))
    bright = (square[0, 0] > 0.5).nonzero()
    marked = (mask[0, 0] > 0.5).nonzero()
    assert torch.equal(bright.float().mean(0).round(), marked.float().mean(0).round())


def test_augment_moves_image_and_mask_together() -> None:
    mask = torch.zeros(4, 1, 64, 64)
    mask[:, :, 20:30, 35:45] = 1
    augment = Augment(degrees=15, hflip=True, generator=torch.Generator().manual_seed(3))
    both = augment.geometric(torch.cat([mask, mask], 1))
    assert torch.allclose(both[:, 0], both[:, 1])
    assert not torch.allclose(both[:, 0], mask[:, 0])


def test_pointing_strict_and_grown() -> None:
    heat = np.zeros((100, 200), dtype=np.float32)
    heat[50, 108] = 1.0
    boxes = ((100.0, 40.0, 5.0, 20.0),)  # x 100-105, y 40-60: the peak is 3 px to the right of it
    assert not pointing_hit(heat, boxes, 0.0)
    assert pointing_hit(heat, boxes, 0.03)  # grown by 3 % of 200 = 6 px
    assert box_mask((10, 10), ((2.0, 3.0, 2.0, 2.0),)).sum() == 4


def test_train_predict_and_evaluate_on_fracatlas_layout(fracatlas: Path, tmp_path: Path) -> None:
    """Two tiny steps only: this checks the plumbing (checkpoint, card, map heatmap, report), not learning."""
    from models.cli import main
    from models.inference.predictor import load_predictor
    from models.data.preprocess import load_image

    out = tmp_path / "run" / "fracture.pt"
    assert main(["train", "abnormality", "--data", str(fracatlas), "--out", str(out), "--size", "64",
                 "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "2", "--no-progress"]) == 0
    card = json.loads(out.with_suffix(".card.json").read_text())
    assert card["trained"] and card["localisation_head"] and card["classes"] == ["no fracture", "fracture"]
    assert card["score_rule"] in ("image", "image_and_map") and 0.0 <= card["threshold"] <= 1.0
    assert "blocks of 20 consecutive image ids" in card["training_data"] and "CC BY 4.0" in card["licence_note"]

    predictor = load_predictor(out)
    image = load_image(fracatlas / "images" / "IMG0000000.jpg")
    pred = predictor.predict([image])[0]
    assert pred.heatmap is not None and pred.heatmap.shape == image.shape
    assert 0.0 <= float(pred.heatmap.min()) and float(pred.heatmap.max()) <= pred.outputs["localisation_peak_probability"] + 1e-4
    assert 0.0 <= pred.outputs["abnormality_probability"] <= 1.0

    report_path = tmp_path / "eval" / "report.json"
    assert main(["evaluate", "abnormality", "--weights", str(out), "--data", str(fracatlas), "--split", "all",
                 "--json", str(report_path), "--no-progress"]) == 0
    report = json.loads(report_path.read_text())
    for key in ("auroc", "pointing_hit_rate", "pointing_hit_rate_strict", "sensitivity", "specificity", "kappa"):
        assert key in report

    assert report["metrics"]["pointing_n"] == 30
    low, high = report["auroc_ci95"]
    assert low <= report["auroc"] <= high and f"(95 % CI {low:.3f}-{high:.3f})" in report["headline"]
    assert report["metrics"]["pointing_hit_rate_ci95"][0] <= report["pointing_hit_rate"]
    assert set(report["metrics"]["by_region"]) == {"hand", "leg", "hip", "shoulder"}
    assert report["heatmap"] == "learnt localisation map"
    for name in ("fracture_roc.png", "fracture_calibration.png", "fracture_worst_misses.png"):
        assert (report_path.parent / name).stat().st_size > 1000

    # issue 29: without --split, the training folder gives its test split, any other folder every image
    assert card["training"]["training_folder"]["images"] == 90
    chosen_path = tmp_path / "eval-default" / "report.json"
    assert main(["evaluate", "abnormality", "--weights", str(out), "--data", str(fracatlas),
                 "--json", str(chosen_path), "--no-progress"]) == 0
    chosen = json.loads(chosen_path.read_text())
    assert chosen["split"] == "test" and "training folder" in chosen["split_reason"]
    assert len(chosen["per_image"]) == sum(case_split(c) == "test" for c in read_fracatlas(fracatlas))
    held_back = write_fracatlas(tmp_path / "held-back", count=45, seed=1)
    assert main(["evaluate", "abnormality", "--weights", str(out), "--data", str(held_back),
                 "--json", str(chosen_path), "--no-progress"]) == 0
    chosen = json.loads(chosen_path.read_text())
    assert chosen["split"] == "all" and len(chosen["per_image"]) == 45
    assert chosen["headline"].startswith("all split (not the model's training folder")

    # a run cut short goes on from its weights, with a fresh schedule; a larger input fine-tunes it (progressive
    # resizing); any other change of geometry is refused
    more = tmp_path / "more" / "fracture.pt"
    common = ["--data", str(fracatlas), "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "1",
              "--no-progress", "--init-weights", str(out)]
    assert main(["train", "abnormality", "--out", str(more), "--size", "64", *common]) == 0
    continued = json.loads(more.with_suffix(".card.json").read_text())
    assert continued["training"]["initialised_from"].startswith("fracture.pt (sha256 ")
    assert "fine-tuned" not in continued["training"]["initialised_from"]
    larger = tmp_path / "larger" / "fracture.pt"
    assert main(["train", "abnormality", "--out", str(larger), "--size", "96", *common]) == 0
    resized = json.loads(larger.with_suffix(".card.json").read_text())
    assert resized["input_size"] == 96
    assert resized["training"]["initialised_from"].endswith("trained at 64 px, fine-tuned at 96 px")
    assert load_predictor(larger).predict([image])[0].heatmap.shape == image.shape
    with pytest.raises(ValueError, match="only the size may differ"):
        main(["train", "abnormality", "--out", str(tmp_path / "other" / "f.pt"), "--size", "64", "--aspect",
              "stretch", *common])


@pytest.mark.skipif(not SHARED_FRACATLAS.is_dir(), reason="needs ../shared/data/fracatlas (the real FracAtlas)")
def test_real_fracatlas_reads_as_published() -> None:
    cases = read_fracatlas(SHARED_FRACATLAS)
    assert len(cases) == 3448 and sum(c.fractured for c in cases) == 614
    assert sum(len(c.boxes) for c in cases) == 790
    sizes = {name: len(items) for name, items in split_cases(cases).items()}
    assert sizes == {"train": 2824, "val": 307, "test": 317}


def test_a_resumed_fracture_run_reaches_the_weights_of_an_uninterrupted_one(fracatlas: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The fracture model trains in the shared loop: cut after its first epoch and resumed, with an EMA, it ends
    with exactly the weights of a run that never stopped (issue 29's ``--resume``: rerunning the command resumes)."""
    import models.train.abnormality as fracture
    from models.data.fracatlas import read_fracatlas
    from models.train.loop import TrainConfig

    cases = read_fracatlas(fracatlas)
    options = dict(epochs=2, batch_size=8, max_steps_per_epoch=2, lr=1e-3, progress=False, ema_decay=0.9)
    geometry = Geometry(size=32)
    whole = tmp_path / "whole" / "f.pt"
    fracture.train_fracture(cases, fracatlas, geometry, TrainConfig(out=whole, resume=False, **options))

    real = fracture.validation_metrics
    calls = {"n": 0}

    def dies_at_the_second_validation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("power cut")
        return real(*args, **kwargs)

    cut = tmp_path / "cut" / "f.pt"
    monkeypatch.setattr(fracture, "validation_metrics", dies_at_the_second_validation)
    with pytest.raises(KeyboardInterrupt):
        fracture.train_fracture(cases, fracatlas, geometry, TrainConfig(out=cut, resume=True, **options))
    monkeypatch.setattr(fracture, "validation_metrics", real)
    fracture.train_fracture(cases, fracatlas, geometry, TrainConfig(out=cut, resume=True, **options))

    a = torch.load(whole.with_suffix(".state.pt"), weights_only=False)
    b = torch.load(cut.with_suffix(".state.pt"), weights_only=False)
    assert a["epoch"] == b["epoch"] == 1 and [h["epoch"] for h in b["history"]] == [0, 1]
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert json.loads(cut.with_suffix(".card.json").read_text())["training"]["ema_decay"] == 0.9


def test_a_larger_validation_share_leaves_the_test_split_alone(fracatlas: Path) -> None:
    """--val-fraction (issue 29) takes validation blocks from train only: the held-out test split never moves."""
    cases = read_fracatlas(fracatlas)
    usual, wider = split_cases(cases), split_cases(cases, val_fraction=0.3)
    assert [c.image_id for c in wider["test"]] == [c.image_id for c in usual["test"]]
    assert {c.image_id for c in usual["val"]} <= {c.image_id for c in wider["val"]}
    assert len(wider["val"]) > len(usual["val"]) and len(wider["train"]) < len(usual["train"])


def test_frozen_blocks_zero_trains_the_whole_network() -> None:
    from models.nets.checkpoint import build_network
    from models.train.abnormality import fracture_card, freeze_early_layers

    card = fracture_card(Geometry(size=64, aspect="pad"), {"train": [], "val": [], "test": []}, Path("fracatlas"))
    model = build_network(card, pretrained=False)
    assert len(freeze_early_layers(model, 0)) == len(list(model.parameters()))
    model = build_network(card, pretrained=False)
    assert len(freeze_early_layers(model, 3)) < len(list(model.parameters()))


@pytest.mark.parametrize("architecture, fine_block", [("efficientnet_lite0", 10), ("efficientnet_lite1", 14)])
def test_the_fracture_map_sits_on_lite0_or_lite1(architecture: str, fine_block: int) -> None:
    """Issue 29's Lite1 idea: the same two-level map on a deeper backbone; the stride-16 level is found, not fixed."""
    import torch

    from models.nets.checkpoint import build_network
    from models.train.abnormality import fracture_card

    card = fracture_card(Geometry(size=64, aspect="pad"), {"train": [], "val": [], "test": []}, Path("fracatlas"),
                         architecture)
    model = build_network(card, pretrained=False).eval()
    assert card.architecture == architecture and model.features.fine_block == fine_block
    with torch.no_grad():
        logits, maps = model.forward_maps(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2,) and maps.shape == (2, 4, 4)  # stride 16


def test_a_backbone_without_two_levels_gets_no_fracture_map() -> None:
    from models.nets.networks import FractureNet

    with pytest.raises(ValueError, match="EfficientNet-Lite"):
        FractureNet("resnet18", pretrained=False)


def test_a_stride_8_map_trains_and_reads_at_twice_the_resolution(fracatlas: Path, tmp_path: Path) -> None:
    """Issue 29's finer map: ``--map-stride 8`` puts one more convolution on the stride-8 features; the card says
    so, the checkpoint loads as such, and the heatmap still covers the image."""
    import torch

    from models.cli import main
    from models.data.preprocess import load_image
    from models.inference.predictor import load_predictor

    out = tmp_path / "run" / "fracture.pt"
    assert main(["train", "abnormality", "--data", str(fracatlas), "--out", str(out), "--size", "64",
                 "--map-stride", "8", "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "2",
                 "--no-progress"]) == 0
    predictor = load_predictor(out)
    assert predictor.card.map_stride == 8 and predictor.model.refiner is not None
    with torch.no_grad():
        _, maps = predictor.model.forward_maps(torch.zeros(1, 3, 64, 64))
    assert maps.shape == (1, 8, 8)
    image = load_image(fracatlas / "images" / "IMG0000000.jpg")
    pred = predictor.predict([image])[0]
    assert pred.heatmap is not None and pred.heatmap.shape == image.shape


def test_a_stride_16_run_starts_a_stride_8_one_with_a_fresh_refiner(fracatlas: Path, tmp_path: Path) -> None:
    """Issue 29: ``--init-weights`` from a stride-16 run with ``--map-stride 8`` loads every weight the two share and
    starts only the refiner fresh (the finer map read in a few epochs, not a whole run); the card says so. The other
    way round would drop a trained refiner, and is refused."""
    import torch

    from models.cli import main
    from models.nets.networks import FractureNet
    from models.train.abnormality import _load_growing_the_map

    coarse, finer = FractureNet(pretrained=False), FractureNet(pretrained=False, map_stride=8)
    with torch.no_grad():
        for param in coarse.parameters():
            param.add_(1.0)
    assert _load_growing_the_map(finer, coarse)
    shared = coarse.state_dict()
    assert all(torch.equal(value, shared[key]) for key, value in finer.state_dict().items() if key in shared)
    with pytest.raises(RuntimeError, match="refiner"):
        _load_growing_the_map(FractureNet(pretrained=False), finer)

    base = tmp_path / "run" / "fracture.pt"
    common = ["--data", str(fracatlas), "--size", "64", "--epochs", "1", "--batch-size", "8",
              "--max-steps-per-epoch", "1", "--no-progress"]
    assert main(["train", "abnormality", "--out", str(base), *common]) == 0
    grown = tmp_path / "grown" / "fracture.pt"
    assert main(["train", "abnormality", "--out", str(grown), "--map-stride", "8", "--init-weights", str(base),
                 *common]) == 0
    card = json.loads(grown.with_suffix(".card.json").read_text())
    assert card["map_stride"] == 8
    assert card["training"]["initialised_from"].endswith("grown to stride 8 (a fresh refiner)")
