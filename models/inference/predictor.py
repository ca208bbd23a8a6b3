"""The daemon's only door into the models: load a verified checkpoint once, predict on decoded images.

:func:`load_predictor` goes through :func:`models.nets.checkpoint.load_checkpoint`, so weights without a card, weights
whose sha256 differs from their card, and cards that say ``trained: false`` are refused before anything is
predicted. :meth:`Predictor.predict` sends every image through :func:`models.data.preprocess.to_model_input` with the
geometry stored in the card, i.e. exactly the preprocessing the model was trained with, in batches, and returns
per image the task's outputs (the keys the SR builder reads) and optionally a Grad-CAM heatmap at the image's
original size.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from models.nets.cam import boneage_grad_cam, grad_cam, to_image
from models.nets.checkpoint import ModelCard, load_checkpoint
from models.nets.networks import fold_for_inference
from models.inference.onnx_features import RUNTIMES, OnnxPooledFeatures, PooledFeatures, onnx_runtime_available
from models.nets.precision import bf16_supported
from models.data.preprocess import Geometry, to_model_input

LOGGER = logging.getLogger(__name__)

MAX_AGE_MONTHS = 240.0
#: The sex head must be at least this sure before a study's PatientSex is flagged as contradicted.
SEX_MISMATCH_CONFIDENCE = 0.9
TTA_SHIFT = 3  # pixels, as in models.train.loop.predict_cache
#: Bone age is read on the left hand (Greulich and Pyle; every RSNA training image is one). A radiograph whose
#: header says it shows the right hand is mirrored before the model sees it, and its heatmap mirrored back.
BONEAGE_TRAINED_SIDE = "L"

_THREADS_SET = False
_THREADS_LOCK = threading.Lock()


@dataclass
class ImagePrediction:
    outputs: dict[str, float | str]
    heatmap: np.ndarray | None = None  # HxW float32 in [0, 1] at the input image's size


def configure_threads() -> int:
    """Use the CPUs this process may run on (not the machine's count), once per process.

    ``BONEBRIDGE_TORCH_THREADS`` overrides it, e.g. 1 per Celery worker process when several share a machine, so
    workers do not oversubscribe cores.
    """
    global _THREADS_SET
    with _THREADS_LOCK:
        wanted = os.environ.get("BONEBRIDGE_TORCH_THREADS")
        if wanted:
            threads = max(1, int(wanted))
        else:
            try:
                threads = len(os.sched_getaffinity(0))
            except AttributeError:  # not on Linux
                threads = os.cpu_count() or 1
        if not _THREADS_SET or wanted:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            _THREADS_SET = True
        return torch.get_num_threads()


def normalise_sex(value: str | None) -> str | None:
    """DICOM PatientSex (M, F, O, empty) -> "M", "F" or None (unknown: the model's prediction is used)."""
    if value is None:
        return None
    text = str(value).strip().upper()
    if text in {"M", "MALE"}:
        return "M"
    if text in {"F", "FEMALE"}:
        return "F"
    return None


def normalise_laterality(value: str | None) -> str | None:
    """DICOM ImageLaterality / Laterality (R, L, U, B, empty) -> "R", "L" or None (unpaired, both or unknown)."""
    text = str(value or "").strip().upper()
    return text if text in ("R", "L") else None


def hand_side_note(side: str | None, looked_right: bool = False, p_right: float = 0.0) -> str:
    """What the SR says about the side bone age was read on: the reader can check a mirrored image is a right hand.

    ``side`` is the header's (normalised) side; ``looked_right`` says the side head, where there was no side in
    the header, called the image a right hand with probability ``p_right``.
    """
    if side == "R":
        return "right hand (header), mirrored to the left-hand standard"
    if side == BONEAGE_TRAINED_SIDE:
        return "left hand (header)"
    if looked_right:
        return f"side not stated; looks like a right hand (p={p_right:.2f}), mirrored to the left-hand standard"
    return "side not stated in the header, read as a left hand"


class Predictor:
    """One model, loaded once, with the preprocessing its card prescribes."""

    def __init__(self, model: nn.Module, card: ModelCard, weights: Path | None = None, device: str | None = None,
                 mask_labels: bool | None = None, batch_size: int = 16, precision: str | None = None,
                 runtime: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        #: bf16 autocast for the forward passes, as the card says (or ``precision`` overrides, for evaluation), and
        #: only where the hardware runs it natively; Grad-CAM's small backward through the heads stays in fp32.
        asked_bf16 = (precision or card.inference_precision) == "bf16"
        self.bf16 = asked_bf16 and bf16_supported(self.device)
        if asked_bf16 and not self.bf16:  # an operator comparing speeds across hosts needs to know which ran
            LOGGER.info("%s %s runs in fp32: its card asks for bf16, which %s does not run natively (no AVX-512 "
                        "BF16 or AMX)", card.name, card.version, self.device)
        size = card.geometry.size
        model = fold_for_inference(model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
        # channels-last as in training: oneDNN's (depthwise) convolutions run faster on CPU too.
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.card = card
        self.weights = weights
        self.task = card.task
        #: Every card whose model answers (one here; an ensemble lists its members): the SR names each.
        self.cards: list[ModelCard] = [card]
        geometry = card.geometry
        if mask_labels is not None:  # evaluation may compare with and without label masking
            geometry = dataclasses.replace(geometry, mask_labels=mask_labels)
        self.geometry: Geometry = geometry
        self.batch_size = batch_size
        #: Fracture: average the reading of the image and of its mirror (the card's choice; evaluation may set it).
        self.test_time_flip = bool(card.test_time_flip)
        self._lock = threading.Lock()  # Grad-CAM hooks the model: one batch at a time per Predictor
        calibration = card.calibration or {}
        #: Anatomy (issue 25): logits are divided by this before the softmax (1: the card has no calibration).
        self.temperature = float(calibration.get("temperature") or 1.0)
        self.ood = None
        self.ood_threshold: float | None = None
        ood = calibration.get("ood") or {}
        if ood.get("file"):
            from models.nets.anatomy_ood import MahalanobisOOD

            base = Path(weights).parent if weights is not None else Path(".")
            self.ood = MahalanobisOOD.load(base / ood["file"], ood.get("sha256"))
            self.ood_threshold = float(ood["threshold"])
        #: Anatomy: what computes the pooled features (``onnxruntime`` or ``torch``; see :meth:`pooled_features`).
        self.runtime = self._choose_runtime(runtime)
        self._pooled = PooledFeatures(self.model)
        self._onnx = OnnxPooledFeatures(self.model, card.geometry.size) if self.runtime == "onnxruntime" else None

    def _choose_runtime(self, asked: str | None) -> str:
        """ONNX Runtime for an fp32 anatomy model on the CPU where it is installed (issue 25: the same features,
        the anatomy step in half the time); PyTorch for everything else, and wherever ``asked`` says ``torch``."""
        if asked not in (None, *RUNTIMES):
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {asked!r}")
        eligible = self.task == "anatomy" and self.device.type == "cpu" and not self.bf16
        if asked == "onnxruntime" and not (eligible and onnx_runtime_available()):
            raise ValueError("ONNX Runtime computes only an fp32 anatomy model's features on the CPU, with the "
                             "onnx and onnxruntime packages installed")
        if asked is None:
            return "onnxruntime" if eligible and onnx_runtime_available() else "torch"
        return asked

    def prepare(self) -> None:
        """Build what the first prediction would otherwise wait for (the ONNX Runtime session, where used)."""
        if self._onnx is not None:
            self._onnx.prepare()

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (N x D, float32) of a normalised batch, by :attr:`runtime`."""
        if self._onnx is not None:
            return self._onnx(x)
        return self._pooled(x.to(self.device).contiguous(memory_format=torch.channels_last)).float()

    def predict(self, images: Sequence[np.ndarray], patient_sex: Sequence[str | None] | None = None,
                with_heatmaps: bool = True, tta: bool = False,
                laterality: Sequence[str | None] | None = None) -> list[ImagePrediction]:
        """Outputs (and heatmaps) for float32 HxW images in [0, 1], MONOCHROME2.

        ``patient_sex`` is the DICOM PatientSex per image (bone age only); ``tta`` averages the image with two
        small shifts, as evaluation's ``--tta`` does. ``laterality`` is the DICOM ImageLaterality (or the series'
        Laterality) per image: bone age mirrors a stated right hand to the left hand it was trained on (a mirrored
        hand costs its sex head all of its accuracy, see ``models/weights/README.md``) and says so in its outputs.
        """
        images = list(images)
        for name, values in (("patient_sex", patient_sex), ("laterality", laterality)):
            if values is not None and len(values) != len(images):
                raise ValueError(f"{len(values)} {name} values for {len(images)} images")
        sexes = [normalise_sex(s) for s in patient_sex] if patient_sex is not None else [None] * len(images)
        sides = [normalise_laterality(v) for v in laterality] if laterality is not None else [None] * len(images)
        mirrored = [self.task == "boneage" and side not in (None, BONEAGE_TRAINED_SIDE) for side in sides]
        images = [np.ascontiguousarray(img[:, ::-1]) if flip else img for img, flip in zip(images, mirrored)]
        results: list[ImagePrediction] = []
        with self._lock:
            for start in range(0, len(images), self.batch_size):
                stop = start + self.batch_size
                results += self._predict_batch(images[start:stop], sexes[start:stop], sides[start:stop],
                                               with_heatmaps, tta)
        for result, flip in zip(results, mirrored):
            if flip and result.heatmap is not None:  # back onto the image as sent
                result.heatmap = np.ascontiguousarray(result.heatmap[:, ::-1])
        return results

    def class_probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Softmax over ``card.classes`` per image (N x C), for a multi-class model such as anatomy.

        The daemon averages these over a study's images before taking its top two, so one odd view cannot
        outvote the rest and the second choice is the study's, not one image's.
        """
        return self.anatomy_scores(images)[0]

    def model_inputs(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The images as this model's input batches (its card's geometry), on the CPU.

        An anatomy cascade hands them to each member of the same geometry (:meth:`anatomy_scores`' ``inputs``), so
        a study sent on to a fallback is not decoded into a network input twice.
        """
        return [to_model_input(list(images[start:start + self.batch_size]), self.geometry)
                for start in range(0, len(images), self.batch_size)]

    def anatomy_scores(self, images: Sequence[np.ndarray],
                       inputs: Sequence[torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated softmax over ``card.classes`` per image (N x C), OOD score per image or None).

        The probabilities are temperature-scaled with the card's ``calibration.temperature``; the OOD score is the
        squared Mahalanobis distance of the pooled features to the nearest class mean (higher: less like the
        training images), compared with :attr:`ood_threshold` by the caller. One backbone pass gives both.
        ``inputs``: the images already made into batches of this model's geometry (:meth:`model_inputs`).
        """
        if self.task != "anatomy":
            raise ValueError(f"class probabilities are for multi-class models, not {self.task!r}")
        rows, scores = [], []
        batches = self.model_inputs(images) if inputs is None else inputs
        with self._lock, torch.no_grad():
            for x in batches:
                pooled = self.pooled_features(x)
                logits = self.model.head(pooled).float() / self.temperature
                rows.append(torch.softmax(logits, dim=1).cpu().numpy())
                if self.ood is not None:
                    scores.append(self.ood.score(pooled.cpu().numpy()))
        probabilities = np.concatenate(rows) if rows else np.zeros((0, len(self.card.classes)), dtype=np.float32)
        ood = (np.concatenate(scores) if scores else np.zeros(0)) if self.ood is not None else None
        return probabilities, ood

    # ------------------------------------------------------------------ internals
    def _views(self, x: torch.Tensor, tta: bool) -> list[torch.Tensor]:
        if not tta:
            return [x]
        return [x, torch.roll(x, shifts=TTA_SHIFT, dims=3), torch.roll(x, shifts=-TTA_SHIFT, dims=2)]

    def _predict_batch(self, images: list[np.ndarray], sexes: list[str | None], sides: list[str | None],
                       with_heatmaps: bool, tta: bool) -> list[ImagePrediction]:
        x = to_model_input(images, self.geometry).to(self.device).contiguous(memory_format=torch.channels_last)
        if self.card.localisation_head:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return self._fracture(x, images, with_heatmaps, tta)
        male_used = direction = feature_map = None
        looked_right = [False] * len(images)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.task == "boneage":
                outputs, male_used, direction, feature_map, looked_right = self._boneage(x, sexes, sides, tta)
            else:
                logits = torch.stack([self.model(v).float() for v in self._views(x, tta)]).mean(0).cpu()
                outputs = self._classifier(logits)
                direction = logits[:, 0]
        heatmaps: list[np.ndarray | None] = [None] * len(images)
        if with_heatmaps:
            if feature_map is not None:  # bone age: Grad-CAM from the pass already made
                squares = boneage_grad_cam(self.model, feature_map, male_used, direction, tuple(x.shape[-2:]))
            else:
                squares = grad_cam(self.model, x, self.task, male_used, direction)
            # A hand the side head mirrored was explained mirrored: its map goes back onto the image as sent.
            squares = [np.ascontiguousarray(sq[:, ::-1]) if flip else sq for sq, flip in zip(squares, looked_right)]
            heatmaps = [to_image(sq, img, self.geometry) for sq, img in zip(squares, images)]
        return [ImagePrediction(out, hm) for out, hm in zip(outputs, heatmaps)]

    def _fracture(self, x: torch.Tensor, images: list[np.ndarray], with_heatmaps: bool,
                  tta: bool) -> list[ImagePrediction]:
        """A box-supervised fracture model: its own map is the heatmap (absolute probability, not rescaled).

        Grad-CAM is not used: the learnt map was trained to mark fractures, and read as a probability it stays
        cool on a radiograph without one instead of being stretched until something glows. The image
        probability follows the card's score rule (the classifier, or its mean with the map's maximum).
        """
        with torch.no_grad():
            outs = [self.model.forward_maps(v) for v in self._views(x, tta)]
            image_prob = torch.stack([torch.sigmoid(o[0].float()) for o in outs]).mean(0).cpu()
            map_prob = torch.sigmoid(outs[0][1].float()).cpu()  # the unshifted view: it lies on the image
            if self.test_time_flip:  # the mirror's reading, its map mirrored back onto the image
                mirrored_logit, mirrored_map = self.model.forward_maps(x.flip(-1))
                image_prob = (image_prob + torch.sigmoid(mirrored_logit.float()).cpu()) / 2
                map_prob = (map_prob + torch.sigmoid(mirrored_map.float()).flip(-1).cpu()) / 2
        peak = map_prob.flatten(1).max(1).values
        prob = image_prob if self.card.score_rule == "image" else (image_prob + peak) / 2
        results = []
        size = self.geometry.size
        for i, image in enumerate(images):
            outputs: dict[str, float | str] = {"abnormality_probability": float(prob[i]),
                                               "localisation_peak_probability": float(peak[i])}
            heatmap = None
            if with_heatmaps:
                square = torch.nn.functional.interpolate(map_prob[i][None, None], size=(size, size), mode="bilinear",
                                                         align_corners=False)[0, 0].numpy()
                heatmap = to_image(square, image, self.geometry, rescale=False)
                outputs.update(map_peak_location(heatmap))
            results.append(ImagePrediction(outputs, heatmap))
        return results

    def _boneage(self, x: torch.Tensor, sexes: list[str | None], sides: list[str | None],
                 tta: bool) -> tuple[list[dict], torch.Tensor, torch.Tensor, torch.Tensor, list[bool]]:
        """Sex head first; the age head then gets PatientSex where the header has it, else the predicted sex.

        The backbone runs once per view; both heads read its pooled features. Where the header states no side and
        the card has a side head, an image the head calls a right hand is mirrored and its backbone pass redone
        (only for those images). That mirror is of the network's input, as the head decides after preprocessing; a
        side the header states is mirrored on the image itself (:meth:`predict`), because the crop, label masking
        and padding do not commute exactly with a mirror: on a held-out RSNA hand the input mirror read 116.8
        months against 117.3 for the image mirror. Returns the outputs, the sex input the age head used, the normalised age (for
        Grad-CAM's direction), the first view's last feature map (for Grad-CAM itself) and which images the side
        head mirrored.
        """
        views = self._views(x, tta)
        feature_maps = [self.model.features(v) for v in views]
        pooled = [self.model.pool(f).flatten(1) for f in feature_maps]
        p_right = self._right_hand_probability(pooled[0], sides)
        looked_right = p_right >= (self.card.side_threshold or 1.0)
        if bool(looked_right.any()):
            rows = looked_right.nonzero().flatten()
            for k, view in enumerate(self._views(x[rows].flip(-1), tta)):
                feature_maps[k] = feature_maps[k].clone()
                feature_maps[k][rows] = self.model.features(view)
                pooled[k] = self.model.pool(feature_maps[k]).flatten(1)
        sex_logit = torch.stack([self.model.sex_head(p).squeeze(1).float() for p in pooled]).mean(0)
        predicted_male = (sex_logit > 0).float()
        has_sex = torch.tensor([s is not None for s in sexes], device=x.device)
        given_male = torch.tensor([1.0 if s == "M" else 0.0 for s in sexes], device=x.device)
        male_used = torch.where(has_sex, given_male, predicted_male)
        age = torch.stack([self.model.heads(p, male_used)[0].float() for p in pooled]).mean(0)
        scaling = self.card.target_scaling
        months = (age * scaling.get("std", 1.0) + scaling.get("mean", 0.0)).clamp(0.0, MAX_AGE_MONTHS).cpu()
        p_male = torch.sigmoid(sex_logit).cpu()
        outputs = []
        for i, given in enumerate(sexes):
            pm = float(p_male[i])
            predicted = "M" if sex_logit[i] > 0 else "F"
            confident_other = (given == "M" and 1 - pm >= SEX_MISMATCH_CONFIDENCE) or (
                given == "F" and pm >= SEX_MISMATCH_CONFIDENCE
            )
            outputs.append({
                "bone_age_months": float(months[i]),
                "predicted_sex": predicted,
                "predicted_sex_probability": pm if predicted == "M" else 1.0 - pm,
                "sex_source": "dicom" if given is not None else "model",
                "sex_mismatch": "yes" if confident_other else "no",
                "hand_side": hand_side_note(sides[i], bool(looked_right[i]), float(p_right[i])),
            })
        return outputs, male_used, age.cpu(), feature_maps[0], [bool(v) for v in looked_right]

    def _right_hand_probability(self, pooled: torch.Tensor, sides: list[str | None]) -> torch.Tensor:
        """The side head's p(right hand) where the header states no side; 0 where it does or there is no head."""
        p_right = torch.zeros(pooled.shape[0], device=pooled.device)
        unstated = torch.tensor([side is None for side in sides], device=pooled.device)
        if self.card.side_head and bool(unstated.any()):
            p_right = torch.where(unstated, torch.sigmoid(self.model.side_head(pooled).squeeze(1).float()), p_right)
        return p_right

    def _classifier(self, logits: torch.Tensor) -> list[dict]:
        if self.task == "abnormality":
            return [{"abnormality_probability": float(p)} for p in torch.sigmoid(logits.squeeze(1))]
        if self.task == "sex":
            threshold = self.card.threshold if self.card.threshold is not None else 0.5
            outputs = []
            for p in torch.sigmoid(logits.squeeze(1)).tolist():
                male = p >= threshold
                outputs.append({"predicted_sex": "M" if male else "F",
                                "predicted_sex_probability": p if male else 1.0 - p})
            return outputs
        if self.task == "anatomy":
            probs = torch.softmax(logits / self.temperature, dim=1)
            top = torch.topk(probs, k=min(2, probs.shape[1]), dim=1)
            classes = self.card.classes
            outputs = []
            for values, indices in zip(top.values.tolist(), top.indices.tolist()):
                out: dict[str, float | str] = {"anatomy": classes[indices[0]], "anatomy_probability": values[0]}
                if len(indices) > 1:
                    out["anatomy_top2"] = classes[indices[1]]
                    out["anatomy_top2_probability"] = values[1]
                outputs.append(out)
            return outputs
        raise ValueError(f"no inference for task {self.task!r}")


def map_peak_location(heatmap: np.ndarray) -> dict[str, float]:
    """Where a learnt map is highest, in the source image's pixels: the centre of its brightest pixel.

    Given as DICOM SCOORD image coordinates (column, row, with (0, 0) the top left corner of the top left pixel,
    so a pixel's centre is at +0.5), which is how the SR names the region the map points at.
    """
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return {"localisation_peak_column": float(col) + 0.5, "localisation_peak_row": float(row) + 0.5}


def load_predictor(weights: str | Path, device: str | None = None, mask_labels: bool | None = None,
                   batch_size: int = 16, precision: str | None = None, runtime: str | None = None) -> Predictor:
    """A :class:`Predictor` for a verified checkpoint (raises ``CheckpointError`` for one that must not be used).

    ``precision`` ("fp32" or "bf16") overrides the card's ``inference_precision``, for evaluation; ``runtime``
    ("onnxruntime" or "torch") what computes an anatomy model's features (default: ONNX Runtime where it can).
    """
    configure_threads()
    model, card = load_checkpoint(Path(weights))
    LOGGER.info("loaded %s %s (%s, %s, sha256 %s)", card.name, card.version, card.task, card.architecture,
                card.sha256[:12])
    return Predictor(model, card, Path(weights), device=device, mask_labels=mask_labels, batch_size=batch_size,
                     precision=precision, runtime=runtime)


def study_abnormality(preds: Sequence[ImagePrediction], threshold: float | None = 0.5,
                      fracture_model: bool = False) -> dict[str, float | str]:
    """A study's abnormality as MURA scores it: the mean of its images' probabilities against the threshold.

    A model trained on fractures (``fracture`` among its card's classes) also states ``fracture``: present or
    absent, which the SR codes as SNOMED CT "Fracture of bone".
    """
    probs = [float(p.outputs["abnormality_probability"]) for p in preds if "abnormality_probability" in p.outputs]
    if not probs:
        raise ValueError("no abnormality predictions for this study")
    threshold = 0.5 if threshold is None else float(threshold)
    probability = float(np.mean(probs))
    found: dict[str, float | str] = {
        "abnormality_probability": probability,
        "abnormality_decision": "abnormal" if probability >= threshold else "normal",
        "abnormality_threshold": threshold,
    }
    if fracture_model:
        found["fracture"] = "present" if probability >= threshold else "absent"
    return found
