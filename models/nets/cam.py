"""Grad-CAM heatmaps for every task, mapped back onto the original radiograph, and an overlay to look at.

Grad-CAM (Selvaraju et al., 2017) comes from the maintained ``pytorch-grad-cam`` package; the target layer is
``model.features.cam_layer``, an identity each backbone puts on its last feature map for this purpose. What is
explained depends on the task:

- bone age: the predicted age (a regression output), through a wrapper whose single output is the age in the
  card's normalised units, i.e. relative to the training population's mean age. Grad-CAM keeps only positive
  evidence, so explaining the raw age would give a blank map for every child the model finds younger than
  average; the target is therefore the deviation from the mean in the predicted direction (+age for an older
  hand, -age for a younger one): "what made the model place this hand above / below the average age";
- abnormality: the one logit (evidence for "abnormal", also on a study it calls normal);
- sex: the logit signed towards the predicted sex (evidence for what was predicted);
- anatomy: the top class.

The library returns maps at the network's square input size. :func:`to_original` undoes the preprocessing
geometry (crop the padding, or un-stretch) so the heatmap lies on the image as it was received.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from models.nets.networks import BoneAgeSexNet
from models.data.preprocess import Geometry, body_box


class AgeOutput(nn.Module):
    """A bone-age network seen as a one-output model (the age), with the sex input fixed per batch."""

    def __init__(self, net: BoneAgeSexNet, male: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.male = male

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        age, _ = self.net(x, self.male)
        return age.unsqueeze(1)


class SignedOutputTarget:
    """Output 0 times +1 or -1: explains a value's push in the direction it went (a custom pytorch-grad-cam target)."""

    def __init__(self, sign: float) -> None:
        self.sign = 1.0 if sign >= 0 else -1.0

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return self.sign * (model_output[0] if model_output.ndim == 1 else model_output[:, 0])


def grad_cam(model: nn.Module, x: torch.Tensor, task: str, male: torch.Tensor | None = None,
             direction: torch.Tensor | None = None) -> np.ndarray:
    """B x S x S Grad-CAM maps in [0, 1] for a preprocessed batch ``x`` (each map scaled to its own maximum).

    ``male`` (0/1 per image) is the sex the age head used for its prediction; it is required for bone age so the
    explained output is the one reported. ``direction`` is the sign per image of the explained output (the
    normalised age for bone age, the logit for sex); it is computed here when not given.
    """
    if task == "boneage":
        if male is None:
            raise ValueError("bone-age Grad-CAM needs the sex input the prediction used")
        target_model: nn.Module = AgeOutput(model, male.to(x.device))  # type: ignore[arg-type]
        if direction is None:
            with torch.no_grad():
                direction = target_model(x)[:, 0]
        targets = [SignedOutputTarget(float(d)) for d in direction]
    elif task == "sex":
        if direction is None:
            with torch.no_grad():
                direction = model(x)[:, 0]
        target_model, targets = model, [SignedOutputTarget(float(d)) for d in direction]
    elif task == "abnormality":
        target_model, targets = model, [ClassifierOutputTarget(0)] * len(x)
    else:
        target_model, targets = model, None  # the library explains each image's top class
    was_training = model.training
    cam = GradCAM(model=target_model, target_layers=[model.features.cam_layer])
    try:
        with torch.enable_grad():
            maps = cam(input_tensor=x, targets=targets)
    finally:
        cam.activations_and_grads.release()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float32)), 0.0, 1.0)


