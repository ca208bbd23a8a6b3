"""Routing: which route a study takes, and why, in sentences radiology IT can read.

Rules are data. A route's ``when`` is a fixed set of named conditions compared with a fixed set of
facts about the study; nothing in the config is ever evaluated as code (mercure had to fix an eval
injection in its Python-expression rules). The same functions serve the worker and ``route explain``,
so a dry run shows exactly what the daemon will do.

A condition on a fact the study does not have (no age, no anatomy) does not match: a pediatric route
must not run on a study whose age is unknown. The reason says the fact was unknown, so the fix (send
PatientAge, or add a catch-all route) is obvious.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rules stay pure; the config types are only needed for annotations
    from daemon.config.schema import Config, Range, Route

__all__ = [
    "RouteDecision",
    "RuleVerdict",
    "StudyFacts",
    "TagRouting",
    "decide_route",
    "evaluate_route",
    "route_by_tags",
    "facts_from_dataset",
    "parse_age_string",
    "age_from_dates",
]

_DAYS_PER_YEAR = 365.25
_AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / _DAYS_PER_YEAR, "D": 1.0 / _DAYS_PER_YEAR}


@dataclass(frozen=True)
class StudyFacts:
    """What routing may look at. Strings as found in the DICOM (stripped); None when absent."""

    anatomy: str | None
    anatomy_source: str
    modality: str | None
    patient_age_years: float | None
    patient_sex: str | None
    calling_ae: str | None
    study_description: str | None
    body_part_examined: str | None


@dataclass(frozen=True)
class RuleVerdict:
    route: str
    matched: bool
    reasons: list[str] = field(default_factory=list)  # one sentence per condition, met or not


@dataclass(frozen=True)
class RouteDecision:
    route: Route | None  # first matching route in file order, or None
    disabled_reason: str | None  # the matching route cannot run: its study gets a not-processed report
    verdicts: list[RuleVerdict]


# --------------------------------------------------------------------------- facts


def parse_age_string(value: str | None) -> float | None:
    """DICOM AS value ("012Y", "006M", "010W", "003D") in years; None when it is not one."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d{1,3})\s*([YMWDymwd])\s*", str(value))
    if match is None:
        return None
    return int(match.group(1)) * _AGE_UNITS[match.group(2).upper()]


def _parse_da(value: Any) -> date | None:
    text = str(value or "").strip().replace(".", "")  # ACR-NEMA style 2004.08.26 still appears
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def age_from_dates(birth: Any, on: Any) -> float | None:
    """Age in years between two DA values, None when either is missing or the result is negative."""
    born, seen = _parse_da(birth), _parse_da(on)
    if born is None or seen is None or seen < born:
        return None
    return (seen - born).days / _DAYS_PER_YEAR


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword) if hasattr(ds, "get") else None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def facts_from_dataset(
    ds: Any, calling_ae: str | None, anatomy: str | None, anatomy_source: str
) -> StudyFacts:
    """The routing facts of one instance (normally the study's first).

    Age comes from PatientAge when it is a valid AS value, else from PatientBirthDate and the study's
    date (StudyDate, falling back to SeriesDate, AcquisitionDate, ContentDate), else it is unknown.
    """
    age = parse_age_string(_text(ds, "PatientAge"))
    if age is None:
        birth = _text(ds, "PatientBirthDate")
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            seen = _text(ds, keyword)
            if seen:
                age = age_from_dates(birth, seen)
                break
    sex = (_text(ds, "PatientSex") or "").upper()
    return StudyFacts(
        anatomy=anatomy.lower() if anatomy else None,
        anatomy_source=anatomy_source,
        modality=_text(ds, "Modality"),
        patient_age_years=age,
        patient_sex=sex if sex in ("M", "F", "O") else None,
        calling_ae=calling_ae.strip() if calling_ae and calling_ae.strip() else None,
        study_description=_text(ds, "StudyDescription"),
        body_part_examined=_text(ds, "BodyPartExamined"),
    )


# --------------------------------------------------------------------------- matching


