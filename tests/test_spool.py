"""Spool: durable placement, validation of what a peer sends, and recovery helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from daemon.receive.spool import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    Spool,
    SpoolError,
    describe_spooled,
    is_valid_uid,
)

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def make_dx(
    path: Path,
    *,
    study_uid: str | None = None,
    sop_class: str = DX_PRESENTATION,
    rows: int = 32,
    cols: int = 24,
    seed: int = 0,
    **overrides: object,
) -> Dataset:
    """Write a small, valid DX image (random 12-bit pixels) and return its data set."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Bone"
    ds.PatientID = "BB0001"
    ds.Modality = "DX"
    ds.BodyPartExamined = "HAND"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_store_file_places_instance_durably_with_identical_content(tmp_path: Path) -> None:
    src = tmp_path / "src.dcm"
    original = make_dx(src)
    spool = Spool(tmp_path / "var", is_own_output=False)

    ev = spool.store_file(src, "MODALITY1", "assoc-1")

    expected = tmp_path / "var" / "incoming" / original.StudyInstanceUID / f"{original.SOPInstanceUID}.dcm"
    assert ev.path == expected and expected.is_file()
    assert (ev.study_uid, ev.sop_instance_uid) == (original.StudyInstanceUID, original.SOPInstanceUID)
    assert ev.series_uid == original.SeriesInstanceUID and ev.sop_class_uid == DX_PRESENTATION
    assert ev.calling_ae == "MODALITY1" and ev.assoc_id == "assoc-1" and not ev.own_output
    stored = pydicom.dcmread(expected)
    assert stored.PixelData == original.PixelData
    assert stored.file_meta.SourceApplicationEntityTitle == "MODALITY1"
    assert list((tmp_path / "var" / "tmp").iterdir()) == []  # nothing left behind


def test_redelivery_of_same_instance_overwrites(tmp_path: Path) -> None:
    src = tmp_path / "src.dcm"
    make_dx(src)
    spool = Spool(tmp_path / "var", is_own_output=False)
    first = spool.store_file(src, "A", "1")
    second = spool.store_file(src, "A", "2")
    assert first.path == second.path
    assert len(list(first.path.parent.iterdir())) == 1


def test_resend_with_other_content_keeps_both_files(tmp_path: Path) -> None:
    """Issue 28, case 3, at the spool: the same SOP Instance UID with other bytes never overwrites the stored file
    (a report may have been made from it); the earlier file stays under ``superseded/`` and the event says where.
    An identical re-send (the File Meta may differ: it records the sender) leaves the stored file alone."""
    from daemon.store.revisions import revision_of

    src = tmp_path / "src.dcm"
    original = make_dx(src, seed=1)
    spool = Spool(tmp_path / "var", is_own_output=False)
    first = spool.store_file(src, "A", "1")
    first_bytes = first.path.read_bytes()
    inode = first.path.stat().st_ino

    same = spool.store_file(src, "B", "2")  # other calling AE: other File Meta, same data set
    assert same.superseded == "" and same.path == first.path and first.path.stat().st_ino == inode
    assert not (first.path.parent / "superseded").exists() and revision_of(first.path) == 0

    other = tmp_path / "other.dcm"
    make_dx(other, seed=2, study_uid=original.StudyInstanceUID, SOPInstanceUID=original.SOPInstanceUID,
            SeriesInstanceUID=original.SeriesInstanceUID, BodyPartExamined="CHEST")
    replaced = spool.store_file(other, "A", "3")
    assert replaced.path == first.path and replaced.superseded
    kept = Path(replaced.superseded)
    assert kept.parent == first.path.parent / "superseded" and kept.read_bytes() == first_bytes
    assert pydicom.dcmread(first.path).BodyPartExamined == "CHEST"
    assert revision_of(first.path) == 1
    assert sorted(p.name for p in first.path.parent.glob("*.dcm")) == [first.path.name]  # the study's files


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"StudyInstanceUID": None}, "StudyInstanceUID"),
        ({"SOPInstanceUID": None}, "SOPInstanceUID"),
        ({"StudyInstanceUID": "../../etc"}, "invalid UID"),
        ({"SeriesInstanceUID": "1.2.03"}, "invalid UID"),  # leading zero: not a UID
    ],
)
def test_missing_or_unsafe_uids_are_refused(tmp_path: Path, override: dict, needle: str) -> None:
    src = tmp_path / "src.dcm"
    make_dx(src, **override)
    spool = Spool(tmp_path / "var", is_own_output=False)
    with pytest.raises(SpoolError) as info:
        spool.store_file(src, "A", "1")
    assert info.value.status == STATUS_CANNOT_UNDERSTAND
    assert needle in info.value.reason
    assert not any((tmp_path / "var" / "incoming").rglob("*.dcm"))


