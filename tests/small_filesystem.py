"""A real small filesystem for disk-full tests: a tmpfs mounted for the test, unmounted after it.

Mounting needs root (CI runs as root); elsewhere the tests that need one are skipped, saying why.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_filesystem(mountpoint: Path, size_mb: int) -> Iterator[Path]:
    """Mount a ``size_mb`` MiB tmpfs at *mountpoint* (created if needed) for the duration of the block."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a disk-full test (needs root): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(path: Path, megabytes: int) -> Path:
    """Write a file of *megabytes* MiB (to take space away from the spool)."""
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(b"\xa5" * 2**20)
    return path
