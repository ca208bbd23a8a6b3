"""From a study's datasets to its result objects: decode, anatomy, route, models, SR and heatmaps.

This is the one analysis path. The Celery worker calls it on a spooled study and ``bonebridge predict`` calls it
on files given on the command line, so what a user sees offline is what the PACS receives.

Order matters and follows the design: anatomy first (a model when one with trained weights is configured and
confident, else the DICOM tags, and the report records which decided), then the route, then only the models that
route names. Every way a study can fail to be analysed ends in a "not processed" result with a reason, never an
exception that loses the study.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from daemon.analyse.anatomy_decision import Decision, ModelWitness, boneage_block, decide_anatomy, witness_of
from daemon.dicom.anatomy_tags import anatomy_from_tags
from daemon.config.cards import model_task
from daemon.config.schema import Config, Route
from models.display_image import DecodeError, read_display_image
from daemon.dicom.header_values import as_int
from daemon.output.own_output import is_own_output
from daemon.output.sc import build_heatmap_sc
from daemon.output.sr import build_sr
from daemon.output.study_result import ImageProbability, MapPeak, ModelProvenance, StudyResult
from daemon.analyse.rules import RouteDecision, StudyFacts, decide_route, facts_from_dataset, runs_a_model

LOGGER = logging.getLogger(__name__)


@dataclass
class AnatomyDecision:
    """What the study shows, who said so, and what the other witness said (for the SR)."""

    label: str | None
    source: str
    probability: float | None
    evidence: dict[str, str]
    provenance: ModelProvenance | None = None
    witness: ModelWitness | None = None          # the model's side (None: no usable model or no image)
    decision: Decision | None = None             # the rule that decided (daemon.analyse.anatomy_decision)


@dataclass
class StudyAnalysis:
    """Everything one analysis produced: the result, the route decision, and the DICOM objects to send."""

    result: StudyResult
    decision: RouteDecision
    facts: StudyFacts
    route: Route | None
    outputs: list[Dataset] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready findings, as ``bonebridge predict`` prints them."""
        r = self.result
        return {
            "study_uid": r.study_uid,
            "route": r.route,
            "anatomy": r.anatomy,
            "anatomy_source": r.anatomy_source,
            "anatomy_probability": r.anatomy_probability,
            "anatomy_evidence": r.anatomy_evidence,
            "findings": r.findings,
            "not_processed_reason": r.not_processed_reason,
            "models": [vars(m) for m in r.models],
            "destinations": list(self.route.send_to) if self.route else [],
            "skipped_images": self.skipped,
            "outputs": [str(ds.SOPInstanceUID) for ds in self.outputs],
        }


