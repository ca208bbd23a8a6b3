"""The study's report: one **TID 1500 Measurement Report** (a highdicom Comprehensive SR) per study, in series
9901 "BoneBridge report" of the *source* study, so it appears next to the images it describes. The heatmap
Secondary Captures are :mod:`daemon.output.sc`; the codes and why they were chosen, :mod:`daemon.output.codes`.

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

UIDs are derived (:func:`daemon.dicom.uids.derive_uid`) from the sources, the route and the model versions, so
a redelivered task rebuilds identical objects instead of duplicates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

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

from daemon.dicom.header_values import unreadable_summary
from daemon.dicom.uids import derive_uid
from daemon.output.codes import (
    ANATOMY_CODES,
    CODE_ABNORMALITY_DECISION,
    CODE_ABNORMALITY_PROBABILITY,
    CODE_ABNORMALITY_THRESHOLD,
    CODE_ANATOMY,
    CODE_ANATOMY_DECIDED_BY,
    CODE_ANATOMY_FALLBACK,
    CODE_ANATOMY_DISAGREEMENT,
    CODE_ANATOMY_MODEL_TOP1,
    CODE_ANATOMY_MODEL_TOP2,
    CODE_ANATOMY_PROBABILITY,
    CODE_ANATOMY_SOURCE,
    CODE_ANATOMY_TAGS,
    CODE_BONE_AGE,
    CODE_FRACTURE,
    CODE_HAND_SIDE,
    CODE_MAP_PEAK_PROBABILITY,
    CODE_MODEL,
    CODE_MODEL_SHA256,
    CODE_MODEL_TASK,
    CODE_MODEL_VERSION,
    CODE_NOT_PROCESSED,
    CODE_PREDICTED_SEX,
    CODE_PREDICTED_SEX_PROBABILITY,
    CODE_RADIOGRAPHY,
    CODE_ROUTE,
    CODE_SEX_MISMATCH,
    CODE_SEX_SOURCE,
    CODE_UNREADABLE_ATTRIBUTE,
    DECISION_CODES,
    FINDING_TASK,
    KNOWN_FINDINGS,
    LOCAL_SCHEME,
    PRESENCE_CODES,
    SEX_CODES,
    UNIT_MONTHS,
    UNIT_PROBABILITY,
    YES_NO_CODES,
    local_code,
)
from daemon.output.own_output import MANUFACTURER, SR_SERIES_DESCRIPTION, SR_SERIES_NUMBER, mark_own_output, software_version
from daemon.output.sources import checked_header, source_identity
from daemon.output.study_result import ModelProvenance, StudyResult, model_versions

__all__ = ["build_sr", "referenced_instances", "sr_uids"]

LOGGER = logging.getLogger(__name__)


def _task_model(result: StudyResult, finding: str) -> list[ModelProvenance]:
    """The models whose outputs gave ``finding``: one, or every member of an output ensemble (lead first)."""
    wanted = FINDING_TASK.get(finding, ())
    return [model for model in result.models if model.task.lower().replace("-", "_") in wanted]


def _algorithm(models: ModelProvenance | list[ModelProvenance] | None) -> AlgorithmIdentification | None:
    """TID 4019 Algorithm Identification; an output ensemble reads "A + B", its versions "1 + 2", each sha256."""
    models = [models] if isinstance(models, ModelProvenance) else list(models or [])
    if not models:
        return None
    return AlgorithmIdentification(
        name=" + ".join(m.name for m in models), version=" + ".join(m.version for m in models),
        parameters=[f"sha256={m.sha256}" for m in models],
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
    return local_code(value, key.replace("_", " "))


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
        if decision in DECISION_CODES:
            evaluations.append(QualitativeEvaluation(CODE_ABNORMALITY_DECISION, DECISION_CODES[decision]))
        else:
            extra.append(_text(CODE_ABNORMALITY_DECISION, decision))
    if str(findings.get("fracture", "")).lower() in PRESENCE_CODES:
        evaluations.append(QualitativeEvaluation(CODE_FRACTURE, PRESENCE_CODES[str(findings["fracture"]).lower()]))
    for image in result.image_probabilities:
        measurements.append(Measurement(
            name=CODE_ABNORMALITY_PROBABILITY, value=float(image.probability), unit=UNIT_PROBABILITY,
            algorithm_id=_algorithm(_task_model(result, "abnormality_probability")),
            referenced_images=[SourceImageForMeasurement(image.sop_class_uid, image.sop_instance_uid)],
        ))
    if "predicted_sex" in findings:
        sex = str(findings["predicted_sex"]).strip().upper()[:1]
        if sex in SEX_CODES:
            evaluations.append(QualitativeEvaluation(CODE_PREDICTED_SEX, SEX_CODES[sex]))
        else:
            extra.append(_text(CODE_PREDICTED_SEX, str(findings["predicted_sex"])))
    if "sex_mismatch" in findings:
        flag = _yes_no(findings["sex_mismatch"])
        if flag is not None:
            evaluations.append(QualitativeEvaluation(CODE_SEX_MISMATCH, YES_NO_CODES[flag]))
        else:
            extra.append(_text(CODE_SEX_MISMATCH, str(findings["sex_mismatch"])))
    if "sex_source" in findings:
        extra.append(_text(CODE_SEX_SOURCE, str(findings["sex_source"])))
    if "hand_side" in findings:
        extra.append(_text(CODE_HAND_SIDE, str(findings["hand_side"])))

    for key in sorted(set(findings) - KNOWN_FINDINGS):
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
                      ("tags", CODE_ANATOMY_TAGS), ("decided_by", CODE_ANATOMY_DECIDED_BY),
                      ("model_fallback", CODE_ANATOMY_FALLBACK)):
        if evidence.get(key):
            items.append(_text(code, evidence[key]))
    if evidence.get("disagreement") in YES_NO_CODES:
        # A mislabelled-study hint for radiology IT: the image looks like one part, the header names another.
        items.append(hd.sr.CodeContentItem(name=CODE_ANATOMY_DISAGREEMENT, value=YES_NO_CODES[evidence["disagreement"]],
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
        *sorted(source_identity(ds) for ds in sources), result.route, *model_versions(result), "sr", kind
    )
    return series_uid, sop_uid



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
            finding_type=CODE_FRACTURE if fracture_model else DECISION_CODES["abnormal"],
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

    checked = [checked_header(ds) for ds in sources]
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
    sr.SoftwareVersions = [f"bonebridge {software_version()}"] + [
        f"{m.name} {m.version}"[:64] for m in result.models
    ]
    scheme = Dataset()
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "BoneBridge local concepts"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    mark_own_output(sr, "SR", result.route)
    return sr



def referenced_instances(sr: Dataset) -> list[str]:
    """SOPInstanceUIDs of the images an SR's evidence lists (for tests and the CLI)."""
    uids: list[str] = []
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []) or []:
        for series in study.get("ReferencedSeriesSequence", []) or []:
            uids.extend(str(ref.ReferencedSOPInstanceUID) for ref in series.get("ReferencedSOPSequence", []) or [])
    return uids
