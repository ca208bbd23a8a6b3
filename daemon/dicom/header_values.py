"""Source headers as the result builders may copy them: every value valid for its VR, or left out.

A modality or a PACS can send a header whose values break their own VR: PatientBirthDate ``abc``, InstanceNumber
``abc``, a 200-character description, two values where the dictionary allows one. pydicom reads them (as plain
strings, with a warning), but highdicom checks what it copies into an SR or a Secondary Capture and refuses, so a
single bad attribute would make even the "not processed" report impossible to build. :func:`copyable_header`
gives a copy without pixel data in which each such element is left out, and names what it left out, so the SR
can say which attribute was unreadable. Nothing here raises on a source header.

Only the copy is cleaned: the analysis reads the original (an overlong BodyPartExamined still names the anatomy),
and reads it defensively.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pydicom
from pydicom.datadict import dictionary_VM, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import DA, DT, TM, validate_value

LOGGER = logging.getLogger(__name__)

_PIXEL_TAGS = frozenset({pydicom.tag.Tag("PixelData"), pydicom.tag.Tag("FloatPixelData"),
                         pydicom.tag.Tag("DoubleFloatPixelData")})
#: Binary VRs: pydicom decoded them or raised; there is no text form to check.
_UNCHECKED_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "US", "SS", "UL", "SL", "UV", "SV", "FL",
                            "FD", "AT", "US or SS", "OB or OW", "US or OW", "US or SS or OW"})
_DATE_TIME = {"DA": DA, "DT": DT, "TM": TM}


@dataclass(frozen=True)
class Unreadable:
    """One source attribute left out of a copy: where, which, and why (never its value: it may identify)."""

    sop_instance_uid: str
    attribute: str  # keyword, "Seq > Keyword" inside a sequence, or the tag for unknown ones
    why: str

    def __str__(self) -> str:
        return f"{self.attribute}: {self.why}"


def _name(tag: pydicom.tag.BaseTag) -> str:
    return keyword_for_tag(tag) or str(tag)


def _vm_allows(tag: pydicom.tag.BaseTag, count: int) -> bool:
    """Whether ``count`` values fit the dictionary's VM ("1", "2", "1-3", "1-n", "2-2n"); unknown tags pass."""
    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return True
    if count == 0:
        return True  # empty: what Type 2 allows
    low, _, high = vm.partition("-")
    try:
        minimum = int(low)
    except ValueError:
        return True
    if not high:
        return count == minimum
    if high.endswith("n"):
        step = int(high[:-1] or 1)
        return count >= minimum and (step == 1 or count % step == 0)
    return minimum <= count <= int(high)


def value_problem(element: pydicom.DataElement) -> str | None:
    """Why ``element``'s value cannot be copied as it is, or None when it can (sequences: see the caller)."""
    vr, value = element.VR, element.value
    if vr == "SQ" or vr in _UNCHECKED_VRS or value is None or value == "":
        return None
    values = list(value) if isinstance(value, (pydicom.multival.MultiValue, list, tuple)) else [value]
    if not element.tag.is_private and not _vm_allows(element.tag, len(values)):
        return f"{len(values)} values where its VR multiplicity is {dictionary_VM(element.tag)}"
    for single in values:
        if single is None or single == "":
            continue
        if isinstance(single, (bytes, bytearray)):
            return f"undecodable bytes for VR {vr}"
        text = str(single)
        try:
            validate_value(vr, text, pydicom.config.RAISE)
            if vr in _DATE_TIME and isinstance(single, str):
                _DATE_TIME[vr](single.strip())  # the regex accepts month 13; the parse does not
        except Exception as exc:  # noqa: BLE001 - any complaint about a value means: do not copy it
            return f"not a valid {vr} ({_reason(exc)})"
    return None


def _reason(exc: Exception) -> str:
    """The validator's complaint without the value it quotes (a value may identify the patient)."""
    text = str(exc)
    if "exceeds" in text and "length" in text:
        return "too long"
    if "cannot be assigned" in text:
        return "wrong type"
    return "invalid value"


def copyable_header(ds: Dataset) -> tuple[Dataset, list[Unreadable]]:
    """A copy of ``ds`` without pixel data or File Meta elements, and what was left out of it and why.

    Sequences are cleaned item by item. The copy keeps ``ds.file_meta`` (the builders read the transfer syntax).
    """
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    clean, dropped = _clean(ds, sop_uid, "")
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        clean.file_meta = file_meta
    if dropped:
        LOGGER.warning("image %s: left out of the results' copy of its header: %s", sop_uid,
                       "; ".join(str(d) for d in dropped))
    return clean, dropped


def _clean(ds: Dataset, sop_uid: str, prefix: str) -> tuple[Dataset, list[Unreadable]]:
    clean = Dataset()
    dropped: list[Unreadable] = []
    for tag in list(ds.keys()):
        if tag in _PIXEL_TAGS or tag.group == 0x0002:
            continue
        name = prefix + _name(tag)
        try:
            element = ds[tag]
        except Exception as exc:  # noqa: BLE001 - pydicom could not even decode it
            dropped.append(Unreadable(sop_uid, name, f"undecodable ({type(exc).__name__})"))
            continue
        if element.VR == "SQ":
            items = []
            for item in element.value or []:
                copy, inner = _clean(item, sop_uid, f"{name} > ")
                items.append(copy)
                dropped += inner
            clean.add_new(tag, "SQ", Sequence(items))
            continue
        try:
            problem = value_problem(element)
        except Exception as exc:  # noqa: BLE001 - a checker that fails means: unreadable
            problem = f"unreadable ({type(exc).__name__})"
        if problem is not None:
            dropped.append(Unreadable(sop_uid, name, problem))
            continue
        clean.add(element)
    return clean, dropped


def unreadable_summary(dropped: list[Unreadable], images: int) -> list[str]:
    """One line per attribute for the SR, e.g. "PatientBirthDate: not a valid DA (invalid value), in 2 of 3 images"."""
    by_attribute: dict[str, tuple[str, set[str]]] = {}
    for item in dropped:
        why, where = by_attribute.setdefault(item.attribute, (item.why, set()))
        where.add(item.sop_instance_uid)
    lines = []
    for attribute, (why, where) in sorted(by_attribute.items()):
        scope = "" if images <= 1 else f", in {len(where)} of {images} images"
        lines.append(f"{attribute}: {why}{scope}; left out of this report's copy of the header")
    return lines


def as_int(value: object, default: int = 0) -> int:
    """An IS (or any) value as an int for sorting and numbering; ``default`` when it is not a number."""
    try:
        return int(float(str(value).strip())) if value not in (None, "") else default
    except (TypeError, ValueError, OverflowError):
        return default
