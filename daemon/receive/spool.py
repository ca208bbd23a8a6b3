"""Durable, streaming spool for instances received over C-STORE.

The listener must never answer *Success* for an instance it could still lose, and it must never
hold a whole study (hundreds of megabytes of radiographs) in memory. pynetdicom 3 already streams
the P-DATA of a C-STORE request into a temporary file when ``_config.STORE_RECV_CHUNKED_DATASET``
is ``True`` (see ``DIMSEMessage.decode_msg``); the file at ``Event.dataset_path`` holds the File
Meta Information pynetdicom wrote followed by the data set exactly as the peer encoded it, and
pynetdicom deletes it once the ``EVT_C_STORE`` handler returns. The :class:`Spool` turns that
temporary file into a durable one:

1. read only the identifying tags (``specific_tags``, ``stop_before_pixels``) and validate them:
   the UIDs become path components, so anything that is not a DICOM UID is refused;
2. fsync the file pynetdicom wrote, which :mod:`daemon.receive.pynetdicom_patches.receive_file` placed in ``data_dir/tmp/`` (same
   filesystem, so no byte is written twice; the kernel's writeback started while it streamed in), and keep the
   calling AE title beside it as the extended attribute ``user.bonebridge.calling_ae`` rather than rewriting
   the file;
3. ``os.replace`` it into ``data_dir/incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` and fsync
   the directory, so that the rename itself survives a power cut. An identical re-send leaves the stored file
   alone; one with other content keeps the stored file under ``superseded/`` first (:mod:`daemon.store.revisions`).

A data set that arrived some other way (pynetdicom's own temporary file elsewhere, or in memory) is copied
into ``data_dir/tmp/`` with its File Meta plus *Source Application Entity Title*, then steps 2 and 3 follow.
Below ``min_free_bytes`` of free space new instances are refused with 0xA700 before anything is written, and
a disk that fills part-way through an instance gets 0xA700 and no partial file; both recover by themselves once
space is freed.

Only then does the listener report success. Our own outputs (SR / Secondary Capture that a PACS
routes back to us) are stored under ``data_dir/returned/`` instead, so that neither the assembler nor
the crash recovery ever treat them as new input.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import split_dataset

from daemon.output.own_output import is_own_output as recognise_own_output
from daemon.receive.pynetdicom_patches.receive_file import ReceiveFile, ReceiveTarget, under_floor
from daemon.store.atomic import fsync_dir
from daemon.store.revisions import same_data_set, superseded_copy_path
from daemon.store.layout import DataDir

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.events import Event

LOGGER = logging.getLogger(__name__)

#: C-STORE status codes the spool answers with (PS3.4 Annex B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

#: Copy buffer: large enough for few syscalls, small enough to never matter for memory.
CHUNK_SIZE = 1024 * 1024

#: A DICOM UID (PS3.5 9.1): digits and dots, components without leading zeros, at most 64 chars.
#: Checked strictly because UIDs become file and directory names.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

#: SOP classes our own outputs use; only these are checked with the (header-reading) own-output test.
OWN_OUTPUT_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    }
)

_IDENTIFYING_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]

#: The extended attribute holding the calling AE title of a spooled instance (the file itself stays as received).
CALLING_AE_XATTR = "user.bonebridge.calling_ae"


@dataclass(frozen=True)
class InstanceEvent:
    """One instance durably on disk, as reported to the study assembler."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    calling_ae: str
    assoc_id: str
    own_output: bool = False  # one of BoneBridge's own SR/SC coming back: never re-processed
    accession_number: str = ""  # for finding the study on the status page (not a patient identifier)
    #: Set when this instance replaced other content under the same UID: where the earlier file is kept.
    superseded: str = ""


class SpoolError(Exception):
    """An instance could not be spooled; ``status`` is the C-STORE status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def is_valid_uid(value: object) -> bool:
    """Return True if *value* is a syntactically valid DICOM UID (safe as a file name)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def _mkdir_durable(path: Path) -> None:
    """Create *path* (one level) if needed and make its directory entry durable."""
    if path.is_dir():
        return
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


