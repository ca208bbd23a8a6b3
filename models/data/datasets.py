"""Readers for the public data-set layouts, and deterministic splits.

- RSNA Pediatric Bone Age: ``labels.csv`` with ``id,boneage,male`` and an image folder (``images/<id>.png``,
  or ``<id>.png`` beside the CSV).
- MURA-v1.1: ``MURA-v1.1/{train,valid}_image_paths.csv`` and ``*_labeled_studies.csv``, study folders named
  ``.../XR_WRIST/patient00001/study1_positive/``.
- One folder per class (anatomy): ``ROOT/<class>/*.png|*.dcm``.

Splits are cut by hashing each case's id, so the same case lands in the same split on every machine and every run,
and a patient's images never straddle train and validation when the id is the patient. :func:`split_key` names the
unit a listed image is split by (its block of consecutive FracAtlas ids, its RSNA case id), so the anatomy, fracture
and bone-age splits agree on every image they share.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}


def split_of(key: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """'train', 'val' or 'test' for a case id, stable across runs and machines."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


@dataclass(frozen=True)
class BoneAgeCase:
    case_id: str
    path: Path
    boneage_months: float
    male: bool


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"true", "1", "m", "male", "yes"}:
        return True
    if value in {"false", "0", "f", "female", "no"}:
        return False
    raise ValueError(f"not a sex/boolean value: {text!r}")


def read_rsna_boneage(labels_csv: str | Path, images: str | Path | None = None) -> list[BoneAgeCase]:
    """Cases of an RSNA-layout folder. Raises FileNotFoundError naming the first missing image."""
    labels_csv = Path(labels_csv)
    folder = Path(images) if images else labels_csv.parent / "images"
    if not folder.exists():
        folder = labels_csv.parent
    cases: list[BoneAgeCase] = []
    with open(labels_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = {name.lower(): name for name in reader.fieldnames or []}
        missing = {"id", "boneage", "male"} - set(fields)
        if missing:
            raise ValueError(f"{labels_csv}: missing columns {sorted(missing)}; expected id,boneage,male")
        for row in reader:
            case_id = row[fields["id"]].strip()
            path = _find_image(folder, case_id)
            cases.append(BoneAgeCase(case_id, path, float(row[fields["boneage"]]), _parse_bool(row[fields["male"]])))
    return cases


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in (".png", ".jpg", ".jpeg", ".dcm"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no image for case {stem} in {folder}")


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int
    group: str  # MURA: body region (XR_WRIST...); folders: class name
    study: str  # the unit a study-level metric averages over


MURA_REGIONS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")


def read_mura(root: str | Path, split: str) -> list[LabelledImage]:
    """Images of MURA-v1.1's ``train`` or ``valid`` split, labelled 1 = abnormal, from the image-paths CSV.

    ``root`` is the folder that contains ``MURA-v1.1`` or that folder itself. Labels come from the folder name
    (``study1_positive``), cross-checked with ``<split>_labeled_studies.csv`` when present.
    """
    root = Path(root)
    base = root / "MURA-v1.1" if (root / "MURA-v1.1").exists() else root
    paths_csv = base / f"{split}_image_paths.csv"
    if not paths_csv.exists():
        raise FileNotFoundError(f"{paths_csv} not found: expected the MURA-v1.1 layout")
    studies: dict[str, int] = {}
    studies_csv = base / f"{split}_labeled_studies.csv"
    if studies_csv.exists():
        with open(studies_csv, newline="") as handle:
            for row in csv.reader(handle):
                if len(row) >= 2:
                    studies[row[0].rstrip("/")] = int(row[1])
    items: list[LabelledImage] = []
    with open(paths_csv, newline="") as handle:
        for row in csv.reader(handle):
            if not row:
                continue
            rel = row[0].strip()
            parts = Path(rel).parts
            # MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/image1.png
            study_rel = str(Path(*parts[:-1]))
            region = next((p for p in parts if p.startswith("XR_")), "XR_UNKNOWN")
            label = studies.get(study_rel, 1 if parts[-2].endswith("positive") else 0)
            path = base.parent / rel if not (base / rel).exists() else base / rel
            items.append(LabelledImage(path, label, region, study_rel))
    return items


def read_class_folders(root: str | Path, classes: list[str] | None = None) -> tuple[list[LabelledImage], list[str]]:
    """Images from ``root/<class>/``; the classes are the sorted folder names unless given."""
    root = Path(root)
    names = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [
        LabelledImage(path, index, name, str(path))
        for index, name in enumerate(names)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return items, list(names)


def stack_images(images: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.float32) for img in images])


#: Consecutive image numbers grouped into one split unit (a patient's images are usually within a few numbers).
BLOCK = 20
_RUNNING_NUMBER = re.compile(r"^(?P<prefix>[A-Za-z_\-]+)(?P<number>\d+)$")


def split_key(listed_path: str) -> str:
    """The unit an image is split by: its id block, its case id, or (for any other name) its path."""
    path = Path(listed_path)
    stem = path.stem
    if stem.isdigit():
        return stem  # an RSNA-style case id: the same key the bone-age split uses
    match = _RUNNING_NUMBER.match(stem)
    if match:
        return f"{path.parent.as_posix()}/{match['prefix']}#{int(match['number']) // BLOCK}"
    return path.as_posix()
