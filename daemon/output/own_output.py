"""BoneBridge's own outputs: how the SR and SC are marked as ours, and how one routed back to us is recognised.

Both objects carry a private block (creator ``BONEBRIDGE 1.0``) so :func:`is_own_output` can spot them
when a PACS sends them back; Manufacturer, series number and description are the fallback for PACS that
strip private tags.

:func:`is_own_output` is what the spool (:mod:`daemon.receive.spool`) asks of every received instance: light to
import (pydicom only), so the listener loads no highdicom for it.
"""

from __future__ import annotations

import importlib.metadata

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

__all__ = [
    "MANUFACTURER",
    "PRIVATE_CREATOR",
    "SC_SERIES_DESCRIPTION",
    "SC_SERIES_NUMBER",
    "SR_SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "is_own_output",
    "mark_own_output",
    "software_version",
]

MANUFACTURER = "BoneBridge"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "BoneBridge report"
SC_SERIES_DESCRIPTION = "BoneBridge heatmap"
PRIVATE_CREATOR = "BONEBRIDGE 1.0"
PRIVATE_GROUP = 0x0009
_PRIVATE_MARKER = 0x01  # LO "BoneBridge output"
_PRIVATE_KIND = 0x02  # CS "SR" / "SC"
_PRIVATE_ROUTE = 0x03  # LO route name
_MARKER_VALUE = "BoneBridge output"



def software_version() -> str:
    try:
        return importlib.metadata.version("bonebridge")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"



def mark_own_output(ds: Dataset, kind: str, route: str) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(_PRIVATE_MARKER, "LO", _MARKER_VALUE)
    block.add_new(_PRIVATE_KIND, "CS", kind)
    block.add_new(_PRIVATE_ROUTE, "LO", (route or "")[:64])



def _private_marker(ds: Dataset) -> bool:
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return False
    if _PRIVATE_MARKER not in block:
        return False
    value = block[_PRIVATE_MARKER].value
    if isinstance(value, bytes):  # VR UN after an implicit VR hop through a PACS
        value = value.decode("ascii", errors="replace")
    return str(value).strip(" \x00") == _MARKER_VALUE


def _observer_is_us(ds: Dataset) -> bool:
    """An SR whose device observer (TID 1004, root level) is BoneBridge."""
    wanted = codes.DCM.DeviceObserverManufacturer.value
    for item in ds.get("ContentSequence", []) or []:
        concept = item.get("ConceptNameCodeSequence")
        if concept and concept[0].get("CodeValue") == wanted and str(item.get("TextValue", "")) == MANUFACTURER:
            return True
    return False


def is_own_output(ds: Dataset) -> bool:
    """True for an SR or SC BoneBridge made, so it is never processed again when a PACS sends it back.

    Checks, in order: our private block; Manufacturer "BoneBridge" with our series number or series
    description (private tags can be stripped by a PACS); an SR whose device observer manufacturer is
    BoneBridge. A source image is never matched: its Manufacturer is the modality's.
    """
    if _private_marker(ds):
        return True
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    if manufacturer.lower() != MANUFACTURER.lower():
        return False
    try:
        series_number = int(ds.get("SeriesNumber")) if ds.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    description = str(ds.get("SeriesDescription", "") or "").strip().lower()
    if series_number in (SR_SERIES_NUMBER, SC_SERIES_NUMBER):
        return True
    if description in (SR_SERIES_DESCRIPTION.lower(), SC_SERIES_DESCRIPTION.lower()):
        return True
    return _observer_is_us(ds)
