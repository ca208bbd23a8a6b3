"""Small synthetic radiographs for tests.

Real radiographs from ``pydicom-data`` are large (1760 x 1760) and carry fixed UIDs and tags; many
tests instead need a few small images whose study, body part, age and sex they choose. ``make_dx``
writes a Digital X-Ray Image *For Presentation* file with the modules a PACS and BoneBridge look at
(patient, study, series, equipment, image, DX image), 16-bit MONOCHROME2 pixels (a gradient plus
noise: nothing here needs a real hand) in Explicit VR Little Endian with a proper file meta header.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

BITS_STORED = 12


def dx_pixels(size: int, seed: int = 0) -> np.ndarray:
    """A ``size x size`` uint16 image: diagonal gradient plus noise, within 12 bits."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.1, 0.9, size, dtype=np.float64)
    base = (ramp[:, None] + ramp[None, :]) / 2.0
    noise = rng.normal(0.0, 0.03, size=(size, size))
    top = (1 << BITS_STORED) - 1
    return np.clip((base + noise) * top, 0, top).astype(np.uint16)


def make_dx(
    path: str | Path,
    *,
    study_uid: str | None = None,
    body_part: str | None = "HAND",
    age: str | None = "010Y",
    sex: str | None = "M",
    size: int = 256,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    patient_id: str = "BB-TEST-0001",
    patient_name: str = "Test^Patient",
    study_description: str | None = None,
    modality: str = "DX",
    instance_number: int = 1,
    accession_number: str = "ACC0001",
    laterality: str = "L",
    seed: int | None = None,
    pixels: np.ndarray | None = None,
) -> Dataset:
    """Write a small DX For Presentation file to ``path`` and return the dataset written.

    UIDs not given are generated, so two calls with the same ``study_uid`` make two instances of one
    study. The returned dataset has ``filename`` set to the written path. ``body_part``, ``age`` and
    ``sex`` map to BodyPartExamined, PatientAge and PatientSex: ``None`` leaves the attribute out,
    ``""`` writes it empty (routing tests need both kinds of missing value). ``pixels`` (uint16 within 12 bits,
    or float in [0, 1]) replaces the gradient with a real radiograph's pixels; ``study_description=""`` and
    ``body_part=None`` then make an untagged study, as many PACS send.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    # SOP common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    if sex is not None:
        ds.PatientSex = sex
    # General study / patient study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.AccessionNumber = accession_number
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = study_description if study_description is not None else f"XR {body_part or 'UNKNOWN'}"
    if age is not None:
        ds.PatientAge = age
    # General series / DX series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = f"{body_part} PA" if body_part else ""
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Laterality = ""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    # General equipment
    ds.Manufacturer = "BoneBridge test factory"
    ds.InstitutionName = "Test"
    # General image / DX anatomy imaged
    ds.InstanceNumber = instance_number
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.PatientOrientation = ["R", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageLaterality = laterality
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # DX image / image pixel
    top = (1 << BITS_STORED) - 1
    if pixels is None:
        pixels = dx_pixels(size, seed=seed if seed is not None else instance_number)
    elif np.issubdtype(pixels.dtype, np.floating):
        pixels = np.clip(np.round(pixels * top), 0, top).astype(np.uint16)
    else:
        pixels = np.clip(pixels, 0, top).astype(np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter = 1 << (BITS_STORED - 1)
    ds.WindowWidth = 1 << BITS_STORED
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PixelSpacing = [0.2, 0.2]
    ds.DetectorType = "SCINTILLATOR"
    ds.PixelData = pixels.tobytes()

    ds.save_as(path, enforce_file_format=True)
    ds.filename = str(path)
    return ds


def make_study(
    folder: str | Path, count: int = 2, *, study_uid: str | None = None, **kwargs: object
) -> list[Dataset]:
    """Write ``count`` instances of one study (one series) into ``folder``; returns their datasets."""
    folder = Path(folder)
    study_uid = study_uid or generate_uid()
    series_uid = str(kwargs.pop("series_uid", None) or generate_uid())
    return [
        make_dx(folder / f"IM{i:04d}.dcm", study_uid=study_uid, series_uid=series_uid, instance_number=i, **kwargs)  # type: ignore[arg-type]
        for i in range(1, count + 1)
    ]
