"""BoneBridge's results as DICOM objects a PACS stores and a viewer shows.

Per study there is one **TID 1500 Measurement Report** (a highdicom Comprehensive SR) and, per source
image with a heatmap, one **Secondary Capture** showing the heatmap over the radiograph. Both go into new
series of the *source* study, so they appear next to the images they describe.

SR content (all inside one TID 1501 "Measurements and Qualitative Evaluations" group, tracked per route):

=============================  ===========================================  =====================
item                           concept name                                 value
=============================  ===========================================  =====================
finding site                   SCT 363698007 (TID 1501)                     SCT anatomy code
bone age                       LN 85151-9 "Bone age"                        NUM, UCUM ``mo``
abnormality probability        99BB ABN-PROB                                NUM, UCUM ``{probability}``
abnormality threshold          99BB ABN-THRESH                              NUM, UCUM ``{probability}``
abnormality decision           99BB ABN-DECISION                            SCT Abnormal / Normal
fracture (fracture models)     SCT 125605004 "Fracture of bone"             SCT Present / Absent
image abnormality probability  99BB ABN-PROB, one per image, with its        NUM, UCUM ``{probability}``
                               source image (SELECTED FROM)
fracture map peak (one TID     SCOORD POINT on the source image, finding    NUM, UCUM ``{probability}``
1410 group per image at or     type SCT "Fracture of bone", with 99BB
above the threshold)           MAP-PEAK-PROB
predicted sex                  99BB SEX-PRED                                SCT Male / Female
predicted sex probability      99BB SEX-PROB                                NUM, ``{probability}``
sex mismatch                   99BB SEX-MISMATCH                            SCT Yes / No
sex source, anatomy, its       99BB SEX-SOURCE / ANATOMY / ANATOMY-SOURCE,  TEXT
source, route                  ROUTE
anatomy probability            99BB ANATOMY-PROB                            NUM, ``{probability}``
model (one per model)          99BB MODEL (name) with HAS PROPERTIES        TEXT
                               MODEL-VERSION, MODEL-SHA256, MODEL-TASK
not processed                  99BB NOT-PROCESSED                           TEXT (the reason)
=============================  ===========================================  =====================

Coding choices, and why:

* Bone age uses LOINC 85151-9 "XR Bone age" (a quantitative observation, reported in months here).
* Anatomy uses the SNOMED CT codes of the upper-extremity regions (hand 85562004, wrist 74670003,
  elbow 127949000, forearm 14975008, humerus 85050009, shoulder 16982005, finger 7569003) and, for the rest
  of the vocabulary, the codes pydicom's SCT dictionary gives (knee 72696002, lower leg 30021000, ankle
  joint 70258002, foot 56459004, hip 29836001, pelvis 816092008, femur 71341001, chest 816094009, spine
  421060004, skull 89546000, abdomen 818981001); "other" has no code and appears only as text. The anatomy
  model's top two, the tags' answer and which decided are TEXT items (99BB ANATOMY-MODEL-1/-2, ANATOMY-TAGS,
  ANATOMY-DECIDED-BY); their disagreement is a CODE item (99BB ANATOMY-DISAGREE, SCT Yes/No).
* A fracture model's decision is also coded as the finding SNOMED CT 125605004 "Fracture of bone" with the
  value Present (52101004) or Absent (272519000): the disorder concept SNOMED CT files every fracture under
  (the site is the group's finding site), so a query for fractures finds it; "Abnormal" alone does not say what.
* Decision, sex and yes/no values are standard SNOMED CT qualifiers. The *concept names* for a model's
  abnormality probability, its threshold, a predicted sex, provenance and the not-processed reason have
  no standard code, so they use the private coding scheme ``99BB`` (PS3.16 8.2: designators starting
  with "99" are local), declared in the Coding Scheme Identification Sequence.
* TID 1500 has no slot for model provenance or free text. Model name/version/sha256/task, the route and
  sources of anatomy and sex are TEXT items appended to the measurement group (Comprehensive SR allows
  them); the numeric results also carry a TID 4019 Algorithm Identification of the model that made them.
* The device observer (TID 1004) has no software-version row, so the BoneBridge version and the model
  versions go into the General Equipment module's Software Versions.
* The report is COMPLETE but PRELIMINARY and UNVERIFIED: it is machine output for a radiologist to
  confirm, not a signed report.

Both objects carry a private block (creator ``BONEBRIDGE 1.0``) so :func:`is_own_output` can spot them
when a PACS sends them back; Manufacturer, series number and description are the fallback for PACS that
strip private tags.

UIDs are derived (:func:`daemon.dicom.uids.derive_uid`) from the sources, the route and the model versions, so
a redelivered task rebuilds identical objects instead of duplicates.
"""