def boneage_grad_cam(model: BoneAgeSexNet, feature_map: torch.Tensor, male: torch.Tensor,
                     direction: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bone-age Grad-CAM from the feature map inference already computed: no second pass through the backbone.

    The explained output (the signed normalised age, as :func:`grad_cam` explains it) depends on the last feature
    map A only through its spatial mean, so its gradient is the same in every cell: dAge/dpooled / (h w). Those
    are exactly Grad-CAM's channel weights, which only the heads are needed for. The map is then assembled and
    scaled by pytorch-grad-cam's own ``scale_cam_image``, the two scalings :class:`GradCAM` applies for one target
    layer, so the result equals the library's (``tests/test_models_inference.py`` checks it) at a fraction of the
    cost: a forward and backward pass at 320 px was most of a 2000 px radiograph's time on a 2-core CPU.
    """
    from pytorch_grad_cam.utils.image import scale_cam_image

    activations = feature_map.detach().float()
    with torch.enable_grad():
        pooled = activations.mean(dim=(2, 3)).requires_grad_(True)
        age, _ = model.heads(pooled, male.to(pooled.device))
        signs = torch.where(direction.to(age.device) >= 0, 1.0, -1.0)
        (gradient,) = torch.autograd.grad((signs * age.float()).sum(), pooled)
    weights = gradient / (activations.shape[2] * activations.shape[3])
    cam = torch.relu((weights[:, :, None, None] * activations).sum(dim=1)).cpu().numpy()
    height, width = size
    maps = scale_cam_image(np.maximum(scale_cam_image(cam, (width, height)), 0))
    return np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float32)), 0.0, 1.0)


def to_original(square: np.ndarray, shape: tuple[int, int], geometry: Geometry, rescale: bool = True) -> np.ndarray:
    """A SxS map on the network input -> HxW on the original image, inverting the stretch or pad of preprocessing.

    Mirrors :func:`models.data.preprocess.resize_to_square`: with ``pad`` the image occupies a centred ``new_h x new_w``
    window, which is cropped out before resizing; with ``stretch`` the whole square is resized.
    """
    height, width = int(shape[0]), int(shape[1])
    size = square.shape[-1]
    region = square
    if geometry.aspect != "stretch":
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (size - new_h) // 2, (size - new_w) // 2
        region = square[top:top + new_h, left:left + new_w]
    tensor = torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    peak = float(out.max()) if out.size else 0.0
    if rescale and peak > 0:
        out = out / peak  # the padding is gone: scale so the strongest evidence on the image reads 1
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def to_image(square: np.ndarray, image: np.ndarray, geometry: Geometry, rescale: bool = True) -> np.ndarray:
    """A SxS map on the network input -> HxW over ``image``, undoing the body crop as well as the resize.

    ``rescale`` scales the map so its maximum reads 1 (Grad-CAM's relative evidence); a learnt probability map
    keeps its values. With ``geometry.crop_to_body`` the network saw only the body part's box: the map is laid back into that box
    and the background outside it reads 0 (the network never saw it, so it holds no evidence).
    """
    height, width = image.shape[:2]
    if not geometry.crop_to_body:
        return to_original(square, (height, width), geometry, rescale)
    top, left, bottom, right = body_box(image)
    out = np.zeros((height, width), dtype=np.float32)
    out[top:bottom, left:right] = to_original(square, (bottom - top, right - left), geometry, rescale)
    return out


def _colormap(name: str = "turbo"):
    import matplotlib

    return matplotlib.colormaps[name]


def render_overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = "turbo",
                   bar_width: int | None = None) -> np.ndarray:
    """The heatmap in colour over the grayscale radiograph, with a colour scale bar to the right; uint8 HxWx3.

    Colour is blended in proportion to the heatmap (``alpha * heat``), so where the model found no evidence the
    radiograph shows unchanged rather than tinted. The scale bar (high at the top) is appended to the right of
    the image, so no anatomy is covered: the output is ``W + bar`` pixels wide.
    """
    source = np.asarray(image)
    gray = source.astype(np.float32)
    if gray.ndim == 3:
        gray = gray.mean(axis=2)
    if source.dtype == np.uint8:
        gray = gray / 255.0
    elif gray.max(initial=0) > 1.0:
        gray = gray / float(gray.max())
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != gray.shape:
        heat = F.interpolate(torch.from_numpy(heat)[None, None], size=gray.shape, mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    heat = np.clip(np.nan_to_num(heat), 0.0, 1.0)
    cmap = _colormap(colormap)
    colour = cmap(heat)[..., :3].astype(np.float32)
    weight = (alpha * heat)[..., None]
    blended = (1.0 - weight) * np.clip(gray, 0, 1)[..., None] + weight * colour
    height, width = gray.shape
    bar = bar_width or max(8, width // 24)
    gap = max(2, bar // 4)
    ramp = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(bar, axis=1)
    scale = cmap(ramp)[..., :3].astype(np.float32)
    strip = np.concatenate([np.zeros((height, gap, 3), np.float32), scale], axis=1)
    out = np.concatenate([blended, strip], axis=1)
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
