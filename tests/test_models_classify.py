"""Abnormality and anatomy classifiers trained on synthetic, learnable images in the real data layouts.

Abnormality: noise radiographs where a bright straight line means "abnormal", in a miniature MURA-v1.1 tree
(``train_image_paths.csv``, ``train_labeled_studies.csv``, ``XR_*/patientNNNNN/studyN_positive/imageN.png``).
Anatomy: one shape per class in class folders. Both train with the tiny CNN at 32-40 px in seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import cli
from models.nets.checkpoint import read_card
from models.metrics.classification import binary_metrics, topk_accuracy, youden_threshold
from models.train.classify import (
    ANATOMY_CLASSES,
    anatomy_class_index,
    mura_examples,
    ClassifierSource,
    train_classifier,
)
from models.inference.predictor import load_predictor
from models.data.preprocess import Geometry, load_image
from models.train.loop import TrainConfig

REGIONS = ("XR_WRIST", "XR_HAND", "XR_ELBOW")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)


def noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.normal(0.35, 0.08, (height, width)).clip(0, 1)


def build_mura(root: Path, n_train: int, n_valid: int, seed: int = 0, only_abnormal: bool = False) -> Path:
    """A MURA-v1.1 tree with the real CSVs; one study per patient, every third study has two images."""
    rng = np.random.default_rng(seed)
    base = root / "MURA-v1.1"
    patient = 0
    for split, count in (("train", n_train), ("valid", n_valid)):
        paths, studies = [], []
        for i in range(count):
            patient += 1
            abnormal = 1 if only_abnormal else i % 2
            study = (f"MURA-v1.1/{split}/{REGIONS[i % 3]}/patient{patient:05d}/"
                     f"study1_{'positive' if abnormal else 'negative'}/")
            studies.append(f"{study},{abnormal}")
            for j in range(2 if i % 3 == 0 else 1):
                height, width = (int(v) for v in rng.integers(36, 60, 2))
                image = noise(rng, height, width)
                if abnormal:
                    row, col = int(rng.integers(height // 4, 3 * height // 4)), int(rng.integers(0, width // 3))
                    image[row:row + 2, col:col + width // 2] = 1.0
                save_png(root / study / f"image{j + 1}.png", image)
                paths.append(f"{study}image{j + 1}.png")
        (base / f"{split}_image_paths.csv").write_text("\n".join(paths) + "\n")
        (base / f"{split}_labeled_studies.csv").write_text("\n".join(studies) + "\n")
    return root


SHAPES = ("hand", "wrist", "elbow", "shoulder")


def shape_image(kind: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """One synthetic 'anatomy': a disk, a horizontal bar, a vertical bar or a ring, jittered, on noise."""
    image = rng.normal(0.2, 0.05, (size, size))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-5, 5), size / 2 + rng.uniform(-5, 5)
    r = size * rng.uniform(0.22, 0.3)
    if kind == "hand":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    elif kind == "wrist":
        mask = (np.abs(yy - cy) < r / 3) & (np.abs(xx - cx) < r * 1.4)
    elif kind == "elbow":
        mask = (np.abs(xx - cx) < r / 3) & (np.abs(yy - cy) < r * 1.4)
    else:
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        mask = (d < r * 1.2) & (d > r * 0.7)
    image[mask] = 0.85
    return image.clip(0, 1)


def build_class_folders(root: Path, per_class: int, seed: int = 0, classes=SHAPES) -> Path:
    rng = np.random.default_rng(seed)
    for kind in classes:
        for i in range(per_class):
            save_png(root / kind / f"{kind}_{i:03d}.png", shape_image(kind, rng))
    return root


@pytest.fixture(scope="module")
def mura(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mura(tmp_path_factory.mktemp("mura"), n_train=220, n_valid=60)


@pytest.fixture(scope="module")
def abnormality_model(mura: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("abn") / "abnormality.pt"
    args = ClassifierSource(task="abnormality", data=mura, arch="tiny_cnn")
    cfg = TrainConfig(out=out, epochs=6, batch_size=32, lr=3e-3, patience=3, resume=False, progress=False)
    return train_classifier(args, Geometry(size=40), cfg)


# --------------------------------------------------------------------------- abnormality
def test_abnormality_learns_the_synthetic_sign(abnormality_model: tuple[Path, dict], mura: Path) -> None:
    path, best = abnormality_model
    assert best["auroc"] > 0.9, best
    card = read_card(path)
    assert card.trained and card.task == "abnormality" and card.classes == ["normal", "abnormal"]
    # The card's threshold is the Youden threshold measured for the saved weights, not the 0.5 placeholder.
    assert card.threshold == pytest.approx(best["threshold"]) and 0.0 < card.threshold < 1.0
    assert card.metrics["auroc"] == pytest.approx(best["auroc"])
    # MURA valid is held out: the validation images are a patient-hashed part of MURA train.
    splits = mura_examples(mura)
    assert {str(e.path) for e in splits["val"]}.isdisjoint(str(e.path) for e in splits["test"])
    assert all("/valid/" in str(e.path) for e in splits["test"]) and all("/train/" in str(e.path) for e in splits["val"])
    assert "held out" in card.training_data


def test_evaluate_abnormality_on_mura_valid(abnormality_model: tuple[Path, dict], mura: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = abnormality_model
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "abnormality", "--weights", str(path), "--data", str(mura),
                     "--json", str(out / "abn.json"), "--plots", str(out), "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"abnormality study AUROC ([0-9.]+) kappa ([-0-9.]+) \(n=(\d+) studies, (\d+) images\)", last)
    assert match, last
    report = json.loads((out / "abn.json").read_text())
    metrics = report["metrics"]
    assert int(match.group(3)) == 60 and int(match.group(4)) == len(report["per_image"]) == 80
    assert float(match.group(1)) == pytest.approx(metrics["study"]["auroc"], abs=5e-4)
    assert metrics["study"]["auroc"] > 0.9 and metrics["threshold"] == pytest.approx(read_card(path).threshold)
    low, high = metrics["study"]["auroc_ci95"]
    assert low <= metrics["study"]["auroc"] <= high and high - low < 0.5
    assert set(metrics["image_by_region"]) == set(REGIONS) == set(metrics["study_by_region"])
    assert sum(r["n"] for r in metrics["study_by_region"].values()) == 60
    for block in (*metrics["image_by_region"].values(), *metrics["study_by_region"].values()):
        assert len(block["auroc_ci95"]) == 2  # every block of a report carries its interval
    # Study level is the mean of the study's images, recomputed here from the per-image list.
    rows = report["per_image"]
    two_image = next(r["study"] for r in rows if sum(q["study"] == r["study"] for q in rows) == 2)
    mean = np.mean([r["probability"] for r in rows if r["study"] == two_image])
    assert 0 <= mean <= 1
    for key in ("sensitivity", "specificity", "kappa", "auroc"):
        assert key in metrics["image"]
    assert report["timing"]["seconds_per_image"] > 0
    for name in ("abnormality_roc.png", "abnormality_calibration.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 100


def test_mini_mura_trains_one_step_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = build_mura(tmp_path / "mini", n_train=24, n_valid=6, seed=5)
    out = tmp_path / "one_step.pt"
    assert cli.main(["train", "abnormality", "--data", str(root), "--arch", "tiny_cnn", "--size", "32",
                     "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "1", "--out", str(out),
                     "--no-progress", "--no-resume"]) == 0
    card = read_card(out)
    assert card.trained and card.training["epochs_run"] == 1 and card.architecture == "tiny_cnn"
    splits = mura_examples(root)
    assert card.training["train_images"] == len(splits["train"]) and len(splits["test"]) == 8  # 6 studies, 2 doubles
    preds = load_predictor(out).predict([load_image(splits["test"][0].path)])
    assert 0 <= preds[0].outputs["abnormality_probability"] <= 1 and preds[0].heatmap is not None


def test_train_refuses_a_split_with_one_class(tmp_path: Path) -> None:
    root = build_mura(tmp_path / "mini", n_train=30, n_valid=2, only_abnormal=True)
    args = ClassifierSource(task="abnormality", data=root, arch="tiny_cnn")
    with pytest.raises(ValueError, match="only one class"):
        train_classifier(args, Geometry(size=32), TrainConfig(out=tmp_path / "x.pt", epochs=1, progress=False))


# --------------------------------------------------------------------------- anatomy
def test_anatomy_learns_shapes_from_class_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = build_class_folders(tmp_path / "anatomy", per_class=40)
    out = tmp_path / "anatomy.pt"
    args = ClassifierSource(task="anatomy", data=data, clusters=None, arch="tiny_cnn")
    cfg = TrainConfig(out=out, epochs=6, batch_size=32, lr=3e-3, patience=6, resume=False, progress=False)
    path, best = train_classifier(args, Geometry(size=32), cfg)
    assert best["top1_accuracy"] > 0.7, best  # chance is 0.25 among the four classes present
    card = read_card(path)
    assert card.classes == [c for c in ANATOMY_CLASSES if c in SHAPES] and card.task == "anatomy"

    assert cli.main(["evaluate", "anatomy", "--weights", str(path), "--data", str(data), "--split", "all",
                     "--json", str(tmp_path / "anat.json"), "--plots", str(tmp_path / "plots"), "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads((tmp_path / "anat.json").read_text())
    assert last == f"anatomy top-1 accuracy {report['metrics']['top1_accuracy']:.3f} (n=160)"
    assert report["metrics"]["top1_accuracy"] > 0.7
    low, high = report["metrics"]["top1_accuracy_ci95"]
    assert low <= report["metrics"]["top1_accuracy"] <= high
    assert report["metrics"]["top2_accuracy"] >= report["metrics"]["top1_accuracy"]
    matrix = np.array(report["metrics"]["confusion_matrix"]["rows_true_columns_predicted"])
    assert matrix.shape == (4, 4) and matrix.sum() == 160
    assert (tmp_path / "plots" / "anatomy_confusion.png").stat().st_size > 1000


def test_anatomy_folder_names_must_be_classes(tmp_path: Path) -> None:
    data = build_class_folders(tmp_path / "bad", per_class=2, classes=("hand", "torso"))
    args = ClassifierSource(task="anatomy", data=data, clusters=None, arch="tiny_cnn")
    with pytest.raises(ValueError, match="torso"):
        train_classifier(args, Geometry(size=32), TrainConfig(out=tmp_path / "a.pt", epochs=1, progress=False))


# --------------------------------------------------------------------------- helpers
def test_anatomy_classes_match_the_daemon() -> None:
    from daemon.dicom.anatomy_tags import ANATOMY_CLASSES as DAEMON_CLASSES

    assert tuple(DAEMON_CLASSES) == ANATOMY_CLASSES
    assert anatomy_class_index("XR_WRIST") == ANATOMY_CLASSES.index("wrist") == anatomy_class_index(" Wrist ")
    assert anatomy_class_index("knee", ["hand", "knee"]) == 1
    with pytest.raises(ValueError, match="not one of this model's classes"):
        anatomy_class_index("wrist", ["hand", "knee"])


def test_binary_metrics_and_youden() -> None:
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]
    threshold = youden_threshold(y, p)
    assert threshold == pytest.approx(0.7)  # 3/4 sensitivity, 4/4 specificity beats every other cut
    m = binary_metrics(y, p, threshold)
    assert m["sensitivity"] == 0.75 and m["specificity"] == 1.0 and m["auroc"] == pytest.approx(15 / 16)
    assert m["kappa"] == pytest.approx(0.75) and "auroc_ci95" not in m  # resampling is for reports only
    low, high = binary_metrics(y, p, threshold, with_interval=True)["auroc_ci95"]
    assert low <= m["auroc"] <= high <= 1.0 and low < high
    assert np.isnan(binary_metrics([1, 1], [0.2, 0.3], with_interval=True)["auroc_ci95"]).all()
    assert youden_threshold([1, 1], [0.2, 0.3]) == 0.5  # undefined with one class: the default
    scores = np.array([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
    assert topk_accuracy([2, 1], scores, 1) == 0.0 and topk_accuracy([2, 1], scores, 2) == 1.0