from __future__ import annotations

import logging
import importlib.metadata
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from daemon.dicom.decode import read_display_image
from daemon.dicom.header_values import Unreadable, copyable_header, unreadable_summary
from daemon.output.heatmap_render import HEATMAP_FLOOR, render_heatmap
from daemon.store.revisions import source_revision
from daemon.dicom.uids import derive_uid

__all__ = [
    "ANATOMY_CODES",
    "MANUFACTURER",
    "SC_SERIES_DESCRIPTION",
    "SC_SERIES_NUMBER",
    "SR_SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "PRIVATE_CREATOR",
    "MapPeak",
    "ModelProvenance",
    "StudyResult",
    "build_heatmap_sc",
    "build_sr",
    "is_own_output",
    "referenced_instances",
    "render_heatmap",
    "sc_uids",
    "sr_uids",
]

LOGGER = logging.getLogger(__name__)

MANUFACTURER = "BoneBridge"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "BoneBridge report"
SC_SERIES_DESCRIPTION = "BoneBridge heatmap"
PRIVATE_CREATOR = "BONEBRIDGE 1.0"
PRIVATE_GROUP = 0x0009
_PRIVATE_MARKER = 0x01  # LO "BoneBridge output"
_PRIVATE_KIND = 0x02  # CS "SR" / "SC"
_PRIVATE_ROUTE = 0x03  # LO route name
_MARKER_VALUE = "BoneBridge output"


# ------------------------------------------------------------------------------ codes
LOCAL_SCHEME = "99BB"


def _local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning)


CODE_BONE_AGE = CodedConcept(value="85151-9", scheme_designator="LN", meaning="Bone age")
CODE_ABNORMALITY_PROBABILITY = _local("ABN-PROB", "Abnormality probability")
CODE_ABNORMALITY_THRESHOLD = _local("ABN-THRESH", "Abnormality decision threshold")
CODE_ABNORMALITY_DECISION = _local("ABN-DECISION", "Abnormality decision")
CODE_PREDICTED_SEX = _local("SEX-PRED", "Predicted sex")
CODE_PREDICTED_SEX_PROBABILITY = _local("SEX-PROB", "Predicted sex probability")
CODE_SEX_SOURCE = _local("SEX-SOURCE", "Sex source")
CODE_SEX_MISMATCH = _local("SEX-MISMATCH", "Predicted sex differs from DICOM sex")
CODE_HAND_SIDE = _local("HAND-SIDE", "Hand side bone age was read on")
CODE_ANATOMY = _local("ANATOMY", "Anatomy")
CODE_MAP_PEAK_PROBABILITY = _local("MAP-PEAK-PROB", "Localisation map peak probability")
CODE_ANATOMY_SOURCE = _local("ANATOMY-SOURCE", "Anatomy source")
CODE_ANATOMY_PROBABILITY = _local("ANATOMY-PROB", "Anatomy probability")
CODE_ANATOMY_MODEL_TOP1 = _local("ANATOMY-MODEL-1", "Anatomy model first choice")
CODE_ANATOMY_MODEL_TOP2 = _local("ANATOMY-MODEL-2", "Anatomy model second choice")
CODE_ANATOMY_TAGS = _local("ANATOMY-TAGS", "Anatomy from DICOM tags")
CODE_ANATOMY_DECIDED_BY = _local("ANATOMY-DECIDED-BY", "Anatomy decided by")
CODE_ANATOMY_DISAGREEMENT = _local("ANATOMY-DISAGREE", "Anatomy model disagrees with DICOM tags")
CODE_ROUTE = _local("ROUTE", "BoneBridge route")
CODE_MODEL = _local("MODEL", "Model name")
CODE_MODEL_VERSION = _local("MODEL-VERSION", "Model version")
CODE_MODEL_SHA256 = _local("MODEL-SHA256", "Model weights SHA-256")
CODE_MODEL_TASK = _local("MODEL-TASK", "Model task")
CODE_NOT_PROCESSED = _local("NOT-PROCESSED", "Not processed")
CODE_UNREADABLE_ATTRIBUTE = _local("UNREADABLE-ATTR", "Unreadable source attribute")
CODE_RADIOGRAPHY = CodedConcept(value="363680008", scheme_designator="SCT", meaning="Radiographic imaging procedure")

UNIT_PROBABILITY = CodedConcept(value="{probability}", scheme_designator="UCUM", meaning="probability")
UNIT_MONTHS = CodedConcept.from_code(codes.UCUM.Month)