def _listing(values: list[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _one_of(label: str, value: str | None, allowed: list[str], unknown_hint: str = "") -> tuple[bool, str]:
    """Case-insensitive equality against a list."""
    if value is None:
        return False, f"{label} unknown{unknown_hint}, route needs one of {_listing(allowed)}"
    if value.strip().lower() in {a.strip().lower() for a in allowed}:
        return True, f"{label} '{value}' in {_listing(allowed)}"
    return False, f"{label} '{value}' not in {_listing(allowed)}"


def _contains(label: str, value: str | None, needles: list[str]) -> tuple[bool, str]:
    """Case-insensitive substring search: study descriptions are free text."""
    if value is None:
        return False, f"{label} unknown, route needs one containing {_listing(needles)}"
    for needle in needles:
        if needle.lower() in value.lower():
            return True, f"{label} '{value}' contains '{needle}'"
    return False, f"{label} '{value}' contains none of {_listing(needles)}"


def _age(value: float | None, bounds: Range) -> tuple[bool, str]:
    wanted = " and ".join(
        part
        for part in (
            f"min {bounds.min:g}" if bounds.min is not None else "",
            f"max {bounds.max:g}" if bounds.max is not None else "",
        )
        if part
    )
    if value is None:
        return False, f"patient age unknown (no PatientAge, no birth and study date), route needs {wanted}"
    if bounds.min is not None and value < bounds.min:
        return False, f"patient age {value:.1f} y < min {bounds.min:g}"
    if bounds.max is not None and value > bounds.max:
        return False, f"patient age {value:.1f} y > max {bounds.max:g}"
    return True, f"patient age {value:.1f} y within {wanted}"


def evaluate_route(route: Route, facts: StudyFacts) -> RuleVerdict:
    """Check every condition of ``route`` (not only up to the first failure), so explain shows them all."""
    when = route.when
    checks: list[tuple[bool, str]] = []
    if when.anatomy is not None:
        checks.append(_one_of("anatomy", facts.anatomy, when.anatomy, f" ({facts.anatomy_source})"))
    if when.patient_age_years is not None:
        checks.append(_age(facts.patient_age_years, when.patient_age_years))
    if when.modality is not None:
        checks.append(_one_of("modality", facts.modality, when.modality))
    if when.calling_ae is not None:
        checks.append(_one_of("calling AE", facts.calling_ae, when.calling_ae))
    if when.study_description is not None:
        checks.append(_contains("study description", facts.study_description, when.study_description))
    if when.body_part_examined is not None:
        checks.append(_one_of("body part examined", facts.body_part_examined, when.body_part_examined))
    if when.patient_sex is not None:
        checks.append(_one_of("patient sex", facts.patient_sex, when.patient_sex))
    if not checks:
        return RuleVerdict(route.name, True, ["no conditions: matches every study"])
    return RuleVerdict(route.name, all(ok for ok, _ in checks), [reason for _, reason in checks])


def decide_route(
    config: Config,
    facts: StudyFacts,
    route_status: Mapping[str, str | None] | None = None,
    blocked: Mapping[str, str] | None = None,
) -> RouteDecision:
    """First matching route in file order, with a verdict for every route.

    ``route_status`` (from ``config.route_status()``) may be passed in by callers that decide many
    studies, since computing it looks at model files on disk. ``blocked`` maps route names to a reason
    they must not take this study although their conditions hold (bone age on a study the anatomy
    model does not call a hand, :func:`daemon.analyse.anatomy_decision.boneage_block`): the study falls
    through to the next route, and the verdict says why.
    """
    verdicts = [evaluate_route(route, facts) for route in config.routes]
    for i, verdict in enumerate(verdicts):
        if verdict.matched and blocked and verdict.route in blocked:
            verdicts[i] = RuleVerdict(verdict.route, False, [*verdict.reasons, f"not taken: {blocked[verdict.route]}"])
    for route, verdict in zip(config.routes, verdicts):
        if verdict.matched:
            status = route_status if route_status is not None else config.route_status()
            return RouteDecision(route=route, disabled_reason=status.get(route.name), verdicts=verdicts)
    return RouteDecision(route=None, disabled_reason=None, verdicts=verdicts)


def runs_a_model(config: Config, facts: StudyFacts, route_status: Mapping[str, str | None] | None = None) -> bool:
    """Whether a study with these facts would reach a route that runs a model (not a not-processed report, not a
    route without models, not no route at all). The anatomy decision asks it of a fallback's choice: an overrule
    toward a part that runs no model can only stop an analysis."""
    routed = decide_route(config, facts, route_status)
    return routed.route is not None and routed.route.report != "not-processed" and bool(routed.route.run)


@dataclass(frozen=True)
class TagRouting:
    """A route decided on the DICOM tags alone (no model): what the tags say the anatomy is, and the decision."""

    anatomy: str | None
    anatomy_source: str  # "DICOM tags (<evidence>)"
    decision: RouteDecision


def route_by_tags(config: Config, header: Any, calling_ae: str | None,
                  route_status: Mapping[str, str | None] | None = None) -> TagRouting:
    """Route a study on its first header's tags alone, where no model may run: the listener choosing a route's
    quiet period before analysis, and a worker reporting a study whose analysis failed for good."""
    from daemon.dicom.anatomy_tags import anatomy_from_tags

    anatomy, evidence = anatomy_from_tags(header)
    source = f"DICOM tags ({evidence})"
    return TagRouting(anatomy, source, decide_route(config, facts_from_dataset(header, calling_ae, anatomy, source),
                                                    route_status))
