"""Bad input against a real ``bonebridge serve`` (issue 10 part 7): the listener must refuse what it cannot
use with the right DIMSE status or association outcome, say why in its log, and keep answering C-ECHO.

One ``serve`` runs for the whole module (quiet period of an hour, so the worker never analyses anything, and a
network timeout of 3 s); its destination is a free port nobody listens on. The clients are independent of the
daemon: dcmtk's ``storescu`` / ``echoscu`` where they can send the thing, pynetdicom as a client where dcmtk
cannot (a data set contradicting its own request, a data set that is not DICOM), and raw sockets for abuse below
DIMSE (garbage, absurd PDU lengths, truncated PDUs, silence, rapid connects).

Every data set carries the patient identifiers below; the last tests check that none of them, and no raw
control character from a peer, ever reaches the log.

What the listener guarantees for pixel data: it validates only what places an instance on disk (SOP class and
instance, study and series UIDs) and stores everything else as received, so a parseable instance with absurd
pixels is answered 0x0000 and kept byte for byte; deciding that an image cannot be decoded is the worker's job
(it answers the study with a "not processed" report).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import socket
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from daemon.receive.listener import TRANSFER_SYNTAXES
from tests.bonebridge_process import BoneBridgeProcess, write_config
from tests.dicom_factory import make_dx
from tests.orthanc_fixture import LOCALHOST, echoscu, free_port, storescu, wait_for

pytestmark = pytest.mark.integration

DX = DigitalXRayImageStorageForPresentation
NETWORK_TIMEOUT_S = 3.0
#: How much later than ``listener.network_timeout_s`` the daemon may free a connection (a loaded 2-core box).
MARGIN_S = 2.0

PATIENT_NAME = "Quaxley^Zebulon"
PATIENT_ID = "PID-QX-4711"
HOSTILE_NAME = "Mallory\r\nERROR forged log line\x1b[31m^Evil\x1b[0m\x1b]0;pwned\x07"
HOSTILE_ID = "PID-EVIL-0815\n\x1b[2J"
#: Strings that must never appear in the daemon's log (the parts of the names and ids above).
PATIENT_STRINGS = ("Quaxley", "Zebulon", "PID-QX-4711", "Mallory", "forged log line", "pwned", "PID-EVIL-0815")

try:
    import data_store

    PYDICOM_DATA = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover - pydicom-data is a test dependency
    PYDICOM_DATA = Path("/nonexistent")
JPEG_LOSSLESS_FILE = PYDICOM_DATA / "JPEG-LL.dcm"  # 16-bit MONOCHROME2, Process 14 SV1
PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


# --------------------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, dcmtk: None) -> Iterator[BoneBridgeProcess]:
    """``bonebridge serve`` for the module: network timeout 3 s, no analysis, no PACS behind it."""
    workdir = tmp_path_factory.mktemp("bad-input")
    listener = {
        "ae_title": "BONEBRIDGE", "host": LOCALHOST, "port": free_port(),
        "allowed_callers": [{"ae_title": t, "host": LOCALHOST} for t in ("ORTHANC", "STORESCU", "ECHOSCU")],
        "network_timeout_s": NETWORK_TIMEOUT_S,
    }
    config = write_config(workdir, pacs_port=free_port(), quiet_period_s=3600, extra={"listener": listener})
    with BoneBridgeProcess(config) as proc:
        yield proc


class DaemonNotServing(RuntimeError):
    """serve died or stopped answering C-ECHO. Not an AssertionError, so that an ``xfail(raises=AssertionError)``
    for a known bug never hides it."""


def assert_still_serving(daemon: BoneBridgeProcess) -> None:
    """The serve process is alive and answers dcmtk's echoscu."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        raise DaemonNotServing(f"serve is not running\n{daemon.log_tail()}")
    result = echoscu(daemon.port, "BONEBRIDGE", timeout=30)
    if result.returncode != 0:
        raise DaemonNotServing(f"no C-ECHO answer: {result.stdout}{result.stderr}\n{daemon.log_tail(20)}")


def log_size(daemon: BoneBridgeProcess) -> int:
    return daemon.log_path.stat().st_size