ANATOMY_CODES: dict[str, CodedConcept] = {
    "hand": CodedConcept("85562004", "SCT", "Hand"),
    "wrist": CodedConcept("74670003", "SCT", "Wrist joint"),
    "elbow": CodedConcept("127949000", "SCT", "Elbow region structure"),
    "forearm": CodedConcept("14975008", "SCT", "Forearm"),
    "humerus": CodedConcept("85050009", "SCT", "Humerus"),
    "shoulder": CodedConcept("16982005", "SCT", "Shoulder"),
    "finger": CodedConcept("7569003", "SCT", "Finger"),
    # The rest of the vocabulary: the codes pydicom's SCT dictionary (from DICOM PS3.16) names for these regions.
    "chest": CodedConcept.from_code(codes.SCT.Chest),
    "pelvis": CodedConcept.from_code(codes.SCT.Pelvis),
    "hip": CodedConcept.from_code(codes.SCT.Hip),
    "femur": CodedConcept.from_code(codes.SCT.Femur),
    "knee": CodedConcept.from_code(codes.SCT.Knee),
    "leg": CodedConcept.from_code(codes.SCT.LowerLeg),
    "ankle": CodedConcept.from_code(codes.SCT.AnkleJoint),
    "foot": CodedConcept.from_code(codes.SCT.Foot),
    "spine": CodedConcept.from_code(codes.SCT.Spine),
    "skull": CodedConcept.from_code(codes.SCT.Skull),
    "abdomen": CodedConcept.from_code(codes.SCT.Abdomen),
}
"""SNOMED CT finding sites for the anatomy names; "other" deliberately has none."""

CODE_FRACTURE = CodedConcept("125605004", "SCT", "Fracture of bone")
_PRESENCE_CODES = {"present": CodedConcept.from_code(codes.SCT.Present),
                   "absent": CodedConcept.from_code(codes.SCT.Absent)}
_DECISION_CODES = {
    "abnormal": CodedConcept.from_code(codes.SCT.Abnormal),
    "normal": CodedConcept.from_code(codes.SCT.Normal),
}
_SEX_CODES = {
    "M": CodedConcept("248153007", "SCT", "Male"),
    "F": CodedConcept("248152002", "SCT", "Female"),
}
_YES_NO_CODES = {"yes": CodedConcept.from_code(codes.SCT.Yes), "no": CodedConcept.from_code(codes.SCT.No)}

# Findings keys handled explicitly; anything else is still reported (NUM or TEXT) under a local code.
_KNOWN_FINDINGS = frozenset(
    {
        "bone_age_months",
        "abnormality_probability",
        "abnormality_threshold",
        "abnormality_decision",
        "fracture",
        "predicted_sex",
        "predicted_sex_probability",
        "sex_source",
        "sex_mismatch",
        "hand_side",
    }
)
# Which model task produced which finding (task names normalised: lower case, "-" -> "_").
_FINDING_TASK = {
    "bone_age_months": ("bone_age", "boneage"),
    "abnormality_probability": ("abnormality",),
    "abnormality_threshold": ("abnormality",),
    "predicted_sex_probability": ("sex",),
    "anatomy_probability": ("anatomy",),
}


# ----------------------------------------------------------------------- data model
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


# ------------------------------------------------------------------------- helpers
def _software_version() -> str:
    try:
        return importlib.metadata.version("bonebridge")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _model_versions(result: StudyResult) -> list[str]:
    """Model identity for UID derivation: name, version and weights hash, in a stable order."""
    return sorted(f"{m.task}:{m.name}:{m.version}:{m.sha256}" for m in result.models)


# Type 2 attributes highdicom reads unconditionally from the first evidence dataset.
_TYPE2_DEFAULTS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _checked_header(ds: Dataset) -> tuple[Dataset, list[Unreadable]]:
    """A copy of ``ds`` without pixel data or values invalid for their VR, with empty Type 2 attributes filled in.

    highdicom copies evidence datasets and checks what it copies: the pixel data of a 1760 x 1760 CR is dead
    weight there, a value invalid for its VR (PatientBirthDate ``abc``) would make it refuse the whole report, and
    a source that lacks (rather than leaves empty) e.g. AccessionNumber would make it fail. What was left out is
    returned, so the SR can say which attribute was unreadable.
    """
    header, dropped = copyable_header(ds)
    for keyword in _TYPE2_DEFAULTS:
        if keyword not in header:
            setattr(header, keyword, "")
    return header, dropped