class Spool:
    """The on-disk spool under ``data_dir`` (see the module docstring for the layout).

    *is_own_output* decides whether a received SR / Secondary Capture is one of ours; by default
    :func:`daemon.output.own_output.is_own_output` (pydicom only, no highdicom).
    """

    def __init__(
        self,
        data_dir: str | Path,
        is_own_output: Callable[[Dataset], bool] | None | bool = True,
        min_free_bytes: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.min_free_bytes = int(min_free_bytes)
        self.incoming_dir = DataDir(self.data_dir).incoming
        self.returned_dir = DataDir(self.data_dir).returned
        self.tmp_dir = DataDir(self.data_dir).tmp
        for d in (self.data_dir, self.incoming_dir, self.returned_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        if is_own_output is True:
            self._is_own_output = recognise_own_output
        elif is_own_output is False:
            self._is_own_output = None
        else:
            self._is_own_output = is_own_output

    # -- housekeeping ---------------------------------------------------------------------------

    def clean_tmp(self) -> int:
        """Delete partial files left in ``tmp/`` by a crash; they were never acknowledged.

        Returns the number of files removed. Call it once at start-up, before the listener runs.
        """
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            LOGGER.info("removed %d unacknowledged partial file(s) from %s", removed, self.tmp_dir)
        return removed

    @property
    def receive_target(self) -> ReceiveTarget:
        """Where :mod:`daemon.receive.pynetdicom_patches.receive_file` should stream data sets for this spool."""
        return ReceiveTarget(self.tmp_dir, self.min_free_bytes)

    def instance_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        """Where the instance with these UIDs lives once received."""
        return self.incoming_dir / study_uid / f"{sop_instance_uid}.dcm"

    # -- receiving ------------------------------------------------------------------------------

    def store_event(self, event: Event, calling_ae: str, assoc_id: str) -> InstanceEvent:
        """Spool the data set of a pynetdicom ``EVT_C_STORE`` event; raise :class:`SpoolError`.

        With ``STORE_RECV_CHUNKED_DATASET`` the data set is already in a file and is copied in
        chunks. Without it (someone reset the flag) pynetdicom holds the encoded data set in memory
        and it is written from there; both paths end in the same durable rename.
        """
        req = event.request
        received = getattr(req, "_dataset_file", None)
        if isinstance(received, ReceiveFile):
            return self.store_received(
                received,
                calling_ae,
                assoc_id,
                expected_sop_class=str(req.AffectedSOPClassUID),
                expected_sop_instance=str(req.AffectedSOPInstanceUID),
            )
        try:
            src: Path | None = event.dataset_path
        except AttributeError:
            src = None
        if src is None:
            # Not chunked: spill pynetdicom's in-memory copy to a temporary file first.
            spill = self.tmp_dir / f"{uuid.uuid4().hex}.recv"
            self._check_free_space()
            try:
                with open(spill, "wb") as f:
                    f.write(event.encoded_dataset(include_meta=True))
                return self.store_file(
                    spill,
                    calling_ae,
                    assoc_id,
                    expected_sop_class=str(req.AffectedSOPClassUID),
                    expected_sop_instance=str(req.AffectedSOPInstanceUID),
                )
            except OSError as exc:
                raise SpoolError(STATUS_OUT_OF_RESOURCES, f"cannot write to the spool: {exc}") from exc
            finally:
                _discard(spill)
        return self.store_file(
            Path(src),
            calling_ae,
            assoc_id,
            expected_sop_class=str(req.AffectedSOPClassUID),
            expected_sop_instance=str(req.AffectedSOPInstanceUID),
        )

    def store_file(
        self,
        src: Path,
        calling_ae: str,
        assoc_id: str,
        *,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
    ) -> InstanceEvent:
        """Durably copy the DICOM file *src* into the spool and describe it.

        *expected_sop_class* / *expected_sop_instance* are the C-STORE request's Affected SOP
        Class / Instance UIDs; a data set that contradicts its own request is refused (0xA900).
        Raises :class:`SpoolError` with the status to answer.
        """
        ident = self._identify(src, expected_sop_class, expected_sop_instance)
        own = self._check_own_output(src, ident["SOPClassUID"])
        self._check_free_space()
        tmp = self.tmp_dir / uuid.uuid4().hex
        try:
            self._write_durably(src, tmp, calling_ae)
            return self._place(tmp, ident, own, calling_ae, assoc_id)
        except OSError as exc:
            raise SpoolError(STATUS_OUT_OF_RESOURCES, f"cannot write to the spool: {exc}") from exc
        finally:
            _discard(tmp)

    def store_received(
        self,
        received: ReceiveFile,
        calling_ae: str,
        assoc_id: str,
        *,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
    ) -> InstanceEvent:
        """Make the file :mod:`daemon.receive.pynetdicom_patches.receive_file` streamed into ``tmp/`` durable and rename it into place.

        Nothing is copied: the file keeps pynetdicom's File Meta, and the calling AE goes into an extended
        attribute. Raises :class:`SpoolError` with the status to answer (the partial file is then removed).
        """
        path = Path(received.name)
        if not received.claim():
            raise SpoolError(STATUS_OUT_OF_RESOURCES, "the association ended while the data set was handled")
        try:
            if received.refused is not None:
                raise SpoolError(STATUS_OUT_OF_RESOURCES, f"refused before writing: {received.refused}")
            if received.error is not None:
                raise received.error
            ident = self._identify(path, expected_sop_class, expected_sop_instance)
            own = self._check_own_output(path, ident["SOPClassUID"])
            _set_calling_ae(path, calling_ae)
            received.sync()
            return self._place(path, ident, own, calling_ae, assoc_id)
        except OSError as exc:
            raise SpoolError(STATUS_OUT_OF_RESOURCES, f"cannot write to the spool: {exc}") from exc
        finally:
            _discard(path)  # a no-op once renamed into place

    # -- helpers --------------------------------------------------------------------------------

    def _check_free_space(self) -> None:
        """Refuse (0xA700) before writing when the spool's filesystem is under its free-space floor."""
        try:
            refused = under_floor(self.tmp_dir, self.min_free_bytes)
        except OSError as exc:
            raise SpoolError(STATUS_OUT_OF_RESOURCES, f"cannot stat the spool: {exc}") from exc
        if refused is not None:
            raise SpoolError(STATUS_OUT_OF_RESOURCES, f"refused before writing: {refused}")

    def _identify(self, src: Path, expected_sop_class: str | None,
                  expected_sop_instance: str | None) -> dict[str, str]:
        """The identifying UIDs of *src*, checked against the C-STORE request (0xA900 if they contradict it)."""
        ident = self._read_identity(src)
        sop_class, sop_instance = ident["SOPClassUID"], ident["SOPInstanceUID"]
        if expected_sop_instance and expected_sop_instance != sop_instance:
            raise SpoolError(
                STATUS_DATASET_MISMATCH,
                f"SOPInstanceUID {sop_instance} in the data set differs from the request's "
                f"{expected_sop_instance}",
            )
        if expected_sop_class and expected_sop_class != sop_class:
            raise SpoolError(
                STATUS_DATASET_MISMATCH,
                f"SOPClassUID {sop_class} in the data set differs from the request's {expected_sop_class}",
            )
        return ident

    def _place(self, tmp: Path, ident: dict[str, str], own: bool, calling_ae: str, assoc_id: str) -> InstanceEvent:
        """Rename the fsynced *tmp* into its study's folder and make the rename durable (raises ``OSError``)."""
        study, sop_instance = ident["StudyInstanceUID"], ident["SOPInstanceUID"]
        dest_dir = (self.returned_dir if own else self.incoming_dir) / study
        dest = dest_dir / f"{sop_instance}.dcm"
        _mkdir_durable(dest_dir)
        superseded = ""
        if not own and dest.exists():
            if _same_content(dest, tmp):
                # An identical re-send: the file already here (which a report may describe) stays as it is.
                return self._event(ident, dest, own, calling_ae, assoc_id)
            # Other content under the same UID: never overwrite what a report may have been made from. The earlier
            # file gets a second name first, so a crash before the rename below loses neither.
            keep = superseded_copy_path(dest)
            _mkdir_durable(keep.parent)
            os.link(dest, keep)
            fsync_dir(keep.parent)
            superseded = str(keep)
            LOGGER.warning("study %s: instance %s re-sent with other content; the earlier file is kept as %s",
                           study, sop_instance, keep.relative_to(self.incoming_dir))
        os.replace(tmp, dest)
        fsync_dir(dest_dir)
        return self._event(ident, dest, own, calling_ae, assoc_id, superseded)

    @staticmethod
    def _event(ident: dict[str, str], dest: Path, own: bool, calling_ae: str, assoc_id: str,
               superseded: str = "") -> InstanceEvent:
        study, sop_instance = ident["StudyInstanceUID"], ident["SOPInstanceUID"]
        return InstanceEvent(
            study_uid=study,
            series_uid=ident["SeriesInstanceUID"],
            sop_instance_uid=sop_instance,
            sop_class_uid=ident["SOPClassUID"],
            path=dest,
            calling_ae=calling_ae,
            assoc_id=assoc_id,
            own_output=own,
            accession_number=ident["AccessionNumber"],
            superseded=superseded,
        )

    @staticmethod
    def _read_identity(src: Path) -> dict[str, str]:
        """Read (only) the UIDs that place an instance; refuse what is not parseable or incomplete."""
        try:
            ds = dcmread(src, stop_before_pixels=True, specific_tags=[*_IDENTIFYING_TAGS, "AccessionNumber"])
            values = {kw: ds.get(kw) for kw in _IDENTIFYING_TAGS}
            accession = str(ds.get("AccessionNumber", "") or "").strip()
        except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, NotImplementedError) as exc:
            raise SpoolError(STATUS_CANNOT_UNDERSTAND, f"data set is not parseable: {exc}") from exc
        except RecursionError as exc:  # thousands of nested sequences: malformed, not a lack of resources
            raise SpoolError(STATUS_CANNOT_UNDERSTAND, "data set is not parseable: sequences nested too deeply") from exc
        except OSError as exc:
            raise SpoolError(STATUS_OUT_OF_RESOURCES, f"cannot read the received data set: {exc}") from exc
        missing = [kw for kw, v in values.items() if v in (None, "")]
        if missing:
            raise SpoolError(STATUS_CANNOT_UNDERSTAND, f"data set lacks {', '.join(missing)}")
        bad = [f"{kw}={v!r}" for kw, v in values.items() if not is_valid_uid(str(v))]
        if bad:
            raise SpoolError(STATUS_CANNOT_UNDERSTAND, f"invalid UID(s): {', '.join(bad)}")
        return {**{kw: str(v) for kw, v in values.items()}, "AccessionNumber": accession}

    def _check_own_output(self, src: Path, sop_class: str) -> bool:
        """Ask the own-output predicate, reading the header only for classes we ever emit."""
        if self._is_own_output is None or sop_class not in OWN_OUTPUT_SOP_CLASSES:
            return False
        try:
            header = dcmread(src, stop_before_pixels=True)
            return bool(self._is_own_output(header))
        except Exception:  # noqa: BLE001 - an unreadable header is simply "not ours"
            LOGGER.exception("own-output check failed for %s; treating it as new input", src)
            return False

    @staticmethod
    def _write_durably(src: Path, tmp: Path, calling_ae: str) -> None:
        """Write File Meta + encoded data set of *src* to *tmp* in chunks, then fsync."""
        file_meta, offset = split_dataset(src)
        meta = FileMetaDataset()
        for elem in file_meta:
            meta.add(elem)
        if calling_ae:
            meta.SourceApplicationEntityTitle = calling_ae.strip()[:16]
        if "TransferSyntaxUID" not in meta:
            raise SpoolError(STATUS_CANNOT_UNDERSTAND, "received file has no Transfer Syntax UID")
        meta.TransferSyntaxUID = UID(str(meta.TransferSyntaxUID))
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            fout.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(fout, meta, enforce_standard=True)  # type: ignore[arg-type]
            fin.seek(offset)
            _copy(fin, fout)
            fout.flush()
            os.fsync(fout.fileno())


def _same_content(stored: Path, received: Path) -> bool:
    """Whether ``received`` holds the data set already ``stored``; a stored file that cannot be read is "other"."""
    try:
        return same_data_set(stored, received)
    except OSError:
        raise
    except Exception:  # noqa: BLE001 - keep both rather than guess
        return False


def _discard(path: Path) -> None:
    """Best-effort removal of a partial file (the spool may be the thing that is broken)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _set_calling_ae(path: Path, calling_ae: str) -> None:
    """Keep the calling AE title with the file without rewriting it (silently skipped where unsupported)."""
    if not calling_ae or not hasattr(os, "setxattr"):
        return
    try:
        os.setxattr(path, CALLING_AE_XATTR, calling_ae.strip()[:16].encode("ascii", "replace"))
    except OSError as exc:
        LOGGER.debug("no extended attributes on %s (%s): calling AE not kept with the file", path, exc)


def _calling_ae_of(path: Path) -> str:
    """The calling AE of a spooled file: its extended attribute, else the File Meta's *Source AE Title*."""
    if hasattr(os, "getxattr"):
        try:
            return os.getxattr(path, CALLING_AE_XATTR).decode("ascii", "replace").strip()
        except OSError:
            pass
    try:
        meta, _ = split_dataset(path)
        return str(meta.get("SourceApplicationEntityTitle", "") or "").strip()
    except Exception:  # noqa: BLE001 - the identity read already proved the file parseable
        return ""


def _copy(fin: BinaryIO, fout: BinaryIO) -> None:
    shutil.copyfileobj(fin, fout, CHUNK_SIZE)


def describe_spooled(path: Path, assoc_id: str = "") -> InstanceEvent:
    """Rebuild the :class:`InstanceEvent` of a file already in the spool (used by crash recovery).

    The calling AE comes from the extended attribute the spool set (or, for a file the spool copied, the
    *Source Application Entity Title* it wrote into the File Meta). Raises :class:`SpoolError` if the file is not a usable instance.
    """
    ident = Spool._read_identity(path)
    calling_ae = _calling_ae_of(path)
    return InstanceEvent(
        study_uid=ident["StudyInstanceUID"],
        series_uid=ident["SeriesInstanceUID"],
        sop_instance_uid=ident["SOPInstanceUID"],
        sop_class_uid=ident["SOPClassUID"],
        path=path,
        calling_ae=calling_ae.strip(),
        assoc_id=assoc_id,
        accession_number=ident["AccessionNumber"],
    )
