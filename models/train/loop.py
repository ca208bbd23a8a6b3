"""Training: one loop for every task, driven by a :class:`TaskSpec`.

The loop preprocesses every image once through :mod:`models.data.preprocess` (the same path inference uses) into a
uint8 cache, then trains with batched augmentation, validation each epoch, early stopping on the validation
metric, a checkpoint (weights + card) after every epoch so a stopped run resumes, seeds, a progress bar,
channels-last, and bf16 autocast wherever the hardware has it: on a CUDA GPU, and on a CPU with AVX-512 BF16 or AMX
(on this project's AMD EPYC cores a Lite0 step of 32 images at 384 px takes 5.1 s against 8.6 s in fp32, issue 30).
The same code runs unchanged on either. An exponential moving average of the weights (``TrainConfig.ema_decay``) is
what validation reads and what the checkpoint holds, as in torchvision's reference scripts.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.nets.checkpoint import ModelCard, build_network, code_version, load_checkpoint, save_checkpoint
from models.data.preprocess import Augment, Geometry, load_image, normalise, to_unit_square
from models.nets.precision import autocast_enabled

LOGGER = logging.getLogger(__name__)


@dataclass
class Example:
    """One training image: its path, its target(s), and an optional side input (sex for bone age)."""

    path: Path
    target: float
    male: float = 0.0
    group: str = ""


@dataclass
class TrainConfig:
    out: Path
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 4
    seed: int = 0
    workers_threads: int = 0
    mask_probability: float = 0.0  # bone age: fraction of training images whose burned-in labels are masked
    #: bone age: fraction of training images drawn from a copy reframed the ways a PACS differs (tight crop on black,
    #: zoomed out with padding; one fixed framing per image, see ``build_reframed_cache``)
    reframe_probability: float = 0.0
    #: bone age: mirror half the training images, so a right hand whose header does not say so reads like a left one
    #: (RSNA holds left hands only; the fracture recipe always mirrors)
    hflip: bool = False
    #: bone age: the sex head's weight in the loss; None is ``models.train.boneage.SEX_LOSS_WEIGHT`` (resolved there, so the
    #: card records the weight used)
    sex_loss_weight: float | None = None
    max_steps_per_epoch: int | None = None
    device: str | None = None
    resume: bool = True
    progress: bool = True
    init_weights: Path | None = None  # start from a trained checkpoint of the same task (fresh optimiser and schedule)
    #: "auto": bf16 autocast where :func:`models.nets.precision.bf16_supported` says so, else fp32; "bf16" or "fp32" to force one
    precision: str = "auto"
    #: decay of the weights' exponential moving average (0: no EMA); validation and the checkpoint read the average
    ema_decay: float = 0.0
    #: fraction of each training batch shown in a random site's processing (:mod:`models.data.site_processing`)
    site_style_probability: float = 0.0
    #: bone age: beta of the smooth L1 loss on standardised months (0: plain L1, as before)
    smooth_l1_beta: float = 0.0
    #: bone age: augmentation strength, a name in ``models.train.boneage.AUGMENTS``
    augment: str = "default"
    #: abnormality on FracAtlas: share of id blocks in validation (taken from train; the test split never moves)
    val_fraction: float = 0.1
    #: abnormality on FracAtlas: the stem and this many first blocks keep their ImageNet weights (0: the whole network
    #: trains). 3 (strides 2 and 4: edges and textures, the layers that transfer best) cut a 320 px fp32 step of 32
    #: images on a 2-core CPU from about 9 s to 6.5 s; the GPU runs of issue 29 trained everything.
    frozen_blocks: int = 3


@dataclass
class TaskSpec:
    """What differs between tasks: the card's template, the loss, the validation metric."""

    card: ModelCard
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]]
    monitor: str
    lower_is_better: bool
    augment: Augment = field(default_factory=Augment)


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics (None when ``decay`` is 0)."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_cache(examples: list[Example], geometry: Geometry, progress: bool = True,
                framings: Sequence[str] | None = None) -> torch.Tensor:
    """All images through the shared preprocessing, as an Nx1xSxS uint8 tensor (a 128 px image is 16 KB).

    ``framings`` (one :mod:`models.data.framing` name per example) reframes each image first, as
    :func:`build_reframed_cache` does.
    """
    from models.data.framing import make_variant

    cache = torch.empty((len(examples), 1, geometry.size, geometry.size), dtype=torch.uint8)
    for i, ex in enumerate(tqdm(examples, desc="preprocess", disable=not progress, leave=False)):
        image = load_image(ex.path)
        if framings is not None:
            image = make_variant(image, framings[i])
        square = to_unit_square(image, geometry)
        cache[i] = (square[0] * 255).round().clamp(0, 255).to(torch.uint8)
    return cache


