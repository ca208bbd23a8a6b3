"""Checks that relate the configuration's sections to each other, run on plain data.

Enters: the file's data as plain Python (a mapping, possibly broken anywhere) and the config file's folder. Leaves:
``(location, message)`` for every problem: a route naming an unknown model or destination, duplicate route names,
a ``findings`` route that runs nothing, anatomy names the sorter cannot produce, an anatomy model whose classes
are not anatomy names, ``send_failures_to`` naming an unknown destination.

Why on plain data and not on the validated models: ``load_config`` runs these beside pydantic's validation, so a
file with a structural error still gets its cross-section errors in the same report instead of only after the
first ones are fixed. :class:`~daemon.config.schema.Config` runs the same checks on configs built in Python.
The anatomy model's card is read as plain JSON (:mod:`~daemon.config.cards`), never with torch.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from daemon.config.cards import anatomy_model_classes
from daemon.config.issues import Loc
from daemon.config.values import as_list, resolve_path
from daemon.dicom.anatomy_tags import ANATOMY_CLASSES

__all__ = ["cross_check"]


def cross_check(data: Any, base_dir: Path | None = None) -> list[tuple[Loc, str]]:
    """Checks that relate sections to each other, run on plain data so they work on broken files too."""
    if not isinstance(data, dict):
        return []
    problems: list[tuple[Loc, str]] = []
    models = data.get("models") if isinstance(data.get("models"), dict) else {}
    destinations = data.get("destinations") if isinstance(data.get("destinations"), dict) else {}

    anatomy = data.get("anatomy")
    anatomy_model = anatomy.get("model", "anatomy") if isinstance(anatomy, dict) else "anatomy"
    if isinstance(anatomy_model, str) and anatomy_model not in models:
        where: Loc = ("anatomy", "model") if isinstance(anatomy, dict) and "model" in anatomy else ("anatomy",)
        problems.append(
            (where, f"anatomy model '{anatomy_model}' is not in models{_known(models)}; "
                    "write 'model: null' to sort by DICOM tags only")
        )

    model_classes = None
    anatomy_ref = models.get(anatomy_model) if isinstance(anatomy_model, str) else None
    if isinstance(anatomy_ref, dict) and isinstance(anatomy_ref.get("weights"), (str, Path)):
        try:
            weights = resolve_path(anatomy_ref["weights"], base_dir, allow_builtin=True)
        except ValueError:
            weights = None
        model_classes = anatomy_model_classes(weights)
        unknown = [c for c in model_classes or [] if c not in ANATOMY_CLASSES]
        if unknown:
            problems.append(((("models", anatomy_model, "weights")),
                             f"the anatomy model's classes {unknown} are not anatomy names ({', '.join(ANATOMY_CLASSES)})"))

    queue = data.get("queue")
    failures = as_list(queue.get("send_failures_to") or []) if isinstance(queue, dict) else []
    if isinstance(failures, list):
        for j, dest in enumerate(failures):
            if isinstance(dest, str) and dest not in destinations:
                problems.append((("queue", "send_failures_to", j), f"unknown destination '{dest}'{_known(destinations)}"))

    routes = data.get("routes")
    if not isinstance(routes, list):
        return problems
    first_seen: dict[str, int] = {}
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in first_seen:
                problems.append(
                    (("routes", i, "name"), f"duplicate route name '{name}' (also routes[{first_seen[name]}])")
                )
            else:
                first_seen[name] = i
        run = as_list(route.get("run") or [])
        if isinstance(run, list):
            for j, model in enumerate(run):
                if isinstance(model, str) and model not in models:
                    problems.append(
                        (("routes", i, "run", j), f"unknown model '{model}'{_known(models)}")
                    )
        send_to = as_list(route.get("send_to") or [])
        if isinstance(send_to, list):
            for j, dest in enumerate(send_to):
                if isinstance(dest, str) and dest not in destinations:
                    problems.append(
                        (("routes", i, "send_to", j), f"unknown destination '{dest}'{_known(destinations)}")
                    )
        if route.get("report", "findings") == "findings" and run == []:
            problems.append(
                (("routes", i, "run") if "run" in route else ("routes", i),
                 "report is 'findings' but run names no model; add a model or set 'report: not-processed'")
            )
        when = route.get("when")
        if isinstance(when, dict):
            labels = as_list(when.get("anatomy"))
            if isinstance(labels, list):
                for j, label in enumerate(labels):
                    if isinstance(label, str) and label.strip().lower() not in ANATOMY_CLASSES:
                        problems.append((("routes", i, "when", "anatomy", j), _unknown_anatomy(label, model_classes)))
    return problems


def _unknown_anatomy(label: str, model_classes: list[str] | None) -> str:
    """Why a route's anatomy name can never match, with what the model and the tags can say instead."""
    hint = difflib.get_close_matches(label.strip().lower(), ANATOMY_CLASSES, n=1)
    message = f"anatomy '{label}' is not an anatomy name"
    if hint:
        message += f"; did you mean '{hint[0]}'?"
    if model_classes:
        message += f" The anatomy model's classes: {', '.join(model_classes)};"
    return message + f" the DICOM tags give: {', '.join(ANATOMY_CLASSES)}"


def _known(names: dict[str, Any]) -> str:
    return f" (known: {', '.join(names)})" if names else " (none are configured)"

