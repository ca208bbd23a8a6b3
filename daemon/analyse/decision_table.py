"""The decision table of ``bonebridge evaluate anatomy --extra ... --examples ...``: the anatomy model as the daemon uses it.

:func:`models.eval.anatomy.head_figures` measures the model's head (accuracy per set and view, calibration, OOD);
this module adds the **decision table**: for each set and each tagging (none, the correct part, a wrong part), run
through the daemon's own decision (:func:`daemon.analyse.anatomy_decision.decide_anatomy`) and routing
(:func:`daemon.analyse.rules.decide_route` on the shipped config, a 10-year-old DX so that every hand could get a
bone age): the share decided right (same region as the truth), unknown, overruling a correct tag, and sent to a
model it must not reach (bone age on anything but a hand, any model on a chest). It lives on the daemon's side
because it reads the daemon's decision, routing and configuration; the models never import the daemon.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from daemon.analyse.anatomy_decision import boneage_block, decide_anatomy, witness_of
from daemon.analyse.rules import StudyFacts, decide_route, runs_a_model
from daemon.config.cards import model_task
from models.eval.anatomy import REGION, HeadFigures, head_figures, inference_ms, mura_truth
from models.inference.anatomy_cascade import in_distribution

LOGGER = logging.getLogger(__name__)

TAGGINGS = ("none", "correct", "wrong")


def wrong_tag(truth: str) -> str:
    """The wrong tag a test study gets: ``hand`` (the bone-age part) unless the truth is in the hand region."""
    return "knee" if REGION.get(truth) == "hand" else "hand"


def table_study(label: str | None, source: str) -> StudyFacts:
    """The study every row of the table is routed as: a 10-year-old's DX with this anatomy, no other header facts."""
    return StudyFacts(anatomy=label, anatomy_source=source, modality="DX", patient_age_years=10.0, patient_sex=None,
                      calling_ae=None, study_description=None, body_part_examined=None)


def every_route_enabled(config) -> dict[str, str | None]:
    """The routes' status the table routes under: all enabled, so a row reads the rules, not today's switches."""
    return {route.name: None for route in config.routes}


def route_study(config, label: str | None, source: str, boneage_routes: set[str], witness,
                decision) -> tuple[str, list[str]]:
    """(route name, models that run) for :func:`table_study` with this anatomy decision, as ``Analyser.decide``
    routes."""
    why = boneage_block(decision, witness)
    blocked = {name: why for name in boneage_routes} if why else {}
    routed = decide_route(config, table_study(label, source), every_route_enabled(config), blocked=blocked)
    if routed.route is None or routed.route.report == "not-processed":
        return (routed.route.name if routed.route else "none"), []
    if label is None and witness is not None:
        return routed.route.name, []  # anatomy unknown: not processed whatever the route would run
    return routed.route.name, list(routed.route.run)


def decision_table(sets: dict[str, list[tuple]], classes: list[str],
                   threshold: float | None, min_probability: float, config) -> dict[str, dict[str, dict[str, float]]]:
    """Per set and tagging: n, right, unknown, overruled_correct_tag, forbidden_model (shares).

    A row is ``(truth, calibrated probabilities, OOD score)`` of one model (``threshold`` is its OOD threshold), or
    ``(truth, probabilities, OOD score, OOD threshold, fallback_because)`` of the member of a cascade that answered
    (:func:`cascade_sets`).
    """
    boneage_routes = {route.name for route in config.routes
                      if any(m in config.models and model_task(config.models[m].weights) == "boneage" for m in route.run)}
    tasks = {name: model_task(ref.weights) for name, ref in config.models.items()}
    status = every_route_enabled(config)

    def no_model(part: str) -> bool:  # the same study and routes as route_study
        return not runs_a_model(config, table_study(part, "anatomy model"), status)

    table: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, rows in sets.items():
        table[set_name] = {}
        for tagging in TAGGINGS:
            counts = {"right": 0, "unknown": 0, "overruled_correct_tag": 0, "forbidden_model": 0, "bone_age": 0}
            for truth, probs, ood, *answered in rows:
                own_threshold, fallback_because = answered if answered else (threshold, None)
                witness = witness_of(probs, classes, ood, own_threshold, fallback_because)
                tag = None if tagging == "none" else truth if tagging == "correct" else wrong_tag(truth)
                found = decide_anatomy(tag, f"BodyPartExamined={tag.upper()}" if tag else "no anatomy", witness,
                                       min_probability, runs_no_model=no_model)
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


def evaluate_heads(arrays: dict[str, np.ndarray], weights: Path, config, split: str = "test",
                   min_probability: float | None = None) -> dict[str, Any]:
    """Every figure of :func:`models.eval.anatomy.head_figures` for one checkpoint's head, and the decision table."""
    min_probability = config.anatomy.min_probability if min_probability is None else min_probability
    figures = head_figures(arrays, weights, split)
    report = figures.report
    report["decisions"] = decision_table(figures.sets, figures.classes, figures.ood_threshold, min_probability, config)
    report["decisions_markdown"] = table_markdown(report["decisions"])
    return report


