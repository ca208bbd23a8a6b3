"""``bonebridge sort``: cluster a site's unlabeled radiographs so a person can name them, then train anatomy.

A new site's archive has no anatomy labels, and tags such as BodyPartExamined are often missing or wrong. The
workflow: embed every image with a pretrained backbone (EfficientNet-Lite0's ImageNet features, pooled, by
default; or the features of a trained BoneBridge checkpoint), group the embeddings with k-means, write one contact
sheet per cluster, and a ``clusters.yaml`` where each cluster has ``name: null``. A person looks at the sheets and
writes an anatomy class (``hand``, ``wrist``...) or ``discard`` into each name; ``bonebridge train anatomy
--clusters clusters.yaml`` then trains on the named clusters. Naming eight clusters takes minutes, labelling
thousands of images does not.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

from models.data.datasets import IMAGE_SUFFIXES
from models.data.preprocess import Geometry, load_image, to_model_input

LOGGER = logging.getLogger(__name__)

SHEET_CELLS = 36  # 6 x 6 thumbnails per contact sheet
THUMB = 128
YAML_HEADER = """\
# Written by `bonebridge sort`. Look at each cluster_XX.png and set `name` to one of
#   elbow, finger, forearm, hand, humerus, shoulder, wrist,
#   chest, pelvis, hip, femur, knee, leg, ankle, foot, spine, skull, abdomen, other
# or to `discard` for images that must not be used (or leave it null to skip the cluster).
# Then: bonebridge train anatomy --clusters THIS_FILE --out anatomy.pt
# Image paths are relative to `root` (a relative root is relative to this file's folder).
"""


@dataclass
class Cluster:
    index: int
    paths: list[Path]          # nearest to the centroid first
    sheet: Path


def find_images(folder: Path) -> list[Path]:
    """Every PNG/JPEG/DICOM file under ``folder``, sorted (DICOM files without a suffix are not picked up)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pooled_root(folders: list[Path]) -> Path:
    """The folder the clusters file lists image paths against: the deepest folder holding every input folder."""
    resolved = [Path(f).resolve() for f in folders]
    return Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0]


def cached_embeddings(cache: Path, paths: list[Path], what: str, compute) -> np.ndarray:
    """Embeddings from ``cache`` when it holds exactly these images embedded the same way, else computed and saved.

    Re-running ``sort`` with another k (the usual loop while naming) then costs seconds instead of an embedding
    pass over thousands of radiographs.
    """
    keys = np.array([str(p.resolve()) for p in paths])
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["what"]) == what and np.array_equal(stored["paths"], keys):
                LOGGER.info("reusing embeddings from %s", cache)
                return stored["vectors"]
    vectors = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, paths=keys, vectors=vectors, what=np.array(what))
    return vectors


def cluster_agreement(labels: np.ndarray, paths: list[Path], regions: dict[Path, str]) -> dict:
    """NMI between clusters and known regions, over the images that have a single region (and with ``mixed``)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    known = [(int(c), regions[p.resolve()]) for c, p in zip(labels, paths) if p.resolve() in regions]
    single = [(c, r) for c, r in known if r != "mixed"]
    report: dict = {"labelled_images": len(known), "single_region_images": len(single)}
    if single:
        clusters, truth = zip(*single)
        report["nmi"] = round(float(normalized_mutual_info_score(truth, clusters)), 4)
        report["adjusted_rand"] = round(float(adjusted_rand_score(truth, clusters)), 4)
    if known:
        clusters, truth = zip(*known)
        report["nmi_with_mixed"] = round(float(normalized_mutual_info_score(truth, clusters)), 4)
    return report


def embedding_network(weights: Path | None, arch: str = "efficientnet_lite0",
                      size: int = 128) -> tuple[nn.Module, Geometry, str]:
    """(backbone returning a feature map, its input geometry, a description for the YAML)."""
    if weights is not None:
        from models.nets.checkpoint import load_checkpoint

        model, card = load_checkpoint(weights)
        features, geometry = model.features, card.geometry
        what = f"{card.name} {card.version} ({card.architecture}, sha256 {card.sha256[:12]})"
    else:
        from models.nets.networks import build_backbone

        features, geometry = build_backbone(arch, pretrained=True), Geometry(size=size, aspect="pad")
        what = f"{arch} ImageNet features" if arch != "tiny_cnn" else "tiny_cnn random features (tests only)"
    return features.eval(), geometry, what


@torch.no_grad()
def pooled_features(features: nn.Module, paths: list[Path], geometry: Geometry, batch_size: int = 32,
                    progress: bool = True) -> np.ndarray:
    """The backbone's global-average-pooled features, one row per image, exactly what a linear head sees."""
    features.eval()
    rows = []
    for start in tqdm(range(0, len(paths), batch_size), desc="features", disable=not progress, leave=False):
        x = to_model_input([load_image(p) for p in paths[start:start + batch_size]], geometry)
        rows.append(features(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3)).float().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 1), dtype=np.float32)


def embed(paths: list[Path], features: nn.Module, geometry: Geometry, batch_size: int = 32,
          progress: bool = True) -> np.ndarray:
    """L2-normalised pooled features (normalised so k-means compares directions, not norms)."""
    vectors = pooled_features(features, paths, geometry, batch_size, progress)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-8)


