"""daemon.dicom.uids: derived UIDs are stable, distinct and valid DICOM UIDs."""

from __future__ import annotations

import hashlib
import re

import pytest
from pydicom.uid import UID

from daemon.dicom.uids import UID_ROOT, derive_uid

# PS3.5 9.1: components of digits, no leading zero unless the component is "0", at most 64 chars.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def test_same_parts_same_uid() -> None:
    parts = ("1.2.3.4", "hand-route", "abnormality:1.0.0")
    assert derive_uid(*parts) == derive_uid(*parts)


def test_uid_is_the_documented_hash() -> None:
    digest = hashlib.sha256("a\x1fb".encode()).digest()
    assert derive_uid("a", "b") == f"2.25.{int.from_bytes(digest[:16], 'big')}"


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("a", "bc"), ("ab", "c")),  # the separator matters
        (("a", "b"), ("b", "a")),  # order matters
        (("1.2.3", "route", "sr"), ("1.2.3", "route", "sc")),
        (("x",), ("x", "")),
    ],
)
def test_different_parts_different_uids(left: tuple[str, ...], right: tuple[str, ...]) -> None:
    assert derive_uid(*left) != derive_uid(*right)


@pytest.mark.parametrize("seed", range(200))
def test_uids_are_valid_dicom(seed: int) -> None:
    uid = derive_uid(f"study-{seed}", "route", "ü-non-ascii")
    assert uid.startswith(UID_ROOT)
    assert len(uid) <= 64
    assert UID_PATTERN.match(uid), uid
    assert UID(uid).is_valid
    assert int(uid[len(UID_ROOT):]) < 2**128


def test_rejects_no_parts_and_non_strings() -> None:
    with pytest.raises(ValueError):
        derive_uid()
    with pytest.raises(TypeError):
        derive_uid("1.2.3", None)  # type: ignore[arg-type]
