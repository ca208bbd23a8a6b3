"""Checkpoints: weights plus a model card, verified on load.

A checkpoint is two files: ``NAME.pt`` (a plain ``state_dict``; loaded with ``weights_only=True`` so a
checkpoint cannot run code) and ``NAME.card.json``, the model card. The card names the task, the network, the
input geometry, the classes, the decision threshold, where the training data came from and under which terms,
the metrics measured and on which split, the code version, and the sha256 of the ``.pt`` file. Loading
recomputes the sha256 and refuses a checkpoint without a card, with a card for another file, or with
``trained: false``, so the daemon cannot report findings from weights nobody trained.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from models.nets.networks import BoneAgeSexNet, ClassifierNet, FractureNet
from models.data.preprocess import Geometry

Task = Literal["boneage", "sex", "abnormality", "anatomy"]


class CheckpointError(Exception):
    """A checkpoint that must not be used, with the reason."""


#: The intended-use line of a card, per classifier task (bone age writes its own in :mod:`models.train.boneage`).
INTENDED_USE = {
    "sex": "Research use only. Not for clinical use. Sex from pediatric hand radiographs (a PatientSex check).",
    "abnormality": "Research use only. Not for clinical use. Abnormality triage of upper-extremity radiographs.",
    "anatomy": "Research use only. Not for clinical use. Sorting radiographs by body region for routing.",
}


class ModelCard(BaseModel):
    task: Task
    name: str
    version: str
    architecture: str
    input_size: int
    normalisation: dict[str, list[float]]
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    classes: list[str] = Field(default_factory=list)
    threshold: float | None = None
    target_scaling: dict[str, float] = Field(default_factory=dict)
    training_data: str = ""
    licence_note: str = ""
    intended_use: str = "Research use only. Not for clinical use."
    metrics: dict[str, Any] = Field(default_factory=dict)
    metrics_split: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    code_version: str = ""
    sha256: str = ""
    trained: bool = True
    #: Abnormality only: the network also has a localisation head trained on fracture boxes (its map is the
    #: heatmap), and how the image probability is scored: ``image`` (the classifier) or ``image_and_map`` (the mean
    #: of the classifier's probability and the map's maximum), chosen on validation.
    localisation_head: bool = False
    #: The localisation map's stride in input pixels: 16 (the shipped models) or 8 (a finer map, issue 29).
    map_stride: Literal[8, 16] = 16
    score_rule: Literal["image", "image_and_map"] = "image"
    #: Bone age only: the network has a fitted side head (right hand from the image, for headers that do not say),
    #: and the probability at or above which an image is read as a right hand and mirrored, chosen on validation.
    side_head: bool = False
    side_threshold: float | None = None
    #: Anatomy only (issue 25): ``temperature`` dividing the logits (fitted on validation), and ``ood``: the
    #: out-of-distribution model's sidecar (``file`` beside the weights, its ``sha256``), ``threshold`` and the rule
    #: that chose it. Empty: raw softmax, no OOD measure.
    calibration: dict[str, Any] = Field(default_factory=dict)
    #: Anatomy only: the sources the model was trained on, as a cached feature pass names them (``fracatlas``,
    #: ``rsna``, ``knee-oai-224``...). An evaluation counts only these as in distribution in its OOD figures; a
    #: model trained on two sources must not be credited with knowing a third that others were trained on. Empty:
    #: every source with training rows in the evaluation's cache (cards written before this field).
    training_sources: list[str] = Field(default_factory=list)
    #: The precision inference runs in: "bf16" (autocast, where the hardware runs it natively; fp32 elsewhere) only
    #: when validation read through both gave the same figures, recorded in the weights README; else "fp32".
    inference_precision: Literal["fp32", "bf16"] = "fp32"
    #: How the weights file stores the convolution and linear weights: "fp16" halves a checkpoint's size (the
    #: weights are widened back to fp32 on loading; normalisation statistics and biases always stay fp32). A
    #: card says so because the rounding is part of the model that was measured.
    weights_storage: Literal["fp32", "fp16"] = "fp32"
    #: Fracture models (issue 29): also read the mirrored image; the probability and the learnt map (mirrored back)
    #: are the means of both readings. Costs a second forward pass; set only where validation showed it pays.
    test_time_flip: bool = False
    #: The lead of an output ensemble (``models.<name>.ensemble``): the threshold on the members' mean probability,
    #: chosen on validation for that very ensemble, keyed by the further members' sha256 joined by "+". The
    #: ``threshold`` above stays this model's own, so the same file run alone keeps its own operating point; an
    #: ensemble with no entry here uses ``threshold``.
    ensemble_thresholds: dict[str, float] = Field(default_factory=dict)

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_dict(self.preprocessing)


def card_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".card.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def code_version() -> str:
    """The git commit of the code that trained the model, or the package version outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bonebridge")
    except PackageNotFoundError:
        return "unknown"


