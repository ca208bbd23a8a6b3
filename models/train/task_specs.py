"""What differs between classification tasks in the one training loop: the loss and the validation metric.

A :class:`models.train.loop.TaskSpec` per kind of output: one logit (sex, abnormality on MURA) or a softmax over
the card's classes (anatomy). Kept apart from :mod:`models.train.classify`, which builds each task's examples,
so a trainer of its own (``models.train.anatomy_finetune``) uses the same specs without importing the dispatcher.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.metrics.classification import binary_metrics, topk_accuracy, youden_threshold
from models.nets.checkpoint import ModelCard
from models.data.preprocess import Augment
from models.train.loop import TaskSpec, predict_cache


def binary_spec(card: ModelCard, *, tune_threshold: bool, augment: Augment | None = None) -> TaskSpec:
    """One logit, BCE, monitored by validation AUROC.

    With ``tune_threshold`` each validation sets ``card.threshold`` to that epoch's Youden-optimal threshold. The
    loop copies the card when it saves an improved epoch, right after evaluating it, so every checkpoint on disk
    carries the threshold measured for its own weights, also when a run is stopped part-way.
    """

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(x).squeeze(1).float(), y)

    def evaluate(model: nn.Module, cache: torch.Tensor, y: torch.Tensor, side: torch.Tensor) -> dict[str, float]:
        device = next(model.parameters()).device
        logits, _ = predict_cache(model, cache, side, card.geometry, device)
        prob = torch.sigmoid(logits).numpy()
        threshold = youden_threshold(y.numpy(), prob) if tune_threshold else (card.threshold or 0.5)
        if tune_threshold:
            card.threshold = threshold
        metrics = binary_metrics(y.numpy(), prob, threshold)
        metrics.pop("n"), metrics.pop("positives")
        metrics.setdefault("auroc", float("nan"))
        return metrics

    return TaskSpec(card=card, loss=loss, evaluate=evaluate, monitor="auroc", lower_is_better=False,
                    augment=augment or Augment())


def multiclass_spec(card: ModelCard, augment: Augment | None = None,
                    val_sources: Sequence[str] | None = None) -> TaskSpec:
    """Softmax over ``card.classes``, cross-entropy, monitored by validation top-1 accuracy.

    ``val_sources`` (one name per validation image) adds top-1 per source and monitors their mean instead: when
    sources differ in size and difficulty (issue 25: 260 FracAtlas images beside 250 easy knees and chests), the
    pooled top-1 lets the easy ones hide a drop on the source that matters; the mean weighs every source alike.
    """
    sources = np.asarray(val_sources) if val_sources is not None else None

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float(), y.long())

    def evaluate(model: nn.Module, cache: torch.Tensor, y: torch.Tensor, side: torch.Tensor) -> dict[str, Any]:
        device = next(model.parameters()).device
        logits, _ = predict_cache(model, cache, side, card.geometry, device)
        scores = logits.numpy()
        labels = y.long().numpy()
        metrics: dict[str, Any] = {
            "top1_accuracy": topk_accuracy(labels, scores, 1),
            "top2_accuracy": topk_accuracy(labels, scores, 2),
            "val_loss": float(F.cross_entropy(logits, y.long()).item()),
        }
        if sources is not None:
            by_source = {str(name): topk_accuracy(labels[sources == name], scores[sources == name], 1)
                         for name in sorted(set(sources.tolist()))}
            metrics["top1_by_source"] = by_source
            metrics["top1_source_mean"] = float(np.mean(list(by_source.values())))
        return metrics

    return TaskSpec(card=card, loss=loss, evaluate=evaluate,
                    monitor="top1_source_mean" if sources is not None else "top1_accuracy", lower_is_better=False,
                    augment=augment or Augment(hflip=True))
