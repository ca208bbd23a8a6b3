"""The one anatomy vocabulary: names a person may give a cluster, a route may test, and the tags may yield.

MURA's seven upper-extremity regions first (the abnormality literature's units), then the rest of the skeleton
at the level a radiologist names a radiograph. ``hand`` is a hand radiograph (the bone-age input), never a
forearm or an elbow. The anatomy model's own classes are the subset a site named when it sorted its images; they
are recorded in its card. Pure Python, no torch: the daemon's config validation imports it.

The FracAtlas region of each name lets a model trained on fine names be measured against that data set's coarse
body-region flags (``hand`` there means the distal upper limb: hand, wrist, forearm and elbow).
"""

from __future__ import annotations

MURA_REGIONS: tuple[str, ...] = ("elbow", "finger", "forearm", "hand", "humerus", "shoulder", "wrist")
OTHER_REGIONS: tuple[str, ...] = (
    "chest", "pelvis", "hip", "femur", "knee", "leg", "ankle", "foot", "spine", "skull", "abdomen", "other",
)
#: Every name, in this order (the order a model's classes are listed in).
VOCABULARY: tuple[str, ...] = MURA_REGIONS + OTHER_REGIONS
#: Cluster names that mean "do not train on these images".
DISCARD = "discard"

#: FracAtlas body-region flag for each name (None: FracAtlas has no such region).
FRACATLAS_REGION: dict[str, str | None] = {
    "finger": "hand", "hand": "hand", "wrist": "hand", "forearm": "hand", "elbow": "hand",
    "humerus": "shoulder", "shoulder": "shoulder", "chest": "shoulder",
    "pelvis": "hip", "hip": "hip",
    "femur": "leg", "knee": "leg", "leg": "leg", "ankle": "leg", "foot": "leg",
    "spine": None, "skull": None, "abdomen": None, "other": None,
}


def canonical_name(name: str) -> str:
    """A cluster or folder name as a vocabulary name (``XR_WRIST`` and `` Wrist `` are ``wrist``).

    Raises ValueError naming the vocabulary for anything else, so a typo in a clusters file is caught before
    an hour of training, not after.
    """
    key = str(name).strip().lower()
    key = key[3:] if key.startswith("xr_") else key
    if key not in VOCABULARY:
        raise ValueError(f"{name!r} is not an anatomy name; use one of {', '.join(VOCABULARY)} (or {DISCARD})")
    return key


def in_vocabulary_order(names: set[str] | list[str]) -> list[str]:
    """The given names, each once, in :data:`VOCABULARY` order."""
    wanted = {canonical_name(n) for n in names}
    return [n for n in VOCABULARY if n in wanted]
