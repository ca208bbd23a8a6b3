"""Receiving straight into the spool: each byte written once, a free-space floor, a disk that fills mid-instance.

The disk-full cases use a real small filesystem (a tmpfs mounted for the test; skipped without root) and a real
listener on a real socket, sent to by pynetdicom (which reports the exact C-STORE status) and dcmtk's storescu.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from daemon.receive.listener import start_listener
from daemon.receive.pynetdicom_patches.receive_file import ReceiveFile, ReceiveTarget, free_bytes
from daemon.receive.spool import CALLING_AE_XATTR, STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, Spool, describe_spooled
from tests.dicom_factory import make_dx
from tests.small_filesystem import fill, small_filesystem


def _listener(spool: Spool) -> SimpleNamespace:
    return SimpleNamespace(ae_title="BONEBRIDGE", host="127.0.0.1", port=0, max_pdu=0, network_timeout_s=10,
                           allowed_callers=[SimpleNamespace(ae_title="STORESCU", host=None)])


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[tuple[int, Spool, list]]:
    spool = Spool(tmp_path / "var", is_own_output=False)
    received: list = []
    server = start_listener(_listener(spool), spool, received.append, lambda a: None)
    try:
        yield server.server_address[1], spool, received
    finally:
        server.shutdown()


def _send(port: int, files: list[Path]) -> list[int]:
    """Send *files* over one association with pynetdicom; the C-STORE status of each."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEBRIDGE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def test_received_file_is_renamed_not_copied_and_keeps_the_calling_ae(listening, tmp_path: Path) -> None:
    """The spooled file is the one pynetdicom streamed (File Meta as received), with the AE as an attribute."""
    port, spool, received = listening
    original = make_dx(tmp_path / "a.dcm", size=256)
    result = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "BONEBRIDGE", "127.0.0.1", str(port),
                             str(tmp_path / "a.dcm")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    path = spool.instance_path(original.StudyInstanceUID, original.SOPInstanceUID)
    stored = pydicom.dcmread(path)
    assert stored.PixelData == original.PixelData
    assert "SourceApplicationEntityTitle" not in stored.file_meta  # not rewritten
    try:
        assert os.getxattr(path, CALLING_AE_XATTR) == b"STORESCU"
    except OSError as exc:  # a filesystem without user extended attributes
        pytest.skip(f"no extended attributes here: {exc}")
    assert describe_spooled(path).calling_ae == "STORESCU"
    assert [ev.calling_ae for ev in received] == ["STORESCU"]
    assert list(spool.tmp_dir.iterdir()) == []


def test_below_the_floor_nothing_is_created(tmp_path: Path) -> None:
    """A ReceiveFile on a filesystem under its floor refuses before creating anything, and says why."""
    target = ReceiveTarget(tmp_path, min_free_bytes=free_bytes(tmp_path) + 2**40)
    received = ReceiveFile(target)
    assert received.write(b"x" * 1000) == 1000
    received.close()
    assert received.refused is not None and "storage.min_free_mb" in received.refused
    assert list(tmp_path.iterdir()) == []


def test_disk_full_mid_instance_answers_a700_and_recovers(tmp_path: Path) -> None:
    """No floor, a 12 MiB filesystem: the second 8 MB instance fills it; 0xA700, no partial file; freed, it works."""
    with small_filesystem(tmp_path / "small", 12) as mount:
        spool = Spool(mount / "var", is_own_output=False, min_free_bytes=0)
        received: list = []
        server = start_listener(_listener(spool), spool, received.append, lambda a: None)
        try:
            port = server.server_address[1]
            first, second = make_dx(tmp_path / "1.dcm", size=2048), make_dx(tmp_path / "2.dcm", size=2048)
            assert _send(port, [tmp_path / "1.dcm", tmp_path / "2.dcm"]) == [STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES]
            assert list(spool.tmp_dir.iterdir()) == []  # nothing half-written kept
            assert not spool.instance_path(second.StudyInstanceUID, second.SOPInstanceUID).exists()
            assert [ev.sop_instance_uid for ev in received] == [first.SOPInstanceUID]

            spool.instance_path(first.StudyInstanceUID, first.SOPInstanceUID).unlink()
            assert _send(port, [tmp_path / "2.dcm"]) == [STATUS_SUCCESS]
            assert pydicom.dcmread(spool.instance_path(second.StudyInstanceUID, second.SOPInstanceUID)).PixelData \
                == second.PixelData
        finally:
            server.shutdown()


def test_floor_refuses_before_writing_and_recovers_by_itself(tmp_path: Path) -> None:
    """With a 16 MiB floor on a 40 MiB filesystem, instances are refused once under it, without writing; freed, accepted."""
    with small_filesystem(tmp_path / "small", 40) as mount:
        spool = Spool(mount / "var", is_own_output=False, min_free_bytes=16 * 2**20)
        filler = fill(mount / "filler", 12)
        server = start_listener(_listener(spool), spool, lambda e: None, lambda a: None)
        try:
            port = server.server_address[1]
            files = [tmp_path / f"{i}.dcm" for i in range(4)]
            for i, f in enumerate(files):
                make_dx(f, size=2048, seed=i)
            statuses = _send(port, files[:3])
            # 28 MiB free: 8 MiB in (20 left), 8 MiB in (12 left, under 16), then refused
            assert statuses == [STATUS_SUCCESS, STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES]
            free_after_refusal = free_bytes(mount)
            assert _send(port, [files[3]]) == [STATUS_OUT_OF_RESOURCES]
            assert free_bytes(mount) == free_after_refusal  # refused before writing a byte
            assert list(spool.tmp_dir.iterdir()) == []

            filler.unlink()
            assert _send(port, [files[3]]) == [STATUS_SUCCESS]
        finally:
            server.shutdown()