def test_garbage_is_cannot_understand(tmp_path: Path) -> None:
    src = tmp_path / "junk.dcm"
    src.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    with pytest.raises(SpoolError) as info:
        Spool(tmp_path / "var", is_own_output=False).store_file(src, "A", "1")
    assert info.value.status == STATUS_CANNOT_UNDERSTAND


def test_request_mismatch_is_a900(tmp_path: Path) -> None:
    src = tmp_path / "src.dcm"
    make_dx(src)
    spool = Spool(tmp_path / "var", is_own_output=False)
    with pytest.raises(SpoolError) as info:
        spool.store_file(src, "A", "1", expected_sop_instance="1.2.3.4")
    assert info.value.status == STATUS_DATASET_MISMATCH


def test_unwritable_spool_is_out_of_resources(tmp_path: Path) -> None:
    src = tmp_path / "src.dcm"
    make_dx(src)
    spool = Spool(tmp_path / "var", is_own_output=False)
    # Replace tmp/ with a plain file: every write below it fails with a real OSError.
    (tmp_path / "var" / "tmp").rmdir()
    (tmp_path / "var" / "tmp").write_text("not a directory")
    with pytest.raises(SpoolError) as info:
        spool.store_file(src, "A", "1")
    assert info.value.status == STATUS_OUT_OF_RESOURCES
    assert not any((tmp_path / "var" / "incoming").rglob("*.dcm"))


def test_own_outputs_go_to_returned(tmp_path: Path) -> None:
    src = tmp_path / "sc.dcm"
    sc = make_dx(src, sop_class="1.2.840.10008.5.1.4.1.1.7", Manufacturer="BoneBridge")
    spool = Spool(tmp_path / "var", is_own_output=lambda ds: ds.get("Manufacturer") == "BoneBridge")
    ev = spool.store_file(src, "PACS", "1")
    assert ev.own_output
    assert ev.path == tmp_path / "var" / "returned" / sc.StudyInstanceUID / f"{sc.SOPInstanceUID}.dcm"
    # A radiograph is never even asked about, whatever the predicate says.
    src2 = tmp_path / "dx.dcm"
    make_dx(src2, Manufacturer="BoneBridge")
    assert not spool.store_file(src2, "PACS", "1").own_output


def test_clean_tmp_and_describe_spooled(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var", is_own_output=False)
    (spool.tmp_dir / "partial").write_bytes(b"half a file")
    assert spool.clean_tmp() == 1 and list(spool.tmp_dir.iterdir()) == []
    src = tmp_path / "src.dcm"
    ds = make_dx(src)
    ev = spool.store_file(src, "CR_ROOM_2", "x")
    again = describe_spooled(ev.path)
    assert again.calling_ae == "CR_ROOM_2"
    assert again.sop_instance_uid == ds.SOPInstanceUID and again.study_uid == ds.StudyInstanceUID


def test_is_valid_uid() -> None:
    assert is_valid_uid("1.2.840.10008.1.1") and is_valid_uid("2.25.0")
    assert not is_valid_uid("1..2") and not is_valid_uid("1.2/3") and not is_valid_uid("1." + "1" * 70)
