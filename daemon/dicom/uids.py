"""Deterministic DICOM UIDs for BoneBridge's outputs.

A Celery task can be delivered twice (worker lost after the results were sent, visibility timeout
passed). If the SR and heatmaps got fresh random UIDs each time, the PACS would hold duplicates; with
UIDs derived from what the result *is* (input instance UIDs, route, model versions) a redelivered task
re-creates the very same objects and the PACS simply overwrites them.

The UIDs live under the ``2.25`` arc (PS3.5 B.2): a decimal integer of at most 128 bits. Here that
integer is the first 16 bytes of SHA-256 over the parts, so no organisational root has to be
registered and collisions are as unlikely as for random UUIDs. The result is at most 44 characters
(``2.25.`` + 39 digits), well inside the 64-character limit, and an integer's decimal form never has
a leading zero.
"""

from __future__ import annotations

import hashlib

__all__ = ["UID_ROOT", "derive_uid"]

UID_ROOT = "2.25."
"""Prefix of every derived UID (the UUID-derived arc of PS3.5 B.2)."""

# ASCII unit separator: cannot appear in UIDs, route names or version strings, so ("a", "bc") and
# ("ab", "c") hash differently.
_SEPARATOR = "\x1f"


def derive_uid(*parts: str) -> str:
    """Return ``2.25.<int of the first 16 bytes of sha256(parts joined)>``.

    The same parts, in the same order, always give the same UID; callers sort lists whose order is not
    meaningful (e.g. source instance UIDs) before passing them.

    Raises:
        ValueError: no parts were given (a UID of nothing would be shared by unrelated objects).
        TypeError: a part is not a string (``str(None)`` would silently collide with ``"None"``).
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"derive_uid parts must be str, got {type(part).__name__}: {part!r}")
    digest = hashlib.sha256(_SEPARATOR.join(parts).encode("utf-8")).digest()
    return UID_ROOT + str(int.from_bytes(digest[:16], "big"))