def log_since(daemon: BoneBridgeProcess, offset: int) -> str:
    with open(daemon.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", errors="replace")


def wait_log(daemon: BoneBridgeProcess, offset: int, pattern: str, timeout: float = 10.0) -> str:
    """Wait until the log written since ``offset`` matches ``pattern``; return that part of the log."""
    def found() -> str | None:
        text = log_since(daemon, offset)
        return text if re.search(pattern, text) else None

    try:
        return wait_for(found, timeout, interval=0.1, what=f"log line /{pattern}/")
    except TimeoutError:
        raise AssertionError(f"no log line matching /{pattern}/ within {timeout} s; the log said:\n"
                             f"{log_since(daemon, offset)[-3000:]}") from None


def spool_files(daemon: BoneBridgeProcess) -> set[Path]:
    """Every file in the spool's incoming/, returned/ and tmp/ folders."""
    return {p for sub in ("incoming", "returned", "tmp") for p in (daemon.data_dir / sub).rglob("*") if p.is_file()}


def stored_path(daemon: BoneBridgeProcess, ds: Dataset) -> Path:
    return daemon.data_dir / "incoming" / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"


# --------------------------------------------------------------------------- data sets


def dx(path: Path, **kwargs: object) -> Dataset:
    """A small DX file with this module's patient identifiers (``make_dx`` arguments may override)."""
    args: dict[str, object] = {"size": 16, "patient_name": PATIENT_NAME, "patient_id": PATIENT_ID, **kwargs}
    return make_dx(path, **args)  # type: ignore[arg-type]


def resave(ds: Dataset, mutate: Callable[[Dataset], object]) -> Dataset:
    """Apply ``mutate`` to a written data set and write it again to the same file."""
    mutate(ds)
    ds.save_as(ds.filename, enforce_file_format=True)
    return ds


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file (what follows its File Meta)."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def raw_instance(path: Path, body: bytes, *, sop_instance: str, sop_class: str = DX,
                 transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """A file whose File Meta names the C-STORE request's UIDs and whose data set is ``body``, byte for byte."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)
        f.write(body)
    return path


def store_status(daemon: BoneBridgeProcess, path: Path, *extra: str) -> int | None:
    """C-STORE one file with dcmtk's storescu; the DIMSE status it got (None: no response at all)."""
    result = storescu(daemon.port, "BONEBRIDGE", [path], extra=("-d", *extra), timeout=300)
    match = re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", result.stdout + result.stderr)
    return int(match.group(1), 16) if match else None


@contextmanager
def chunked_send() -> Iterator[None]:
    """Make pynetdicom send a file's data set bytes as they are (request UIDs from its File Meta)."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def pynetdicom_store(daemon: BoneBridgeProcess, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> int:
    """C-STORE ``path`` as it is with pynetdicom (for what dcmtk will not send); returns the DIMSE status."""
    sop_class = str(split_dataset(path)[0].MediaStorageSOPClassUID)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(sop_class, [transfer_syntax])
    with chunked_send():
        assoc = ae.associate(LOCALHOST, daemon.port, ae_title="BONEBRIDGE")
        assert assoc.is_established, "association refused"
        try:
            response = assoc.send_c_store(path)
        finally:
            assoc.release()
    assert "Status" in response, f"no C-STORE response: {response}"
    return int(response.Status)


# --------------------------------------------------------------------------- raw PDUs


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(calling: bytes = b"ECHOSCU", called: bytes = b"BONEBRIDGE",
                 contexts: tuple[tuple[str, tuple[str, ...]], ...] = ((Verification, (ImplicitVRLittleEndian,)),)
                 ) -> bytes:
    """An A-ASSOCIATE-RQ PDU built by hand (so the AE titles can be anything at all)."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    for i, (abstract, syntaxes) in enumerate(contexts):
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        body += _item(0x20, bytes([2 * i + 1, 0, 0, 0]) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.9999"))
    return struct.pack(">BBL", 1, 0, len(body)) + body


def p_data(context_id: int, fragments: list[bytes]) -> bytes:
    """A P-DATA-TF PDU; each fragment starts with its message control header byte."""
    body = b"".join(struct.pack(">LB", 1 + len(f), context_id) + f for f in fragments)
    return struct.pack(">BBL", 4, 0, len(body)) + body


RELEASE_RQ = struct.pack(">BBL", 5, 0, 4) + bytes(4)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """The next PDU as (type, body); (0, b"") when the peer closed the connection first."""
    sock.settimeout(timeout)
    header = recv_exactly(sock, 6)
    if len(header) < 6:
        return 0, b""
    kind, _, length = struct.unpack(">BBL", header)
    return kind, recv_exactly(sock, length)


def context_results(ac_body: bytes) -> dict[int, int]:
    """Context id -> result, from an A-ASSOCIATE-AC body (0 acceptance, 3 abstract syntax not supported,
    4 transfer syntaxes not supported)."""
    results, i = {}, 68
    while i + 4 <= len(ac_body):
        kind, length = ac_body[i], struct.unpack(">H", ac_body[i + 2:i + 4])[0]
        if kind == 0x21:
            results[ac_body[i + 4]] = ac_body[i + 6]
        i += 4 + length
    return results


@contextmanager
def connection(daemon: BoneBridgeProcess, source: str = LOCALHOST) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
        sock.connect((LOCALHOST, daemon.port))
        yield sock
    finally:
        sock.close()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the daemon closed the connection within ``seconds`` (whatever it sent first is read and dropped)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (kB for the Vm* fields)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def established(sock: socket.socket) -> None:
    """Associate as STORESCU over a raw socket with one accepted context, id 1: DX in Explicit VR Little Endian."""
    sock.sendall(associate_rq(b"STORESCU", contexts=((DX, (ExplicitVRLittleEndian,)),)))
    kind, body = read_pdu(sock)
    assert kind == 0x02 and context_results(body) == {1: 0}, (kind, body[:40])


# =========================================================================== identifying UIDs


def _contradicting_files(tmp_path: Path, which: str) -> tuple[Path, Dataset]:
    ds = dx(tmp_path / "im.dcm")
    if which == "sop-instance":
        return raw_instance(tmp_path / "raw.dcm", dataset_bytes(Path(ds.filename)), sop_instance=generate_uid()), ds
    return raw_instance(tmp_path / "raw.dcm", dataset_bytes(Path(ds.filename)), sop_instance=ds.SOPInstanceUID,
                        sop_class=ComputedRadiographyImageStorage), ds


@pytest.mark.parametrize(("which", "keyword"), [("sop-instance", "SOPInstanceUID"), ("sop-class", "SOPClassUID")])
def test_data_set_contradicting_its_request_is_refused_0xA900(daemon: BoneBridgeProcess, tmp_path: Path,
                                                               which: str, keyword: str) -> None:
    """A data set whose SOP Instance / SOP Class UID differs from the C-STORE request's: 0xA900, nothing kept."""
    path, ds = _contradicting_files(tmp_path, which)
    before, mark = spool_files(daemon), log_size(daemon)
    assert pynetdicom_store(daemon, path) == 0xA900
    assert spool_files(daemon) == before
    wait_log(daemon, mark, rf"status 0xA900\): {keyword} .* differs from the request's")
    assert_still_serving(daemon)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"])
def test_missing_identifying_uid_is_refused_0xC210(daemon: BoneBridgeProcess, tmp_path: Path, keyword: str) -> None:
    """A data set without one of the UIDs that place it on disk: 0xC210 (cannot understand), nothing kept."""
    ds = resave(dx(tmp_path / "im.dcm"), lambda d: delattr(d, keyword))
    path = raw_instance(tmp_path / "raw.dcm", dataset_bytes(Path(ds.filename)), sop_instance=generate_uid()
                        if keyword == "SOPInstanceUID" else ds.SOPInstanceUID)
    before, mark = spool_files(daemon), log_size(daemon)
    assert pynetdicom_store(daemon, path) == 0xC210
    assert spool_files(daemon) == before
    wait_log(daemon, mark, rf"status 0xC210\): data set lacks {keyword}")
    assert_still_serving(daemon)


def test_empty_study_uid_is_refused_0xC210(daemon: BoneBridgeProcess, tmp_path: Path) -> None:
    """A zero-length StudyInstanceUID (sent by dcmtk) counts as missing: 0xC210."""
    ds = resave(dx(tmp_path / "im.dcm"), lambda d: setattr(d, "StudyInstanceUID", ""))
    before, mark = spool_files(daemon), log_size(daemon)
    assert store_status(daemon, Path(ds.filename)) == 0xC210
    assert spool_files(daemon) == before
    wait_log(daemon, mark, r"status 0xC210\): data set lacks StudyInstanceUID")
    assert_still_serving(daemon)


MALFORMED_UIDS = {
    "letters": "1.2.840.abc.7",
    "leading-zero": "1.2.840.01.7",
    "too-long": "1." + "2" * 63,  # 65 characters
    "path-traversal": "../../etc/passwd",
    "empty-component": "1.2..3",
    "trailing-dot": "1.2.3.",
    "backslash-two-values": "1.2.3\\4.5",
    "escape-codes": "1.2.3\x1b[31m",
}


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
@pytest.mark.parametrize("bad", list(MALFORMED_UIDS.values()), ids=list(MALFORMED_UIDS))
def test_malformed_uid_is_refused_0xC210(daemon: BoneBridgeProcess, tmp_path: Path, keyword: str, bad: str) -> None:
    """A UID that is not a DICOM UID (UIDs become file names) is refused with 0xC210 and nothing is written
    anywhere, inside the spool or outside it (path traversal); sent by dcmtk's storescu."""
    def spoil(d: Dataset) -> None:
        setattr(d, keyword, bad)
        if keyword == "SOPInstanceUID":
            d.file_meta.MediaStorageSOPInstanceUID = bad

    with warnings.catch_warnings():  # pydicom warns about writing an invalid UI value
        warnings.simplefilter("ignore")
        ds = resave(dx(tmp_path / "im.dcm"), spoil)
    before, mark = spool_files(daemon), log_size(daemon)
    assert store_status(daemon, Path(ds.filename)) == 0xC210
    assert spool_files(daemon) == before
    assert not (daemon.data_dir.parent / "etc").exists() and not (daemon.data_dir / "etc").exists()
    wait_log(daemon, mark, rf"status 0xC210\): invalid UID\(s\): {keyword}=")
    assert_still_serving(daemon)


# =========================================================================== data sets that are not DICOM


def _cut_in_header(tmp_path: Path) -> tuple[bytes, str]:
    ds = dx(tmp_path / "im.dcm")
    body = dataset_bytes(Path(ds.filename))
    return body[: body.index(b"\x20\x00\x0d\x00")], ds.SOPInstanceUID  # just before (0020,000D) Study UID


def _deep_sequences(depth: int = 5000) -> bytes:
    item = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000,
                                                                                      0xFFFFFFFF)
    return item * depth


def _not_a_pdu_type(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    return bytes(rnd.randrange(8, 256) for _ in range(size))


GARBAGE_DATA_SETS: dict[str, Callable[[Path], tuple[bytes, str]]] = {
    "random-bytes": lambda tmp: (random.Random(3).randbytes(4096), generate_uid()),
    "all-zero": lambda tmp: (bytes(4096), generate_uid()),
    "all-0xff": lambda tmp: (b"\xff" * 4096, generate_uid()),
    "cut-before-study-uid": _cut_in_header,
    "element-longer-than-data-set": lambda tmp: (
        struct.pack("<HH2sH", 0x0008, 0x0005, b"CS", 0xFFFF) + dataset_bytes(Path(dx(tmp / "im.dcm").filename)),
        generate_uid()),
    "undefined-length-OB": lambda tmp: (struct.pack("<HH2sHL", 0x0008, 0x0001, b"OB", 0, 0xFFFFFFFF) + bytes(64),
                                        generate_uid()),
    "5000-nested-sequences": lambda tmp: (_deep_sequences(), generate_uid()),
}


@pytest.mark.parametrize("kind", list(GARBAGE_DATA_SETS))
def test_data_set_that_is_not_dicom_is_refused_0xC210(daemon: BoneBridgeProcess, tmp_path: Path, kind: str) -> None:
    """Bytes that do not parse as a data set with the identifying UIDs: 0xC210 (cannot understand; a retry cannot
    help, so never 0xA700), nothing kept, and the log says why."""
    body, sop_instance = GARBAGE_DATA_SETS[kind](tmp_path)
    path = raw_instance(tmp_path / "raw.dcm", body, sop_instance=sop_instance)
    before, mark = spool_files(daemon), log_size(daemon)
    status = pynetdicom_store(daemon, path)
    assert_still_serving(daemon)
    assert status == 0xC210
    assert spool_files(daemon) == before
    wait_log(daemon, mark, r"refusing instance .* \(status 0xC210\): (data set lacks|data set is not parse)")


def test_data_set_cut_inside_its_pixel_data_is_stored_as_received(daemon: BoneBridgeProcess, tmp_path: Path) -> None:
    """A data set that ends 3001 bytes before the end of its Pixel Data element: the identifying UIDs parse, so
    the listener answers 0x0000 and keeps the bytes exactly as received (the worker refuses to decode it)."""
    ds = dx(tmp_path / "im.dcm", size=64)
    body = dataset_bytes(Path(ds.filename))[:-3001]
    path = raw_instance(tmp_path / "raw.dcm", body, sop_instance=ds.SOPInstanceUID)
    assert pynetdicom_store(daemon, path) == 0x0000
    assert dataset_bytes(stored_path(daemon, ds)) == body
    assert_still_serving(daemon)


# =========================================================================== pixel data


def _bits(allocated: int, stored: int) -> Callable[[Dataset], None]:
    def mutate(d: Dataset) -> None:
        d.BitsAllocated, d.BitsStored, d.HighBit = allocated, stored, stored - 1
    return mutate


PIXEL_CASES: dict[str, tuple[dict[str, object], Callable[[Dataset], object]]] = {
    "1x1": ({"pixels": np.array([[1234]], dtype=np.uint16)}, lambda d: None),
    "monochrome1": ({}, lambda d: (setattr(d, "PhotometricInterpretation", "MONOCHROME1"),
                                   setattr(d, "PresentationLUTShape", "INVERSE"))),
    "bits-allocated-8-with-16-bit-data": ({}, _bits(8, 8)),
    "bits-allocated-32-with-16-bit-data": ({}, _bits(32, 32)),
    "bits-stored-over-bits-allocated": ({}, _bits(16, 24)),
    "pixel-data-half-its-length": ({}, lambda d: setattr(d, "PixelData", d.PixelData[: len(d.PixelData) // 2])),
    "pixel-data-empty": ({}, lambda d: setattr(d, "PixelData", b"")),
    "no-pixel-data": ({}, lambda d: delattr(d, "PixelData")),
    "zero-rows-and-columns": ({}, lambda d: (setattr(d, "Rows", 0), setattr(d, "Columns", 0))),
    "three-samples-per-pixel-mono-data": ({}, lambda d: setattr(d, "SamplesPerPixel", 3)),
}


@pytest.mark.parametrize("case", list(PIXEL_CASES))
def test_parseable_instance_with_bad_pixels_is_stored_as_received(daemon: BoneBridgeProcess, tmp_path: Path,
                                                                  case: str) -> None:
    """Image attributes that contradict the pixel data (or tiny / MONOCHROME1 images): the UIDs are valid, so
    0x0000, and the stored instance has exactly the attributes and pixel bytes that were sent."""
    kwargs, mutate = PIXEL_CASES[case]
    ds = resave(dx(tmp_path / "im.dcm", **kwargs), mutate)
    assert store_status(daemon, Path(ds.filename)) == 0x0000
    stored = pydicom.dcmread(stored_path(daemon, ds))
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel", "PhotometricInterpretation",
                    "PixelData"):
        assert (stored.get(keyword) or None) == (ds.get(keyword) or None), keyword  # pydicom reads b"" as None
    assert_still_serving(daemon)


def test_8000_by_8000_image_is_stored(daemon: BoneBridgeProcess, tmp_path: Path) -> None:
    """An 8000 x 8000 16-bit image (128 MB) arrives whole: 0x0000 and its pixel bytes on disk under
    incoming/<study>/<sop>.dcm, without the daemon holding it in memory."""
    ds = dx(tmp_path / "big.dcm", pixels=np.full((8000, 8000), 1000, dtype=np.uint16))
    sent = hashlib.sha256(ds.PixelData).hexdigest()
    del ds.PixelData  # keep the test process small
    rss_before = proc_status(daemon.proc.pid, "VmRSS")
    assert store_status(daemon, Path(ds.filename)) == 0x0000
    path = stored_path(daemon, ds)
    assert path.stat().st_size > 8000 * 8000 * 2
    stored = pydicom.dcmread(path)
    assert (stored.Rows, stored.Columns) == (8000, 8000)
    assert hashlib.sha256(stored.PixelData).hexdigest() == sent
    del stored
    # streamed to disk: the daemon's resident memory did not keep the image (some slack for allocator noise)
    assert proc_status(daemon.proc.pid, "VmRSS") - rss_before < 100 * 1024
    assert_still_serving(daemon)


# =========================================================================== transfer syntaxes


def _pillow_jpeg(path: Path, transfer_syntax: str) -> Dataset:
    """An 8-bit DX compressed with Pillow's baseline JPEG encoder (also a valid Process 2 & 4 stream)."""
    from PIL import Image

    ds = dx(path, size=64)
    gray = (ds.pixel_array >> 4).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def _pydicom_compressed(path: Path, transfer_syntax: str) -> Dataset:
    """A 16-bit DX compressed by pydicom's own encoders (RLE, JPEG-LS, JPEG 2000)."""
    ds = dx(path, size=64)
    options = {JPEGLSNearLossless: {"jls_error": 2}, JPEG2000: {"j2k_cr": [20]}}.get(transfer_syntax, {})
    ds.compress(transfer_syntax, **options)
    return ds


def _uncompressed(path: Path, transfer_syntax: str) -> Dataset:
    ds = dx(path, size=64)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def _rewritten(source: Path, path: Path, transfer_syntax: str) -> Dataset:
    """A pydicom test file as a DX of our patient, labelled ``transfer_syntax`` (bitstream kept)."""
    if not source.is_file():
        pytest.skip(f"{source.name} missing (pydicom-data not installed)")
    ds = pydicom.dcmread(source)
    sop = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = DX, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = DX, sop
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.filename = str(path)
    return ds


#: transfer syntax -> (how to make an instance in it, storescu option proposing it; None: dcmtk has none)
TRANSFER_SYNTAX_CASES: dict[str, tuple[Callable[[Path, str], Dataset], str | None]] = {
    ImplicitVRLittleEndian: (_uncompressed, "-xi"),
    DeflatedExplicitVRLittleEndian: (_uncompressed, "-xd"),
    ExplicitVRBigEndian: (lambda p, ts: _rewritten(PYDICOM_TEST_FILES / "MR_small_bigendian.dcm", p, ts), "-xb"),
    RLELossless: (_pydicom_compressed, "-xr"),
    JPEGBaseline8Bit: (_pillow_jpeg, "-xy"),
    JPEGExtended12Bit: (_pillow_jpeg, "-xx"),
    # an SV1 bitstream is a valid Process 14 bitstream; storescu has no option that proposes plain Process 14
    JPEGLossless: (lambda p, ts: _rewritten(JPEG_LOSSLESS_FILE, p, ts), None),
    JPEGLosslessSV1: (lambda p, ts: _rewritten(JPEG_LOSSLESS_FILE, p, ts), "-xs"),
    JPEGLSLossless: (_pydicom_compressed, "-xt"),
    JPEGLSNearLossless: (_pydicom_compressed, "-xu"),
    JPEG2000Lossless: (_pydicom_compressed, "-xv"),
    JPEG2000: (_pydicom_compressed, "-xw"),
}


def test_every_promised_transfer_syntax_has_a_case() -> None:
    """The parametrisation below covers every transfer syntax the listener accepts (docs/conformance.md, linked
    from the README), Explicit VR Little Endian being what every other test here sends."""
    assert set(TRANSFER_SYNTAX_CASES) == set(TRANSFER_SYNTAXES) - {ExplicitVRLittleEndian}


@pytest.mark.parametrize("transfer_syntax", list(TRANSFER_SYNTAX_CASES),
                         ids=[pydicom.uid.UID(ts).keyword or ts for ts in TRANSFER_SYNTAX_CASES])
def test_promised_transfer_syntax_is_accepted_and_kept(daemon: BoneBridgeProcess, tmp_path: Path,
                                                       transfer_syntax: str) -> None:
    """An instance in each promised transfer syntax: 0x0000, stored in that transfer syntax with its pixel data
    unchanged, and it still decodes to the image that was sent."""
    make, option = TRANSFER_SYNTAX_CASES[transfer_syntax]
    path = tmp_path / "im.dcm"
    ds = make(path, transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    sent = pydicom.dcmread(path)
    assert sent.file_meta.TransferSyntaxUID == transfer_syntax
    status = store_status(daemon, path, option) if option else pynetdicom_store(daemon, path, transfer_syntax)
    assert status == 0x0000
    stored = pydicom.dcmread(stored_path(daemon, sent))
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    assert stored.PixelData == sent.PixelData
    assert np.array_equal(stored.pixel_array, sent.pixel_array)
    assert_still_serving(daemon)


def test_hostile_patient_name_is_stored_unchanged(daemon: BoneBridgeProcess, tmp_path: Path) -> None:
    """A PatientName / PatientID with CR LF and terminal escape codes: 0x0000, kept byte for byte (it is the
    PACS's data, not ours to clean); the last tests check it never reaches the log."""
    ds = dx(tmp_path / "im.dcm", patient_name=HOSTILE_NAME, patient_id=HOSTILE_ID)
    assert store_status(daemon, Path(ds.filename)) == 0x0000
    stored = pydicom.dcmread(stored_path(daemon, ds))
    assert stored["PatientName"].value == ds["PatientName"].value
    assert stored.PatientID == ds.PatientID
    assert_still_serving(daemon)


# =========================================================================== negotiation


UNSUPPORTED_SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "encapsulated-PDF": "1.2.840.10008.5.1.4.1.1.104.1",
    "not-a-sop-class": "1.2.3.4.5.6.7",
}
UNSUPPORTED_TRANSFER_SYNTAXES = {
    "HTJ2K": "1.2.840.10008.1.2.4.201",
    "MPEG2": "1.2.840.10008.1.2.4.100",
    "JPEG-XL": "1.2.840.10008.1.2.4.110",
    "private": "1.2.3.4.5.6.7.8",
}
REFUSED_CONTEXTS = [
    *[pytest.param(uid, ExplicitVRLittleEndian, 3, id=f"sop-class-{name}")
      for name, uid in UNSUPPORTED_SOP_CLASSES.items()],
    *[pytest.param(DX, uid, 4, id=f"transfer-syntax-{name}") for name, uid in UNSUPPORTED_TRANSFER_SYNTAXES.items()],
    pytest.param(Verification, JPEGBaseline8Bit, 4, id="verification-in-JPEG"),
]


@pytest.mark.parametrize(("abstract", "transfer", "result"), REFUSED_CONTEXTS)
def test_unsupported_context_is_refused_in_negotiation(daemon: BoneBridgeProcess, abstract: str, transfer: str,
                                                       result: int) -> None:
    """A presentation context the listener cannot use is refused in the A-ASSOCIATE-AC (result 3: abstract syntax
    not supported, 4: transfer syntaxes not supported), while a good context in the same request is accepted."""
    with connection(daemon) as sock:
        sock.sendall(associate_rq(b"STORESCU", contexts=((abstract, (transfer,)), (DX, (ExplicitVRLittleEndian,)))))
        kind, body = read_pdu(sock)
        assert kind == 0x02, (kind, body[:40])
        assert context_results(body) == {1: result, 3: 0}
        sock.sendall(RELEASE_RQ)
        assert read_pdu(sock)[0] == 0x06  # A-RELEASE-RP
    assert_still_serving(daemon)


def test_storescu_with_unsupported_sop_class_sends_nothing(daemon: BoneBridgeProcess, tmp_path: Path) -> None:
    """dcmtk's storescu with a CT image finds no presentation context: nothing is sent, nothing stored."""
    ds = pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.save_as(tmp_path / "ct.dcm")
    before = spool_files(daemon)
    result = storescu(daemon.port, "BONEBRIDGE", [tmp_path / "ct.dcm"])
    assert result.returncode != 0
    assert "no presentation context" in (result.stdout + result.stderr).lower()
    assert spool_files(daemon) == before
    assert_still_serving(daemon)


@pytest.mark.parametrize(("abstract", "transfer"), [(UNSUPPORTED_SOP_CLASSES["CT"], ExplicitVRLittleEndian),
                                                    (DX, UNSUPPORTED_TRANSFER_SYNTAXES["HTJ2K"])],
                         ids=["sop-class", "transfer-syntax"])
def test_refused_context_is_logged(daemon: BoneBridgeProcess, abstract: str, transfer: str) -> None:
    """The log says which context was refused and why (radiology IT needs it when a modality cannot send)."""
    mark = log_size(daemon)
    with connection(daemon) as sock:
        sock.sendall(associate_rq(b"STORESCU", contexts=((abstract, (transfer,)),)))
        assert read_pdu(sock)[0] == 0x02
        sock.sendall(RELEASE_RQ)
        read_pdu(sock)
    assert_still_serving(daemon)
    wait_log(daemon, mark, re.escape(abstract if abstract != DX else transfer), timeout=3)


# =========================================================================== callers


@pytest.mark.parametrize(("calling", "source"), [
    pytest.param("INTRUDER", LOCALHOST, id="unknown-title"),
    pytest.param("storescu", LOCALHOST, id="known-title-in-lower-case"),
    pytest.param("STORESCU", "127.0.0.2", id="known-title-from-another-address"),
])
def test_unknown_caller_is_rejected(daemon: BoneBridgeProcess, calling: str, source: str) -> None:
    """A caller not in allowed_callers gets A-ASSOCIATE-RJ rejected-permanent / service-user / calling AE title not
    recognised (1, 1, 3), and the log names the title and address."""
    mark = log_size(daemon)
    with connection(daemon, source) as sock:
        sock.sendall(associate_rq(calling.encode(), contexts=((DX, (ExplicitVRLittleEndian,)),)))
        kind, body = read_pdu(sock)
        assert kind == 0x03, (kind, body[:40])
        assert tuple(body[1:4]) == (1, 1, 3)
        assert closed_within(sock, 5)
    wait_log(daemon, mark, rf"rejecting association from calling AE '{calling}' at {re.escape(source)}: "
                           r"calling AE title not recognised")
    assert_still_serving(daemon)


def test_echoscu_with_unknown_title_is_rejected(daemon: BoneBridgeProcess) -> None:
    """dcmtk's echoscu as INTRUDER is told "calling AE title not recognized"; the log says so too."""
    mark = log_size(daemon)
    result = echoscu(daemon.port, "BONEBRIDGE", calling_aet="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    wait_log(daemon, mark, r"rejecting association from calling AE 'INTRUDER' at 127\.0\.0\.1")
    assert_still_serving(daemon)


# =========================================================================== raw bytes on the port


GARBAGE = {
    "http-request": (b"GET / HTTP/1.1\r\nHost: bonebridge\r\n\r\n", r"Unknown PDU type received '0x47'"),
    "tls-client-hello": (bytes.fromhex("160301020001") + bytes(200), r"Unknown PDU type received '0x16'"),
    "zero-bytes": (bytes(64), r"Unknown PDU type received '0x00'"),
    "random-bytes": (_not_a_pdu_type(4096, seed=7), r"Unknown PDU type received"),
    "associate-rq-random-body": (struct.pack(">BBL", 1, 0, 100) + _not_a_pdu_type(100, seed=8),
                                 r"Unable to decode the received PDU"),
    "associate-rq-blank-calling-title": (associate_rq(b" " * 16), r"Unable to decode the received PDU"),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_on_the_port_is_aborted(daemon: BoneBridgeProcess, kind: str) -> None:
    """Bytes that are not a well-formed A-ASSOCIATE-RQ are answered with A-ABORT at once, the log says why, and
    the daemon keeps serving."""
    payload, why = GARBAGE[kind]
    mark = log_size(daemon)
    with connection(daemon) as sock:
        sock.sendall(payload)
        assert read_pdu(sock, timeout=5)[0] == 0x07  # A-ABORT
    wait_log(daemon, mark, why)
    assert_still_serving(daemon)
    # pynetdicom logs one line per 6 bytes it cannot read; the flood guard keeps 4 KiB from becoming 680 lines
    assert log_since(daemon, mark).count("Unknown PDU type received") <= 4


OUT_OF_SEQUENCE = {
    "release-rq-first": RELEASE_RQ,
    "p-data-first": p_data(1, [b"\x03" + bytes(8)]),
    "associate-ac-to-the-scp": struct.pack(">BBL", 2, 0, 4) + bytes(4),
}


@pytest.mark.parametrize("kind", list(OUT_OF_SEQUENCE))
def test_pdu_out_of_sequence_is_aborted(daemon: BoneBridgeProcess, kind: str) -> None:
    """A valid PDU type in the wrong state (no association yet) is answered with A-ABORT and the connection is
    closed at once."""
    with connection(daemon) as sock:
        sock.sendall(OUT_OF_SEQUENCE[kind])
        assert read_pdu(sock, timeout=5)[0] == 0x07
        assert closed_within(sock, 5)
    assert_still_serving(daemon)


@pytest.mark.parametrize("kind", ["release-rq-first", "p-data-first"])
def test_pdu_out_of_sequence_is_logged(daemon: BoneBridgeProcess, kind: str) -> None:
    """The abort of an out-of-sequence PDU leaves a WARNING or ERROR line naming the peer."""
    mark = log_size(daemon)
    with connection(daemon) as sock:
        sock.sendall(OUT_OF_SEQUENCE[kind])
        read_pdu(sock, timeout=5)
    assert_still_serving(daemon)
    wait_log(daemon, mark, r"(WARNING|ERROR) .*127\.0\.0\.1", timeout=3)


def test_peer_abort_right_away_is_harmless(daemon: BoneBridgeProcess) -> None:
    """An A-ABORT as the first PDU: the daemon closes the connection and keeps serving."""
    with connection(daemon) as sock:
        sock.sendall(struct.pack(">BBL", 7, 0, 4) + bytes(4))
        assert closed_within(sock, 5)
    assert_still_serving(daemon)


@pytest.mark.parametrize("payload", [
    pytest.param(b"", id="connect-and-say-nothing"),
    pytest.param(b"\x01\x00\x00", id="half-a-pdu-header"),
    pytest.param(associate_rq()[:40], id="associate-rq-cut-short"),
    pytest.param(struct.pack(">BBL", 9, 0, 4) + b"ab", id="unknown-pdu-type-cut-short"),
    pytest.param(b"GET / HTTP/1.0\r\n\r\n", id="three-whole-garbage-headers-then-silence"),
])
def test_silent_connection_is_freed_by_the_network_timeout(daemon: BoneBridgeProcess, payload: bytes) -> None:
    """A peer that connects, sends nothing or part of a PDU, and goes silent is disconnected within
    listener.network_timeout_s (it would otherwise hold one of the listener's association slots for ever)."""
    with connection(daemon) as sock:
        sock.sendall(payload)
        freed = closed_within(sock, NETWORK_TIMEOUT_S + MARGIN_S)
    assert_still_serving(daemon)
    assert freed, f"connection still open {NETWORK_TIMEOUT_S + MARGIN_S} s after the peer went silent"


def test_silent_association_is_aborted_by_the_network_timeout(daemon: BoneBridgeProcess) -> None:
    """An established association that then says nothing is aborted after listener.network_timeout_s, with a log
    line saying so."""
    mark = log_size(daemon)
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOCALHOST, daemon.port, ae_title="BONEBRIDGE")
    assert assoc.is_established
    started = time.monotonic()
    try:
        wait_for(lambda: not assoc.is_alive(), NETWORK_TIMEOUT_S + MARGIN_S, interval=0.05,
                 what="the daemon to drop the silent association")
    finally:
        if assoc.is_alive():
            assoc.abort()
    assert NETWORK_TIMEOUT_S - 0.5 <= time.monotonic() - started
    assert assoc.is_aborted
    wait_log(daemon, mark, r"Network timeout reached")
    assert_still_serving(daemon)


def _c_store_pdus(ds: Dataset, context_id: int, max_pdv: int = 4096) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE of ``ds`` (encoded by pynetdicom's DIMSE layer)."""
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = DX, ds.SOPInstanceUID
    req.DataSet = BytesIO(dataset_bytes(Path(ds.filename)))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return [p_data(context_id, [pdv for _, pdv in primitive.presentation_data_value_list])
            for primitive in msg.encode_msg(context_id, max_pdv)]


def test_association_silent_in_the_middle_of_a_c_store(daemon: BoneBridgeProcess, tmp_path: Path) -> None:
    """A sender that stops half-way through a data set is aborted after the network timeout; no response is sent
    for the instance, it is not stored, and no partial file stays in the spool."""
    ds = dx(tmp_path / "im.dcm", size=128)
    pdus = _c_store_pdus(ds, context_id=1)
    assert len(pdus) > 4
    before, mark = spool_files(daemon), log_size(daemon)
    with connection(daemon) as sock:
        established(sock)
        for pdu in pdus[: len(pdus) // 2]:
            sock.sendall(pdu)
        assert read_pdu(sock, timeout=NETWORK_TIMEOUT_S + MARGIN_S)[0] == 0x07  # A-ABORT, not a C-STORE-RSP
        assert closed_within(sock, 5)
    wait_log(daemon, mark, r"Network timeout reached")
    assert not stored_path(daemon, ds).exists()
    assert not spool_files(daemon) - before - set((daemon.data_dir / "tmp").iterdir())
    assert_still_serving(daemon)


def test_c_store_aborted_by_the_peer_leaves_nothing_behind(daemon: BoneBridgeProcess, tmp_path: Path) -> None:
    """A sender that aborts half-way through a data set: nothing stored, no partial file in the spool, no file
    descriptor left open on one."""
    ds = dx(tmp_path / "im.dcm", size=128)
    pdus = _c_store_pdus(ds, context_id=1)
    before = spool_files(daemon)
    with connection(daemon) as sock:
        established(sock)
        for pdu in pdus[: len(pdus) // 2]:
            sock.sendall(pdu)
        sock.sendall(struct.pack(">BBL", 7, 0, 4) + bytes(4))  # A-ABORT
        assert closed_within(sock, 5)
    assert_still_serving(daemon)
    assert not stored_path(daemon, ds).exists()
    tmp_dir = str(daemon.data_dir / "tmp")

    def nothing_left() -> bool:
        fds = [os.readlink(f"/proc/{daemon.proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd")]
        return spool_files(daemon) == before and not any(path.startswith(tmp_dir) for path in fds)

    try:
        wait_for(nothing_left, 5, what="no partial file and no descriptor left in data_dir/tmp")
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


@pytest.mark.parametrize("where", ["associate-rq", "p-data-after-association"])
def test_absurd_pdu_length_neither_allocates_nor_hangs(daemon: BoneBridgeProcess, where: str) -> None:
    """A PDU header announcing 0xFFFFFFF0 bytes followed by a few: the daemon's memory does not grow by the
    announced length, and the connection is aborted or dropped within the network timeout."""
    pid = daemon.proc.pid
    rss_before = proc_status(pid, "VmRSS")
    peak = rss_before
    with connection(daemon) as sock:
        if where == "p-data-after-association":
            established(sock)
        sock.sendall(struct.pack(">BBL", 1 if where == "associate-rq" else 4, 0, 0xFFFFFFF0) + bytes(100))
        deadline = time.monotonic() + NETWORK_TIMEOUT_S + MARGIN_S
        freed = False
        while time.monotonic() < deadline and not freed:
            freed = closed_within(sock, 0.2)
            peak = max(peak, proc_status(pid, "VmRSS"))
    assert_still_serving(daemon)
    assert peak - rss_before < 256 * 1024, f"daemon grew by {(peak - rss_before) // 1024} MiB"
    assert freed, "connection still open after the network timeout"


def _fds_and_threads(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def test_100_rapid_associate_requests_then_disconnects(daemon: BoneBridgeProcess) -> None:
    """100 connections that send an A-ASSOCIATE-RQ and close without waiting for the answer: the daemon keeps
    serving, at once, and is back to its file descriptors and threads of before within seconds (nothing leaks)."""
    pid = daemon.proc.pid
    fds_before, threads_before = _fds_and_threads(pid)
    for _ in range(100):
        with connection(daemon) as sock:
            sock.sendall(associate_rq(b"STORESCU"))
    assert_still_serving(daemon)
    wait_for(lambda: all(a <= b + 2 for a, b in zip(_fds_and_threads(pid), (fds_before, threads_before))), 15,
             interval=0.2, what=f"fds and threads {_fds_and_threads(pid)} back to {(fds_before, threads_before)}")


def test_100_rapid_connects_and_disconnects(daemon: BoneBridgeProcess) -> None:
    """100 bare connections opened and closed at once (a port scan, a load balancer's health check): the daemon
    answers C-ECHO right after them, and nothing leaks."""
    pid = daemon.proc.pid
    fds_before, threads_before = _fds_and_threads(pid)
    for _ in range(100):
        with connection(daemon):
            pass
    try:
        if daemon.proc.poll() is not None:
            raise DaemonNotServing(f"serve died\n{daemon.log_tail()}")
        result = echoscu(daemon.port, "BONEBRIDGE", timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:  # the next tests need the slots back: wait out the lock-out (a daemon that never recovers is an error)
        try:
            wait_for(lambda: echoscu(daemon.port, "BONEBRIDGE").returncode == 0, 60, interval=1,
                     what="C-ECHO after the rapid connects")
        except TimeoutError as exc:
            raise DaemonNotServing(str(exc)) from None
    wait_for(lambda: all(a <= b + 2 for a, b in zip(_fds_and_threads(pid), (fds_before, threads_before))), 15,
             interval=0.2, what=f"fds and threads {_fds_and_threads(pid)} back to {(fds_before, threads_before)}")


# =========================================================================== the log


@pytest.mark.parametrize("via", ["sop-instance-uid", "calling-ae-title"])
def test_peer_cannot_forge_log_lines(daemon: BoneBridgeProcess, tmp_path: Path, via: str) -> None:
    """Control characters sent by a peer (newline, ESC) never reach the log raw: no forged line, no terminal
    escape sequence; the thing is still refused."""
    forged = "FORGED-LINE"
    mark = log_size(daemon)
    if via == "sop-instance-uid":
        uid = f"1.2.3\n{forged}\x1b[31m"
        ds = resave(dx(tmp_path / "im.dcm"), lambda d: setattr(d, "SOPInstanceUID", uid))
        path = raw_instance(tmp_path / "raw.dcm", dataset_bytes(Path(ds.filename)), sop_instance=uid)
        assert pynetdicom_store(daemon, path) == 0xC210
    else:
        with connection(daemon) as sock:
            sock.sendall(associate_rq(f"\x1b[31m\n{forged}".encode()))
            assert read_pdu(sock, timeout=5)[0] in (0x03, 0x07)
    assert_still_serving(daemon)
    text = log_since(daemon, mark)
    assert "\x1b" not in text
    assert not any(line.startswith(forged) for line in text.splitlines())


def test_no_log_line_carries_a_patient_name_or_id(daemon: BoneBridgeProcess, tmp_path: Path) -> None:
    """After everything above (and one accepted and one refused instance of a hostile patient, so this holds when
    run alone), no line of serve's log names a patient: neither the names nor the ids, nor any part of them."""
    accepted = dx(tmp_path / "a.dcm", patient_name=HOSTILE_NAME, patient_id=HOSTILE_ID)
    refused = resave(dx(tmp_path / "r.dcm", patient_name=HOSTILE_NAME, patient_id=HOSTILE_ID),
                     lambda d: setattr(d, "SeriesInstanceUID", "1.2.abc"))
    assert store_status(daemon, Path(accepted.filename)) == 0x0000
    assert store_status(daemon, Path(refused.filename)) == 0xC210
    assert_still_serving(daemon)
    log = daemon.log_path.read_text(errors="replace")
    assert "refusing instance" in log
    leaked = [(s, line) for line in log.splitlines() for s in PATIENT_STRINGS if s in line]
    assert not leaked, leaked[:5]
