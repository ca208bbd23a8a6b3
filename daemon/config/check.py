"""Text for ``bonebridge config check``: is the file valid, and which routes can actually run.

Enters: a configuration file's path. Leaves: ``(ok, text)``, the error lines (``FILE:LINE: FIELD: message``) or a
summary of the valid configuration (listener, destinations, models, anatomy, every route enabled or disabled and
why). It loads the file with :func:`daemon.config.schema.load_config`, the daemon's own path, so a check cannot
disagree with production. The CLI prints the text.
"""

from __future__ import annotations

from pathlib import Path

from daemon.config.cards import anatomy_model_classes
from daemon.config.issues import ConfigError
from daemon.config.schema import Route, load_config

__all__ = ["check_config_text", "describe_route"]


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
        for member in ref.ensemble:
            lines.append(f"    averaged with {member}")
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
