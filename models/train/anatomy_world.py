"""More of the world for the anatomy probe: extra sources, contrast copies, and one cached feature pass.

Issue 25. The probe of :mod:`models.train.anatomy` was fitted on FracAtlas and the RSNA hands only, so a knee from another
site (OAI crops, CLAHE-processed) or a chest radiograph (Kermany) got a confident wrong class. This module adds:

- **extra sources**: a folder of images that all show one vocabulary part (``knee-oai-224`` -> ``knee``,
  ``chest-kermany`` -> ``chest``), each image split by a hash of its *patient* key (:func:`patient_key`: the OAI
  patient number without the side, the Kermany ``personN`` / ``IM-NNNN`` prefix), so both knees of a patient and
  every chest film of a child fall in one split;
- **contrast copies** (:data:`CONTRAST_STYLES`): every image of every source is also seen through CLAHE, histogram
  equalisation or a strong gamma (:mod:`models.data.site_processing`), so the probe cannot learn "this look = this class"
  (the knee set is CLAHE-processed, the chest set is not FracAtlas's look);
- **one feature pass**: the frozen backbone's pooled features of every (image, view) are computed once and cached in
  an ``.npz`` (:func:`extract_features`), from which the probe, the temperature, the out-of-distribution model and the
  evaluation are all fitted or measured in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.data.datasets import IMAGE_SUFFIXES, split_of
from models.data.preprocess import Geometry, load_image, to_model_input

LOGGER = logging.getLogger(__name__)

#: Contrast styles a training copy is drawn from (a site's processing, not a different body part).
CONTRAST_STYLES: tuple[str, ...] = ("clahe", "equalised", "gamma")
_KNEE = re.compile(r"^(?P<patient>\d+)[LR]$", re.IGNORECASE)
_KERMANY = re.compile(r"^(?P<patient>person\d+|IM-\d+|NORMAL\d*-IM-\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class WorldImage:
    """One image of the anatomy world: where it is, its class (or None), its split and the set it belongs to."""

    path: Path
    label: str | None
    split: str
    source: str


def patient_key(path: str | Path, source: str) -> str:
    """The unit an extra source's image is split by: its patient, when the file name says it, else the name."""
    stem = Path(path).stem
    for pattern in (_KNEE, _KERMANY):
        match = pattern.match(stem)
        if match:
            return f"{source}/{match['patient'].lower()}"
    return f"{source}/{stem}"


def folder_images(folder: str | Path, label: str | None, source: str) -> list[WorldImage]:
    """Every image under ``folder`` (sorted), all of class ``label``, split by :func:`patient_key`."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [WorldImage(p, label, split_of(patient_key(p, source)), source) for p in paths]


def contrast_copy(image: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` (float in [0, 1]) as another site's processing would show it."""
    from models.data.site_processing import clahe, histogram_equalised

    if style == "clahe":
        return clahe(image, clip_limit=float(rng.uniform(0.005, 0.03)))
    if style == "equalised":
        return histogram_equalised(image)
    if style == "gamma":
        exponent = float(np.exp(rng.choice([-1, 1]) * rng.uniform(0.35, 0.8)))
        return (np.clip(image, 0, 1) ** exponent).astype(np.float32)
    if style == "original":
        return image
    raise ValueError(f"unknown contrast style {style!r}; choose from original, {', '.join(CONTRAST_STYLES)}")


def _stable_rng(path: Path, style: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{path.name}|{style}".encode()).hexdigest()
    return np.random.default_rng(int(digest[:12], 16))


def training_style(path: Path) -> str:
    """The one contrast style a training image's extra copy is drawn in (stable: a hash of its name)."""
    digest = int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16)
    return CONTRAST_STYLES[digest % len(CONTRAST_STYLES)]


def views_of(image: WorldImage, all_styles: bool) -> list[str]:
    """The views whose features are extracted: the original, and one (train) or every (else) contrast copy."""
    if all_styles:
        return ["original", *CONTRAST_STYLES]
    return ["original", training_style(image.path)]


