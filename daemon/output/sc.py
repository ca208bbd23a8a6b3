"""The heatmap Secondary Capture: one per source image, the radiograph tinted where the model found evidence, with
a caption in words (:func:`heatmap_caption`), in series 9902 "BoneBridge heatmap" of the source study.

UIDs are derived (:func:`daemon.dicom.uids.derive_uid`) from the source, the route and the model versions, so a
redelivered task rebuilds identical objects instead of duplicates.
"""

from __future__ import annotations

import numpy as np
from highdicom.sr import CodedConcept
import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from models.display_image import read_display_image
from daemon.dicom.uids import derive_uid
from daemon.output.heatmap_render import HEATMAP_FLOOR, render_heatmap
from daemon.output.own_output import MANUFACTURER, SC_SERIES_DESCRIPTION, SC_SERIES_NUMBER, mark_own_output, software_version
from daemon.output.sources import copied_header, source_identity
from daemon.output.study_result import StudyResult, model_versions

__all__ = ["build_heatmap_sc", "heatmap_caption", "sc_uids"]


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
    sop_uid = derive_uid(source_identity(source), result.route, *model_versions(result), "sc", str(index))
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
    ``display_image`` is the source's :func:`~models.display_image.read_display_image` output when the caller
    already has it (saves decoding a large radiograph twice); by default the source is decoded here.

    Raises:
        models.display_image.DecodeError: the source's pixel data cannot be decoded.
        ValueError: ``heatmap`` (or ``display_image``) is not 2-D.
    """
    gray = read_display_image(source) if display_image is None else np.asarray(display_image, dtype=np.float32)
    if gray.ndim != 2:
        raise ValueError(f"display_image must be a 2-D array, got shape {gray.shape}")
    rgb = render_heatmap(gray, heatmap, heatmap_caption(result, source))
    series_uid, sop_uid = sc_uids(source, result, index)
    models = ", ".join(f"{m.name} {m.version} (sha256 {m.sha256[:12]})" for m in result.models) or "unknown model"
    software = software_version()

    header = copied_header(source)  # every value below is read from this checked copy, never from the source
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
    mark_own_output(sc, "SC", result.route)
    return sc
