"""What the SR and SC take from their source images: a checked copy of the header, and the source's identity.

A value invalid for its VR is left out of the copy (and named, so the SR can say which attribute was unreadable);
a source's identity for UID derivation carries its revision when the spool kept a re-sent instance with other
content (:mod:`daemon.store.revisions`).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from daemon.dicom.header_values import Unreadable, copyable_header
from daemon.store.revisions import source_revision

__all__ = ["checked_header", "copied_header", "source_identity"]


# Type 2 attributes highdicom reads unconditionally from the first evidence dataset.
_TYPE2_DEFAULTS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def checked_header(ds: Dataset) -> tuple[Dataset, list[Unreadable]]:
    """A copy of ``ds`` without pixel data or values invalid for their VR, with empty Type 2 attributes filled in.

    highdicom copies evidence datasets and checks what it copies: the pixel data of a 1760 x 1760 CR is dead
    weight there, a value invalid for its VR (PatientBirthDate ``abc``) would make it refuse the whole report, and
    a source that lacks (rather than leaves empty) e.g. AccessionNumber would make it fail. What was left out is
    returned, so the SR can say which attribute was unreadable.
    """
    header, dropped = copyable_header(ds)
    for keyword in _TYPE2_DEFAULTS:
        if keyword not in header:
            setattr(header, keyword, "")
    return header, dropped


def copied_header(ds: Dataset) -> Dataset:
    """:func:`checked_header` without the list of what was left out."""
    return checked_header(ds)[0]



def source_identity(ds: Dataset) -> str:
    """A source's UID, with its revision when the spool replaced its content (:mod:`daemon.store.revisions`)."""
    revision = source_revision(ds)
    return str(ds.SOPInstanceUID) + (f"#{revision}" if revision else "")