@torch.no_grad()
def extract_features(features: torch.nn.Module, images: list[WorldImage], geometry: Geometry, cache: Path,
                     all_styles_for: tuple[str, ...] = ("val", "test"), batch_size: int = 32,
                     progress: bool = True) -> dict[str, np.ndarray]:
    """Pooled backbone features of every image in each of its views, cached in ``cache`` (an ``.npz``).

    Returned arrays, one row per (image, view): ``x`` (features), ``path``, ``view``, ``label`` ('' for none),
    ``split``, ``source``. A cache holding exactly these images and views is reused as it is.
    """
    from tqdm import tqdm

    rows = [(img, view) for img in images for view in views_of(img, img.split in all_styles_for)]
    keys = np.array([f"{img.path}|{view}" for img, view in rows])
    meta = {
        "key": keys,
        "path": np.array([str(img.path) for img, _ in rows]),
        "view": np.array([view for _, view in rows]),
        "label": np.array([img.label or "" for img, _ in rows]),
        "split": np.array([img.split for img, _ in rows]),
        "source": np.array([img.source for img, _ in rows]),
    }
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            where = {key: i for i, key in enumerate(stored["key"].tolist())}
            if all(key in where for key in keys.tolist()):
                LOGGER.info("reusing features from %s", cache)
                return {"x": stored["x"][[where[key] for key in keys.tolist()]], **meta}
    features.eval()
    out = []
    by_image: dict[Path, np.ndarray] = {}
    for start in tqdm(range(0, len(rows), batch_size), desc="features", disable=not progress):
        batch = []
        for img, view in rows[start:start + batch_size]:
            if img.path not in by_image:
                by_image.clear()
                by_image[img.path] = load_image(img.path)
            batch.append(contrast_copy(by_image[img.path], view, _stable_rng(img.path, view)))
        x = to_model_input(batch, geometry).contiguous(memory_format=torch.channels_last)
        out.append(features(x).mean(dim=(2, 3)).float().numpy())
    arrays = {"x": np.concatenate(out).astype(np.float32), **meta}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **arrays)
    return arrays


# --------------------------------------------------------------------------- fitting on the cached features

#: Share of the validation images (every view, every training source) the OOD threshold accepts: the rule,
#: fixed before any test image was read.
OOD_ACCEPT = 0.95
#: C values tried (on validation): 1.0.0's grid was flat from 0.01 to 1 (within one validation image), so the
#: larger, slower fits are left out.
WORLD_C_GRID = (0.01, 0.03, 0.1)


def world_images(clusters_yaml: Path, extras: list[tuple[Path, str]], include_discarded: bool = True) -> list[WorldImage]:
    """The named clusters' images (FracAtlas, RSNA: their id-block / case-id split), the extra sources' images, and
    (for OOD measurement only, never training) the validation and test images of the clusters a person discarded."""
    from models.data.datasets import split_key
    from models.anatomy_vocabulary import canonical_name
    from models.train.cluster import read_named_clusters

    images = []
    for listed, path, name in read_named_clusters(Path(clusters_yaml), include_discarded=include_discarded):
        first = Path(listed).parts[0] if len(Path(listed).parts) > 1 else "clusters"
        source = "rsna" if "rsna" in listed else "fracatlas" if "fracatlas" in listed else first
        split = split_of(split_key(listed))
        if name == "discard":
            if split == "train":
                continue
            images.append(WorldImage(path, None, split, source + "-discarded"))
        else:
            images.append(WorldImage(path, canonical_name(name), split, source))
    for folder, label in extras:
        images += folder_images(folder, label, Path(folder).parent.name if Path(folder).name == "images"
                                else Path(folder).name)
    return images


@dataclass
class WorldFit:
    weight: np.ndarray
    bias: np.ndarray
    choice: dict
    temperature: float
    ood: object
    threshold: float
    validation: dict


def fit_world_probe(arrays: dict[str, np.ndarray], classes: list[str], seed: int = 0,
                    accept: float = OOD_ACCEPT) -> WorldFit:
    """Probe (C on validation top-1), then :func:`calibrate_head`, from cached features.

    Training rows: the train split's labelled images in every view extracted (original + contrast copy).
    Validation rows: the validation split's labelled images in every view (original + each contrast style).
    """
    from models.train.anatomy import fit_probe

    y_all, train, val = _labelled_rows(arrays, classes)
    x = arrays["x"]
    weight, bias, choice = fit_probe(x[train], y_all[train], x[val], y_all[val], seed=seed, grid=WORLD_C_GRID)
    return calibrate_head(arrays, classes, weight, bias, accept, choice)