class Analyser:
    """Holds the configuration and the loaded models; one per process, so models load once."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._predictors: dict[str, object] = {}
        # Read once per process: models load once, so their availability is fixed for its lifetime too.
        self._model_status = config.model_status()
        self._route_status = config.route_status()
        #: Routes that run a bone-age model: they take only a study the anatomy decision lets through as a hand.
        self._boneage_routes = {route.name for route in config.routes
                                if any(name in config.models and model_task(config.models[name].weights) == "boneage"
                                       for name in route.run)}

    def warm_up(self) -> list[str]:
        """Load every usable model now, so the first study does not wait for torch and the weights."""
        loaded = []
        for name, reason in self._model_status.items():
            if reason is None:
                prepare = getattr(self.predictor(name), "prepare", None)  # an anatomy model's ONNX Runtime session
                if prepare is not None:
                    prepare()
                loaded.append(name)
        return loaded

    def predictor(self, name: str):
        """The named model's predictor, loaded on first use and kept; ``models.inference.predictor`` verifies the card."""
        if name not in self._predictors:
            from models.inference.ensemble import load_model

            ref = self.config.models[name]
            if ref.weights is None:
                raise LookupError(f"model {name!r} has no weights configured")
            self._predictors[name] = load_model(Path(ref.weights), [Path(m) for m in ref.ensemble])
        return self._predictors[name]

    def _anatomy(self, sources: list[Dataset], images: list[np.ndarray], calling_ae: str | None = None) -> AnatomyDecision:
        """The study's anatomy from the image model and the DICOM tags, with both witnesses kept for the SR.

        The rules are :func:`daemon.analyse.anatomy_decision.decide_anatomy`'s: the model's calibrated probabilities
        (averaged over the study's images) and its out-of-distribution score (the images' mean) against the tags;
        a tag is overruled only by a sure, in-distribution model that does not have it among its two best guesses.
        With an anatomy cascade (``models.anatomy.ensemble``), the first member in distribution answers, and a
        fallback's answer overrules a tag only toward a part no route runs a model on for this study.
        """
        tag_label, tag_evidence = None, ""
        for ds in sources:
            tag_label, tag_evidence = anatomy_from_tags(ds)
            if tag_label is not None:
                break
        witness, provenance = None, None
        model_name = self.config.anatomy.model
        if model_name and images and self._model_status.get(model_name, "not configured") is None:
            try:
                from models.inference.anatomy_cascade import study_anatomy

                answer = study_anatomy(self.predictor(model_name), images)
                witness = witness_of(answer.probabilities, answer.card.classes, answer.ood_score,
                                     answer.ood_threshold, "; ".join(answer.passed_over) or None)
                card = answer.card
                provenance = ModelProvenance(name=card.name, version=card.version, sha256=card.sha256, task=card.task)
            except Exception as exc:  # a broken model must not lose the study: the tags still decide
                LOGGER.exception("anatomy model failed: %s; falling back to DICOM tags", exc)

        def runs_no_model(part: str) -> bool:
            facts = facts_from_dataset(sources[0], calling_ae, part, "anatomy model")
            return not runs_a_model(self.config, facts, self._route_status)

        found = decide_anatomy(tag_label, tag_evidence, witness, self.config.anatomy.min_probability,
                               f"model {provenance.name} {provenance.version}" if provenance else "anatomy model",
                               runs_no_model=runs_no_model)
        return AnatomyDecision(found.label, found.source, found.probability, found.evidence, provenance,
                               witness=witness, decision=found)

    def decide(self, sources: list[Dataset], images: list[np.ndarray],
               calling_ae: str | None = None) -> tuple[AnatomyDecision, StudyFacts, RouteDecision]:
        """Anatomy, routing facts and route of a study: what ``analyse`` and ``route explain`` both run."""
        found = self._anatomy(sources, images, calling_ae)
        facts = facts_from_dataset(sources[0], calling_ae, found.label, found.source)
        blocked = {}
        if found.decision is not None:
            why = boneage_block(found.decision, found.witness)
            if why is not None:
                blocked = {name: f"bone age needs a hand: {why}" for name in self._boneage_routes}
        decision = decide_route(self.config, facts, self._route_status, blocked=blocked)
        return found, facts, decision

    def analyse(self, datasets: list[Dataset], calling_ae: str | None = None,
                predecessors: list[tuple[str, str, str, str]] | None = None) -> StudyAnalysis:
        sources = [ds for ds in datasets if not is_own_output(ds)]
        if not sources:
            raise ValueError("no source images: every dataset is BoneBridge's own output")
        sources.sort(key=_source_order)
        images: list[np.ndarray] = []
        decoded: list[Dataset] = []
        skipped: list[str] = []
        for ds in sources:
            try:
                images.append(read_display_image(ds))
                decoded.append(ds)
            except DecodeError as exc:
                skipped.append(f"{ds.SOPInstanceUID}: {exc}")
                LOGGER.warning("study %s: image %s not decodable: %s", ds.StudyInstanceUID, ds.SOPInstanceUID, exc)

        found, facts, decision = self.decide(decoded or sources, images, calling_ae)
        anatomy, anatomy_source, anatomy_p = found.label, found.source, found.probability
        route = decision.route
        base = dict(
            study_uid=str(sources[0].StudyInstanceUID), route=route.name if route else "none", anatomy=anatomy,
            anatomy_source=anatomy_source, anatomy_probability=anatomy_p, findings={},
            models=[found.provenance] if found.provenance else [],
            not_processed_reason=None, predecessor_sr=list(predecessors or []), anatomy_evidence=found.evidence,
        )
        reason = _not_processed_reason(decision, route, facts, images, skipped)
        if reason is None and anatomy is None and found.witness is not None and route.run:
            reason = f"anatomy unknown: {found.decision.rule.removeprefix('anatomy unknown: ')}"
        if reason is not None:
            result = StudyResult(**{**base, "not_processed_reason": reason})
            LOGGER.info("study %s not processed: %s", result.study_uid, reason)
            outputs = [build_sr(sources, result)] if route else []
            return StudyAnalysis(result, decision, facts, route, outputs, skipped)

        findings: dict[str, float | str] = {}
        provenance: list[ModelProvenance] = list(base["models"])
        heatmaps: list[np.ndarray | None] = [None] * len(images)
        image_probabilities: list[ImageProbability] = []
        sexes = [_sex(ds) for ds in decoded]
        sides = [_laterality(ds) for ds in decoded]
        for name in route.run:
            predictor = self.predictor(name)
            card = predictor.card
            preds = predictor.predict(images, sexes, with_heatmaps=True, laterality=sides)
            # An output ensemble names every member whose outputs the findings average (lead first).
            provenance += [ModelProvenance(name=c.name, version=c.version, sha256=c.sha256, task=c.task)
                           for c in predictor.cards]
            findings.update(_study_findings(card, preds))
            if card.task == "abnormality":
                image_probabilities += [
                    ImageProbability(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                     float(pred.outputs["abnormality_probability"]), map_peak=_map_peak(pred.outputs))
                    for ds, pred in zip(decoded, preds)
                ]
            for i, pred in enumerate(preds):
                if heatmaps[i] is None and pred.heatmap is not None:
                    heatmaps[i] = pred.heatmap
        result = StudyResult(**{**base, "findings": findings, "models": provenance,
                                "image_probabilities": image_probabilities})
        outputs = [build_sr(sources, result)]
        outputs += [
            build_heatmap_sc(ds, hm, result, i, display_image=img)
            for i, (ds, hm, img) in enumerate(zip(decoded, heatmaps, images))
            if hm is not None
        ]
        return StudyAnalysis(result, decision, facts, route, outputs, skipped)


