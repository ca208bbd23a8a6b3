"""Issue 25's training pipeline end to end on synthetic shapes: extra sources split by patient, contrast copies,
one cached feature pass, calibration and the OOD sidecar in the card, loaded by the predictor; then ``evaluate
anatomy`` with its decision table. Tiny network, no shared data (the real run's figures: models/weights/README.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from daemon import cli
from models.train.anatomy_world import contrast_copy, folder_images, patient_key, training_style, views_of
from models.nets.checkpoint import card_path, read_card
from tests.test_models_classify import shape_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_patient_keys_keep_both_knees_and_a_childs_films_together() -> None:
    assert patient_key("x/9001695L.jpg", "knee") == patient_key("x/9001695R.jpg", "knee") == "knee/9001695"
    assert patient_key("x/person12_virus_33.jpeg", "chest") == patient_key("x/person12_bacteria_1.jpeg", "chest")
    assert patient_key("x/IM-0131-0001.jpg", "chest") == "chest/im-0131"
    assert patient_key("x/odd.png", "s") == "s/odd"


def test_contrast_copies_keep_the_image_in_range_and_change_its_look() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(0.4, 0.1, (64, 64)), 0, 1).astype(np.float32)
    for style in ("clahe", "equalised", "gamma"):
        out = contrast_copy(image, style, np.random.default_rng(1))
        assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1 and not np.allclose(out, image)
    assert views_of(type("I", (), {"path": Path("a.png")})(), True) == ["original", "clahe", "equalised", "gamma"]
    assert training_style(Path("a.png")) == training_style(Path("/elsewhere/a.png"))
    with pytest.raises(ValueError, match="unknown contrast style"):
        contrast_copy(image, "sepia", rng)


def _world(tmp_path: Path) -> tuple[Path, Path, dict[str, list[str]], np.random.Generator]:
    """Three shape classes on one "site", a knee set of rings from another, and a discarded cluster."""
    rng = np.random.default_rng(3)
    root = tmp_path / "data"
    (root / "site").mkdir(parents=True)
    (root / "knees" / "images").mkdir(parents=True)
    clusters = {"hand": [], "wrist": [], "discard": []}
    kinds = {"hand": "hand", "wrist": "wrist", "discard": "elbow"}  # shape_image: disk, bar, upright bar
    for i in range(150):
        name = ("hand", "wrist", "discard")[i % 3]
        file = f"IMG{i * 40:07d}.png"  # a block of its own per image: the id-block split spreads them
        Image.fromarray((shape_image(kinds[name], rng, 40) * 255).astype(np.uint8)).save(root / "site" / file)
        clusters[name].append(f"site/{file}")
    for i in range(60):
        Image.fromarray((shape_image("ring", rng, 40) * 255).astype(np.uint8)).save(
            root / "knees" / "images" / f"{9000000 + i}{'LR'[i % 2]}.png")
    document = {"root": str(root), "clusters": [{"cluster": k, "name": name, "images": images}
                                                for k, (name, images) in enumerate(clusters.items())]}
    named = tmp_path / "clusters.yaml"
    named.write_text(yaml.safe_dump(document))
    assert {img.split for img in folder_images(root / "knees" / "images", "knee", "knee")} >= {"train"}
    return root, named, clusters, rng


def test_world_probe_trains_calibrates_and_evaluates(tmp_path: Path) -> None:
    root, named, clusters, rng = _world(tmp_path)
    weights = tmp_path / "anatomy.pt"
    assert cli.main(["train", "anatomy", "--clusters", str(named), "--extra", f"{root / 'knees' / 'images'}=knee",
                     "--arch", "tiny_cnn", "--size", "32", "--out", str(weights), "--no-progress",
                     "--features-cache", str(tmp_path / "features.npz")]) == 0
    card = read_card(weights)
    assert card.classes == ["hand", "wrist", "knee"]  # vocabulary order
    calibration = card.calibration
    assert calibration["temperature"] > 0 and calibration["ood"]["file"] == "anatomy.ood.npz"
    assert (tmp_path / "anatomy.ood.npz").exists() and "95%" in calibration["ood"]["rule"]
    assert 0.9 <= card.metrics["validation"]["ood_accepted"] <= 1.0

    from models.inference.predictor import load_predictor
    from models.data.preprocess import load_image

    predictor = load_predictor(weights)
    probabilities, ood = predictor.anatomy_scores([load_image(root / clusters["hand"][0])])
    assert probabilities.shape == (1, 3) and abs(float(probabilities.sum()) - 1) < 1e-5
    assert ood is not None and ood.shape == (1,) and np.isfinite(ood).all()

    examples = tmp_path / "examples"
    examples.mkdir()
    Image.fromarray((shape_image("disk", rng, 40) * 255).astype(np.uint8)).save(examples / "HAND.png")
    report_path = tmp_path / "report.json"
    assert cli.main(["evaluate", "anatomy", "--weights", str(weights), "--data", str(named),
                     "--extra", f"{root / 'knees' / 'images'}=knee", "--examples", str(examples),
                     "--features-cache", str(tmp_path / "eval-features.npz"), "--json", str(report_path),
                     "--no-progress"]) == 0
    report = json.loads(report_path.read_text())["model"]
    assert set(report["decisions"]) >= {"site", "mura"}
    for row in report["decisions"]["site"].values():
        assert 0 <= row["right"] <= 1 and 0 <= row["forbidden_model"] <= 1
    assert "ece_calibrated_original" in report["calibration"] and "all other sets" in report["ood"]["auroc"]


def test_world_finetune_trains_the_whole_network_then_calibrates_on_its_own_features(tmp_path: Path) -> None:
    """``train anatomy --clusters --extra --finetune``: the loop trains every layer, then temperature and OOD sidecar
    are fitted on the fine-tuned backbone's features, with the 99 % acceptance rule (issue 25)."""
    root, named, clusters, rng = _world(tmp_path)
    weights = tmp_path / "anatomy.pt"
    assert cli.main(["train", "anatomy", "--clusters", str(named), "--extra", f"{root / 'knees' / 'images'}=knee",
                     "--finetune", "--arch", "tiny_cnn", "--size", "32", "--epochs", "8", "--batch-size", "16",
                     "--lr", "3e-3", "--patience", "8", "--site-style-probability", "0.5", "--out", str(weights), "--no-progress"]) == 0
    card = read_card(weights)
    assert card.trained and card.classes == ["hand", "wrist", "knee"]
    assert "fine-tuned whole" in card.training["method"] and card.training["epochs_planned"] == 8
    calibration = card.calibration
    assert calibration["temperature"] > 0 and "99%" in calibration["ood"]["rule"]
    assert (tmp_path / "anatomy.ood.npz").exists() and (tmp_path / "anatomy.features.npz").exists()
    chosen = card.metrics["training_validation"]  # the epoch was chosen on the mean of the sources' top-1
    assert set(chosen["top1_by_source"]) == {"site", "knees"}
    assert chosen["top1_source_mean"] == pytest.approx(sum(chosen["top1_by_source"].values()) / 2)
    validation = card.metrics["validation"]
    assert validation["top1_original"] > 0.6  # three shapes: chance is a third
    assert validation["ood_accepted"] >= 0.95

    from models.data.preprocess import load_image
    from models.inference.predictor import load_predictor

    probabilities, ood = load_predictor(weights).anatomy_scores([load_image(root / clusters["wrist"][0])])
    assert probabilities.shape == (1, 3) and ood is not None and np.isfinite(ood).all()