def _labelled_rows(arrays: dict[str, np.ndarray], classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class index or -1 per row, labelled training rows, labelled validation rows)."""
    index = {name: i for i, name in enumerate(classes)}
    labelled = np.array([label in index for label in arrays["label"]])
    y_all = np.array([index.get(label, -1) for label in arrays["label"]])
    return y_all, labelled & (arrays["split"] == "train"), labelled & (arrays["split"] == "val")


def calibrate_head(arrays: dict[str, np.ndarray], classes: list[str], weight: np.ndarray, bias: np.ndarray,
                   accept: float = OOD_ACCEPT, choice: dict | None = None) -> WorldFit:
    """A linear head's temperature (validation NLL) and the OOD model (training rows) with its threshold (the
    ``accept`` share of the validation rows), on the cached features of the backbone the head sits on."""
    from models.nets.anatomy_ood import (
        MahalanobisOOD, expected_calibration_error, fit_temperature, softmax, threshold_for_acceptance,
    )

    y_all, train, val = _labelled_rows(arrays, classes)
    x = arrays["x"]
    logits = x[val] @ weight.T + bias
    temperature = fit_temperature(logits, y_all[val])
    ood = MahalanobisOOD.fit(x[train], y_all[train])
    scores = ood.score(x[val])
    threshold = threshold_for_acceptance(scores, accept)
    original = arrays["view"][val] == "original"
    validation = {
        "images": int(original.sum()), "rows_all_views": int(val.sum()),
        "top1_all_views": float((logits.argmax(1) == y_all[val]).mean()),
        "top1_original": float((logits[original].argmax(1) == y_all[val][original]).mean()),
        "ece_before": expected_calibration_error(softmax(logits), y_all[val]),
        "ece_after": expected_calibration_error(softmax(logits, temperature), y_all[val]),
        "ood_accepted": float((scores <= threshold).mean()),
    }
    return WorldFit(weight, bias, choice or {}, temperature, ood, threshold, validation)


def write_calibrated(model: torch.nn.Module, card, fit: WorldFit, out: Path, accept: float = OOD_ACCEPT,
                     extra_metrics: dict | None = None) -> Path:
    """Save ``model`` with ``fit``'s temperature and OOD sidecar (``<out>.ood.npz``) recorded in its card."""
    from models.nets.checkpoint import code_version, save_checkpoint

    sidecar = Path(out).with_suffix(".ood.npz")
    sha = fit.ood.save(sidecar)
    card = card.model_copy(update={
        "metrics": {"validation": fit.validation, **(extra_metrics or {})},
        "metrics_split": f"validation split ({fit.validation['images']} images, each also in 3 contrast styles)",
        "calibration": {
            "temperature": fit.temperature,
            "temperature_fitted_on": "validation split, every view (NLL, scipy bounded search over log T)",
            "ood": {"method": "min squared Mahalanobis distance of the pooled features to the class means, shared "
                              "Ledoit-Wolf covariance fitted on the training rows",
                    "file": sidecar.name, "sha256": sha, "threshold": fit.threshold,
                    "rule": f"accept {accept:.0%} of the validation images of the training sources (every view); "
                            "chosen before any test image was read"},
        },
        "code_version": code_version(),
        "trained": True,
    })
    return save_checkpoint(model, card, out)


def train_world_probe(clusters_yaml: Path, extras: list[tuple[Path, str]], out: Path, geometry: Geometry, card,
                      cache: Path, seed: int = 0, progress: bool = True,
                      measure_only: list[WorldImage] | None = None) -> tuple[Path, dict]:
    """Issue 25's anatomy probe: more sources, contrast copies, calibrated, with its OOD sidecar beside the weights.

    ``measure_only`` images (unlabelled or test-only sets: the MURA examples...) are embedded in the same pass and
    cache, for ``evaluate anatomy`` to read later; they never train anything.
    """
    from models.anatomy_vocabulary import in_vocabulary_order
    from models.nets.checkpoint import build_network

    images = world_images(clusters_yaml, extras) + list(measure_only or [])
    classes = in_vocabulary_order({img.label for img in images if img.label and img.split == "train"})
    card = card.model_copy(update={"classes": classes})
    model = build_network(card, pretrained=True).to(memory_format=torch.channels_last).eval()
    arrays = extract_features(model.features, images, geometry, cache, progress=progress)
    fit = fit_world_probe(arrays, classes, seed=seed)
    linear = model.head[-1]
    linear.weight.data = torch.from_numpy(fit.weight)
    linear.bias.data = torch.from_numpy(fit.bias)
    sources = sorted({img.source for img in images if img.label})
    counts = {name: int(sum(1 for img in images if img.split == "train" and img.label == name)) for name in classes}
    card = card.model_copy(update={
        "training_sources": sources,
        "training_data": (f"{', '.join(sources)}: {sum(counts.values())} train images (each once as it is and once in "
                          f"one contrast style: {', '.join(CONTRAST_STYLES)}); train per class {counts}; split by "
                          "id block / case id (FracAtlas, RSNA) and patient (extra sources)"),
        "training": {"method": "linear probe on frozen ImageNet features (multinomial logistic regression), "
                               "contrast-augmented, temperature-scaled, Mahalanobis OOD",
                     "seed": seed, **fit.choice},
    })
    out = write_calibrated(model, card, fit, Path(out))
    LOGGER.info("anatomy world probe: C=%s, T=%.3f, OOD threshold %.1f, validation %s", fit.choice["C"],
                fit.temperature, fit.threshold, fit.validation)
    return out, fit.validation
