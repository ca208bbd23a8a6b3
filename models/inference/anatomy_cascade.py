"""An anatomy cascade: anatomy models asked in order; the first that finds the study in its distribution answers.

Enters: the configured anatomy ``weights`` (the first witness) and its ``ensemble`` list (the fallbacks), as
:func:`models.inference.ensemble.load_model` loads them. Leaves: per study one :class:`StudyAnatomy`, the answer of
one member, with why the members before it did not answer.

Why a cascade and not an average (issue 25, ``models/weights/README.md`` "Anatomy 1.2.0"): the first model, a probe
on a frozen ImageNet backbone, reads the sources it was fitted on better than a network fine-tuned on more sites,
and its out-of-distribution score says when a study is not one of those sources (another site's knee crops, a
paediatric chest). Averaging would blend its good reading with a worse one on exactly the studies it knows; asking
the next model only where it is out of its depth keeps its reading there and adds the other's elsewhere. A later
member runs only for such studies, so a study the first model knows costs one network.

The daemon's decision treats a fallback's answer as a weaker witness against a tag: it decides untagged studies and
flags a disagreement, but overrules a tag only toward a part no route runs a model on, where the overrule can only
stop an analysis (:mod:`daemon.analyse.anatomy_decision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from models.inference.predictor import Predictor
from models.nets.checkpoint import ModelCard

__all__ = ["AnatomyCascade", "StudyAnatomy", "in_distribution", "member_answers", "study_anatomy"]


@dataclass(frozen=True)
class StudyAnatomy:
    """One member's answer for a study: its calibrated probabilities averaged over the study's images."""

    card: ModelCard                 # the member that answered
    probabilities: np.ndarray       # mean calibrated softmax over ``card.classes``
    ood_score: float | None         # mean OOD score of the study's images (None: the member has no OOD measure)
    ood_threshold: float | None
    position: int                   # 0: the first member answered
    passed_over: tuple[str, ...]    # why each earlier member did not answer

    @property
    def in_distribution(self) -> bool:
        return in_distribution(self.ood_score, self.ood_threshold)


class AnatomyCascade:
    """Looks like a :class:`Predictor` where the daemon reads one (``card``, ``task``, ``cards``); see the module."""

    def __init__(self, members: Sequence[Predictor]) -> None:
        members = list(members)
        if len(members) < 2:
            raise ValueError("an anatomy cascade needs at least two members")
        lead = members[0]
        for member in members:
            if member.task != "anatomy":
                raise ValueError(f"anatomy cascade member {member.card.name} {member.card.version} is a "
                                 f"{member.task} model")
            if list(member.card.classes) != list(lead.card.classes):
                raise ValueError(f"anatomy cascade member {member.card.name} {member.card.version} has classes "
                                 f"{list(member.card.classes)}, not the first member's {list(lead.card.classes)}")
        self.members = members
        self.lead = lead
        self.card: ModelCard = lead.card
        self.task = "anatomy"

    @property
    def cards(self) -> list[ModelCard]:
        return [member.card for member in self.members]

    def prepare(self) -> None:
        """Every member's :meth:`Predictor.prepare`: a study sent on must not wait for a fallback's session."""
        for member in self.members:
            member.prepare()


def in_distribution(score: float | None, threshold: float | None) -> bool:
    """The one OOD rule of a member's answer, and of a cached row in the decision table: no score or no threshold
    counts as inside."""
    return score is None or threshold is None or score <= threshold


def member_answers(predictor, images: Sequence[np.ndarray]) -> Iterator[StudyAnatomy]:
    """Each member's answer for the study in turn, lazily: a consumer that stops at the first in distribution runs
    no further network. Members of one geometry and batch size share the study's preprocessed batches.

    Each answer: calibrated probabilities and OOD scores of every image, averaged (one odd view cannot outvote the
    rest), with why the earlier members out of distribution were passed over.
    """
    members = list(getattr(predictor, "members", None) or [predictor])
    passed: list[str] = []
    inputs: dict[tuple, list] = {}
    for position, member in enumerate(members):
        key = (member.geometry, member.batch_size)
        if key not in inputs:
            inputs[key] = member.model_inputs(images)
        probabilities, ood = member.anatomy_scores(images, inputs[key])
        score = float(np.mean(ood)) if ood is not None and len(ood) else None
        answer = StudyAnatomy(member.card, probabilities.mean(axis=0), score, member.ood_threshold, position,
                              tuple(passed))
        yield answer
        if not answer.in_distribution:
            passed.append(f"{member.card.name} {member.card.version} out of distribution "
                          f"({score:.0f} vs threshold {answer.ood_threshold:.0f})")


def study_anatomy(predictor, images: Sequence[np.ndarray]) -> StudyAnatomy:
    """The study's anatomy from one anatomy :class:`Predictor` or an :class:`AnatomyCascade`: the first member in
    distribution answers; the last answers whatever its score says (the decision then lets the tags decide, or calls
    the anatomy unknown)."""
    for answer in member_answers(predictor, images):
        if answer.in_distribution:
            return answer
    return answer
