"""Anatomy from named clusters: the examples, their patient-safe split, and a linear probe on frozen features.

A site's workflow (README, "Anatomy sorting"): ``bonebridge sort`` clusters unlabeled radiographs, a person names
each cluster from one vocabulary (:mod:`models.anatomy_vocabulary`), and ``bonebridge train anatomy --clusters``
trains the classifier the daemon routes on. The classes are the names the person used, in vocabulary order; they
are written into the model card, and ``config check`` validates routes against them.

**Split.** Consecutive image numbers often come from one patient (FracAtlas says so of its ids), so an image
whose file stem is letters followed by a running number (``IMG0000123``) is split with its block of
:data:`models.data.datasets.BLOCK` consecutive numbers; a purely numeric stem is a case id (the RSNA layout, one patient per id) and is
split by that id exactly as the bone-age model splits it, so a bone-age test hand is an anatomy test hand too.

**Linear probe.** Sorting body regions is what ImageNet features already separate well (the clusters show it), so
the default trainer keeps EfficientNet-Lite0's ImageNet backbone frozen and fits a multinomial logistic
regression on its pooled features, with the regularisation chosen on the validation split. The result is an
ordinary :class:`models.nets.networks.ClassifierNet` checkpoint (backbone + linear head), so inference, Grad-CAM and
the card work as for any classifier, and it trains in minutes on a CPU. ``--finetune`` uses the shared training
loop instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.anatomy_vocabulary import canonical_name, in_vocabulary_order
from models.nets.checkpoint import ModelCard, code_version, save_checkpoint
from models.data.datasets import split_key, split_of
from models.data.preprocess import Geometry
from models.train.loop import Example

LOGGER = logging.getLogger(__name__)

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass
class AnatomyExamples:
    splits: dict[str, list[Example]]
    classes: list[str]


def examples_from_clusters(clusters_yaml: Path) -> AnatomyExamples:
    """Images of the clusters a person named, labelled by index into the names used, split by :func:`split_key`."""
    from models.train.cluster import read_named_clusters

    entries = read_named_clusters(clusters_yaml)
    classes = in_vocabulary_order({name for _, _, name in entries})
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for key, path, name in entries:
        label = classes.index(canonical_name(name))
        splits[split_of(split_key(key))].append(Example(path, float(label), group=classes[label]))
    return AnatomyExamples(splits, classes)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              seed: int = 0, grid: tuple[float, ...] = C_GRID) -> tuple[np.ndarray, np.ndarray, dict]:
    """Multinomial logistic regression on standardised features, C picked by validation top-1 (ties: smaller C).

    Returns the head's weight and bias on the *raw* features (the standardisation folded in) and the choice.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    trials = []
    for c in grid:
        model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced", random_state=seed).fit(xt, y_train)
        trials.append((float((model.predict(xv) == y_val).mean()), -c, c, model))
    accuracy, _, best_c, best = max(trials, key=lambda t: (t[0], t[1]))
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    coef, intercept = best.coef_, best.intercept_
    if coef.shape[0] == 1:  # two classes: sklearn keeps one row (class 1); softmax([0, z]) is sigmoid(z)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = coef / scale
    bias = intercept - (coef * scaler.mean_ / scale).sum(axis=1)
    choice = {"C": best_c, "val_top1": accuracy, "grid": {str(t[2]): t[0] for t in trials}}
    return weight.astype(np.float32), bias.astype(np.float32), choice


def train_linear_probe(clusters_yaml: Path, out: Path, geometry: Geometry, card: ModelCard, seed: int = 0,
                       progress: bool = True) -> tuple[Path, dict]:
    """Fit the probe on the train split, choose C on validation, save a ClassifierNet checkpoint with its card."""
    from models.nets.checkpoint import build_network
    from models.metrics.classification import topk_accuracy
    from models.train.cluster import pooled_features

    data = examples_from_clusters(clusters_yaml)
    model = build_network(card, pretrained=True).to(memory_format=torch.channels_last).eval()
    arrays = {}
    for name in ("train", "val"):
        examples = data.splits[name]
        x = pooled_features(model.features, [e.path for e in examples], geometry, progress=progress)
        arrays[name] = (x, np.array([int(e.target) for e in examples]))
    weight, bias, choice = fit_probe(*arrays["train"], *arrays["val"], seed=seed)
    linear = model.head[-1]
    linear.weight.data = torch.from_numpy(weight)
    linear.bias.data = torch.from_numpy(bias)
    x_val, y_val = arrays["val"]
    scores = x_val @ weight.T + bias
    metrics = {"top1_accuracy": topk_accuracy(y_val, scores, 1), "top2_accuracy": topk_accuracy(y_val, scores, 2)}
    card = card.model_copy(update={
        "metrics": metrics,
        "metrics_split": f"validation split ({len(y_val)} images)",
        "training": {"method": "linear probe on frozen ImageNet features (multinomial logistic regression)",
                     "train_images": len(arrays["train"][1]), "seed": seed, **choice},
        "code_version": code_version(),
        "trained": True,
    })
    save_checkpoint(model, card, out)
    LOGGER.info("anatomy probe: C=%s, validation top-1 %.3f", choice["C"], metrics["top1_accuracy"])
    return out, metrics
