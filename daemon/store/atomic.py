"""One atomic writer for every stage: a crash leaves the old file or the new one, never half of one.

Write a temporary file in the same folder, fsync it, rename it over the target, then fsync the folder so the rename
itself is durable. Readers in other processes (the status page, metrics, a worker) may read at any moment.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

__all__ = ["fsync_dir", "write_json_atomic", "write_text_atomic"]


def fsync_dir(path: Path) -> None:
    """fsync a directory so that entries created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write *text* to *path*: temporary file ``.<name>.<random>.tmp`` beside it, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any, *, indent: int | None = 1,
                      default: Callable[[Any], Any] | None = None) -> None:
    """Write *data* as JSON through :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(data, indent=indent, default=default))
