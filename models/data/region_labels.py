"""Known body regions of images in public layouts, to measure how well unlabeled sorting recovers them.

``bonebridge sort --labels FILE`` reads one or more of these and reports the normalised mutual information (NMI)
between its clusters and the regions; the labels never influence the clustering. Understood layouts:

- FracAtlas ``dataset.csv`` (``image_id,hand,leg,hip,shoulder,mixed,...``): the region flag that is set, or
  ``mixed`` when the image shows several regions; images are ``images/<image_id>`` beside the CSV.
- RSNA bone age ``labels.csv`` (``id,boneage,male``): every image is a ``hand``.
- Any ``path,label`` CSV, paths relative to the CSV's folder.

Returned keys are resolved absolute paths, so they match however the sorted folders were named.
"""

from __future__ import annotations

import csv
from pathlib import Path

FRACATLAS_FLAGS = ("hand", "leg", "hip", "shoulder")


def layout_of(csv_path: str | Path) -> str:
    """``fracatlas``, ``rsna`` or ``generic``, from the CSV's columns (raises on anything else)."""
    with open(csv_path, newline="") as handle:
        fields = {f.strip().lower() for f in csv.DictReader(handle).fieldnames or []}
    if {"image_id", "mixed", *FRACATLAS_FLAGS} <= fields:
        return "fracatlas"
    if {"id", "boneage", "male"} <= fields:
        return "rsna"
    if {"path", "label"} <= fields:
        return "generic"
    raise ValueError(f"{csv_path}: not a FracAtlas dataset.csv, an RSNA labels.csv, or a path,label CSV")


def read_region_labels(csv_path: str | Path) -> dict[Path, str]:
    """Resolved image path -> region for one labels file, of any layout above (raises on an unknown one)."""
    csv_path = Path(csv_path)
    layout = layout_of(csv_path)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    folder = csv_path.parent
    images = folder / "images" if (folder / "images").is_dir() else folder
    out: dict[Path, str] = {}
    if layout == "fracatlas":
        for row in rows:
            flags = [flag for flag in FRACATLAS_FLAGS if str(row[flag]).strip() == "1"]
            region = "mixed" if str(row["mixed"]).strip() == "1" or len(flags) != 1 else flags[0]
            out[(images / row["image_id"].strip()).resolve()] = region
        return out
    if layout == "rsna":
        for row in rows:
            stem = row["id"].strip()
            for suffix in (".png", ".jpg", ".jpeg", ".dcm"):
                candidate = images / f"{stem}{suffix}"
                if candidate.exists():
                    out[candidate.resolve()] = "hand"
                    break
        return out
    for row in rows:
        out[(folder / row["path"].strip()).resolve()] = row["label"].strip()
    return out


def read_all_region_labels(paths: list[Path]) -> dict[Path, str]:
    labels: dict[Path, str] = {}
    for path in paths:
        labels.update(read_region_labels(path))
    return labels