def _header(ds: Dataset) -> Dataset:
    """:func:`_checked_header` without the list of what was left out."""
    return _checked_header(ds)[0]


def _task_model(result: StudyResult, finding: str) -> ModelProvenance | None:
    wanted = _FINDING_TASK.get(finding, ())
    for model in result.models:
        if model.task.lower().replace("-", "_") in wanted:
            return model
    return None


def _algorithm(model: ModelProvenance | None) -> AlgorithmIdentification | None:
    if model is None:
        return None
    return AlgorithmIdentification(
        name=model.name, version=model.version, parameters=[f"sha256={model.sha256}"]
    )


def _text(name: CodedConcept, value: str, relationship: str = "CONTAINS") -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=relationship)


def _as_float(value: float | str) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _yes_no(value: float | str | bool) -> str | None:
    text = str(value).strip().lower()
    if text in {"yes", "true", "1", "y"}:
        return "yes"
    if text in {"no", "false", "0", "n"}:
        return "no"
    return None


def _local_key_code(key: str) -> CodedConcept:
    """A local code for a findings key BoneBridge has no dedicated concept for (code value is SH: 16)."""
    value = "X-" + key.upper().replace("_", "-")
    if len(value) > 16:
        value = "X-" + derive_uid(key)[-14:]
    return _local(value, key.replace("_", " "))


def _measurements(result: StudyResult) -> tuple[list[Measurement], list[QualitativeEvaluation], list[Dataset]]:
    """Map ``result.findings`` to NUM, CODE and TEXT items (measurements, evaluations, extra items)."""
    findings = result.findings
    measurements: list[Measurement] = []
    evaluations: list[QualitativeEvaluation] = []
    extra: list[Dataset] = []

    def add_number(key: str, name: CodedConcept, unit: CodedConcept) -> None:
        if key not in findings:
            return
        number = _as_float(findings[key])
        if number is None:
            extra.append(_text(name, str(findings[key])))
            return
        measurements.append(
            Measurement(name=name, value=number, unit=unit, algorithm_id=_algorithm(_task_model(result, key)))
        )

    add_number("bone_age_months", CODE_BONE_AGE, UNIT_MONTHS)
    add_number("abnormality_probability", CODE_ABNORMALITY_PROBABILITY, UNIT_PROBABILITY)
    add_number("abnormality_threshold", CODE_ABNORMALITY_THRESHOLD, UNIT_PROBABILITY)
    add_number("predicted_sex_probability", CODE_PREDICTED_SEX_PROBABILITY, UNIT_PROBABILITY)

    if "abnormality_decision" in findings:
        decision = str(findings["abnormality_decision"]).strip().lower()
        if decision in _DECISION_CODES:
            evaluations.append(QualitativeEvaluation(CODE_ABNORMALITY_DECISION, _DECISION_CODES[decision]))
        else:
            extra.append(_text(CODE_ABNORMALITY_DECISION, decision))
    if str(findings.get("fracture", "")).lower() in _PRESENCE_CODES:
        evaluations.append(QualitativeEvaluation(CODE_FRACTURE, _PRESENCE_CODES[str(findings["fracture"]).lower()]))
    for image in result.image_probabilities:
        measurements.append(Measurement(
            name=CODE_ABNORMALITY_PROBABILITY, value=float(image.probability), unit=UNIT_PROBABILITY,
            algorithm_id=_algorithm(_task_model(result, "abnormality_probability")),
            referenced_images=[SourceImageForMeasurement(image.sop_class_uid, image.sop_instance_uid)],
        ))
    if "predicted_sex" in findings:
        sex = str(findings["predicted_sex"]).strip().upper()[:1]
        if sex in _SEX_CODES:
            evaluations.append(QualitativeEvaluation(CODE_PREDICTED_SEX, _SEX_CODES[sex]))
        else:
            extra.append(_text(CODE_PREDICTED_SEX, str(findings["predicted_sex"])))
    if "sex_mismatch" in findings:
        flag = _yes_no(findings["sex_mismatch"])
        if flag is not None:
            evaluations.append(QualitativeEvaluation(CODE_SEX_MISMATCH, _YES_NO_CODES[flag]))
        else:
            extra.append(_text(CODE_SEX_MISMATCH, str(findings["sex_mismatch"])))
    if "sex_source" in findings:
        extra.append(_text(CODE_SEX_SOURCE, str(findings["sex_source"])))
    if "hand_side" in findings:
        extra.append(_text(CODE_HAND_SIDE, str(findings["hand_side"])))

    for key in sorted(set(findings) - _KNOWN_FINDINGS):
        number = _as_float(findings[key]) if not isinstance(findings[key], str) else None
        if number is not None:
            measurements.append(
                Measurement(name=_local_key_code(key), value=number, unit=CodedConcept.from_code(codes.UCUM.NoUnits))
            )
        else:
            extra.append(_text(_local_key_code(key), str(findings[key])))
    return measurements, evaluations, extra


