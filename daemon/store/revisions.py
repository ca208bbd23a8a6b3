"""Instances re-sent with other content: the earlier files are kept, and results made from the new one get new UIDs.

A sender may send an instance again under the same SOP Instance UID with other bytes (a corrected header, another
image by mistake). The spool never overwrites a file a report may have been made from: it keeps the earlier file
as ``incoming/<study>/superseded/<SOP Instance UID>.<when>-<id>.dcm`` (a hard link, made before the new file is
renamed into place, so a crash in between loses neither) and the study re-opens as a new generation.

Result UIDs are derived from the source UIDs (:mod:`daemon.dicom.uids`), so a report on the new content would reuse the
old report's UIDs and a PACS would keep one or the other. The *revision* of a source, how many earlier contents
of it the spool kept, goes into the derivation when it is not 0: results of the first content keep the UIDs they
always had, and a redelivered task of the same generation still rebuilds identical objects.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from pydicom.dataset import Dataset

SUPERSEDED_DIR = "superseded"


def superseded_copy_path(instance_path: Path) -> Path:
    """A new, unique name under ``superseded/`` for the current content of ``instance_path``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return instance_path.parent / SUPERSEDED_DIR / f"{instance_path.stem}.{stamp}-{uuid.uuid4().hex[:8]}.dcm"


def revision_of(instance_path: str | os.PathLike[str] | None) -> int:
    """How many earlier contents of the instance at ``instance_path`` the spool kept (0: never replaced)."""
    if not instance_path:
        return 0
    path = Path(instance_path)
    folder = path.parent / SUPERSEDED_DIR
    if not folder.is_dir():
        return 0
    return sum(1 for _ in folder.glob(f"{path.stem}.*.dcm"))


def source_revision(ds: Dataset) -> int:
    """The revision of a source dataset read from the spool (its ``filename``); 0 for one read from elsewhere."""
    filename = getattr(ds, "filename", None)
    return revision_of(filename) if isinstance(filename, (str, os.PathLike)) else 0


def same_data_set(a: Path, b: Path) -> bool:
    """Whether two DICOM files hold the same encoded data set, File Meta aside (it records who sent it, not what)."""
    from pynetdicom.dsutils import split_dataset

    _, offset_a = split_dataset(a)
    _, offset_b = split_dataset(b)
    if a.stat().st_size - offset_a != b.stat().st_size - offset_b:
        return False
    chunk = 1 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(offset_a)
        fb.seek(offset_b)
        while True:
            block_a, block_b = fa.read(chunk), fb.read(chunk)
            if block_a != block_b:
                return False
            if not block_a:
                return True
