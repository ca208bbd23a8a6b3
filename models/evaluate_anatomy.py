"""``bonebridge evaluate anatomy --extra ... --examples ...``: the anatomy model as the daemon uses it (issue 25).

Accuracy alone hides what matters for routing, so this reports, from one cached feature pass:

- top-1 per set, per class and per view (the test images as they are, and read through CLAHE, histogram
  equalisation and a strong gamma: the processing-style shortcut);
- calibration: expected calibration error of the raw and the temperature-scaled probabilities, and a reliability
  table;
- out of distribution: AUROC of the OOD score, test images of the training sources against images of other sources
  and of parts without a class (the clusters a person discarded), and the share of each set the threshold accepts;
- the **decision table**: for each set and each tagging (none, the correct part, a wrong part), run through the
  daemon's own decision (:func:`daemon.anatomy_decision.decide_anatomy`) and routing (:func:`daemon.rules.decide_route`
  on the shipped config, a 10-year-old DX so that every hand could get a bone age): the share decided right (same
  region as the truth), unknown, overruling a correct tag, and sent to a model it must not reach (bone age on
  anything but a hand, any model on a chest).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.anatomy_vocabulary import FRACATLAS_REGION

LOGGER = logging.getLogger(__name__)

#: Coarse region of each name: FracAtlas's, except that a chest is its own region (FracAtlas files it under shoulder).
REGION: dict[str, str | None] = {**FRACATLAS_REGION, "chest": "chest"}
TAGGINGS = ("none", "correct", "wrong")


def wrong_tag(truth: str) -> str:
    """The wrong tag a test study gets: ``hand`` (the bone-age part) unless the truth is in the hand region."""
    return "knee" if REGION.get(truth) == "hand" else "hand"


def route_study(config, label: str | None, source: str, boneage_routes: set[str], witness, decision) -> tuple[str, list[str]]:
    """(route name, models that run) for a 10-year-old DX with this anatomy decision, as ``Analyser.decide`` routes."""
    from daemon.analyse.anatomy_decision import boneage_block
    from daemon.analyse.rules import StudyFacts, decide_route

    facts = StudyFacts(anatomy=label, anatomy_source=source, modality="DX", patient_age_years=10.0, patient_sex=None,
                       calling_ae=None, study_description=None, body_part_examined=None)
    why = boneage_block(decision, witness)
    blocked = {name: why for name in boneage_routes} if why else {}
    status = {route.name: None for route in config.routes}
    routed = decide_route(config, facts, status, blocked=blocked)
    if routed.route is None or routed.route.report == "not-processed":
        return (routed.route.name if routed.route else "none"), []
    if label is None and witness is not None:
        return routed.route.name, []  # anatomy unknown: not processed whatever the route would run
    return routed.route.name, list(routed.route.run)


def decision_table(sets: dict[str, list[tuple[str, np.ndarray, float | None]]], classes: list[str],
                   threshold: float | None, min_probability: float, config) -> dict[str, dict[str, dict[str, float]]]:
    """Per set and tagging: n, right, unknown, overruled_correct_tag, forbidden_model (shares)."""
    from daemon.analyse.anatomy_decision import ModelWitness, decide_anatomy
    from daemon.config.cards import model_task

    boneage_routes = {route.name for route in config.routes
                      if any(m in config.models and model_task(config.models[m].weights) == "boneage" for m in route.run)}
    tasks = {name: model_task(ref.weights) for name, ref in config.models.items()}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, rows in sets.items():
        table[set_name] = {}
        for tagging in TAGGINGS:
            counts = {"right": 0, "unknown": 0, "overruled_correct_tag": 0, "forbidden_model": 0, "bone_age": 0}
            for truth, probs, ood in rows:
                order = np.argsort(-probs)[:2]
                witness = ModelWitness(top=tuple((classes[i], float(probs[i])) for i in order), ood_score=ood,
                                       ood_threshold=threshold, classes=tuple(classes))
                tag = None if tagging == "none" else truth if tagging == "correct" else wrong_tag(truth)
                found = decide_anatomy(tag, f"BodyPartExamined={tag.upper()}" if tag else "no anatomy", witness,
                                       min_probability)
                _, run = route_study(config, found.label, found.source, boneage_routes, witness, found)
                ran = {tasks.get(m) for m in run}
                counts["right"] += found.label is not None and REGION.get(found.label) == REGION.get(truth)
                counts["unknown"] += found.label is None
                counts["overruled_correct_tag"] += tagging == "correct" and found.label != truth
                counts["bone_age"] += "boneage" in ran
                counts["forbidden_model"] += ("boneage" in ran and truth != "hand") or (truth == "chest" and bool(ran))
            n = len(rows)
            table[set_name][tagging] = {"n": n, **{k: (v / n if n else float("nan")) for k, v in counts.items()}}
    return table


def table_markdown(table: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| set | tagging | n | decided right | unknown | overruled a correct tag | sent to a model it must not reach | bone age run |",
             "|---|---|---|---|---|---|---|---|"]
    for set_name, by_tag in table.items():
        for tagging, row in by_tag.items():
            lines.append(f"| {set_name} | {tagging} | {row['n']} | {row['right']:.1%} | {row['unknown']:.1%} | "
                         f"{row['overruled_correct_tag']:.1%} | {row['forbidden_model']:.1%} | {row['bone_age']:.1%} |")
    return "\n".join(lines)


def head_of(weights: Path) -> tuple[np.ndarray, np.ndarray, list[str], float, Any, float | None]:
    """(W, b, classes, temperature, OOD model or None, OOD threshold) of an anatomy checkpoint, without its backbone."""
    import torch

    from models.anatomy_ood import MahalanobisOOD
    from models.checkpoint import read_card

    card = read_card(weights)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    w = state["head.2.weight"].numpy().astype(np.float64)
    b = state["head.2.bias"].numpy().astype(np.float64)
    calibration = card.calibration or {}
    ood_entry = calibration.get("ood") or {}
    ood = MahalanobisOOD.load(Path(weights).parent / ood_entry["file"], ood_entry.get("sha256")) \
        if ood_entry.get("file") else None
    return w, b, list(card.classes), float(calibration.get("temperature") or 1.0), ood, \
        (float(ood_entry["threshold"]) if ood_entry.get("file") else None)


def evaluate_heads(arrays: dict[str, np.ndarray], weights: Path, config, split: str = "test",
                   min_probability: float | None = None) -> dict[str, Any]:
    """Every figure of the module docstring for one checkpoint's head on cached features."""
    from models.anatomy_ood import auroc, expected_calibration_error, reliability, softmax

    w, b, classes, temperature, ood, threshold = head_of(weights)
    min_probability = config.anatomy.min_probability if min_probability is None else min_probability
    x = arrays["x"]
    logits = x @ w.T + b
    probs = softmax(logits, temperature)
    scores = ood.score(x) if ood is not None else np.full(len(x), np.nan)
    index = {c: i for i, c in enumerate(classes)}
    in_split = arrays["split"] == split
    view = arrays["view"]
    source = arrays["source"]
    label = arrays["label"]
    report: dict[str, Any] = {"weights": str(weights), "classes": classes, "temperature": temperature,
                              "ood_threshold": threshold, "split": split}
    # accuracy per set and view (the set's own labels; a label the model has no class for counts as wrong)
    accuracy: dict[str, dict[str, float]] = {}
    for s in sorted(set(source[in_split])):
        for v in sorted(set(view[in_split & (source == s)])):
            rows = in_split & (source == s) & (view == v) & (label != "")
            if rows.any():
                truth = label[rows]
                predicted = np.array(classes)[probs[rows].argmax(1)]
                accuracy.setdefault(s, {})[v] = float((predicted == truth).mean())
                accuracy[s][f"{v}_region"] = float(np.mean([REGION.get(p) == REGION.get(t)
                                                            for p, t in zip(predicted, truth)]))
                accuracy[s]["n"] = int(rows.sum())
    report["top1"] = accuracy
    known = in_split & np.array([lab in index for lab in label])
    y = np.array([index[lab] for lab in label[known]])
    original = view[known] == "original"
    report["calibration"] = {
        "ece_raw_original": expected_calibration_error(softmax(logits[known][original]), y[original]),
        "ece_calibrated_original": expected_calibration_error(probs[known][original], y[original]),
        "ece_raw_all_views": expected_calibration_error(softmax(logits[known]), y),
        "ece_calibrated_all_views": expected_calibration_error(probs[known], y),
        "reliability_calibrated_original": reliability(probs[known][original], y[original]),
        "n_original": int(original.sum()), "n_all_views": int(len(y)),
    }
    per_class = {c: float((probs[known][original][y[original] == i].argmax(1) == i).mean())
                 for i, c in enumerate(classes) if (y[original] == i).any()}
    report["per_class_recall_original"] = per_class
    if ood is not None:
        training_sources = {s for s in set(source) if not s.endswith("-discarded") and s in
                            set(source[arrays["split"] == "train"])}
        inside = in_split & np.isin(source, list(training_sources)) & (view == "original")
        others = {s for s in set(source) if s not in training_sources}
        ood_report = {"in_distribution_accepted": float((scores[inside] <= threshold).mean()), "auroc": {},
                      "accepted": {}}
        for s in sorted(others):
            rows = (source == s) & (view == "original") & np.isin(arrays["split"], ["val", "test"])
            if rows.any():
                ood_report["auroc"][s] = auroc(scores[inside], scores[rows])
                ood_report["accepted"][s] = float((scores[rows] <= threshold).mean())
        out_all = np.isin(source, list(others)) & (view == "original") & np.isin(arrays["split"], ["val", "test"])
        ood_report["auroc"]["all other sets"] = auroc(scores[inside], scores[out_all])
        for s in sorted(training_sources):
            for v in sorted(set(view)):
                rows = in_split & (source == s) & (view == v)
                if rows.any():
                    ood_report["accepted"][f"{s} ({v})"] = float((scores[rows] <= threshold).mean())
        report["ood"] = ood_report
    # decision table: the original views of the test split of each set with a known truth, and the examples
    sets: dict[str, list] = {}
    for s in sorted(set(source)):
        rows = np.flatnonzero((source == s) & (view == "original") & (label != "") &
                              ((arrays["split"] == split) | np.isin(source, ["mura", "hands-fullres", "pydicom"])))
        if len(rows):
            sets[s] = [(str(label[i]), probs[i], None if ood is None else float(scores[i])) for i in rows]
    report["decisions"] = decision_table(sets, classes, threshold, min_probability, config)
    report["decisions_markdown"] = table_markdown(report["decisions"])
    return report


