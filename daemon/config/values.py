"""What a raw value of the configuration means: a path, a ``builtin:`` checkpoint, a one-item list.

Enters: a value as YAML gives it (a string, a list, a scalar) and the config file's folder. Leaves: the value as the
daemon uses it: an absolute :class:`~pathlib.Path` (``~`` expanded, ``builtin:NAME`` in the package's
``models/weights``, relative paths against the config file's folder) and ``[value]`` for a scalar written where a
list goes. Both the models (:mod:`~daemon.config.schema`) and the cross-checks on plain data
(:mod:`~daemon.config.cross_checks`) read values here, so the two cannot disagree about what a file says.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_PREFIX", "as_list", "builtin_weights_dir", "resolve_path"]

#: ``weights: "builtin:NAME"`` names a file shipped inside the package (models/weights/NAME).
BUILTIN_PREFIX = "builtin:"


def builtin_weights_dir() -> Path:
    """The installed ``models/weights`` folder, found without importing ``models`` (which may pull torch)."""
    spec = importlib.util.find_spec("models")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve() / "weights"
    # Source checkout without an install: models/ sits next to daemon/.
    return Path(__file__).resolve().parents[2] / "models" / "weights"  # daemon/config/values.py -> repository root


def resolve_path(value: Any, base_dir: Path | None, *, allow_builtin: bool) -> Any:
    """Expand ``~``, resolve ``builtin:`` and make relative paths relative to the config file's folder (``base_dir``).

    Why here and not at use: the daemon changes working directory under systemd, and a path that meant
    one thing in ``config check`` must mean the same thing in the running daemon.
    """
    if value is None:
        return None
    if isinstance(value, str) and allow_builtin and value.startswith(BUILTIN_PREFIX):
        name = value[len(BUILTIN_PREFIX) :].strip()
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(
                f"'{value}' must name a single file in the package's models/weights folder, "
                f"e.g. '{BUILTIN_PREFIX}boneage-sex.pt'"
            )
        return builtin_weights_dir() / name
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        return path
    return value  # let pydantic report the wrong type


def as_list(value: Any) -> Any:
    """Accept ``anatomy: hand`` as shorthand for ``anatomy: [hand]``."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    return value