def cascade_sets(members: Sequence[HeadFigures]) -> dict[str, list[tuple]]:
    """The rows an anatomy cascade's decision table reads: per image, the first member in distribution answers (the
    last answers whatever its score), as :func:`models.inference.anatomy_cascade.study_anatomy` does per study.

    Every member's figures must come from the same images in the same order (each on its own backbone's features).
    """
    first = members[0]
    sets: dict[str, list[tuple]] = {}
    for set_name, rows in first.sets.items():
        truths = [row[0] for row in rows]
        for member in members[1:]:
            if [row[0] for row in member.sets.get(set_name, [])] != truths:
                raise ValueError(f"the cascade's members list different images in {set_name}")
        answered = []
        for index, truth in enumerate(truths):
            passed: list[str] = []
            for position, member in enumerate(members):
                _, probs, ood = member.sets[set_name][index]
                if in_distribution(ood, member.ood_threshold) or position == len(members) - 1:
                    answered.append((truth, probs, ood, member.ood_threshold, "; ".join(passed) or None))
                    break
                passed.append(f"member {position + 1} out of distribution ({ood:.0f} vs threshold "
                              f"{member.ood_threshold:.0f})")
        sets[set_name] = answered
    return sets


def evaluate_cascade(arrays: Sequence[dict[str, np.ndarray]], weights: Sequence[Path], config, split: str = "test",
                     min_probability: float | None = None) -> dict[str, Any]:
    """The decision table of an anatomy cascade (``weights`` in order, each with its own backbone's ``arrays``),
    with the answering member's class top-1 per set and the share of each set a fallback answered."""
    min_probability = config.anatomy.min_probability if min_probability is None else min_probability
    members = [head_figures(a, Path(w), split) for a, w in zip(arrays, weights)]
    sets = cascade_sets(members)
    classes = members[0].classes
    report: dict[str, Any] = {"weights": [str(w) for w in weights], "split": split, "members": [m.report for m in members]}
    report["top1"] = {name: float(np.mean([classes[int(np.argmax(probs))] == truth for truth, probs, *_ in rows]))
                      for name, rows in sets.items()}
    report["fallback_share"] = {name: float(np.mean([bool(row[4]) for row in rows])) for name, rows in sets.items()}
    report["decisions"] = decision_table(sets, classes, None, min_probability, config)
    report["decisions_markdown"] = table_markdown(report["decisions"])
    return report


def run(weights: Path, data: Path, report_path: Path, *, extra: Sequence[str] = (), examples: Sequence[Path] = (),
        features_cache: Path | None = None, config_path: Path | None = None, compare_with: Sequence[Path] = (),
        split: str | None = None, progress: bool = True, ensemble: Sequence[Path] = ()) -> int:
    """``bonebridge evaluate anatomy --extra DIR=PART ... --examples DIR``: extract (or reuse) features of every set,
    then report each checkpoint's head on them, decision table included; the report is written to ``report_path``.

    With ``ensemble`` (the daemon's ``models.anatomy.ensemble``), the report's ``cascade`` entry is the decision
    table of ``weights`` followed by those fallbacks, each read on its own backbone's features, and that table is
    the one printed."""
    from daemon.config.schema import load_config
    from models.nets.checkpoint import load_checkpoint
    from models.train.anatomy_world import WorldImage, extract_features, world_images

    extras = []
    for item in extra:
        folder, _, label = str(item).partition("=")
        extras.append((Path(folder), label))
    images = world_images(Path(data), extras)
    for folder in examples:
        images += [WorldImage(p, mura_truth(p), "test", "mura") for p in sorted(Path(folder).glob("*.png"))]
    model, card = load_checkpoint(weights)
    cache = Path(features_cache or report_path.with_suffix(".features.npz"))

    def features_of(net, geometry, where: Path) -> dict[str, np.ndarray]:
        arrays = extract_features(net.features, images, geometry, where, progress=progress)
        if examples:
            arrays["label"] = np.array([lab if src != "mura" else mura_truth(p)
                                        for lab, src, p in zip(arrays["label"], arrays["source"], arrays["path"])])
        return arrays

    arrays = features_of(model, card.geometry, cache)
    config = load_config(config_path) if config_path else load_config(
        Path(__file__).resolve().parents[2] / "config" / "bonebridge.yaml")
    report = {"model": evaluate_heads(arrays, weights, config, split=split or "test")}
    for other in compare_with:
        # A head is only meaningful on its own backbone's features: a checkpoint whose backbone differs (a
        # fine-tuned model against a probe on frozen ImageNet features) gets its own feature pass and cache.
        other_model, other_card = load_checkpoint(Path(other))
        same = backbone_fingerprint(other_model) == backbone_fingerprint(model) and \
            other_card.geometry == card.geometry
        other_arrays = arrays if same else features_of(
            other_model, other_card.geometry, cache.with_name(f"{cache.stem}-{Path(other).stem}.npz"))
        report[f"compare {Path(other).name}"] = evaluate_heads(other_arrays, Path(other), config,
                                                               split=split or "test")
    if ensemble:
        member_arrays = [arrays]
        for member in ensemble:
            member_model, member_card = load_checkpoint(Path(member))
            member_arrays.append(features_of(member_model, member_card.geometry,
                                             cache.with_name(f"{cache.stem}-{Path(member).stem}.npz")))
        report["cascade"] = evaluate_cascade(member_arrays, [weights, *map(Path, ensemble)], config,
                                             split=split or "test")
    report["inference_ms_per_image"] = inference_ms(weights, [Path(p) for p in arrays["path"][:4]])
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(report["cascade" if ensemble else "model"]["decisions_markdown"])
    print(f"ECE {report['model']['calibration']['ece_raw_original']:.3f} -> "
          f"{report['model']['calibration']['ece_calibrated_original']:.3f}; "
          f"inference {report['inference_ms_per_image']:.1f} ms/image; report: {report_path}")
    return 0


def backbone_fingerprint(model) -> str:
    """sha256 of a network's backbone weights: equal fingerprints mean cached features can be shared."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.features.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