def mura_truth(path: str | Path) -> str:
    """The part a MURA example shows, from its file name (``ELBOW.png`` -> ``elbow``)."""
    return Path(path).stem.lower().removeprefix("xr_")


def inference_ms(weights: Path, paths: list[Path], rounds: int = 5, study: int = 4) -> float:
    """Median ms per image of :meth:`Predictor.anatomy_scores` on studies of ``study`` decoded images."""
    from models.inference import load_predictor
    from models.preprocess import load_image

    predictor = load_predictor(weights)
    images = [load_image(p) for p in paths[:study]]
    predictor.anatomy_scores(images)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        predictor.anatomy_scores(images)
        times.append((time.perf_counter() - start) * 1000 / len(images))
    return float(np.median(times))


def run(args) -> int:
    """The CLI: extract (or reuse) features of every set, then report each checkpoint's head on them."""
    from daemon.config.schema import load_config
    from models.anatomy_world import WorldImage, extract_features, world_images
    from models.checkpoint import load_checkpoint

    extras = []
    for item in args.extra or []:
        folder, _, label = str(item).partition("=")
        extras.append((Path(folder), label))
    images = world_images(Path(args.data), extras)
    for folder in args.examples or []:
        images += [WorldImage(p, mura_truth(p), "test", "mura") for p in sorted(Path(folder).glob("*.png"))]
    model, card = load_checkpoint(args.weights)
    cache = args.features_cache or args.json.with_suffix(".features.npz")
    arrays = extract_features(model.features, images, card.geometry, Path(cache), progress=not args.no_progress)
    if getattr(args, "examples", None):
        arrays["label"] = np.array([lab if src != "mura" else mura_truth(p)
                                    for lab, src, p in zip(arrays["label"], arrays["source"], arrays["path"])])
    config = load_config(args.config) if getattr(args, "config", None) else load_config(
        Path(__file__).resolve().parents[1] / "config" / "bonebridge.yaml")
    report = {"model": evaluate_heads(arrays, args.weights, config, split=args.split or "test")}
    for other in getattr(args, "compare_with", None) or []:
        report[f"compare {Path(other).name}"] = evaluate_heads(arrays, Path(other), config, split=args.split or "test")
    report["inference_ms_per_image"] = inference_ms(args.weights, [Path(p) for p in arrays["path"][:4]])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(report["model"]["decisions_markdown"])
    print(f"ECE {report['model']['calibration']['ece_raw_original']:.3f} -> "
          f"{report['model']['calibration']['ece_calibrated_original']:.3f}; "
          f"inference {report['inference_ms_per_image']:.1f} ms/image; report: {args.json}")
    return 0