def _context_items(result: StudyResult) -> list[Dataset]:
    """Route, anatomy (with source and probability) and one provenance item per model."""
    items: list[Dataset] = [_text(CODE_ROUTE, result.route or "(none)")]
    items.append(_text(CODE_ANATOMY, result.anatomy or "unknown"))
    items.append(_text(CODE_ANATOMY_SOURCE, result.anatomy_source or "unknown"))
    evidence = result.anatomy_evidence
    for key, code in (("model_top1", CODE_ANATOMY_MODEL_TOP1), ("model_top2", CODE_ANATOMY_MODEL_TOP2),
                      ("tags", CODE_ANATOMY_TAGS), ("decided_by", CODE_ANATOMY_DECIDED_BY)):
        if evidence.get(key):
            items.append(_text(code, evidence[key]))
    if evidence.get("disagreement") in _YES_NO_CODES:
        # A mislabelled-study hint for radiology IT: the image looks like one part, the header names another.
        items.append(hd.sr.CodeContentItem(name=CODE_ANATOMY_DISAGREEMENT, value=_YES_NO_CODES[evidence["disagreement"]],
                                           relationship_type="CONTAINS"))
    for model in result.models:
        item = _text(CODE_MODEL, model.name)
        item.ContentSequence = hd.sr.ContentSequence(
            [
                _text(CODE_MODEL_VERSION, model.version, "HAS PROPERTIES"),
                _text(CODE_MODEL_SHA256, model.sha256, "HAS PROPERTIES"),
                _text(CODE_MODEL_TASK, model.task, "HAS PROPERTIES"),
            ]
        )
        items.append(item)
    return items


def _add_private_block(ds: Dataset, kind: str, route: str) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(_PRIVATE_MARKER, "LO", _MARKER_VALUE)
    block.add_new(_PRIVATE_KIND, "CS", kind)
    block.add_new(_PRIVATE_ROUTE, "LO", (route or "")[:64])


def _predecessors(result: StudyResult) -> list[Dataset] | None:
    """Minimal datasets for highdicom's Predecessor Documents Sequence (it groups them by series)."""
    if not result.predecessor_sr:
        return None
    previous = []
    for study_uid, series_uid, sop_class_uid, sop_instance_uid in result.predecessor_sr:
        ref = Dataset()
        ref.StudyInstanceUID = study_uid
        ref.SeriesInstanceUID = series_uid
        ref.SOPClassUID = sop_class_uid
        ref.SOPInstanceUID = sop_instance_uid
        previous.append(ref)
    return previous


# ---------------------------------------------------------------------------- SR
def sr_uids(sources: Sequence[Dataset], result: StudyResult) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR for these sources and this result."""
    study_uid = str(sources[0].StudyInstanceUID) if sources else result.study_uid
    series_uid = derive_uid(study_uid, result.route, "sr")
    kind = "not-processed" if result.not_processed_reason is not None else "findings"
    sop_uid = derive_uid(
        *sorted(_source_identity(ds) for ds in sources), result.route, *_model_versions(result), "sr", kind
    )
    return series_uid, sop_uid


def _source_identity(ds: Dataset) -> str:
    """A source's UID, with its revision when the spool replaced its content (:mod:`daemon.store.revisions`)."""
    revision = source_revision(ds)
    return str(ds.SOPInstanceUID) + (f"#{revision}" if revision else "")


def _library_entries(headers: list[Dataset]) -> list[Dataset]:
    """The sources highdicom can describe in the TID 1600 Image Library.

    highdicom's descriptors need e.g. PatientOrientation and ImagerPixelSpacing for radiographs, which many CR
    files lack (pydicom-data's RG1 chest among them). Such images stay referenced by the measurement group's
    source images and the evidence sequence; only their optional library entry is left out.
    """
    from highdicom.sr.templates import ImageLibraryEntryDescriptors

    usable = []
    for header in headers:
        try:
            ImageLibraryEntryDescriptors(header)
        except (AttributeError, ValueError, TypeError, IndexError) as exc:
            LOGGER.debug("image %s left out of the image library: %s", header.SOPInstanceUID, exc)
            continue
        usable.append(header)
    return usable


