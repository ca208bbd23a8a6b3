"""Model cards read as plain JSON: no torch, no validation, so the listener and ``config check`` stay light.

Enters: a weights path from the configuration (``models.<name>.weights``). Leaves: the card's fields as a dict
(empty without a readable card), the anatomy model's classes, the task a card names, or why a model cannot load.
The full, validated reading (with the sha256 check) is :func:`models.nets.checkpoint.read_card`, for the workers.
"""

from __future__ import annotations

import json
from pathlib import Path


def card_fields(weights: Path | None) -> dict:
    """A model card read as plain JSON (no torch, no validation); empty when there is no readable card."""
    if weights is None:
        return {}
    try:
        card = json.loads(Path(weights).with_suffix(".card.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return card if isinstance(card, dict) else {}


def anatomy_model_classes(weights: Path | None) -> list[str] | None:
    """The classes an anatomy model's card lists (None when there is no readable card): plain JSON, no torch."""
    classes = card_fields(weights).get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else None


def model_task(weights: Path | None) -> str | None:
    """The task a model's card names (``boneage``, ``abnormality``...), None without a readable card: no torch."""
    task = card_fields(weights).get("task")
    return str(task) if task else None


def model_unavailable(name: str, weights: Path | None) -> str | None:
    """Why a model cannot be loaded, judged from its files and card without importing torch."""
    if weights is None:
        return f"model '{name}' has no weights (models.{name}.weights is null)"
    if not weights.is_file():
        return f"model '{name}' weights file {weights} not found"
    card_path = weights.with_suffix(".card.json")
    if not card_path.is_file():
        return f"model '{name}' has no model card ({card_path} not found)"
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"model '{name}' card {card_path} is unreadable: {exc}"
    if not isinstance(card, dict):
        return f"model '{name}' card {card_path} is not a JSON object"
    if card.get("trained") is not True:
        return f"model '{name}' is not trained (its card {card_path.name} says trained: {card.get('trained')!r})"
    return None


def ensemble_unavailable(name: str, weights: Path | None, members: list[Path]) -> str | None:
    """Why a model with ensemble members cannot run: its own reason, a member's, or a member of another task.

    A member that cannot load disables the whole model rather than silently running fewer members: the SR would
    otherwise carry a figure from a different model than the one radiology IT configured and checked.
    """
    reason = model_unavailable(name, weights)
    if reason is not None:
        return reason
    task = model_task(weights)
    for index, member in enumerate(members):
        reason = model_unavailable(f"{name}.ensemble[{index}]", member)
        if reason is not None:
            return reason
        if model_task(member) != task:
            return (f"model '{name}' ensemble member {member} is a {model_task(member)} model, "
                    f"not {task} like {weights}")
    return None
