"""Listener against real dcmtk clients (storescu / echoscu) over loopback."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from daemon.receive.listener import start_listener
from daemon.receive.spool import InstanceEvent, Spool
from tests.test_spool import make_dx

pytestmark = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")

try:
    import data_store

    RG3_J2KR = Path(data_store.__file__).parent / "data" / "RG3_J2KR.dcm"
except ImportError:  # pragma: no cover
    RG3_J2KR = Path("/nonexistent")


class Recorder:
    """Collects the listener's callbacks (thread-safe)."""

    def __init__(self) -> None:
        self.instances: list[InstanceEvent] = []
        self.closed: list[str] = []
        self._cv = threading.Condition()

    def on_instance(self, ev: InstanceEvent) -> None:
        assert ev.path.is_file(), "callback must only fire once the file is in place"
        with self._cv:
            self.instances.append(ev)
            self._cv.notify_all()

    def on_closed(self, assoc_id: str) -> None:
        with self._cv:
            self.closed.append(assoc_id)
            self._cv.notify_all()

    def wait_closed(self, n: int, timeout: float = 10.0) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: len(self.closed) >= n, timeout)


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[tuple[int, Spool, Recorder]]:
    cfg = SimpleNamespace(
        ae_title="BONEBRIDGE",
        host="127.0.0.1",
        port=0,
        allowed_callers=[
            SimpleNamespace(ae_title="STORESCU", host="127.0.0.1"),
            SimpleNamespace(ae_title="ECHOSCU", host=None),
            SimpleNamespace(ae_title="ELSEWHERE", host="10.255.255.1"),
        ],
        max_pdu=16384,
        network_timeout_s=10,
    )
    spool = Spool(tmp_path / "var", is_own_output=False)
    rec = Recorder()
    server = start_listener(cfg, spool, rec.on_instance, rec.on_closed)
    try:
        yield server.server_address[1], spool, rec
    finally:
        server.shutdown()


