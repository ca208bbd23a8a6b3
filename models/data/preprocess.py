"""One preprocessing path for training and inference.

Every image a model sees, during training or in the daemon, goes through :func:`to_model_input`, driven by a
:class:`Geometry` that is stored in the model card. That is what keeps inference identical to training: the
daemon never chooses a size, an aspect policy or a normalisation on its own.

Images enter as float32 arrays in [0, 1], MONOCHROME2 (bone bright). DICOM decoding (VOI LUT, MONOCHROME1
inversion, compressed transfer syntaxes) lives in :mod:`models.display_image`; :func:`load_image` accepts both DICOM and
PNG/JPEG files and calls it for DICOM, so the training commands can read either.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: One grey level for all three channels, (x - 0.45) / 0.25: what a grayscale radiograph in [0, 1] spans (issue 30's
#: recipe; ImageNet's per-channel colour statistics mean nothing for a grey image).
RADIOGRAPH_MEAN = (0.45, 0.45, 0.45)
RADIOGRAPH_STD = (0.25, 0.25, 0.25)
#: ``train --normalisation`` names.
NORMALISATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD), "radiograph": (RADIOGRAPH_MEAN, RADIOGRAPH_STD),
}


@dataclass(frozen=True)
class Geometry:
    """How an image becomes a network input; recorded in the model card.

    ``aspect="stretch"`` resizes to a square regardless of aspect ratio. It exists because the public bone-age
    set we train on was itself squashed to 100x100: a model trained on squashed hands must see squashed hands.
    ``aspect="pad"`` keeps the aspect ratio and pads with black, the right default for data kept at its shape.
    """

    size: int = 128
    aspect: Literal["stretch", "pad"] = "pad"
    mask_labels: bool = False
    #: Crop to the body part's silhouette (see :func:`body_box`) before resizing, so a hand framed loosely on a
    #: whole detector, zoomed out with padding, or cropped tightly on black reaches the network alike.
    crop_to_body: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Geometry":
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def load_image(path: str | Path) -> np.ndarray:
    """Read a PNG/JPEG or DICOM file as float32 HxW in [0, 1], bone bright."""
    path = Path(path)
    if path.suffix.lower() in {".dcm", ".dicom", ""}:
        import pydicom

        from models.display_image import read_display_image

        return read_display_image(pydicom.dcmread(path))
    with Image.open(path) as img:
        array = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return array


#: Label masking works on images up to this side; larger ones are masked from a block-averaged copy.
MASK_WORKING_SIDE = 1024


def mask_burned_in_labels(
    image: np.ndarray, *, brightness: float = 0.93, max_area: float = 0.02, contrast: float = 0.3
) -> np.ndarray:
    """Cover burned-in labels (laterality letters, technologist marks) with the background level.

    Burned-in text is drawn at (near) full white in small, compact blobs, usually away from the anatomy. Bone is
    rarely saturated and forms one large component. So: threshold near white, keep connected components smaller
    than ``max_area`` of the image that stand out from their immediate surroundings by ``contrast`` (letters on a
    dark box do; the brightest spots of dense bone, which sit inside bone, do not), dilate them a little to catch
    anti-aliased edges, and paint them with the image's dark background level. CNNs otherwise learn such marks as shortcuts (Zech et al., 2018).
    """
    img = np.asarray(image, dtype=np.float32)
    factor = math.ceil(max(img.shape) / MASK_WORKING_SIDE) if img.size else 1
    if factor > 1:
        # Labels are blobs of dozens of pixels at any detector size: find them on a block-averaged copy (the
        # labelling and ring statistics cost grows with the pixel count: 150 ms at 2000 px, on a 2-core CPU)
        # and paint the full-resolution pixels under them. Images up to MASK_WORKING_SIDE (every training
        # image here) are masked at their own resolution, exactly as before.
        height, width = img.shape[0] // factor * factor, img.shape[1] // factor * factor
        small = img[:height, :width].reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))
        masked_small = mask_burned_in_labels(small, brightness=brightness, max_area=max_area, contrast=contrast)
        changed = masked_small != small
        if not changed.any():
            return img
        mask = np.zeros(img.shape, dtype=bool)
        mask[:height, :width] = np.repeat(np.repeat(changed, factor, axis=0), factor, axis=1)
        out = img.copy()
        out[mask] = float(np.percentile(small, 5))
        return out
    bright = img >= brightness * float(img.max() if img.size else 1.0)
    if not bright.any():
        return img
    labels, count = ndimage.label(bright)
    if count == 0:
        return img
    index = np.arange(1, count + 1)
    areas = ndimage.sum(bright, labels, index=index)
    # Text sits on dark background or a dark box: the ring around a letter is much darker than the letter.
    # The brightest spots of dense bone sit inside bone and fail this test, so anatomy is left alone.
    ring_size = max(1, round(min(img.shape) / 50))
    grown = ndimage.grey_dilation(labels, size=(2 * ring_size + 1, 2 * ring_size + 1))
    ring = (grown > 0) & (labels == 0)
    with np.errstate(invalid="ignore", divide="ignore"):  # a blob with no ring (fills the image) gives NaN
        ring_mean = np.asarray(ndimage.mean(img, grown * ring, index=index))
        blob_mean = np.asarray(ndimage.mean(img, labels, index=index))
    small = np.zeros(count + 1, dtype=bool)
    small[1:] = (areas <= max_area * img.size) & (np.nan_to_num(blob_mean - ring_mean) >= contrast)
    mask = small[labels]
    if not mask.any():
        return img
    mask = ndimage.binary_dilation(mask, iterations=max(1, round(min(img.shape) / 100)))
    out = img.copy()
    out[mask] = float(np.percentile(img, 5))
    return out


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """The grey level that best separates two classes of ``values`` (Otsu, 1979): between-class variance max."""
    hist, edges = np.histogram(values, bins=bins, range=(float(values.min()), float(values.max()) + 1e-6))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist).astype(np.float64)
    total = weight[-1]
    if total == 0:
        return float(values.mean())
    mean_below = np.cumsum(hist * centres) / np.maximum(weight, 1)
    overall = float((hist * centres).sum() / total)
    mean_above = (overall * total - mean_below * weight) / np.maximum(total - weight, 1)
    between = weight * (total - weight) * (mean_below - mean_above) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def body_box(image: np.ndarray, margin: float = 0.06, min_area: float = 0.03) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the body part's silhouette, grown by ``margin`` of its size on every side.

    The part (a hand with its forearm, say) is the largest bright connected region after thresholding a smoothed,
    downsampled copy halfway between the background's mean and Otsu's level (Otsu alone separates bone from
    everything else and cuts off the thin soft tissue of fingertips); burned-in markers and rulers are small
    separate blobs and fall away. Where no
    region stands out (under ``min_area`` of the image, or the whole field is bright), the whole image is kept:
    the crop only ever removes background, it never guesses.
    """
    img = np.asarray(image, dtype=np.float32)
    height, width = img.shape[:2]
    full = (0, 0, height, width)
    if height < 16 or width < 16:
        return full
    step = max(1, int(max(height, width) // 192))
    small = ndimage.gaussian_filter(img[::step, ::step], 1.0)
    if float(small.max() - small.min()) < 1e-3:
        return full
    level = otsu_threshold(small.ravel())
    below = small[small <= level]
    level = (level + float(below.mean())) / 2 if below.size else level
    mask = ndimage.binary_opening(small > level, iterations=2)
    labels, count = ndimage.label(mask)
    if count == 0:
        return full
    areas = np.asarray(ndimage.sum(mask, labels, index=np.arange(1, count + 1)))
    biggest = int(np.argmax(areas)) + 1
    if areas[biggest - 1] < min_area * mask.size:
        return full
    rows = np.flatnonzero((labels == biggest).any(axis=1))
    cols = np.flatnonzero((labels == biggest).any(axis=0))
    top, bottom = rows[0] * step, (rows[-1] + 1) * step
    left, right = cols[0] * step, (cols[-1] + 1) * step
    grow_y, grow_x = round(margin * (bottom - top)), round(margin * (right - left))
    box = (max(0, top - grow_y), max(0, left - grow_x), min(height, bottom + grow_y), min(width, right + grow_x))
    if (box[2] - box[0]) < 8 or (box[3] - box[1]) < 8:
        return full
    return box


def crop_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, bottom, right = box
    return image[top:bottom, left:right]


def resize_to_square(image: np.ndarray, size: int, aspect: str) -> torch.Tensor:
    """Resize HxW to ``size`` x ``size`` per the aspect policy; returns a 1x1xSxS tensor."""
    # A decoded DICOM's pixel array may be read-only; a writable copy then, so torch never shares read-only memory.
    tensor = torch.from_numpy(np.require(image, dtype=np.float32, requirements=["C", "W"]))[None, None]
    height, width = tensor.shape[-2:]
    if aspect == "stretch":
        return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(tensor, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(resized, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def normalise(batch: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Bx1xHxW in [0,1] -> Bx3xHxW normalised as the pretrained backbone expects."""
    mean = torch.tensor(geometry.mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(geometry.std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
    return (batch.expand(-1, 3, -1, -1) - mean) / std


def to_unit_square(image: np.ndarray, geometry: Geometry) -> torch.Tensor:
    """Image -> 1x1xSxS in [0, 1], cropped and label-masked when the geometry asks for it (not normalised)."""
    if geometry.crop_to_body:
        image = crop_box(image, body_box(image))
    if geometry.mask_labels:
        image = mask_burned_in_labels(image)
    return resize_to_square(image, geometry.size, geometry.aspect)


def to_model_input(images: list[np.ndarray], geometry: Geometry) -> torch.Tensor:
    """A list of images -> one normalised Bx3xSxS batch: the only way images reach a network."""
    squares = torch.cat([to_unit_square(img, geometry) for img in images], dim=0)
    return normalise(squares, geometry)


@dataclass
class Augment:
    """Batched, on-device augmentation for radiographs: small rotations, scale, shifts, contrast and gamma.

    Done on whole batches with ``affine_grid`` so it costs little on a CPU and nothing on a GPU.
    """

    degrees: float = 12.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    contrast: float = 0.15
    gamma: float = 0.2
    brightness: float = 0.0
    hflip: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.photometric(self.geometric(batch))

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        return (torch.rand(n, generator=self.generator) * (high - low) + low).to(device)

    def geometric(self, batch: torch.Tensor) -> torch.Tensor:
        """Rotation, scale, shift and flip, the same for every channel of an image (an image and its box mask)."""
        n, dev = batch.shape[0], batch.device
        angle = self._uniform(n, -self.degrees, self.degrees, dev) * torch.pi / 180
        scale = self._uniform(n, *self.scale, dev)
        tx = self._uniform(n, -self.translate, self.translate, dev)
        ty = self._uniform(n, -self.translate, self.translate, dev)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        if self.hflip:
            flip = torch.where(self._uniform(n, 0, 1, dev) < 0.5, -1.0, 1.0).to(dev)
        else:
            flip = torch.ones(n, device=dev)
        theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def photometric(self, batch: torch.Tensor) -> torch.Tensor:
        """Gamma, contrast and brightness jitter of the grey levels."""
        n, dev = batch.shape[0], batch.device
        gamma = torch.exp(self._uniform(n, -self.gamma, self.gamma, dev)).view(n, 1, 1, 1)
        out = batch.clamp(0, 1) ** gamma
        contrast = self._uniform(n, 1 - self.contrast, 1 + self.contrast, dev).view(n, 1, 1, 1)
        mean = out.mean(dim=(2, 3), keepdim=True)
        out = (out - mean) * contrast + mean
        if self.brightness:
            out = out + self._uniform(n, -self.brightness, self.brightness, dev).view(n, 1, 1, 1)
        return out.clamp(0, 1)
