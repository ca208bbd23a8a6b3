"""The FracAtlas layout (Abedeen et al., Sci Data 2023): images, image labels, regions and fracture boxes.

``DIR/dataset.csv`` holds one row per image with the data set's own columns
(``image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,...``), ``DIR/images/<image_id>`` the
radiographs and, optionally, ``DIR/fractures.csv`` one row per radiologist's fracture box
(``image_id,x,y,width,height`` in pixels of the image). Nothing is renamed or copied: the folder is read as
published.

The split is the anatomy model's: blocks of 20 consecutive image ids (a patient's images sit within a few
numbers) hashed into train / val / test, keyed as ``fracatlas/images/IMG#<block>``, so a test image of one
BoneBridge model is a test image of every other.
"""

from __future__ import annotations

import hashlib

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.data.datasets import split_key
from models.data.datasets import split_of
from models.data.preprocess import Geometry, body_box, crop_box, resize_to_square, to_unit_square

REGIONS = ("hand", "leg", "hip", "shoulder")
Box = tuple[float, float, float, float]  # x, y, width, height in image pixels


@dataclass(frozen=True)
class FractureCase:
    image_id: str
    path: Path
    fractured: bool
    region: str  # one of REGIONS, or "mixed" when several region flags are set
    boxes: tuple[Box, ...]


def folder_fingerprint(cases: list[FractureCase]) -> dict[str, object]:
    """Which images a FracAtlas folder holds: their number and the sha256 of their sorted ids.

    Training writes it into the card, so that evaluation can tell the folder a model was trained on (whose
    train and validation images it has seen: only its held-out test split is fair) from any other folder.
    """
    ids = "\n".join(sorted(case.image_id for case in cases))
    return {"images": len(cases), "ids_sha256": hashlib.sha256(ids.encode()).hexdigest()}


def is_fracatlas(folder: str | Path) -> bool:
    """True for a folder in the FracAtlas layout (its ``dataset.csv`` has ``image_id`` and ``fractured``)."""
    csv_path = Path(folder) / "dataset.csv"
    if not csv_path.is_file():
        return False
    with open(csv_path, newline="") as handle:
        header = next(csv.reader(handle), [])
    return {"image_id", "fractured"} <= {name.strip() for name in header}


def read_fracatlas(folder: str | Path) -> list[FractureCase]:
    """Every image of a FracAtlas-layout folder with its label, region and boxes (raises on a missing image)."""
    folder = Path(folder)
    boxes: dict[str, list[Box]] = defaultdict(list)
    fractures_csv = folder / "fractures.csv"
    if fractures_csv.exists():
        with open(fractures_csv, newline="") as handle:
            for row in csv.DictReader(handle):
                boxes[row["image_id"].strip()].append(
                    (float(row["x"]), float(row["y"]), float(row["width"]), float(row["height"]))
                )
    cases: list[FractureCase] = []
    with open(folder / "dataset.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            image_id = row["image_id"].strip()
            path = folder / "images" / image_id
            if not path.exists():
                raise FileNotFoundError(f"{folder}: dataset.csv lists {image_id} but images/{image_id} is missing")
            flags = [name for name in REGIONS if row.get(name, "0").strip() == "1"]
            region = flags[0] if len(flags) == 1 else "mixed"
            cases.append(FractureCase(image_id, path, row["fractured"].strip() == "1", region,
                                      tuple(boxes.get(image_id, ()))))
    return cases


def case_split(case: FractureCase, val_fraction: float = 0.1) -> str:
    """'train', 'val' or 'test': the id block's hash, exactly as the anatomy model splits FracAtlas.

    ``val_fraction`` above 0.1 moves more id blocks from train into validation (issue 29: 46 fractured validation
    images cannot tell two runs apart); the test split is the same whatever it is.
    """
    return split_of(split_key(f"fracatlas/images/{case.image_id}"), val_fraction=val_fraction)


def split_cases(cases: list[FractureCase], val_fraction: float = 0.1) -> dict[str, list[FractureCase]]:
    splits: dict[str, list[FractureCase]] = {"train": [], "val": [], "test": []}
    for case in cases:
        splits[case_split(case, val_fraction)].append(case)
    return splits


def box_mask(shape: tuple[int, int], boxes: tuple[Box, ...]) -> np.ndarray:
    """HxW float32, 1 inside any of the boxes."""
    mask = np.zeros(shape, dtype=np.float32)
    height, width = shape
    for x, y, w, h in boxes:
        left, top = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
        right, bottom = min(width, int(np.ceil(x + w))), min(height, int(np.ceil(y + h)))
        mask[top:bottom, left:right] = 1.0
    return mask


def image_and_mask_squares(image: np.ndarray, boxes: tuple[Box, ...], geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """The image as the network sees it (1x1xSxS) and its box mask through exactly the same crop and resize.

    The image goes through :func:`models.data.preprocess.to_unit_square`, the inference path itself, so training can
    never see an image prepared differently from what the daemon sends the model.
    """
    mask = box_mask(image.shape[:2], boxes)
    if geometry.crop_to_body:
        mask = crop_box(mask, body_box(image))
    return to_unit_square(image, geometry), resize_to_square(mask, geometry.size, geometry.aspect)


def grown_box_mask(shape: tuple[int, int], boxes: tuple[Box, ...], grow_fraction: float) -> np.ndarray:
    """Boxes grown by ``grow_fraction`` of the image's long side on every side (the lenient pointing target)."""
    grow = grow_fraction * max(shape)
    return box_mask(shape, tuple((x - grow, y - grow, w + 2 * grow, h + 2 * grow) for x, y, w, h in boxes))


def pointing_hit(heatmap: np.ndarray, boxes: tuple[Box, ...], grow_fraction: float = 0.0) -> bool:
    """Does the heatmap's maximum lie inside a box (grown by ``grow_fraction`` of the long side)?"""
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(grown_box_mask(heatmap.shape, boxes, grow_fraction)[peak] > 0)