def _map_peak_groups(result: StudyResult, finding_site: CodedConcept | None) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 planar-ROI group per image the model calls fractured on its own: where its map points.

    The region is a SCOORD POINT at the map's peak on the source image, the finding type SNOMED CT "Fracture of
    bone" (or "Abnormal" for a model not trained on fractures), with the map's probability there. Images below
    the threshold get none: a point on an image the model calls normal would only invite a search for nothing.
    """
    threshold = _as_float(result.findings.get("abnormality_threshold", 0.5))
    threshold = 0.5 if threshold is None else threshold
    fracture_model = "fracture" in result.findings
    algorithm = _algorithm(_task_model(result, "abnormality_probability"))
    groups = []
    for index, image in enumerate(result.image_probabilities, start=1):
        peak = image.map_peak
        if peak is None or image.probability < threshold:
            continue
        region = ImageRegion(
            graphic_type=GraphicTypeValues.POINT,
            graphic_data=np.array([[peak.column, peak.row]], dtype=float),
            source_image=SourceImageForRegion(image.sop_class_uid, image.sop_instance_uid),
        )
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=derive_uid(result.study_uid, result.route, image.sop_instance_uid, "map-peak"),
                identifier=f"BoneBridge map peak, image {index}",
            ),
            referenced_region=region,
            finding_type=CODE_FRACTURE if fracture_model else _DECISION_CODES["abnormal"],
            finding_sites=[FindingSite(anatomic_location=finding_site)] if finding_site else None,
            algorithm_id=algorithm,
            measurements=[Measurement(name=CODE_MAP_PEAK_PROBABILITY, value=float(peak.probability),
                                      unit=UNIT_PROBABILITY, algorithm_id=algorithm)],
        ))
    return groups


def build_sr(sources: list[Dataset], result: StudyResult) -> Dataset:
    """Build the study's TID 1500 Measurement Report (Comprehensive SR) in a new series of its study.

    ``result.not_processed_reason`` set gives the same document shape with a "Not processed" item and
    the reason instead of measurements. Patient and study attributes come from ``sources[0]``.

    Raises:
        ValueError: no sources, or sources from a study other than ``result.study_uid``.
    """
    if not sources:
        raise ValueError("build_sr needs at least one source image")
    study_uids = {str(ds.StudyInstanceUID) for ds in sources}
    if study_uids != {result.study_uid}:
        raise ValueError(f"sources belong to {sorted(study_uids)}, result is for {result.study_uid}")

    checked = [_checked_header(ds) for ds in sources]
    headers = [header for header, _ in checked]
    unreadable = unreadable_summary([item for _, dropped in checked for item in dropped], len(sources))
    series_uid, sop_uid = sr_uids(sources, result)
    model_name = " + ".join(m.name for m in result.models) or MANUFACTURER

    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derive_uid("bonebridge-device", model_name),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=model_name,
        ),
    )

    if result.not_processed_reason is not None:
        measurements: list[Measurement] = []
        evaluations: list[QualitativeEvaluation] = []
        extra: list[Dataset] = [_text(CODE_NOT_PROCESSED, result.not_processed_reason or "no reason given")]
    else:
        measurements, evaluations, extra = _measurements(result)
        if result.anatomy_probability is not None:
            measurements.append(
                Measurement(
                    name=CODE_ANATOMY_PROBABILITY,
                    value=float(result.anatomy_probability),
                    unit=UNIT_PROBABILITY,
                    algorithm_id=_algorithm(_task_model(result, "anatomy_probability")),
                )
            )

    finding_site = ANATOMY_CODES.get((result.anatomy or "").lower())
    single_model = result.models[0] if len(result.models) == 1 else None
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derive_uid(result.study_uid, result.route, "tracking"),
            identifier=f"BoneBridge {result.route or 'study'}"[:64],
        ),
        algorithm_id=_algorithm(single_model),
        finding_sites=[FindingSite(anatomic_location=finding_site)] if finding_site else None,
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=[
            SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(ds.SOPClassUID),
                referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            )
            for ds in sources
        ],
    )
    # TID 1500 has no slot for these; Comprehensive SR allows TEXT/CODE items in the group container.
    group[0].ContentSequence.extend(extra + _context_items(result)
                                    + [_text(CODE_UNREADABLE_ATTRIBUTE, line) for line in unreadable])

    regions = [] if result.not_processed_reason is not None else _map_peak_groups(result, finding_site)
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CODE_RADIOGRAPHY,
        imaging_measurements=[group, *regions],
        referenced_images=_library_entries(headers) or None,
    )

    sr = ComprehensiveSR(
        evidence=headers,
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        previous_versions=_predecessors(result),
    )
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.ManufacturerModelName = model_name[:64]
    sr.SoftwareVersions = [f"bonebridge {_software_version()}"] + [
        f"{m.name} {m.version}"[:64] for m in result.models
    ]
    scheme = Dataset()
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "BoneBridge local concepts"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    _add_private_block(sr, "SR", result.route)
    return sr


# ---------------------------------------------------------------------------- SC
def _years_months(months: float) -> str:
    whole = int(round(months))
    return f"{whole // 12} y {whole % 12} mo"


def heatmap_caption(result: StudyResult, source: Dataset) -> list[str]:
    """The SC's caption: the finding in words, anatomy and its source, the models, what the colours mean.

    Only findings and model names: no patient name or id (the viewer shows those from the header anyway).
    """
    findings = result.findings
    lines: list[str] = []
    if "bone_age_months" in findings:
        months = float(findings["bone_age_months"])
        line = f"Bone age {_years_months(months)} ({months:.0f} months)"
        if "predicted_sex" in findings:
            # The sex the age was computed for: the header's when it has one, else the model's guess.
            header_sex = str(getattr(source, "PatientSex", "") or "").strip().upper()
            if findings.get("sex_source") == "dicom" and header_sex in ("M", "F"):
                line += f"; sex {header_sex} (from DICOM PatientSex)"
                if str(findings.get("sex_mismatch", "no")) == "yes":
                    line += f"; the model reads {findings['predicted_sex']}, contradicting the header"
            else:
                line += f"; sex {findings['predicted_sex']} (predicted by the model)"
        if "mirrored" in str(findings.get("hand_side", "")):
            line += "; read as a right hand, mirrored to the left-hand standard"
        lines.append(line)
    if "abnormality_probability" in findings:
        threshold = float(findings.get("abnormality_threshold", 0.5))
        probability = float(findings["abnormality_probability"])
        what = "Fracture" if "fracture" in findings else "Abnormality"
        decision = ("FRACTURE" if findings["fracture"] == "present" else "no fracture") if "fracture" in findings \
            else str(findings.get("abnormality_decision", "")).upper()
        line = f"{what} probability {probability:.2f} (study) - {decision} at threshold {threshold:.2f}"
        this_image = next((i.probability for i in result.image_probabilities
                           if i.sop_instance_uid == str(source.SOPInstanceUID)), None)
        if this_image is not None:
            line += f"; this image {this_image:.2f}"
        lines.append(line)
    if result.anatomy:
        probability = f" {result.anatomy_probability:.2f}" if result.anatomy_probability is not None else ""
        lines.append(f"Anatomy: {result.anatomy}{probability} ({result.anatomy_source})")
    models = ", ".join(f"{m.name} {m.version}" for m in result.models if m.task != "anatomy")
    lines.append(f"Model: {models or 'none'}. Colours: where the model found evidence (scale at right; grey below "
                 f"{HEATMAP_FLOOR:.1f} is not drawn)")
    return lines


def sc_uids(source: Dataset, result: StudyResult, index: int) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the heatmap SC for this source image."""
    series_uid = derive_uid(str(source.StudyInstanceUID), result.route, "sc")
    sop_uid = derive_uid(_source_identity(source), result.route, *_model_versions(result), "sc", str(index))
    return series_uid, sop_uid


