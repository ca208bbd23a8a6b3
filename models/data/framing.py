"""The ways real radiographs differ from a training set's framing, as reproducible transforms of a test image.

A model is judged on images it never saw, *at the framing a PACS sends*. A hand reaches BoneBridge cropped tightly
by a technologist, zoomed out on a large detector, rotated on the plate, or as an inverted (MONOCHROME1) CR; a
model that only holds at the framing it was trained on gives different answers for the same hand. ``bonebridge
evaluate boneage --variants`` runs the test split through each of these and reports the figures side by side.

- ``tight_crop_black``: cropped to the hand's silhouette (no margin) with everything outside it set to black.
- ``zoomed_out``: the image shrunk to half its size in the middle of a black field of the original size.
- ``rotated_plus_15`` / ``rotated_minus_15``: rotated by 15 degrees, the corners filled with black.
- ``monochrome1_dicom``: inverted and written as a 12-bit MONOCHROME1 DICOM, then read back through the daemon's
  decoder (so the inversion and windowing the daemon applies are part of what is measured).
- ``right_hand_stated`` / ``right_hand_unstated``: mirrored, as a right hand looks, with ImageLaterality R in the
  header (bone age mirrors it back: the figures should equal the image as sent) or without a side (what a
  right hand costs a model trained on left hands). Outside the issue's list; :data:`VARIANT_LATERALITY` gives the
  header side each variant comes with.
- ``segmented_equalised`` / ``clahe``: not framing but a site's processing (:mod:`models.data.site_processing`): the hand
  segmented onto black and contrast-equalised, as another pipeline sent 60 hands in issue 30; and CLAHE, as many
  exports and public sets (the OAI knees) apply it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from models.data.site_processing import clahe, segmented_equalised, silhouette

VARIANTS: tuple[str, ...] = (
    "tight_crop_black", "zoomed_out", "rotated_plus_15", "rotated_minus_15", "monochrome1_dicom",
    "right_hand_stated", "right_hand_unstated", "segmented_equalised", "clahe",
)
#: Variants that change the hand's side rather than its framing.
SIDE_VARIANTS: frozenset[str] = frozenset({"right_hand_stated", "right_hand_unstated"})
#: The header's ImageLaterality each variant arrives with (None: the header does not say).
VARIANT_LATERALITY: dict[str, str | None] = {"right_hand_stated": "R"}


def tight_crop_black(image: np.ndarray) -> np.ndarray:
    mask = silhouette(image)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    out = np.where(mask, image, 0.0).astype(np.float32)
    return out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def zoomed_out(image: np.ndarray, factor: float = 0.5) -> np.ndarray:
    small = ndimage.zoom(image.astype(np.float32), factor, order=1)
    out = np.zeros_like(image, dtype=np.float32)
    top, left = (image.shape[0] - small.shape[0]) // 2, (image.shape[1] - small.shape[1]) // 2
    out[top:top + small.shape[0], left:left + small.shape[1]] = small
    return out


def rotated(image: np.ndarray, degrees: float) -> np.ndarray:
    return np.clip(ndimage.rotate(image.astype(np.float32), degrees, reshape=True, order=1, cval=0.0), 0, 1)


def monochrome1_round_trip(image: np.ndarray) -> np.ndarray:
    """Write the image as an inverted 12-bit MONOCHROME1 DX and read it back through :mod:`models.display_image`."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from models.display_image import read_display_image

    top = 4095
    pixels = np.round((1.0 - np.clip(image, 0, 1)) * top).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "variant.dcm"
        ds.save_as(path, enforce_file_format=True)
        return read_display_image(pydicom.dcmread(path))


def make_variant(image: np.ndarray, name: str) -> np.ndarray:
    """``image`` (float32 HxW in [0, 1], bone bright) as the named variant; raises on an unknown name."""
    if name == "tight_crop_black":
        return tight_crop_black(image)
    if name == "zoomed_out":
        return zoomed_out(image)
    if name == "rotated_plus_15":
        return rotated(image, 15.0)
    if name == "rotated_minus_15":
        return rotated(image, -15.0)
    if name == "monochrome1_dicom":
        return monochrome1_round_trip(image)
    if name == "segmented_equalised":
        return segmented_equalised(image)
    if name == "clahe":
        return clahe(image)
    if name in SIDE_VARIANTS:
        return np.ascontiguousarray(image[:, ::-1], dtype=np.float32)
    raise ValueError(f"unknown framing variant {name!r}; choose from {', '.join(VARIANTS)}")
