"""pydantic's validation errors in radiology IT's words, at the file's own locations.

Enters: one error of :meth:`pydantic.ValidationError.errors` from validating the file's data, with the root model
and the destination types it was validated against. Leaves: ``(location, message)``: the location as the file
writes it (pydantic's union tag dropped from a destination's path, so the location finds its line) and a message
that says what to do: the allowed fields and the nearest one for a misspelt key, the known destination types,
quotes for a ``yes`` that YAML read as a boolean.

The models are passed in (:class:`~daemon.config.schema.Config` and ``DESTINATION_TYPES``), not imported:
:func:`~daemon.config.schema.load_config` calls this module, and an import back would be a circle.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

from pydantic import BaseModel

from daemon.config.issues import Loc

__all__ = ["explain"]


def explain(
    error: dict[str, Any], root: type[BaseModel], destination_types: Mapping[str, type[BaseModel]]
) -> tuple[Loc, str]:
    """Where in the file one validation error is, and what it says."""
    loc, _ = _destination_loc(tuple(error.get("loc", ())), destination_types)
    if error.get("type") == "union_tag_invalid" and loc[:1] == ("destinations",):
        loc = (*loc, "type")
    return loc, _message(error, root, destination_types)


def _destination_loc(loc: Loc, destination_types: Mapping[str, type[BaseModel]]) -> tuple[Loc, str | None]:
    """pydantic puts a destination's type (the union's tag) into the location of its errors,
    ``destinations.pacs.dicom.port``: drop it, so the location is the file's own (and finds its line)."""
    if len(loc) >= 3 and loc[0] == "destinations" and loc[2] in destination_types:
        return (*loc[:2], *loc[3:]), str(loc[2])
    return loc, None


def _allowed_fields(loc: Loc, root: type[BaseModel], destination_types: Mapping[str, type[BaseModel]]) -> list[str]:
    """Field names valid at ``loc`` (a model's location), by walking the annotations from ``root``."""
    loc, kind = _destination_loc(loc, destination_types)
    if kind is not None:  # the destination's own type, then on from there
        loc = loc[2:]
        annotation: Any = destination_types[kind]
        for part in loc:
            annotation = _unwrap(annotation)
            field = annotation.model_fields.get(str(part)) if isinstance(annotation, type) and issubclass(
                annotation, BaseModel) else None
            if field is None:
                return []
            annotation = field.annotation
        annotation = _unwrap(annotation)
        return list(annotation.model_fields) if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
            else []
    annotation = root
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return []
            annotation = field.annotation
        else:
            origin = typing.get_origin(annotation)
            args = typing.get_args(annotation)
            if origin is list and args:
                annotation = args[0]
            elif origin is dict and len(args) == 2:
                annotation = args[1]
            else:
                return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _message(error: dict[str, Any], root: type[BaseModel], destination_types: Mapping[str, type[BaseModel]]) -> str:
    """pydantic's message, reworded where radiology IT would otherwise have to guess."""
    kind = error.get("type", "")
    loc: Loc = tuple(error.get("loc", ()))
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1], root, destination_types)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1) if loc else []
        msg = f"unknown field '{loc[-1]}'" if loc else "unknown field"
        if hint:
            msg += f"; did you mean '{hint[0]}'?"
        elif allowed:
            msg += f" (allowed: {', '.join(allowed)})"
        return msg
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid" and loc[:1] == ("destinations",):
        tag = (error.get("ctx") or {}).get("tag", "?")
        return f"unknown destination type {tag} (known: {', '.join(destination_types)})"
    msg = str(error.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = error.get("input")
    if kind not in ("value_error",) and isinstance(value, (str, int, float, bool)) and value is not None:
        msg += f" (got {value!r})"
    if kind == "string_type" and isinstance(value, bool):
        # YAML 1.1 reads yes/no/on/off as booleans; the user almost always meant the text.
        msg += "; put the value in quotes"
    return msg

