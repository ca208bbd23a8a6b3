"""The config file read as YAML, with the line of every key and list item.

Enters: the config file's path. Leaves: the file's data (a mapping, as plain Python) and :class:`Located`, the line
(1-based) of every location in it, so an error found later, by the models or the cross-checks, can name its line;
keys written twice (YAML would silently keep the last) come back as issues. A file that cannot be read, is not
YAML, is empty or is not a mapping raises :class:`~daemon.config.issues.ConfigError` at once: nothing else can be
checked then.

The YAML is composed into nodes first and only then constructed, with ``yaml.SafeLoader``, never the full loader:
a config file must not be able to build Python objects. The node tree is what gives a line to every key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from daemon.config.issues import ConfigError, ConfigIssue, Loc, format_loc

__all__ = ["Located", "read_yaml"]


class Located:
    """Line numbers (1-based) of every key and list item, keyed by location tuple."""

    def __init__(self) -> None:
        self.lines: dict[Loc, int] = {}
        self.duplicates: list[tuple[Loc, int, int]] = []  # (loc, line, first line)

    def walk(self, node: yaml.Node, loc: Loc, loader: yaml.SafeLoader) -> None:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = loader.construct_object(key_node, deep=True)
                child = (*loc, key if isinstance(key, (str, int)) else str(key))
                line = key_node.start_mark.line + 1
                if child in self.lines:
                    self.duplicates.append((child, line, self.lines[child]))
                else:
                    self.lines[child] = line
                self.walk(value_node, child, loader)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.walk(item, (*loc, index), loader)

    def line_of(self, loc: Loc) -> int | None:
        """Line of the deepest part of ``loc`` that exists in the file (a missing field -> its parent)."""
        best = self.lines.get(())
        for depth in range(1, len(loc) + 1):
            line = self.lines.get(tuple(loc[:depth]))
            if line is None:
                break
            best = line
        return best

    def duplicate_issues(self, file: str) -> list[ConfigIssue]:
        """Every key written twice in the same mapping, at its second line."""
        return [
            ConfigIssue(file, line, format_loc(loc),
                        f"duplicate key (first at line {first}); YAML would keep only the last")
            for loc, line, first in self.duplicates
        ]


def read_yaml(path: Path) -> tuple[dict[str, Any], Located]:
    """The file's mapping and the lines of its keys; :class:`ConfigError` when there is no mapping to check."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(file, None, "", f"cannot read config file: {exc}")]) from exc

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(file, line, "", f"YAML syntax error: {problem}")]) from exc
    finally:
        loader.dispose()

    if node is None or data is None:
        raise ConfigError([ConfigIssue(file, 1, "", "config file is empty")])
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigIssue(file, node.start_mark.line + 1, "", "config must be a mapping of sections (listener:, routes:, ...)")]
        )

    located = Located()
    relocator = yaml.SafeLoader("")
    try:
        located.walk(node, (), relocator)
    finally:
        relocator.dispose()
    return data, located
