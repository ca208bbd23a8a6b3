"""The anatomy workflow's parts: the vocabulary, the patient-safe split, region labels and NMI, the linear probe.

Pure logic on small arrays and CSV files; the trained, shipped model is tested on real radiographs in
``test_anatomy_routing.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.data.datasets import BLOCK, split_key
from models.train.anatomy import fit_probe
from models.anatomy_vocabulary import FRACATLAS_REGION, VOCABULARY, canonical_name, in_vocabulary_order
from models.train.cluster import cluster_agreement, pooled_root
from models.data.datasets import split_of
from models.data.region_labels import layout_of, read_all_region_labels, read_region_labels


def test_vocabulary_is_the_issue_list_and_every_name_has_a_fracatlas_region_entry() -> None:
    assert VOCABULARY[:7] == ("elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist")
    assert set(VOCABULARY[7:]) == {"chest", "pelvis", "hip", "femur", "knee", "leg", "ankle", "foot", "spine",
                                   "skull", "abdomen", "other"}
    assert set(FRACATLAS_REGION) == set(VOCABULARY)
    assert canonical_name(" XR_Wrist ") == "wrist"
    with pytest.raises(ValueError, match="not an anatomy name"):
        canonical_name("torso")
    assert in_vocabulary_order({"knee", "hand", "Hand"}) == ["hand", "knee"]


def test_split_keeps_id_blocks_and_rsna_ids_together() -> None:
    # Running image numbers: neighbours within a block share a key (they may be one patient), the next block not.
    first = BLOCK * 7
    keys = {split_key(f"fracatlas/images/IMG{n:07d}.jpg") for n in range(first, first + BLOCK)}
    assert len(keys) == 1
    assert split_key(f"fracatlas/images/IMG{first + BLOCK:07d}.jpg") not in keys
    # A numeric stem is a case id: split exactly as the bone-age model splits that id.
    assert split_key("rsna-boneage-512/images/1377.jpg") == "1377"
    assert split_of(split_key("x/1377.png")) == split_of("1377")
    assert split_key("site/odd name.png") == "site/odd name.png"


def test_block_split_puts_no_block_in_two_splits() -> None:
    names = [f"images/IMG{n:07d}.jpg" for n in range(2000)]
    split_by_block: dict[str, set[str]] = {}
    for name in names:
        split_by_block.setdefault(split_key(name), set()).add(split_of(split_key(name)))
    assert all(len(s) == 1 for s in split_by_block.values())
    counts = {s: sum(split_of(split_key(n)) == s for n in names) for s in ("train", "val", "test")}
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0


def test_probe_folds_the_standardisation_into_the_head() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 16)) * 4
    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        return centres[y] * 10 + 50 + rng.normal(0, 1, (n, 16)), y  # raw features far from zero mean, unit scale

    x_train, y_train = sample(150)
    x_val, y_val = sample(60)
    weight, bias, choice = fit_probe(x_train, y_train, x_val, y_val)
    assert weight.shape == (3, 16) and bias.shape == (3,)
    predicted = np.argmax(x_val @ weight.T + bias, axis=1)  # raw features, as the network's linear head sees them
    assert (predicted == y_val).mean() == choice["val_top1"] > 0.95


def test_probe_with_two_classes_gives_a_two_row_head() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 30)
    x = rng.normal(0, 1, (60, 8)) + y[:, None] * 3
    weight, bias, choice = fit_probe(x, y, x, y)
    assert weight.shape == (2, 8) and (np.argmax(x @ weight.T + bias, axis=1) == y).mean() > 0.95


def write_fracatlas(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    rows = ["image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,lateral,oblique",
            "IMG1.jpg,1,0,0,0,0,0,0,0,0,1,0,0", "IMG2.jpg,0,1,0,0,0,0,0,1,1,1,0,0",
            "IMG3.jpg,0,1,1,0,1,0,0,0,0,1,0,0", "IMG4.jpg,0,0,0,1,0,0,0,0,0,1,0,0"]
    (folder / "dataset.csv").write_text("\n".join(rows) + "\n")
    for row in rows[1:]:
        (folder / "images" / row.split(",")[0]).write_bytes(b"")
    return folder / "dataset.csv"


def test_region_labels_of_each_layout(tmp_path: Path) -> None:
    fracatlas = write_fracatlas(tmp_path / "fracatlas")
    regions = read_region_labels(fracatlas)
    images = (tmp_path / "fracatlas" / "images").resolve()
    assert regions == {images / "IMG1.jpg": "hand", images / "IMG2.jpg": "leg", images / "IMG3.jpg": "mixed",
                       images / "IMG4.jpg": "shoulder"}
    rsna = tmp_path / "rsna"
    (rsna / "images").mkdir(parents=True)
    (rsna / "labels.csv").write_text("id,boneage,male\n1377,180,False\n1378,90,True\n")
    (rsna / "images" / "1377.jpg").write_bytes(b"")  # 1378 has no image: not listed
    assert read_region_labels(rsna / "labels.csv") == {(rsna / "images" / "1377.jpg").resolve(): "hand"}
    generic = tmp_path / "mine.csv"
    generic.write_text("path,label\na/b.png,knee\n")
    assert read_region_labels(generic) == {(tmp_path / "a" / "b.png").resolve(): "knee"}
    assert [layout_of(p) for p in (fracatlas, rsna / "labels.csv", generic)] == ["fracatlas", "rsna", "generic"]
    assert len(read_all_region_labels([fracatlas, rsna / "labels.csv"])) == 5
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a FracAtlas"):
        read_region_labels(tmp_path / "bad.csv")


def test_cluster_agreement_is_nmi_over_single_region_images(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(8)]
    regions = {p.resolve(): r for p, r in zip(paths, ["hand"] * 3 + ["leg"] * 3 + ["mixed", "hand"])}
    perfect = cluster_agreement(np.array([0, 0, 0, 1, 1, 1, 1, 0]), paths, regions)
    assert perfect["nmi"] == 1.0 and perfect["single_region_images"] == 7 and perfect["labelled_images"] == 8
    shuffled = cluster_agreement(np.array([0, 1, 0, 1, 0, 1, 0, 1]), paths, regions)
    assert shuffled["nmi"] < 0.2


def test_pooled_root_is_the_common_parent(tmp_path: Path) -> None:
    (tmp_path / "a" / "images").mkdir(parents=True)
    (tmp_path / "b" / "images").mkdir(parents=True)
    assert pooled_root([tmp_path / "a" / "images", tmp_path / "b" / "images"]) == tmp_path.resolve()
    assert pooled_root([tmp_path / "a" / "images"]) == (tmp_path / "a" / "images").resolve()
