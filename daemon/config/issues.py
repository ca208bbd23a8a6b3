"""A problem in a configuration file, and how it is written: ``FILE:LINE: FIELD: message``.

Enters: a location (``Loc``, the keys and list indexes from the file's top, e.g. ``("routes", 0, "send_to", 1)``)
and a message, from the YAML reader (:mod:`~daemon.config.yaml_lines`), the models' validation
(:mod:`~daemon.config.messages`) and the cross-checks (:mod:`~daemon.config.cross_checks`). Leaves:
:class:`ConfigIssue` (file, line, field, message) and :class:`ConfigError`, which carries every issue of a file at
once. Radiology IT edits the file by hand, so a problem is reported the way a compiler reports one; this module
is that format alone, shared by every step, so all of them read alike.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigIssue", "Loc", "format_loc"]

#: Where in the file: keys and list indexes from the top, e.g. ``("routes", 0, "send_to", 1)``.
Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located as precisely as the YAML allows."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ConfigError(Exception):
    """Raised by :func:`~daemon.config.schema.load_config`; carries every issue found, not just the first."""

    def __init__(self, errors: list[ConfigIssue]) -> None:
        self.errors = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.errors)


def format_loc(loc: Loc) -> str:
    """The FIELD of an issue: ``routes[0].send_to[1]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
