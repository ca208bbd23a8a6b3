"""An output ensemble: several checkpoints of one task read the same images and their outputs are averaged.

Enters: the configured ``weights`` (the *lead* member) and the ``ensemble`` list of further checkpoints of the same
task. Leaves: per image the same outputs a single :class:`~models.inference.predictor.Predictor` gives, so the
pipeline and the SR builder do not know whether one model or several answered.

Why averaging outputs and not weights: the members may differ in architecture, input size and preprocessing (a
hand-cropped 320 px model beside a padded 384 px one); each keeps the preprocessing its own card prescribes. Two
models trained differently err differently, which is why their mean reads closer (issue 30 measured it on
validation before shipping one, see ``models/weights/README.md``).

What is averaged: bone age in months, p(male) (the predicted sex follows the mean; a stated PatientSex still
feeds each member's age head), and the fracture probability. What comes from the lead alone: the heatmap (one
Grad-CAM pass, not one per member, keeps the study inside its time budget), the hand-side note and the learnt
map's peak. The extra members run without heatmaps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from models.inference.predictor import (SEX_MISMATCH_CONFIDENCE, ImagePrediction, Predictor, load_predictor,
                                        normalise_sex)
from models.nets.checkpoint import ModelCard

#: Tasks whose outputs have a meaningful mean; a generic classifier ensemble is refused, and anatomy members form a
#: cascade instead (:mod:`models.inference.anatomy_cascade`).
ENSEMBLE_TASKS = ("boneage", "abnormality")


class EnsemblePredictor:
    """Looks like a :class:`Predictor` (``card``, ``task``, ``predict``) and averages its members' outputs."""

    def __init__(self, members: Sequence[Predictor]) -> None:
        members = list(members)
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        lead = members[0]
        if lead.task not in ENSEMBLE_TASKS:
            raise ValueError(f"an output ensemble is defined for {', '.join(ENSEMBLE_TASKS)}, not {lead.task}")
        for member in members[1:]:
            if member.task != lead.task:
                raise ValueError(f"ensemble member {member.card.name} {member.card.version} is a {member.task} "
                                 f"model, not {lead.task} like {lead.card.name} {lead.card.version}")
        self.members = members
        self.lead = lead
        #: The lead's card stands for the ensemble where one card is read (threshold, classes, task), with the
        #: threshold the lead's card names for exactly these further members, where it names one.
        self.card: ModelCard = lead.card
        chosen = lead.card.ensemble_thresholds.get(ensemble_key(members[1:]))
        if chosen is not None:
            self.card = lead.card.model_copy(update={"threshold": float(chosen)})
        self.task = lead.task
        self.weights = lead.weights

    # Where the lead runs and how it reads an image (reports state them; each member keeps its own). Properties, so
    # a setting changed on the lead after loading (an evaluation's --flip) is what the ensemble reports too.
    @property
    def device(self):
        return self.lead.device

    @property
    def geometry(self):
        return self.lead.geometry

    @property
    def bf16(self) -> bool:
        return self.lead.bf16

    @property
    def test_time_flip(self) -> bool:
        return self.lead.test_time_flip

    @property
    def cards(self) -> list[ModelCard]:
        """Every member's card, lead first: each is named in the SR's provenance."""
        return [member.card for member in self.members]

    def predict(self, images: Sequence[np.ndarray], patient_sex: Sequence[str | None] | None = None,
                with_heatmaps: bool = True, tta: bool = False,
                laterality: Sequence[str | None] | None = None) -> list[ImagePrediction]:
        images = list(images)
        lead = self.lead.predict(images, patient_sex, with_heatmaps=with_heatmaps, tta=tta, laterality=laterality)
        others = [member.predict(images, patient_sex, with_heatmaps=False, tta=tta, laterality=laterality)
                  for member in self.members[1:]]
        sexes = [normalise_sex(s) for s in patient_sex] if patient_sex is not None else [None] * len(images)
        out = []
        for i, first in enumerate(lead):
            outputs = [first.outputs] + [preds[i].outputs for preds in others]
            merged = average_boneage(outputs, sexes[i]) if self.task == "boneage" else average_abnormality(outputs)
            out.append(ImagePrediction(merged, first.heatmap))
        return out


def ensemble_key(members: Sequence[Predictor]) -> str:
    """How a lead's card names a set of further members (``ModelCard.ensemble_thresholds``): their sha256s."""
    return "+".join(member.card.sha256 for member in members)


def average_boneage(outputs: Sequence[dict], given_sex: str | None) -> dict:
    """The members' bone-age outputs of one image -> one: mean months, mean p(male) and the sex it implies."""
    merged = dict(outputs[0])
    merged["bone_age_months"] = float(np.mean([float(o["bone_age_months"]) for o in outputs]))
    p_male = float(np.mean([male_probability(o) for o in outputs]))
    predicted = "M" if p_male > 0.5 else "F"
    merged["predicted_sex"] = predicted
    merged["predicted_sex_probability"] = p_male if predicted == "M" else 1.0 - p_male
    confident_other = (given_sex == "M" and 1 - p_male >= SEX_MISMATCH_CONFIDENCE) or (
        given_sex == "F" and p_male >= SEX_MISMATCH_CONFIDENCE)
    merged["sex_mismatch"] = "yes" if confident_other else "no"
    return merged


def average_abnormality(outputs: Sequence[dict]) -> dict:
    """The members' abnormality outputs of one image -> one: the mean probability; the lead's map and its peak."""
    merged = dict(outputs[0])
    merged["abnormality_probability"] = float(np.mean([float(o["abnormality_probability"]) for o in outputs]))
    return merged


def male_probability(outputs: dict) -> float:
    """p(male) from a bone-age output, which states the predicted sex and the probability of that sex."""
    p = float(outputs["predicted_sex_probability"])
    return p if outputs["predicted_sex"] == "M" else 1.0 - p


def load_model(weights: str | Path, ensemble: Sequence[str | Path] = (), **kwargs):
    """One :class:`Predictor`, or, when ``ensemble`` names further checkpoints, an :class:`EnsemblePredictor`
    (bone age, abnormality: outputs averaged) or an anatomy cascade
    (:class:`~models.inference.anatomy_cascade.AnatomyCascade`: the first member in distribution answers).

    Every member goes through :func:`load_predictor` and so through the card and sha256 checks.
    """
    lead = load_predictor(weights, **kwargs)
    if not ensemble:
        return lead
    members = [lead] + [load_predictor(member, **kwargs) for member in ensemble]
    if lead.task == "anatomy":
        from models.inference.anatomy_cascade import AnatomyCascade

        return AnatomyCascade(members)
    return EnsemblePredictor(members)