def storescu(port: int, *files: Path, aet: str = "STORESCU", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", aet, "-aec", "BONEBRIDGE", *extra, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_storescu_instances_land_on_disk_identical(listener, tmp_path: Path) -> None:
    port, spool, rec = listener
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    da = make_dx(a, seed=1)
    db = make_dx(b, study_uid=da.StudyInstanceUID, seed=2)

    result = storescu(port, a, b)

    assert result.returncode == 0, result.stderr
    assert rec.wait_closed(1)
    assert {ev.sop_instance_uid for ev in rec.instances} == {da.SOPInstanceUID, db.SOPInstanceUID}
    assert {ev.calling_ae for ev in rec.instances} == {"STORESCU"}
    assert len({ev.assoc_id for ev in rec.instances}) == 1
    assert rec.closed[0] == rec.instances[0].assoc_id
    for original in (da, db):
        stored_path = spool.instance_path(original.StudyInstanceUID, original.SOPInstanceUID)
        stored = pydicom.dcmread(stored_path)
        assert stored.SOPInstanceUID == original.SOPInstanceUID
        assert stored.PixelData == original.PixelData
    assert list(spool.tmp_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("path", "propose"),
    [
        # storescu offers only uncompressed syntaxes unless told: -xv JPEG 2000 lossless, -xr RLE.
        pytest.param(RG3_J2KR, "-xv", id="CR-jpeg2000-lossless",
                     marks=pytest.mark.skipif(not RG3_J2KR.is_file(), reason="pydicom-data not installed")),
        pytest.param(Path(get_testdata_file("SC_rgb_rle.dcm")), "-xr", id="SC-rle"),
    ],
)
def test_compressed_instances_keep_their_transfer_syntax(listener, path: Path, propose: str) -> None:
    port, spool, rec = listener
    original = pydicom.dcmread(path)
    result = storescu(port, path, extra=(propose,))
    assert result.returncode == 0, result.stderr
    stored = pydicom.dcmread(spool.instance_path(original.StudyInstanceUID, original.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert stored.PixelData == original.PixelData
    assert rec.instances[0].sop_class_uid == original.SOPClassUID


def test_listener_feeds_the_assembler(tmp_path: Path) -> None:
    """storescu -> listener -> assembler: the study completes after release + quiet period."""
    from daemon.assemble.assembler import StudyAssembler

    enqueued: list[tuple[str, int]] = []
    asm = StudyAssembler(tmp_path / "var", 0.5, lambda s, g: enqueued.append((s, g)))
    cfg = SimpleNamespace(
        ae_title="BONEBRIDGE",
        host="127.0.0.1",
        port=0,
        allowed_callers=[SimpleNamespace(ae_title="STORESCU", host=None)],
        max_pdu=0,
        network_timeout_s=10,
    )
    server = start_listener(cfg, Spool(tmp_path / "var", is_own_output=False), asm.instance_received,
                            asm.association_closed)
    try:
        files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
        first = make_dx(files[0], seed=5)
        make_dx(files[1], study_uid=first.StudyInstanceUID, seed=6)
        assert storescu(server.server_address[1], *files).returncode == 0
    finally:
        server.shutdown()
    deadline = time.time() + 10
    while time.time() < deadline and asm.get(first.StudyInstanceUID).open_associations:
        time.sleep(0.02)
    st = asm.get(first.StudyInstanceUID)
    assert st.open_associations == [] and st.calling_ae == "STORESCU"
    assert asm.poll(st.last_instance_at + 0.4) == []
    assert asm.poll(st.last_instance_at + 0.5) == [(first.StudyInstanceUID, 1)] == enqueued
    assert sorted(p.name for p in asm.list_instances(first.StudyInstanceUID)) == sorted(
        f"{pydicom.dcmread(f).SOPInstanceUID}.dcm" for f in files
    )


def test_echoscu_verification(listener) -> None:
    port, _, _ = listener
    result = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "BONEBRIDGE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_unknown_calling_ae_is_rejected(listener, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port, spool, rec = listener
    f = tmp_path / "a.dcm"
    make_dx(f)
    with caplog.at_level(logging.WARNING, logger="daemon.receive.listener"):
        result = storescu(port, f, aet="INTRUDER")
        # A known title from the wrong address is rejected too (ELSEWHERE is only allowed from 10.255.255.1).
        result2 = storescu(port, f, aet="ELSEWHERE")
    assert result.returncode != 0 and result2.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
    assert "'INTRUDER' at 127.0.0.1" in caplog.text and "calling AE title not recognised" in caplog.text
    assert "'ELSEWHERE' at 127.0.0.1" in caplog.text
    assert rec.instances == [] and not any(spool.incoming_dir.rglob("*.dcm"))


def test_unsupported_sop_class_is_refused(listener) -> None:
    port, spool, rec = listener
    result = storescu(port, Path(get_testdata_file("CT_small.dcm")))
    assert result.returncode != 0
    assert "no presentation context" in (result.stderr + result.stdout).lower()
    assert rec.instances == [] and not any(spool.incoming_dir.rglob("*.dcm"))


def test_empty_allowed_callers_rejects_everyone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = SimpleNamespace(
        ae_title="BONEBRIDGE", host="127.0.0.1", port=0, allowed_callers=[], max_pdu=0, network_timeout_s=10
    )
    with caplog.at_level(logging.WARNING, logger="daemon.receive.listener"):
        server = start_listener(cfg, Spool(tmp_path / "var", is_own_output=False), lambda e: None, lambda a: None)
        try:
            result = subprocess.run(
                ["echoscu", "-aet", "STORESCU", "-aec", "BONEBRIDGE", "127.0.0.1", str(server.server_address[1])],
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            server.shutdown()
    assert result.returncode != 0
    assert "EVERY association will be rejected" in caplog.text


def test_failing_callback_asks_sender_to_retry(tmp_path: Path) -> None:
    """If the assembler cannot record an instance, the sender must not get Success."""
    cfg = SimpleNamespace(
        ae_title="BONEBRIDGE",
        host="127.0.0.1",
        port=0,
        allowed_callers=[SimpleNamespace(ae_title="STORESCU", host=None)],
        max_pdu=0,
        network_timeout_s=10,
    )

    def broken(ev: InstanceEvent) -> None:
        raise OSError("state disk full")

    server = start_listener(cfg, Spool(tmp_path / "var", is_own_output=False), broken, lambda a: None)
    try:
        f = tmp_path / "a.dcm"
        make_dx(f)
        result = storescu(server.server_address[1], f, extra=("-v",))
    finally:
        server.shutdown()
    assert result.returncode != 0
    assert "Refused: OutOfResources" in result.stderr + result.stdout, result.stderr + result.stdout


def test_tcp_nodelay_is_set(tmp_path: Path) -> None:
    """The accepted socket has TCP_NODELAY (read back on the server side while a peer is connected)."""
    cfg = SimpleNamespace(
        ae_title="BONEBRIDGE",
        host="127.0.0.1",
        port=0,
        allowed_callers=[SimpleNamespace(ae_title="ECHOSCU", host=None)],
        max_pdu=0,
        network_timeout_s=10,
    )
    server = start_listener(cfg, Spool(tmp_path / "var", is_own_output=False), lambda e: None, lambda a: None)
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="BONEBRIDGE")
    try:
        assert assoc.is_established
        deadline = time.time() + 5
        while time.time() < deadline and not server.active_associations:
            time.sleep(0.02)
        flags = [
            a.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for a in server.active_associations
        ]
    finally:
        assoc.release()
        server.shutdown()
    assert flags and all(flags)


@pytest.mark.parametrize(("pynetdicom_level", "expected"), [(logging.WARNING, "none"), (logging.INFO, "standard")])
def test_pynetdicom_logging_handlers_are_bound_only_when_they_would_print(
        tmp_path: Path, pynetdicom_level: int, expected: str) -> None:
    """Its standard handlers log at INFO/DEBUG only; bound under a WARNING logger they cost an event per PDU."""
    from pynetdicom import _config

    from daemon.receive.listener import build_ae

    logger = logging.getLogger("pynetdicom")
    saved_level, saved_setting = logger.level, _config.LOG_HANDLER_LEVEL
    try:
        logger.setLevel(pynetdicom_level)
        _config.LOG_HANDLER_LEVEL = "standard"
        cfg = SimpleNamespace(ae_title="BONEBRIDGE", host="127.0.0.1", port=0, allowed_callers=[], max_pdu=0,
                              network_timeout_s=10)
        build_ae(cfg, Spool(tmp_path / "var", is_own_output=False), lambda ev: None, lambda assoc_id: None)
        assert _config.LOG_HANDLER_LEVEL == expected
    finally:
        logger.setLevel(saved_level)
        _config.LOG_HANDLER_LEVEL = saved_setting


def test_refused_contexts_make_one_line_per_association(listener, caplog: pytest.LogCaptureFixture) -> None:
    """A caller proposing every storage class it knows (as storescu and many PACS do) gets one INFO line naming how
    many contexts were refused and why, not a WARNING per context; a caller left with nothing gets a WARNING."""
    from pynetdicom import AE, StoragePresentationContexts

    port, _, _ = listener
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = StoragePresentationContexts[:120]
    with caplog.at_level(logging.INFO, logger="daemon.receive.listener"):
        assoc = ae.associate("127.0.0.1", port, ae_title="BONEBRIDGE")
        assert assoc.is_established and assoc.accepted_contexts and assoc.rejected_contexts
        refused = len(assoc.rejected_contexts)
        assoc.release()
        lines = [r for r in caplog.records if "presentation context(s) refused" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.INFO
        assert lines[0].getMessage().count(f"{refused} presentation context(s) refused: abstract syntax not supported")

        caplog.clear()
        ct_only = AE(ae_title="STORESCU")
        ct_only.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage: not a radiograph
        assoc = ct_only.associate("127.0.0.1", port, ae_title="BONEBRIDGE")
        if assoc.is_established:
            assoc.release()
        lines = [r for r in caplog.records if "presentation context(s) refused" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "CT Image Storage" in lines[0].getMessage()


def test_unknown_pynetdicom_version_is_refused_with_one_line_and_the_stock_path_still_receives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 26: the pynetdicom patches are behind one install() that knows which versions they were written for."""
    from daemon.receive import pynetdicom_patches

    monkeypatch.setattr(pynetdicom_patches, "_INSTALLED", None)
    monkeypatch.setattr("pynetdicom.__version__", "9.9.9")
    cfg = SimpleNamespace(ae_title="BONEBRIDGE", host="127.0.0.1", port=0,
                          allowed_callers=[SimpleNamespace(ae_title="STORESCU", host="127.0.0.1")],
                          max_pdu=16384, network_timeout_s=10)
    spool = Spool(tmp_path / "var", is_own_output=False)
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="daemon.receive.pynetdicom_patches"):
        server = start_listener(cfg, spool, rec.on_instance, rec.on_closed)
    try:
        refusals = [r.getMessage() for r in caplog.records if r.name == "daemon.receive.pynetdicom_patches"]
        assert len(refusals) == 1 and "pynetdicom 9.9.9" in refusals[0] and "stock code path" in refusals[0]
        assert not pynetdicom_patches.installed()
        fake = SimpleNamespace(dul=SimpleNamespace())
        pynetdicom_patches.on_connection_open(fake, spool.receive_target)
        assert fake.dul.__class__ is SimpleNamespace and vars(fake.dul) == {}
        a = tmp_path / "a.dcm"
        original = make_dx(a, seed=3)
        result = storescu(server.server_address[1], a)
        assert result.returncode == 0, result.stderr
        assert rec.wait_closed(1)
        stored = pydicom.dcmread(spool.instance_path(original.StudyInstanceUID, original.SOPInstanceUID))
        assert stored.PixelData == original.PixelData
    finally:
        server.shutdown()