def build_network(card: ModelCard, pretrained: bool = False) -> nn.Module:
    """The network a card describes, with random or ImageNet weights (the checkpoint's are loaded after)."""
    if card.task == "boneage":
        return BoneAgeSexNet(card.architecture, pretrained=pretrained, side_head=card.side_head)
    if card.task == "abnormality" and card.localisation_head:
        return FractureNet(card.architecture, pretrained=pretrained, map_stride=card.map_stride)
    outputs = 1 if card.task in ("abnormality", "sex") else len(card.classes)
    return ClassifierNet(card.architecture, outputs, pretrained=pretrained)


def save_checkpoint(model: nn.Module, card: ModelCard, path: str | Path) -> Path:
    """Write weights, then the card with their sha256 (the card is written last: no card, no checkpoint).

    ``card.weights_storage == "fp16"`` stores every floating tensor of two or more dimensions (convolution and
    linear weights: nearly all the bytes) in fp16, so two bone-age models fit the repository's weights budget.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if card.weights_storage == "fp16":
        state = {k: v.half() if v.is_floating_point() and v.dim() >= 2 else v for k, v in state.items()}
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    card = card.model_copy(update={"sha256": sha256_file(path)})
    card_file = card_path(path)
    card_file.write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return path


def read_card(path: str | Path) -> ModelCard:
    path = Path(path)
    cfile = card_path(path)
    if not cfile.exists():
        raise CheckpointError(f"{path}: no model card ({cfile.name}); refusing weights without one")
    try:
        return ModelCard.model_validate_json(cfile.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{cfile}: invalid model card: {exc}") from exc


def load_checkpoint(path: str | Path, *, require_trained: bool = True) -> tuple[nn.Module, ModelCard]:
    """Load a checkpoint after checking its card and its sha256; the model is returned in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such weights file")
    card = read_card(path)
    actual = sha256_file(path)
    if card.sha256 != actual:
        raise CheckpointError(f"{path}: sha256 {actual[:12]}... does not match its card ({card.sha256[:12]}...)")
    if require_trained and not card.trained:
        raise CheckpointError(f"{path}: its card says the weights were not trained; no findings from them")
    model = build_network(card, pretrained=False)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    return model, card


def publish_checkpoint(weights: str | Path, out: str | Path, test_metrics: dict[str, Any], test_split: str,
                       notes: dict[str, Any] | None = None) -> Path:
    """Ship a trained checkpoint: its card then reports held-out test metrics, not the validation ones.

    Validation metrics chose the epoch, so they flatter the model; the card a user reads carries the figures of a
    split that neither training nor model selection saw. The validation figures stay in ``training``.
    """
    model, card = load_checkpoint(weights)
    training = {**card.training, "validation_metrics": card.metrics, "validation_split": card.metrics_split,
                **(notes or {})}
    card = card.model_copy(update={"metrics": test_metrics, "metrics_split": test_split, "training": training})
    return save_checkpoint(model, card, out)
