"""A table of bad values for the header attributes BoneBridge reads, and a way to write them as sent.

Each case puts raw bytes into one attribute of an otherwise good instance: empty, wrong for the VR, absurdly long,
or of the wrong multiplicity. The bytes go into the file exactly as written here (a raw element), so pydicom's own
checks on assignment never see them, as with a file from a real modality. ``unreadable`` says whether the value is
invalid for its VR or multiplicity: those must be left out of what the results copy, and the SR must name them.

Used by ``tests/test_results.py`` (the builders, in process) and ``tests/test_header_fuzz.py`` (a real serve).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag


@dataclass(frozen=True)
class BadValue:
    case: str
    keyword: str
    raw: bytes
    unreadable: bool  # invalid for its VR or multiplicity (the SR must say so)


def _case(keyword: str, what: str, raw: bytes, unreadable: bool = True) -> BadValue:
    return BadValue(f"{keyword}-{what}", keyword, raw, unreadable)


BAD_VALUES: list[BadValue] = [
    _case("PatientAge", "empty", b"", False),
    _case("PatientAge", "letters", b"abc"),
    _case("PatientAge", "long", b"0" * 300),
    _case("PatientAge", "two-values", b"010Y\\012Y"),
    _case("PatientSex", "empty", b"", False),
    _case("PatientSex", "lower-case-word", b"male"),
    _case("PatientSex", "two-values", b"M\\F"),
    _case("PatientSex", "long", b"F" * 500),
    _case("PatientBirthDate", "letters", b"abc"),
    _case("PatientBirthDate", "month-13", b"20241399"),
    _case("PatientBirthDate", "long", b"1" * 300),
    _case("PatientBirthDate", "two-values", b"20000101\\20010101"),
    _case("StudyDate", "word", b"yesterday"),
    _case("ImageLaterality", "word", b"right"),
    _case("ImageLaterality", "two-values", b"R\\L"),
    _case("Laterality", "long", b"L" * 200),
    _case("InstanceNumber", "letters", b"abc"),
    _case("InstanceNumber", "huge", b"9" * 100),
    _case("InstanceNumber", "two-values", b"1\\2"),
    _case("InstanceNumber", "empty", b"", False),
    _case("SeriesNumber", "word", b"one"),
    _case("PixelSpacing", "letters", b"abc\\def"),
    _case("PixelSpacing", "one-value", b"0.1"),  # VM is 2
    _case("PixelSpacing", "three-values", b"0.1\\0.1\\0.1"),
    _case("PixelSpacing", "overflow", b"1e999\\1", False),
    _case("PhotometricInterpretation", "empty", b"", False),
    _case("PhotometricInterpretation", "unknown", b"monochrome9"),
    _case("PhotometricInterpretation", "two-values", b"MONOCHROME1\\RGB"),
    _case("PhotometricInterpretation", "long", b"X" * 200),
    _case("WindowCenter", "letters", b"abc"),
    _case("WindowWidth", "zero", b"0", False),
    _case("WindowWidth", "nan", b"nan"),
    _case("WindowCenter", "long", b"1" * 100),
    _case("BodyPartExamined", "empty", b"", False),
    _case("BodyPartExamined", "not-ascii", b"\xff\xfe\xfd"),
    _case("BodyPartExamined", "long", b"HAND" * 50),
    _case("BodyPartExamined", "two-values", b"HAND\\KNEE"),
    _case("StudyDescription", "long", b"x" * 1000),
    _case("StudyDescription", "escape-codes", b"\x1b[31mHAND\x1b[0m", False),
    _case("SeriesDescription", "long", b"y" * 2000),
    _case("SeriesDescription", "two-values", b"HAND\\KNEE"),
    _case("PatientName", "long", b"A" * 500),
]
"""42 cases over 16 attributes (34 invalid for the VR or multiplicity); each attribute is one the pipeline or the
result builders read."""


def put_raw(ds: Dataset, keyword: str, raw: bytes) -> None:
    """Put ``raw`` into ``ds`` as ``keyword``'s bytes, padded to even length, never checked by pydicom."""
    tag = Tag(keyword)
    if len(raw) % 2:
        raw += b" "
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)  # type: ignore[attr-defined]


def write_with_bad_value(source: Path, target: Path, bad: BadValue) -> Dataset:
    """Copy the DICOM file ``source`` to ``target`` with ``bad`` written into it; returns the dataset as read back."""
    ds = pydicom.dcmread(source)
    put_raw(ds, bad.keyword, bad.raw)
    ds.save_as(target, enforce_file_format=True)
    written = pydicom.dcmread(target)
    assert written[bad.keyword].VR == dictionary_VR(bad.keyword)
    return written
