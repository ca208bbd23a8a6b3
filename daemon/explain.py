"""Text for ``bonebridge config check`` and ``bonebridge route explain``.

Radiology IT tests rules before going live: ``config check`` says whether the file is valid and
which routes can actually run (a route whose model has no trained weights is disabled, and says
why); ``route explain`` takes sample DICOM files and shows, per file, the facts routing sees and
the verdict of every route with its reasons. Both use the same code paths as the daemon
(:func:`daemon.config.load_config`, :func:`daemon.rules.decide_route`), so a dry run cannot
disagree with production. The functions return text; the CLI prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from daemon.anatomy_tags import anatomy_from_tags
from daemon.config import Config, ConfigError, Route, anatomy_model_classes, load_config
from daemon.rules import StudyFacts, decide_route, facts_from_dataset

__all__ = ["check_config_text", "describe_route", "explain_files", "explain_files_text"]

AnatomyOf = Callable[[pydicom.Dataset], tuple[str | None, str]]


def describe_route(route: Route) -> str:
    """One line: the conditions, what runs, where it goes."""
    when = route.when
    conditions: list[str] = []
    if when.anatomy is not None:
        conditions.append(f"anatomy in [{', '.join(when.anatomy)}]")
    if when.patient_age_years is not None:
        bounds = when.patient_age_years
        if bounds.min is not None:
            conditions.append(f"age >= {bounds.min:g} y")
        if bounds.max is not None:
            conditions.append(f"age <= {bounds.max:g} y")
    for label, values in (
        ("modality", when.modality),
        ("calling AE", when.calling_ae),
        ("body part examined", when.body_part_examined),
        ("patient sex", when.patient_sex),
    ):
        if values is not None:
            conditions.append(f"{label} in [{', '.join(values)}]")
    if when.study_description is not None:
        conditions.append(f"study description contains any of [{', '.join(when.study_description)}]")
    cond = " and ".join(conditions) if conditions else "every study"
    action = f"run [{', '.join(route.run)}]" if route.run else "run nothing"
    text = f"when {cond}: {action}, report {route.report}, send to [{', '.join(route.send_to)}]"
    if route.quiet_period_s is not None:
        text += f", quiet period {route.quiet_period_s:g} s"
    return text


def check_config_text(path: str | Path) -> tuple[bool, str]:
    """(ok, text): the error lines (``FILE:LINE: FIELD: message``) or a summary of the valid config."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        count = len(exc.errors)
        header = f"{path}: {count} problem{'s' if count != 1 else ''}"
        return False, f"{header}\n{exc}"

    lines = [f"{path}: OK"]
    listener = config.listener
    tls = listener.tls
    tls_text = ("DICOM TLS" + (", client certificates required" if tls.require_client_certificate else "")) if tls \
        else "plain TCP"
    lines.append(f"listener: {listener.ae_title} on {listener.host}:{listener.port} ({tls_text})")
    if listener.allowed_callers:
        for caller in listener.allowed_callers:
            lines.append(f"  accepts {caller.ae_title} from {caller.host or 'any host'}")
    else:
        lines.append("  no allowed_callers configured")
    lines.append(f"storage: {config.storage.data_dir}")
    lines.append(f"broker: {config.broker}")
    lines.append("destinations:")
    for name, dest in config.destinations.items():
        if dest.type == "dicom":
            lines.append(f"  {name}: {dest.ae_title} at {dest.host}:{dest.port} (calling as {dest.calling_ae}"
                         f"{', DICOM TLS' if dest.tls else ''})")
        else:  # describe() names the URL and the kind of authentication, never a secret
            lines.append(f"  {name}: {dest.describe()}")
    models = config.model_status()
    lines.append("models:")
    for name, ref in config.models.items():
        where = str(ref.weights) if ref.weights is not None else "no weights"
        usable = "ready" if models[name] is None else "not usable"
        lines.append(f"  {name}: {where} ({usable})")
    anatomy_model = config.anatomy.model
    if anatomy_model is None:
        lines.append("anatomy: from DICOM tags only")
    elif models.get(anatomy_model) is not None:
        lines.append(f"anatomy: from DICOM tags (model '{anatomy_model}' not usable)")
    else:
        lines.append(
            f"anatomy: model '{anatomy_model}' (min probability {config.anatomy.min_probability:g}), "
            "DICOM tags as evidence and fallback"
        )
        classes = anatomy_model_classes(config.models[anatomy_model].weights)
        if classes:
            lines.append(f"  the model's classes: {', '.join(classes)}")
            tag_only = sorted({label for route in config.routes for label in (route.when.anatomy or [])
                               if label.strip().lower() not in classes})
            if tag_only:
                lines.append(f"  routes name {', '.join(tag_only)}: only the DICOM tags can give "
                             f"{'it' if len(tag_only) == 1 else 'them'}")
    status = config.route_status()
    enabled = sum(1 for reason in status.values() if reason is None)
    lines.append(f"routes (first match wins; {enabled} of {len(status)} enabled):")
    for index, route in enumerate(config.routes, start=1):
        reason = status.get(route.name)
        state = "enabled" if reason is None else f"DISABLED: {reason}"
        lines.append(f"  {index}. {route.name}: {state}")
        lines.append(f"     {describe_route(route)}")
    return True, "\n".join(lines)


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

    With ``analyser`` (a :class:`daemon.pipeline.Analyser`, what the CLI passes) the anatomy is the daemon's own
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
            from daemon.decode import DecodeError, read_display_image

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
    rule = found.decision.rule if found.decision is not None else evidence.get("decided_by", "")
    lines.append(f"  anatomy rule: {rule} (decided by {evidence.get('decided_by', 'none')})")
    return lines