def _source_order(ds: Dataset) -> tuple[int, int, str]:
    """Series, then instance number, then UID: numbers that are not numbers (IS ``abc``) count as 0, never raise."""
    def number(keyword: str) -> int:
        try:
            return as_int(ds.get(keyword))
        except Exception:  # noqa: BLE001 - an element pydicom cannot even decode sorts first
            return 0

    return number("SeriesNumber"), number("InstanceNumber"), str(ds.SOPInstanceUID)


def _not_processed_reason(decision: RouteDecision, route: Route | None, facts: StudyFacts,
                          images: list[np.ndarray], skipped: list[str]) -> str | None:
    if route is None:
        return "no route matches this study"
    if decision.disabled_reason:
        return f"route '{route.name}' is disabled: {decision.disabled_reason}"
    if route.report == "not-processed":
        return (f"route '{route.name}' reports studies it matches as not processed "
                f"(anatomy: {facts.anatomy or 'unknown'}, from {facts.anatomy_source})")
    if not images:
        return "no image could be decoded: " + "; ".join(skipped)
    return None


def _map_peak(outputs: dict[str, float | str]) -> MapPeak | None:
    """The learnt map's peak of one image's prediction, if its model has such a map."""
    try:
        return MapPeak(column=float(outputs["localisation_peak_column"]), row=float(outputs["localisation_peak_row"]),
                       probability=float(outputs["localisation_peak_probability"]))
    except (KeyError, TypeError, ValueError):
        return None


def _sex(ds: Dataset) -> str | None:
    value = str(getattr(ds, "PatientSex", "") or "").strip().upper()
    return value if value in ("M", "F") else None


def _laterality(ds: Dataset) -> str | None:
    """The image's side: ImageLaterality (General Image) first, else the series' Laterality."""
    return str(getattr(ds, "ImageLaterality", "") or getattr(ds, "Laterality", "") or "").strip().upper() or None


def _study_findings(card, preds) -> dict[str, float | str]:
    """Image predictions -> study findings: mean of the images, as MURA and the bone-age readers do."""
    if card.task == "abnormality":
        from models.inference.predictor import study_abnormality

        return study_abnormality(preds, card.threshold if card.threshold is not None else 0.5,
                                 fracture_model="fracture" in card.classes)
    if card.task == "boneage":
        first = preds[0].outputs
        ages = [float(p.outputs["bone_age_months"]) for p in preds]
        out: dict[str, float | str] = {"bone_age_months": round(float(np.mean(ages)), 1)}
        for key in ("predicted_sex", "predicted_sex_probability", "sex_source", "sex_mismatch", "hand_side"):
            if key in first:
                out[key] = first[key]
        return out
    merged: dict[str, float | str] = {}
    for pred in preds:
        for key, value in pred.outputs.items():
            merged.setdefault(key, value)
    return merged
