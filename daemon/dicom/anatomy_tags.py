"""Anatomy from DICOM tags: the evidence (and fallback) for the anatomy model.

Modalities fill BodyPartExamined unreliably, and radiographers type study and series descriptions
freely, so this module reads four attributes in order of trust (BodyPartExamined, StudyDescription,
SeriesDescription, ProtocolName) and takes the first one that names a region. Words are matched on
word boundaries after folding case and punctuation, so "HANDLE" is not a hand and "XR_WRIST_LT" is a
wrist. Generic terms (EXTREMITY, ARM, UPPER EXTREMITY) say nothing about the region and are passed
over, so a more specific description further down can still decide.

The labels come from the one anatomy vocabulary (:mod:`models.anatomy_vocabulary`): MURA's seven
upper-extremity regions and the rest of the skeleton (chest, pelvis, hip, femur, knee, leg, ankle, foot,
spine, skull, abdomen), with "other" for recognisable parts outside it (face, dental, whole body). Routes
test the same names whether the anatomy model or the tags decided.
"""

from __future__ import annotations

import re
from typing import Any

from models.anatomy_vocabulary import VOCABULARY

__all__ = ["ANATOMY_CLASSES", "TAG_SOURCES", "anatomy_from_tags", "anatomy_from_text"]

#: Every label the tags (and routes) know; the anatomy model's classes are a subset recorded in its card.
ANATOMY_CLASSES: tuple[str, ...] = VOCABULARY

#: Attributes read, most trusted first.
TAG_SOURCES = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")

# Terms are written after normalisation: upper case, runs of non-alphanumerics become one space.
# "S?" lets plural forms match ("HANDS", "FINGERS"). Multi-word terms take precedence over the words
# they contain when they start at the same place ("HUMERAL HEAD" is a shoulder, not a head).
_TERMS: dict[str, tuple[str, ...]] = {
    "hand": (
        "HANDS?", "BONE ?AGE", "METACARPALS?", "METACARPUS", "HAND ?WRIST",
    ),
    "finger": ("FINGERS?", "THUMBS?", "DIGITS?", "PHALANX OF HAND", "FINGER JOINTS?"),
    "wrist": ("WRISTS?", "CARPUS", "CARPALS?", "SCAPHOIDS?", "NAVICULAR OF WRIST"),
    "forearm": ("FOREARMS?", "RADIUS", "ULNA", "RADIUS ULNA", "LOWER ARM"),
    "elbow": ("ELBOWS?", "OLECRANON", "RADIAL HEAD", "CAPITELLUM"),
    "humerus": ("HUMERUS", "HUMERI", "HUMERAL", "UPPER ARM"),
    "shoulder": (
        "SHOULDERS?", "CLAVICLES?", "SCAPULA", "SCAPULAE", "AC JOINTS?", "ACROMIOCLAVICULAR",
        "ACROMION", "GLENOHUMERAL", "HUMERAL HEAD",
    ),
    "chest": ("CHEST", "THORAX", "LUNGS?", "RIBS?", "STERNUM", "CXR"),
    "abdomen": ("ABDOMEN", "ABDO", "ABDOMINAL", "KUB"),
    "pelvis": ("PELVIS", "PELVIC", "SACRUM", "COCCYX", "SI JOINTS?", "SACROILIAC"),
    "hip": ("HIPS?", "FEMORAL NECK", "FEMORAL HEAD", "ACETABULUM"),
    "femur": ("FEMUR", "FEMORA", "THIGH", "UPPER LEG"),
    "knee": ("KNEES?", "PATELLA", "PATELLAE"),
    "leg": ("LEGS?", "LOWER LEG", "TIBIA", "FIBULA", "TIB FIB", "TIBIA FIBULA"),
    "ankle": ("ANKLES?", "MALLEOLUS", "MORTISE"),
    "foot": ("FOOT", "FEET", "TOES?", "HEELS?", "CALCANEUS", "OS CALCIS", "METATARSALS?"),
    "spine": (
        "SPINE", "SPINAL", "CSPINE", "TSPINE", "LSPINE", "C SPINE", "T SPINE", "L SPINE", "CERVICAL", "LUMBAR",
        "THORACIC", "SCOLIOSIS", "VERTEBRA\\w*",
    ),
    "skull": ("SKULL", "HEAD", "CRANIUM"),
    "other": (
        "BREASTS?", "MAMMO\\w*", "FACE", "FACIAL", "SINUS", "SINUSES", "MANDIBLE",
        "ORBITS?", "NASAL", "NECK", "DENTAL", "TEETH", "OPG", "WHOLEBODY", "WHOLE BODY", "BABYGRAM",
    ),
}

#: Terms that name a limb but not a region: skipped so a later, more specific attribute can decide.
_GENERIC = re.compile(
    r"\b(?:EXTREMITY|EXTREMITIES|UPPEREXM|LOWEREXM|UPPER EXTREMITY|LOWER EXTREMITY|UPPER LIMB|LOWER LIMB|ARMS?|LIMBS?)\b"
)

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"\b(?:{term})\b"), label) for label, terms in _TERMS.items() for term in terms
]


def _normalise(text: str) -> str:
    """Upper case, separators folded to single spaces: "xr_Hand-2v" -> "XR HAND 2V"."""
    return re.sub(r"[^A-Z0-9]+", " ", text.upper()).strip()


def anatomy_from_text(text: str) -> tuple[str | None, str | None]:
    """(label, matched words) for free text; the earliest mention wins, the longer term on a tie."""
    norm = _normalise(text)
    best: tuple[int, int, str, str] | None = None  # (start, -length, label, words)
    for pattern, label in _PATTERNS:
        match = pattern.search(norm)
        if match is None:
            continue
        candidate = (match.start(), -len(match.group(0)), label, match.group(0))
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    if best is None:
        return None, None
    return best[2], best[3]


def _tag_text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword) if hasattr(ds, "get") else getattr(ds, keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return " ".join(str(v) for v in value)
    return str(value).strip()


def anatomy_from_tags(ds: Any) -> tuple[str | None, str]:
    """The anatomy label a dataset's tags name, with the evidence, e.g. ("hand", "BodyPartExamined=HAND").

    Returns (None, "no anatomy in BodyPartExamined, StudyDescription, SeriesDescription, ProtocolName")
    when none of them names a region, followed by what was seen, so ``route explain`` can show why.
    """
    unrecognised: list[str] = []
    for keyword in TAG_SOURCES:
        text = _tag_text(ds, keyword)
        if not text:
            continue
        label, words = anatomy_from_text(text)
        if label is not None and words is not None:
            evidence = f"{keyword}={text}"
            if words != _normalise(text):
                evidence += f" (matched '{words}')"
            return label, evidence
        if _GENERIC.search(_normalise(text)):
            unrecognised.append(f"{keyword}={text} is not specific")
        else:
            unrecognised.append(f"{keyword}={text} is not recognised")
    evidence = f"no anatomy in {', '.join(TAG_SOURCES)}"
    if unrecognised:
        evidence += f" ({'; '.join(unrecognised)})"
    return None, evidence