def build_heatmap_sc(
    source: Dataset,
    heatmap: np.ndarray,
    result: StudyResult,
    index: int,
    *,
    display_image: np.ndarray | None = None,
) -> Dataset:
    """Build an RGB Secondary Capture of ``heatmap`` over ``source`` in a new series of its study.

    ``index`` is the position of the source in the study (InstanceNumber = index + 1). The colours are
    burned in, so BurnedInAnnotation is YES; ImageType is DERIVED\\SECONDARY and the conversion type WSD.
    ``display_image`` is the source's :func:`~daemon.dicom.decode.read_display_image` output when the caller
    already has it (saves decoding a large radiograph twice); by default the source is decoded here.

    Raises:
        daemon.dicom.decode.DecodeError: the source's pixel data cannot be decoded.
        ValueError: ``heatmap`` (or ``display_image``) is not 2-D.
    """
    gray = read_display_image(source) if display_image is None else np.asarray(display_image, dtype=np.float32)
    if gray.ndim != 2:
        raise ValueError(f"display_image must be a 2-D array, got shape {gray.shape}")
    rgb = render_heatmap(gray, heatmap, heatmap_caption(result, source))
    series_uid, sop_uid = sc_uids(source, result, index)
    models = ", ".join(f"{m.name} {m.version} (sha256 {m.sha256[:12]})" for m in result.models) or "unknown model"
    software = _software_version()

    header = _header(source)  # every value below is read from this checked copy, never from the source
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=index + 1,
        manufacturer=MANUFACTURER,
        # highdicom insists on an orientation for PATIENT images; the source's own is restored below.
        patient_orientation=("L", "F"),
        # Explicit VR keeps the private block's VRs readable by anyone (implicit turns them into UN).
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[
            hd.ContributingEquipment(
                manufacturer=MANUFACTURER,
                purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=(" + ".join(m.name for m in result.models) or MANUFACTURER)[:64],
                software_versions=f"bonebridge {software}",
                contribution_description="Machine-generated heatmap (model saliency) over the source radiograph",
            )
        ],
    )
    if "PatientOrientation" in header:
        sc.PatientOrientation = header.PatientOrientation
    else:
        sc.PatientOrientation = ""
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    # A paired body part needs its side: as ImageLaterality (General Image) when the source says it, which makes
    # the series' Laterality (Type 2C) not allowed; else the source's own Laterality, as it was (dciodvfy checks).
    side = str(header.get("ImageLaterality", "") or header.get("Laterality", "") or "").strip().upper()
    if side in ("R", "L", "U", "B"):
        sc.ImageLaterality = side
    elif "Laterality" in header:
        sc.Laterality = header.Laterality
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    # Lossy compression anywhere upstream makes the derived image lossy too (PS3.3 C.7.6.1.1.5).
    if str(header.get("LossyImageCompression", "")) == "01":
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in header:
                setattr(sc, keyword, header[keyword].value)
    else:
        sc.LossyImageCompression = "00"
    sc.ManufacturerModelName = (" + ".join(m.name for m in result.models) or MANUFACTURER)[:64]
    sc.SoftwareVersions = f"bonebridge {software}"
    sc.DerivationDescription = (
        f"Machine-generated by BoneBridge {software}: heatmap of {models} "
        f"(route {result.route or 'none'}) blended over the source radiograph"
    )[:1024]
    sc.ImageComments = "Machine-generated heatmap; colours show where the model looked, not a diagnosis."
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [
        CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [reference]
    _add_private_block(sc, "SC", result.route)
    return sc


# ---------------------------------------------------------------------- own outputs
def _private_marker(ds: Dataset) -> bool:
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return False
    if _PRIVATE_MARKER not in block:
        return False
    value = block[_PRIVATE_MARKER].value
    if isinstance(value, bytes):  # VR UN after an implicit VR hop through a PACS
        value = value.decode("ascii", errors="replace")
    return str(value).strip(" \x00") == _MARKER_VALUE


def _observer_is_us(ds: Dataset) -> bool:
    """An SR whose device observer (TID 1004, root level) is BoneBridge."""
    wanted = codes.DCM.DeviceObserverManufacturer.value
    for item in ds.get("ContentSequence", []) or []:
        concept = item.get("ConceptNameCodeSequence")
        if concept and concept[0].get("CodeValue") == wanted and str(item.get("TextValue", "")) == MANUFACTURER:
            return True
    return False


def is_own_output(ds: Dataset) -> bool:
    """True for an SR or SC BoneBridge made, so it is never processed again when a PACS sends it back.

    Checks, in order: our private block; Manufacturer "BoneBridge" with our series number or series
    description (private tags can be stripped by a PACS); an SR whose device observer manufacturer is
    BoneBridge. A source image is never matched: its Manufacturer is the modality's.
    """
    if _private_marker(ds):
        return True
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    if manufacturer.lower() != MANUFACTURER.lower():
        return False
    try:
        series_number = int(ds.get("SeriesNumber")) if ds.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    description = str(ds.get("SeriesDescription", "") or "").strip().lower()
    if series_number in (SR_SERIES_NUMBER, SC_SERIES_NUMBER):
        return True
    if description in (SR_SERIES_DESCRIPTION.lower(), SC_SERIES_DESCRIPTION.lower()):
        return True
    return _observer_is_us(ds)


def referenced_instances(sr: Dataset) -> list[str]:
    """SOPInstanceUIDs of the images an SR's evidence lists (for tests and the CLI)."""
    uids: list[str] = []
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []) or []:
        for series in study.get("ReferencedSeriesSequence", []) or []:
            uids.extend(str(ref.ReferencedSOPInstanceUID) for ref in series.get("ReferencedSOPSequence", []) or [])
    return uids
