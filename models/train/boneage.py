"""Bone age and sex from a hand radiograph: the task definition, and training on the RSNA layout.

One network (:class:`models.nets.networks.BoneAgeSexNet`) with two heads. Bone age is regressed in normalised months
(mean and std kept in the card) with an L1 loss, since the challenge was scored by mean absolute difference;
sex is a logistic head trained beside it. During training the age head gets the true sex, as PatientSex from
the DICOM header gives it at inference; when the header lacks it the sex head's prediction stands in.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from models.nets.checkpoint import ModelCard, read_card
from models.data.datasets import read_rsna_boneage, split_of
from models.data.preprocess import Augment, Geometry
from models.train.loop import Example, TaskSpec, TrainConfig, build_cache, build_reframed_cache, predict_cache, train

LOGGER = logging.getLogger(__name__)

RSNA_LICENCE = (
    "RSNA Pediatric Bone Age Challenge training images (Halabi et al., Radiology 2019;290:498-503), "
    "research use only, with attribution."
)
#: The sex head's share of the loss beside the age's L1 on standardised months (``train boneage --sex-loss-weight``).
SEX_LOSS_WEIGHT = 0.3

#: Training augmentation by name (``train boneage --augment``). "default" is what 2.1.0 was trained with; "wide" is
#: issue 30's recipe (rotation +-20 degrees, scale 0.8-1.2, shift +-10 %, gamma exp(+-0.25), contrast +-15 %,
#: brightness +-0.08), which gave 7.1-7.5 months on a GPU from ImageNet weights.
AUGMENTS: dict[str, dict] = {
    "default": dict(degrees=15, scale=(0.85, 1.15), translate=0.08, contrast=0.2),
    "wide": dict(degrees=20, scale=(0.8, 1.2), translate=0.1, gamma=0.25, contrast=0.15, brightness=0.08),
}


def boneage_card(geometry: Geometry, architecture: str, age_mean: float, age_std: float, data_note: str) -> ModelCard:
    return ModelCard(
        task="boneage",
        name="bonebridge-boneage-sex",
        version="1.0.0",
        architecture=architecture,
        input_size=geometry.size,
        normalisation={"mean": list(geometry.mean), "std": list(geometry.std)},
        preprocessing=geometry.to_dict(),
        classes=["female", "male"],
        threshold=0.5,
        target_scaling={"mean": age_mean, "std": age_std},
        training_data=data_note,
        licence_note=RSNA_LICENCE,
        intended_use="Research use only. Not for clinical use. Pediatric left-hand radiographs.",
        trained=False,
    )


def boneage_spec(card: ModelCard, hflip: bool = False, sex_loss_weight: float = SEX_LOSS_WEIGHT,
                 smooth_l1_beta: float = 0.0, augment: str = "default") -> TaskSpec:
    """The loss is (smooth) L1 on standardised months plus ``sex_loss_weight`` x the sex head's cross-entropy."""
    mean, std = card.target_scaling["mean"], card.target_scaling["std"]
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {augment!r}; choose from {', '.join(AUGMENTS)}")

    def loss(model: nn.Module, x: torch.Tensor, age: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        age_pred, sex_logit = model(x, male)
        target = (age - mean) / std
        age_loss = (F.smooth_l1_loss(age_pred.float(), target, beta=smooth_l1_beta) if smooth_l1_beta > 0
                    else F.l1_loss(age_pred.float(), target))
        return age_loss + sex_loss_weight * F.binary_cross_entropy_with_logits(sex_logit.float(), male)

    def evaluate(model: nn.Module, cache: torch.Tensor, age: torch.Tensor, male: torch.Tensor) -> dict[str, float]:
        device = next(model.parameters()).device
        pred, sex_logit = predict_cache(model, cache, male, card.geometry, device)
        return boneage_metrics(pred * std + mean, age, sex_logit, male)

    return TaskSpec(card=card, loss=loss, evaluate=evaluate, monitor="mae_months", lower_is_better=True,
                    augment=Augment(**AUGMENTS[augment], hflip=hflip))


def boneage_metrics(pred_months: torch.Tensor, true_months: torch.Tensor, sex_logit: torch.Tensor,
                    male: torch.Tensor) -> dict[str, float]:
    err = (pred_months - true_months).numpy()
    sex_prob = torch.sigmoid(sex_logit).numpy()
    male_np = male.numpy()
    metrics = {
        "mae_months": float(np.abs(err).mean()),
        "rmse_months": float(np.sqrt((err**2).mean())),
        "sex_accuracy": float(((sex_prob > 0.5) == (male_np > 0.5)).mean()),
    }
    if 0 < male_np.sum() < len(male_np):
        metrics["sex_auroc"] = float(roc_auc_score(male_np, sex_prob))
    return metrics


def rsna_examples(labels_csv: Path, images: Path | None = None) -> dict[str, list[Example]]:
    cases = read_rsna_boneage(labels_csv, images)
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for case in cases:
        splits[split_of(case.case_id)].append(Example(case.path, case.boneage_months, float(case.male)))
    return splits


def train_boneage(labels_csv: Path, out: Path, geometry: Geometry, cfg: TrainConfig, architecture: str,
                  images: Path | None = None) -> tuple[Path, dict]:
    """Train on the RSNA layout with a hashed 80/10/10 split; the test tenth is left for ``evaluate``."""
    splits = rsna_examples(Path(labels_csv), images)
    ages = np.array([e.target for e in splits["train"]])
    note = (
        f"{Path(labels_csv).parent.name}: {len(splits['train'])} train / {len(splits['val'])} validation images "
        f"(sha256-of-id split; {len(splits['test'])} test images held out)"
    )
    age_mean, age_std = float(ages.mean()), float(ages.std())
    if cfg.init_weights:
        # The source's heads regress in its own normalised months: keep its scaling so they start meaningful.
        source_card = read_card(cfg.init_weights)
        if source_card.task != "boneage":
            raise ValueError(f"{cfg.init_weights}: a {source_card.task} checkpoint, not a boneage one")
        age_mean, age_std = source_card.target_scaling["mean"], source_card.target_scaling["std"]
        note += f"; initialised from {Path(cfg.init_weights).name} (sha256 {source_card.sha256[:12]})"
    card = boneage_card(geometry, architecture, age_mean, age_std, note)
    if cfg.sex_loss_weight is None:
        cfg = replace(cfg, sex_loss_weight=SEX_LOSS_WEIGHT)
    spec = boneage_spec(card, hflip=cfg.hflip, sex_loss_weight=cfg.sex_loss_weight,
                        smooth_l1_beta=cfg.smooth_l1_beta, augment=cfg.augment)
    unmasked_geometry = Geometry.from_dict({**geometry.to_dict(), "mask_labels": False})
    train_cache = build_cache(splits["train"], unmasked_geometry, cfg.progress)
    val_cache = build_cache(splits["val"], geometry, cfg.progress)
    masked_cache = None
    if cfg.mask_probability > 0:
        masked_geometry = Geometry.from_dict({**geometry.to_dict(), "mask_labels": True})
        masked_cache = build_cache(splits["train"], masked_geometry, cfg.progress)
    reframed_cache = None
    if cfg.reframe_probability > 0:
        reframed_cache = build_reframed_cache(splits["train"], geometry, cfg.seed, cfg.progress)
    return train(spec, splits["train"], splits["val"], cfg, caches=(train_cache, val_cache),
                 masked_train_cache=masked_cache, reframed_train_cache=reframed_cache)