def test_compare_with_a_model_on_another_backbone_reads_it_on_its_own_features(tmp_path: Path) -> None:
    """`evaluate anatomy --compare-with`: a probe on frozen features and a fine-tuned network do not share features;
    each head is read on its own backbone's, so the comparison says what evaluating each alone says."""
    root, named, clusters, rng = _world(tmp_path)
    knees = f"{root / 'knees' / 'images'}=knee"
    probe, tuned = tmp_path / "probe" / "anatomy.pt", tmp_path / "tuned" / "anatomy.pt"
    assert cli.main(["train", "anatomy", "--clusters", str(named), "--extra", knees, "--arch", "tiny_cnn", "--size",
                     "32", "--out", str(probe), "--no-progress"]) == 0
    assert cli.main(["train", "anatomy", "--clusters", str(named), "--extra", knees, "--finetune", "--arch",
                     "tiny_cnn", "--size", "32", "--epochs", "2", "--batch-size", "16", "--out", str(tuned),
                     "--no-progress"]) == 0

    def evaluate(weights: Path, *compare: Path, flag: str = "--compare-with") -> dict:
        report = tmp_path / f"{weights.parent.name}-{len(compare)}{flag}.json"
        args = ["evaluate", "anatomy", "--weights", str(weights), "--data", str(named), "--extra", knees,
                "--features-cache", str(report.with_suffix(".npz")), "--json", str(report), "--no-progress"]
        for other in compare:
            args += [flag, str(other)]
        assert cli.main(args) == 0
        return json.loads(report.read_text())

    both = evaluate(tuned, probe)
    alone = evaluate(probe)["model"]
    compared = both["compare anatomy.pt"]
    assert (tmp_path / "tuned-1--compare-with-anatomy.npz").exists()  # the probe's own feature pass
    assert compared["top1"] == alone["top1"] and compared["decisions"] == alone["decisions"]

    # `--ensemble`: the cascade's decision table, the probe first; the fine-tuned network answers exactly the test
    # images the probe's OOD threshold does not accept
    cascade = evaluate(probe, tuned, flag="--ensemble")["cascade"]
    assert cascade["members"][0]["top1"] == alone["top1"]
    for source in ("site", "knees"):
        accepted = alone["ood"]["accepted"][f"{source} (original)"]
        assert cascade["fallback_share"][source] == pytest.approx(1 - accepted)
        for row in cascade["decisions"][source].values():
            assert 0 <= row["right"] <= 1 and row["right"] + row["unknown"] <= 1 + 1e-9
    # a first member that accepts nothing: every image goes to the fallback, whose untagged decisions are then the
    # fine-tuned network's own
    strict = tmp_path / "strict" / "anatomy.pt"
    strict.parent.mkdir()
    for name in ("anatomy.pt", "anatomy.ood.npz"):
        shutil.copyfile(probe.parent / name, strict.parent / name)
    card = json.loads(card_path(probe).read_text())
    card["calibration"]["ood"]["threshold"] = -1.0
    card_path(strict).write_text(json.dumps(card))
    everything = evaluate(strict, tuned, flag="--ensemble")["cascade"]
    tuned_alone = evaluate(tuned)["model"]
    for source in ("site", "knees"):
        assert everything["fallback_share"][source] == 1.0
        assert everything["decisions"][source]["none"] == tuned_alone["decisions"][source]["none"]
