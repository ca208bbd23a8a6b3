"""Which body part a study shows, from two witnesses: the DICOM tags and the anatomy model (issue 25). Pure logic.

The model's numbers are *calibrated* probabilities (temperature-scaled on validation) averaged over the study's
images, plus whether its features lie within the training images' distribution (a Mahalanobis distance under a
threshold chosen on validation; see ``models/nets/anatomy_ood.py``). The rules, first that applies wins:

1. **tag, model sure and in distribution, tag not among its two best** (and a part the model has a class for: it
   cannot rule out a finger if it knows no fingers; and the model is the *first* witness, not a fallback consulted
   because the first was out of its depth, unless the fallback's choice is a part no route runs a model on, where
   overruling can only stop an analysis) -> the model overrules the tag (a mislabelled study), flagged;
2. **tag** (any other case) -> the tag decides; where the model's first choice is another part the disagreement is
   flagged and said ("elbow (tags); model said knee 0.89"); a tag is never overruled by a model that is unsure, out
   of its depth, or has the tagged part as its second guess;
3. **no tag, model sure and in distribution** -> the model decides;
4. **no tag, model unsure or out of distribution (or no model)** -> anatomy unknown, with the reason: the study is
   not processed.

**Bone age** (:func:`boneage_block`) runs only on a study decided ``hand`` that neither witness contradicts: the model
(where there is one) calls it a hand and the tags (where they name a part) say hand. Never on an unknown, never where
tags say hand and the image looks like another part, never where the model overruled a tag naming another part (an
adult wrist tagged WRIST that the model reads as a hand).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

__all__ = ["ModelWitness", "Decision", "witness_of", "decide_anatomy", "boneage_block", "HAND"]

HAND = "hand"


@dataclass(frozen=True)
class ModelWitness:
    """What the anatomy model says of a study: its two best classes with calibrated probabilities, and OOD."""

    top: tuple[tuple[str, float], ...]          # best first, calibrated probabilities
    ood_score: float | None = None              # None: the model has no OOD measure
    ood_threshold: float | None = None
    classes: tuple[str, ...] = ()               # every class the model has (empty: not known)
    #: Why a fallback of an anatomy cascade answered ("bonebridge-anatomy 1.1.1 out of distribution (4120 vs
    #: threshold 3394)"); None: the first (or only) model did.
    fallback_because: str | None = None

    @property
    def may_overrule(self) -> bool:
        """Whether this witness may overrule a tag toward any part. A fallback may not: it was asked only because the
        first model found the study outside its distribution, so against a tag it is the weaker witness (it may
        still overrule toward a part no route runs a model on, see :func:`decide_anatomy`)."""
        return self.fallback_because is None

    def knows(self, part: str) -> bool:
        """Whether the model has a class for ``part`` (it cannot rule on a finger if it has no finger class)."""
        return not self.classes or part in self.classes

    @property
    def in_distribution(self) -> bool:
        if self.ood_score is None or self.ood_threshold is None:
            return True
        return self.ood_score <= self.ood_threshold

    @property
    def best(self) -> tuple[str, float]:
        return self.top[0]

    def names(self) -> set[str]:
        return {name for name, _ in self.top[:2]}

    def said(self) -> str:
        """"knee 0.89" (with "out of distribution" when it is)."""
        name, p = self.best
        return f"{name} {p:.2f}" + ("" if self.in_distribution else " (out of distribution)")


def witness_of(probabilities, classes, ood_score: float | None = None, ood_threshold: float | None = None,
               fallback_because: str | None = None) -> ModelWitness:
    """The witness for a study from its model's calibrated probabilities over ``classes`` (averaged over the study's
    images by the caller): the two best classes, the OOD score and threshold, and why a fallback answered."""
    order = sorted(range(len(classes)), key=lambda i: -float(probabilities[i]))[:2]
    return ModelWitness(top=tuple((classes[i], float(probabilities[i])) for i in order), ood_score=ood_score,
                        ood_threshold=ood_threshold, classes=tuple(classes), fallback_because=fallback_because)


@dataclass(frozen=True)
class Decision:
    label: str | None                 # None: anatomy unknown
    decided_by: str                   # "model", "tags" or "none"
    rule: str                         # the rule that decided, in words
    source: str                       # what the SR and caption say after "Anatomy: <label>"
    probability: float | None         # the model's calibrated probability when it decided
    disagreement: bool | None         # tags and model's first choice differ (None: one witness is missing)
    evidence: dict[str, str] = field(default_factory=dict)
    tag: str | None = None            # what the tags said (the other witness, kept for the bone-age gate)


def decide_anatomy(tag_label: str | None, tag_evidence: str, model: ModelWitness | None,
                   min_probability: float, model_name: str = "anatomy model",
                   runs_no_model: Callable[[str], bool] | None = None) -> Decision:
    """Apply the rules above; ``tag_evidence`` is what the tag reader matched (``BodyPartExamined=ELBOW``).

    ``model_name`` ("model bonebridge-anatomy 2.0.0") starts the source when the model decided. ``runs_no_model``
    says whether a part would take this study to a route that runs no model (the caller knows the routes); a
    fallback may overrule a tag only toward such a part.
    """
    evidence: dict[str, str] = {"tags": f"{tag_label} ({tag_evidence})" if tag_label else f"none ({tag_evidence})"}
    confident_and_known = False
    if model is not None:
        for key, (name, p) in zip(("model_top1", "model_top2"), model.top):
            evidence[key] = f"{name} {p:.2f}"
        if model.ood_score is not None and model.ood_threshold is not None:
            word = "in distribution" if model.in_distribution else "out of distribution"
            evidence["model_ood"] = f"{word} ({model.ood_score:.0f} vs threshold {model.ood_threshold:.0f})"
        if model.fallback_because:
            evidence["model_fallback"] = f"second witness answered: {model.fallback_because}"
        confident_and_known = model.best[1] >= min_probability and model.in_distribution
    disagreement = None
    if model is not None and tag_label is not None:
        disagreement = tag_label != model.best[0]
        # As in earlier SRs: "yes" when the tagged part is not even among the model's two best guesses.
        evidence["disagreement"] = "no" if tag_label in model.names() else "yes"

    def done(label, by, rule, source, probability=None) -> Decision:
        evidence["decided_by"] = by
        evidence["rule"] = rule
        return Decision(label, by, rule, source, probability, disagreement, evidence, tag_label)

    tags = f"DICOM tags ({tag_evidence})"
    if tag_label is not None:
        if model is None:
            return done(tag_label, "tags", "tags decide (no anatomy model)", tags)
        name, p = model.best
        harmless = not model.may_overrule and runs_no_model is not None and runs_no_model(name)
        if confident_and_known and tag_label not in model.names() and model.knows(tag_label) and \
                (model.may_overrule or harmless):
            return done(name, "model",
                        f"model overrules the tags: sure ({p:.2f} >= {min_probability:g}), in distribution, "
                        f"and the tagged {tag_label} is not among its two best"
                        + (f" (a fallback, toward {name}, on which no route runs a model)" if harmless else ""),
                        f"{model_name}, overruling the DICOM tags' {tag_label}", p)
        if not disagreement:
            if confident_and_known:
                return done(name, "model", "model and tags agree", f"{model_name}; the DICOM tags agree", p)
            return done(tag_label, "tags", "tags decide; the model agrees but is unsure or out of distribution",
                        f"{tags}; model agrees: {model.said()}")
        why = ("the tagged part is the model's second choice" if tag_label in model.names()
               else f"the model has no class for {tag_label}" if not model.knows(tag_label)
               else "the model is out of distribution" if not model.in_distribution
               else f"the model is unsure ({p:.2f} < {min_probability:g})" if not confident_and_known
               else "the model that answered is a fallback (the first was out of distribution); "
                    "a fallback does not overrule tags toward a part a route runs a model on")
        return done(tag_label, "tags", f"tags decide: {why}", f"{tags}; model said {model.said()}")
    if model is None:
        return done(None, "none", "anatomy unknown: no anatomy in the tags and no anatomy model",
                    f"unknown: no anatomy in the DICOM tags ({tag_evidence}) and no anatomy model")
    name, p = model.best
    if confident_and_known:
        return done(name, "model", f"no tag; model sure ({p:.2f} >= {min_probability:g}) and in distribution",
                    model_name, p)
    why = (f"the model is out of distribution ({evidence['model_ood']}; it said {name} {p:.2f})"
           if not model.in_distribution else f"the model is unsure ({name} {p:.2f} < {min_probability:g})")
    return done(None, "none", f"anatomy unknown: no anatomy in the tags and {why}",
                f"unknown: no anatomy in the DICOM tags and {why}")


def boneage_block(decision: Decision, model: ModelWitness | None) -> str | None:
    """Why bone age must not run on this study (None: it may). Only a study decided ``hand`` can get one.

    Without a model witness (a tags-only configuration, or an undecodable image) an unknown anatomy is left to the
    routes' own conditions, as before; a part that is not a hand still never gets a bone age.
    """
    if decision.label is None and model is None:
        return None
    if decision.label != HAND:
        return f"anatomy is {decision.label or 'unknown'}, not a hand"
    if decision.tag is not None and decision.tag != HAND:
        return f"the DICOM tags say {decision.tag} (the model overruled them: a disagreement bone age does not settle)"
    if model is not None and model.best[0] != HAND:
        return f"the anatomy model does not call it a hand (it said {model.said()})"
    return None