#: How ``build_reframed_cache`` reframes training images (models.data.framing names), drawn per image.
REFRAMINGS: tuple[str, ...] = ("tight_crop_black", "zoomed_out")


def build_reframed_cache(examples: list[Example], geometry: Geometry, seed: int = 0,
                         progress: bool = True) -> torch.Tensor:
    """Each training image reframed one of :data:`REFRAMINGS` ways (at random, fixed per image), then preprocessed.

    The crop to the body and the scale augmentation do not make a hand cropped tightly on black look like one on
    its detector: the background is gone (validation, shipped 2.0.0: +2.6 months of bias, and putting the margin
    back with black padding did not remove it). Training on such copies is what teaches the model that it is the
    same hand.
    """
    names = np.random.default_rng(seed).choice(np.array(REFRAMINGS, dtype=object), len(examples))
    return build_cache(examples, geometry, progress, [str(name) for name in names])


def _batches(n: int, batch_size: int, shuffle: bool, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return list(order.split(batch_size))


def _to_input(cache_batch: torch.Tensor, geometry: Geometry, device: torch.device, augment: Augment | None) -> torch.Tensor:
    x = cache_batch.to(device, non_blocking=True).float() / 255.0
    if augment is not None:
        x = augment(x)
    # channels-last: ~1.5x faster on CPU (oneDNN depthwise convolutions, measured) as well as on a GPU
    return normalise(x, geometry).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_cache(
    model: nn.Module, cache: torch.Tensor, side: torch.Tensor, geometry: Geometry, device: torch.device,
    batch_size: int = 128, tta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw outputs over a cache: (primary output, secondary output or zeros). TTA averages a flip and two shifts."""
    model.eval()
    firsts, seconds = [], []
    for idx in torch.arange(len(cache)).split(batch_size):
        x = _to_input(cache[idx], geometry, device, None)
        views = [x]
        if tta:
            views += [torch.roll(x, shifts=3, dims=3), torch.roll(x, shifts=-3, dims=2)]
        outs = [_forward(model, v, side[idx].to(device)) for v in views]
        firsts.append(torch.stack([o[0] for o in outs]).mean(0).cpu())
        seconds.append(torch.stack([o[1] for o in outs]).mean(0).cpu())
    return torch.cat(firsts), torch.cat(seconds)


def _forward(model: nn.Module, x: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x, side) if getattr(model, "takes_side_input", False) or _is_boneage(model) else model(x)
    if isinstance(out, tuple):
        return out[0].float(), out[1].float()
    out = out.float()
    return (out.squeeze(1) if out.shape[1] == 1 else out), torch.zeros(len(out))


def _is_boneage(model: nn.Module) -> bool:
    from models.nets.networks import BoneAgeSexNet

    return isinstance(model, BoneAgeSexNet)


def resume_loop(state_path: Path, resume: bool, model: nn.Module, optimiser: torch.optim.Optimizer, scheduler: Any,
                generator: torch.Generator, ema: nn.Module | None = None) -> tuple[list[dict], dict | None, int]:
    """(history, best record, first epoch to run): from the per-epoch state file when resuming, else fresh.

    Every random stream the loop draws from is restored (its own generator, torch's global one that dropout uses,
    numpy's and Python's), so a resumed run reaches the weights an uninterrupted one would have.
    """
    if not (resume and state_path.exists()):
        return [], None, 0
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    if ema is not None:
        if state.get("ema") is None:
            raise ValueError(f"{state_path}: saved without an EMA; resume with the EMA decay it was started with")
        ema.load_state_dict(state["ema"])
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
    LOGGER.info("resumed from %s at epoch %d", state_path, state["epoch"] + 1)
    return state["history"], state["best"], state["epoch"] + 1


def save_loop(state_path: Path, model: nn.Module, optimiser: torch.optim.Optimizer, scheduler: Any,
              generator: torch.Generator, history: list[dict], best: dict | None, epoch: int,
              ema: nn.Module | None = None) -> None:
    """Everything a stopped run needs to go on after ``epoch`` (written after every epoch, atomically)."""
    tmp = state_path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                "history": history, "best": best, "epoch": epoch, "generator": generator.get_state(),
                "ema": ema.state_dict() if ema is not None else None, "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}, tmp)
    tmp.replace(state_path)


@dataclass
class LoopParts:
    """What a task plugs into :func:`fit`, the one training loop.

    ``batch_loss`` turns a batch's training-set indices into a loss (it runs inside the loop's autocast and may draw
    from the loop's generator, which the resume state keeps); ``validate`` judges the model the checkpoint would hold
    (the EMA when there is one) and returns the epoch's metrics; ``better`` says whether an epoch's record beats the
    best so far; ``save_best`` writes the checkpoint and card of an improved epoch, given the loop's own training facts.
    """

    model: nn.Module
    parameters: list[nn.Parameter]
    n_train: int
    batch_loss: Callable[[torch.Tensor], torch.Tensor]
    validate: Callable[[nn.Module], dict[str, Any]]
    better: Callable[[dict, dict], bool]
    save_best: Callable[[nn.Module, dict, dict], None]


def fit(parts: LoopParts, cfg: TrainConfig, generator: torch.Generator, device: torch.device) -> tuple[list[dict], dict | None]:
    """AdamW with a one-cycle schedule, bf16 autocast where native, an optional EMA, a full resume state after every
    epoch (a resumed run reaches the weights an uninterrupted one would), early stopping on ``cfg.patience``.

    Returns (history, best record); the history is also written beside ``cfg.out``.
    """
    model = parts.model
    optimiser = torch.optim.AdamW(parts.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = build_ema(model, cfg.ema_decay)
    bf16 = autocast_enabled(cfg.precision, device)
    LOGGER.info("training on %s in %s%s", device, "bf16 autocast" if bf16 else "fp32",
                f", EMA {cfg.ema_decay}" if ema is not None else "")
    steps_per_epoch = math.ceil(parts.n_train / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=cfg.lr, total_steps=max(1, cfg.epochs * steps_per_epoch), pct_start=0.15
    )
    state_path = cfg.out.with_suffix(".state.pt")
    history, best, start_epoch = resume_loop(state_path, cfg.resume, model, optimiser, scheduler, generator, ema)
    for epoch in range(start_epoch, cfg.epochs):
        if best is not None and epoch - 1 - best["epoch"] >= cfg.patience:
            LOGGER.info("early stop: no improvement in %d epochs", cfg.patience)
            break
        model.train()
        began = time.time()
        losses = []
        batches = _batches(parts.n_train, cfg.batch_size, True, generator)[:steps_per_epoch]
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for idx in bar:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = parts.batch_loss(idx)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        judged = ema.module if ema is not None else model
        metrics = parts.validate(judged)
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "seconds": round(time.time() - began, 1),
                  **metrics}
        history.append(record)
        LOGGER.info("epoch %d: %s", epoch + 1, json.dumps(record))
        print(json.dumps(record), flush=True)
        if best is None or parts.better(record, best):
            best = record
            parts.save_best(judged, record, {
                "epochs_run": epoch + 1, "epochs_planned": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                "seed": cfg.seed, "train_images": parts.n_train, "device": device.type,
                "precision": "bf16" if bf16 else "fp32", "ema_decay": cfg.ema_decay, "weight_decay": cfg.weight_decay,
            })
        save_loop(state_path, model, optimiser, scheduler, generator, history, best, epoch, ema)
    cfg.out.with_suffix(".history.json").write_text(json.dumps(history, indent=2))
    return history, best


def train(
    spec: TaskSpec, train_examples: list[Example], val_examples: list[Example], cfg: TrainConfig,
    caches: tuple[torch.Tensor, torch.Tensor] | None = None, masked_train_cache: torch.Tensor | None = None,
    reframed_train_cache: torch.Tensor | None = None,
) -> tuple[Path, dict]:
    """Train, keep the best epoch by the validation metric, and write ``cfg.out`` (+ card). Returns (path, metrics)."""
    generator = seed_everything(cfg.seed)
    spec.augment.generator = generator
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    geometry = spec.card.geometry
    train_cache, val_cache = caches or (
        build_cache(train_examples, geometry, cfg.progress), build_cache(val_examples, geometry, cfg.progress)
    )
    y_train = torch.tensor([e.target for e in train_examples], dtype=torch.float32)
    s_train = torch.tensor([e.male for e in train_examples], dtype=torch.float32)
    y_val = torch.tensor([e.target for e in val_examples], dtype=torch.float32)
    s_val = torch.tensor([e.male for e in val_examples], dtype=torch.float32)

    model = build_network(spec.card, pretrained=True)
    if cfg.init_weights:
        model.load_state_dict(load_checkpoint(cfg.init_weights)[0].state_dict())
        LOGGER.info("initialised from %s", cfg.init_weights)
    model = model.to(device).to(memory_format=torch.channels_last)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        batch_u8 = train_cache[idx]
        if masked_train_cache is not None and cfg.mask_probability > 0:
            pick = torch.rand(len(idx), generator=generator) < cfg.mask_probability
            batch_u8 = torch.where(pick.view(-1, 1, 1, 1), masked_train_cache[idx], batch_u8)
        if reframed_train_cache is not None and cfg.reframe_probability > 0:
            pick = torch.rand(len(idx), generator=generator) < cfg.reframe_probability
            batch_u8 = torch.where(pick.view(-1, 1, 1, 1), reframed_train_cache[idx], batch_u8)
        if cfg.site_style_probability > 0:
            from models.data.site_processing import restyle_batch

            style_seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
            batch_u8 = restyle_batch(batch_u8, cfg.site_style_probability, style_seed)
        x = _to_input(batch_u8, geometry, device, spec.augment)
        return spec.loss(model, x, y_train[idx].to(device), s_train[idx].to(device))

    def better(record: dict, best: dict) -> bool:
        value, old = record[spec.monitor], best[spec.monitor]
        return value < old if spec.lower_is_better else value > old

    def save_best(judged: nn.Module, record: dict, facts: dict) -> None:
        card = spec.card.model_copy(
            update={
                "metrics": {k: v for k, v in record.items() if k not in ("epoch", "seconds", "train_loss")},
                "metrics_split": f"validation split ({len(val_examples)} images), epoch {record['epoch'] + 1}",
                "training": {
                    **facts, "mask_probability": cfg.mask_probability,
                    "reframe_probability": cfg.reframe_probability, "hflip": cfg.hflip,
                    "sex_loss_weight": cfg.sex_loss_weight, "site_style_probability": cfg.site_style_probability,
                    "smooth_l1_beta": cfg.smooth_l1_beta, "augment": cfg.augment,
                    "initialised_from": str(cfg.init_weights) if cfg.init_weights else "ImageNet",
                },
                "code_version": code_version(),
                "trained": True,
            }
        )
        save_checkpoint(judged, card, cfg.out)

    parts = LoopParts(model=model, parameters=list(model.parameters()), n_train=len(train_examples),
                      batch_loss=batch_loss, validate=lambda judged: spec.evaluate(judged, val_cache, y_val, s_val),
                      better=better, save_best=save_best)
    _, best = fit(parts, cfg, generator, device)
    return cfg.out, best or {}
