"""Text for ``bonebridge route explain`` (``config check`` is :mod:`daemon.config.check`).

Radiology IT tests rules before going live: ``route explain`` takes sample DICOM files and shows, per file, the
facts routing sees and the verdict of every route with its reasons. It uses the same code paths as the daemon
(:func:`daemon.config.schema.load_config`, :func:`daemon.analyse.rules.decide_route`), so a dry run cannot
disagree with production. The functions return text; the CLI prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from daemon.dicom.anatomy_tags import anatomy_from_tags
from daemon.config.schema import Config
from daemon.analyse.rules import StudyFacts, decide_route, facts_from_dataset

__all__ = ["explain_files", "explain_files_text"]

AnatomyOf = Callable[[pydicom.Dataset], tuple[str | None, str]]


def _facts_lines(facts: StudyFacts) -> list[str]:
    age = f"{facts.patient_age_years:.1f} y" if facts.patient_age_years is not None else "unknown"
    return [
        f"  anatomy: {facts.anatomy or 'unknown'} ({facts.anatomy_source})",
        f"  modality: {facts.modality or 'unknown'}",
        f"  patient age: {age}",
        f"  patient sex: {facts.patient_sex or 'unknown'}",
        f"  calling AE: {facts.calling_ae or 'not given'}",
        f"  study description: {facts.study_description or 'none'}",
        f"  body part examined: {facts.body_part_examined or 'none'}",
    ]


def explain_files_text(
    config: Config,
    paths: list[Path],
    anatomy_of: AnatomyOf | None = None,
    calling_ae: str | None = None,
    analyser=None,
) -> str:
    """Per file: the routing facts, every route's verdict with reasons, and the decision (text only)."""
    return explain_files(config, paths, anatomy_of, calling_ae, analyser)[0]


def explain_files(
    config: Config,
    paths: list[Path],
    anatomy_of: AnatomyOf | None = None,
    calling_ae: str | None = None,
    analyser=None,
) -> tuple[str, bool]:
    """(text, every file was readable): per file the facts, every route's verdict with reasons, and the decision.

    With ``analyser`` (a :class:`daemon.analyse.pipeline.Analyser`, what the CLI passes) the anatomy is the daemon's own
    decision: the image is decoded and the anatomy model and the tags weigh in exactly as in ``analyse``
    (:meth:`Analyser.decide`), and both witnesses and the rule that decided are printed. Without it, ``anatomy_of``
    (default: the tag reader) gives the anatomy. ``calling_ae`` stands in for the AE title that would send the files.
    """
    anatomy_of = anatomy_of or anatomy_from_tags
    status = config.route_status()
    blocks: list[str] = []
    all_read = True
    for path in paths:
        path = Path(path)
        lines = [f"{path}:"]
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=analyser is None)
        except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
            lines.append(f"  cannot read as DICOM: {exc}")
            blocks.append("\n".join(lines))
            all_read = False
            continue
        unknown_reason = None
        if analyser is not None:
            from models.display_image import DecodeError, read_display_image

            images = []
            try:
                images = [read_display_image(ds)]
            except DecodeError as exc:
                lines.append(f"  image not decodable ({exc}): the anatomy model cannot witness")
            found, facts, decision = analyser.decide([ds], images, calling_ae)
            lines.extend(_facts_lines(facts))
            lines.extend(_witness_lines(found))
            if found.label is None and found.witness is not None and decision.route is not None \
                    and decision.route.run and decision.disabled_reason is None:
                unknown_reason = found.decision.rule
        else:
            anatomy, source = anatomy_of(ds)
            facts = facts_from_dataset(ds, calling_ae, anatomy, source)
            lines.extend(_facts_lines(facts))
            decision = decide_route(config, facts, status)
        lines.append("  routes:")
        for verdict in decision.verdicts:
            mark = "MATCH" if verdict.matched else "no"
            lines.append(f"    {verdict.route}: {mark}")
            for reason in verdict.reasons:
                lines.append(f"      - {reason}")
            if verdict.matched and status.get(verdict.route) is not None:
                lines.append(f"      (route disabled: {status[verdict.route]})")
        route = decision.route
        if route is None:
            lines.append("  decision: no route matches; the study is not processed and nothing is sent")
        elif decision.disabled_reason is not None:
            lines.append(
                f"  decision: route '{route.name}' matches but is disabled ({decision.disabled_reason}); "
                f"a not-processed report goes to [{', '.join(route.send_to)}]"
            )
        elif route.report == "not-processed":
            lines.append(
                f"  decision: route '{route.name}': a not-processed report goes to [{', '.join(route.send_to)}]"
            )
        elif unknown_reason is not None:
            lines.append(
                f"  decision: route '{route.name}' matches but nothing runs ({unknown_reason}); "
                f"a not-processed report goes to [{', '.join(route.send_to)}]"
            )
        else:
            lines.append(
                f"  decision: route '{route.name}': run [{', '.join(route.run)}], "
                f"send findings to [{', '.join(route.send_to)}]"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks), all_read


def _witness_lines(found) -> list[str]:
    """Both witnesses of the anatomy decision and the rule that decided."""
    evidence = found.evidence
    lines = [f"  witness, DICOM tags: {evidence.get('tags', 'none')}"]
    if found.witness is None:
        lines.append("  witness, anatomy model: none (not configured, not usable, or no decodable image)")
    else:
        model = " ".join(part for part in (
            f"first {evidence.get('model_top1', '?')}",
            f"second {evidence['model_top2']}" if "model_top2" in evidence else "",
            f"({evidence['model_ood']})" if "model_ood" in evidence else "",
        ) if part)
        lines.append(f"  witness, anatomy model: {model}")
        if "model_fallback" in evidence:  # an anatomy cascade: which member answered, and why not the first
            lines.append(f"  anatomy cascade: {evidence['model_fallback']}")
    rule = found.decision.rule if found.decision is not None else evidence.get("decided_by", "")
    lines.append(f"  anatomy rule: {rule} (decided by {evidence.get('decided_by', 'none')})")
    return lines
