"""What the analysis hands to the output builders: :class:`StudyResult` and its parts.

Enters from :mod:`daemon.analyse.pipeline`; read by :mod:`daemon.output.sr` and :mod:`daemon.output.sc`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ImageProbability", "MapPeak", "ModelProvenance", "StudyResult", "model_versions"]


@dataclass
class ModelProvenance:
    """Which weights produced a result: reported in the SR so a finding can be traced to a checkpoint."""

    name: str
    version: str
    sha256: str
    task: str


@dataclass(frozen=True)
class MapPeak:
    """Where a learnt localisation map is highest on one image (SCOORD image coordinates) and its value there."""

    column: float
    row: float
    probability: float


@dataclass
class ImageProbability:
    """One source image's abnormality probability, reported in the SR with a reference to that image.

    ``map_peak`` is the peak of the model's learnt map, when the model has one: for an image whose own
    probability reaches the threshold the SR names it as an image region (a SCOORD point).
    """

    sop_class_uid: str
    sop_instance_uid: str
    probability: float
    map_peak: MapPeak | None = None


@dataclass
class StudyResult:
    """Everything the worker learned about one study, as the result builders need it."""

    study_uid: str
    route: str
    anatomy: str | None
    anatomy_source: str
    anatomy_probability: float | None
    findings: dict[str, float | str] = field(default_factory=dict)
    models: list[ModelProvenance] = field(default_factory=list)
    not_processed_reason: str | None = None
    predecessor_sr: list[tuple[str, str, str, str]] = field(default_factory=list)
    #: Abnormality models: each image's own probability (the study's is their mean), reported per source image.
    image_probabilities: list[ImageProbability] = field(default_factory=list)
    #: Both witnesses of the anatomy, whichever decided: ``model_top1``/``model_top2`` ("knee 0.93"), ``tags``
    #: ("hand (BodyPartExamined=HAND)"), ``decided_by`` (model, tags or none) and ``disagreement`` (yes/no).
    anatomy_evidence: dict[str, str] = field(default_factory=dict)



def model_versions(result: StudyResult) -> list[str]:
    """Model identity for UID derivation: name, version and weights hash, in a stable order."""
    return sorted(f"{m.task}:{m.name}:{m.version}:{m.sha256}" for m in result.models)