def kmeans(vectors: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(label per row, distance of each row to its centroid); ``k`` is capped at the number of images."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(vectors)))
    model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(vectors)
    distances = np.linalg.norm(vectors - model.cluster_centers_[model.labels_], axis=1)
    return model.labels_, distances


def spread_indices(count: int, cells: int) -> list[int]:
    """Which members a sheet shows: all when they fit, else evenly spaced from the nearest to the farthest.

    The nearest images alone make every cluster look pure; its outskirts are where a mixed cluster shows, and a
    person naming it must see them.
    """
    if count <= cells:
        return list(range(count))
    return sorted({round(i * (count - 1) / (cells - 1)) for i in range(cells)})


def contact_sheet(paths: list[Path], title: str, out: Path, cells: int = SHEET_CELLS, thumb: int = THUMB) -> Path:
    """A grid of up to ``cells`` thumbnails (aspect kept, on black) with a title bar, as a PNG.

    Members are listed nearest to the centroid first; the sheet samples them from nearest to farthest
    (:func:`spread_indices`) and numbers each cell with the image's position in that list.
    """
    picked = spread_indices(len(paths), cells)
    shown = [paths[i] for i in picked]
    columns = max(1, min(int(math.ceil(math.sqrt(cells))), len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    bar = 24
    sheet = Image.new("L", (columns * thumb, rows * thumb + bar), 0)
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), title, fill=255)
    for i, path in enumerate(shown):
        try:
            array = load_image(path)
        except Exception as exc:  # an unreadable file must not stop the sheet; show it as a grey cell
            LOGGER.warning("%s: cannot read for the contact sheet: %s", path, exc)
            array = np.full((thumb, thumb), 0.25, dtype=np.float32)
        img = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
        scale = (thumb - 4) / max(img.width, img.height)  # small images are enlarged too, so cells read alike
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
        x = (i % columns) * thumb + (thumb - img.width) // 2
        y = bar + (i // columns) * thumb + (thumb - img.height) // 2
        sheet.paste(img, (x, y))
        # The cell number is the image's position in the cluster's list in clusters.yaml.
        draw.text(((i % columns) * thumb + 4, bar + (i // columns) * thumb + 2), str(picked[i] + 1), fill=255)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def sort_images(images: Path | list[Path], out: Path, k: int = 8, weights: Path | None = None,
                arch: str = "efficientnet_lite0", size: int = 128, progress: bool = True, seed: int = 0,
                region_labels: list[Path] | None = None) -> tuple[list[Cluster], dict]:
    """Embed, cluster, and write ``out/cluster_XX.png`` and ``out/clusters.yaml``.

    ``images`` may be several folders (a site pools its archives); the YAML lists paths relative to their common
    parent. With ``region_labels`` (see :mod:`models.data.region_labels`) the clusters' agreement with the known
    regions is measured and returned, and written into the YAML; the labels never steer the clustering.
    Returns (clusters, agreement report or {}).
    """
    import yaml

    folders = [Path(f) for f in (images if isinstance(images, list) else [images])]
    paths = [p for folder in folders for p in find_images(folder)]
    if not paths:
        raise ValueError(f"{', '.join(map(str, folders))}: no PNG/JPEG/DICOM images found")
    net, geometry, what = embedding_network(weights, arch, size)
    what = f"{what}, {geometry.size} px {geometry.aspect}"
    vectors = cached_embeddings(out / "embeddings.npz", paths, what,
                                lambda: embed(paths, net, geometry, progress=progress))
    labels, distances = kmeans(vectors, k, seed)
    agreement: dict = {}
    if region_labels:
        from models.data.region_labels import read_all_region_labels

        agreement = cluster_agreement(labels, paths, read_all_region_labels(region_labels))
    # Largest cluster first, so cluster_00 is the one most worth naming.
    order = sorted(set(labels.tolist()), key=lambda c: (-int((labels == c).sum()), c))
    out.mkdir(parents=True, exist_ok=True)
    root = pooled_root(folders)
    clusters: list[Cluster] = []
    entries = []
    for index, label in enumerate(order):
        members = np.flatnonzero(labels == label)
        members = members[np.argsort(distances[members], kind="stable")]
        member_paths = [paths[i] for i in members]
        sheet = contact_sheet(member_paths, f"cluster {index:02d}: {len(members)} images", out / f"cluster_{index:02d}.png")
        clusters.append(Cluster(index, member_paths, sheet))
        entries.append({
            "cluster": index,
            "name": None,
            "count": len(member_paths),
            "contact_sheet": sheet.name,
            "images": [p.resolve().relative_to(root).as_posix() for p in member_paths],
        })
    document = {"root": str(root), "embedding": what, "k": len(order)}
    if agreement:
        document["agreement_with_known_regions"] = agreement
    document["clusters"] = entries
    text = YAML_HEADER + yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    (out / "clusters.yaml").write_text(text)
    return clusters, agreement


def read_named_clusters(path: Path, include_discarded: bool = False) -> list[tuple[str, Path, str]]:
    """(listed path, image path, class name) for every image in a cluster a person named.

    Clusters named null or ``discard`` are skipped, unless ``include_discarded`` (then they come with the name
    ``discard``: evaluation measures the model on them too, since a PACS sends such images as well). The listed
    path is relative to the root, so the split does not depend on where the folder is mounted.
    """
    import yaml

    path = Path(path)
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict) or not isinstance(document.get("clusters"), list):
        raise ValueError(f"{path}: not a clusters file written by `bonebridge sort` (no `clusters:` list)")
    root = Path(document.get("root") or ".")
    if not root.is_absolute():
        root = path.parent / root
    out: list[tuple[str, Path, str]] = []
    for entry in document["clusters"]:
        name = entry.get("name")
        if name is None or str(name).strip().lower() in {"", "discard", "null", "none"}:
            if not include_discarded:
                continue
            name = "discard"
        for rel in entry.get("images") or []:
            image = Path(rel) if Path(rel).is_absolute() else root / rel
            out.append((str(rel), image, str(name).strip()))
    if not any(name != "discard" for _, _, name in out):
        raise ValueError(f"{path}: no cluster has a name yet; write an anatomy class or `discard` into each `name`")
    return out
