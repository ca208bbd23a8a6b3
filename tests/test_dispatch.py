"""Dispatcher against a real dcmtk storescp: success, failure statuses, dead letter and replay."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.data import get_testdata_file

from daemon.dispatch.dispatcher import DeadLettered, Dispatcher, DispatchError, send_datasets
from tests.test_spool import make_dx

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None, reason="dcmtk not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class StoreSCP:
    """dcmtk storescp as a subprocess writing into a folder."""

    def __init__(self, port: int, out: Path) -> None:
        self.port, self.out = port, out
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "-aet", "DEST", "--output-directory", str(self.out), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def received(self) -> dict[str, pydicom.Dataset]:
        return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in self.out.iterdir() if p.is_file())}


def destination(port: int, **kw: object) -> SimpleNamespace:
    base = dict(ae_title="DEST", host="127.0.0.1", port=port, calling_ae="BONEBRIDGE", retries=2, backoff_s=0.5)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture()
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    server = StoreSCP(free_port(), tmp_path / "received")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_send_datasets_delivers_identical_files(scp: StoreSCP, tmp_path: Path) -> None:
    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    originals = [make_dx(files[0], seed=1), make_dx(files[1], seed=2, sop_class="1.2.840.10008.5.1.4.1.1.7")]
    send_datasets(destination(scp.port), files)
    got = scp.received()
    assert set(got) == {ds.SOPInstanceUID for ds in originals}
    for ds in originals:
        assert got[ds.SOPInstanceUID].PixelData == ds.PixelData
        assert got[ds.SOPInstanceUID].SOPClassUID == ds.SOPClassUID


def test_unaccepted_transfer_syntax_is_a_dispatch_error(scp: StoreSCP) -> None:
    # storescp accepts only uncompressed syntaxes by default; an RLE file has no context.
    with pytest.raises(DispatchError) as info:
        send_datasets(destination(scp.port), [Path(get_testdata_file("SC_rgb_rle.dcm"))])
    assert "DEST@127.0.0.1" in info.value.reason


def test_destination_down_is_a_dispatch_error(tmp_path: Path) -> None:
    f = tmp_path / "a.dcm"
    make_dx(f)
    with pytest.raises(DispatchError, match="no connection"):
        send_datasets(destination(free_port()), [f])


def test_down_then_dead_letter_then_replay(tmp_path: Path) -> None:
    port = free_port()
    files = [tmp_path / "sr.dcm", tmp_path / "sc.dcm"]
    originals = [make_dx(files[0], seed=3), make_dx(files[1], seed=4)]
    sleeps: list[float] = []
    dispatcher = Dispatcher(tmp_path / "var", {"pacs": destination(port, retries=2, backoff_s=1.5)}, sleep=sleeps.append)

    with pytest.raises(DeadLettered) as info:
        dispatcher.send("pacs", files, "study 1.2.3/route:hand")

    assert sleeps == [1.5, 3.0]  # 1 + 2 retries, exponential backoff
    entry = info.value.path
    assert entry.parent == tmp_path / "var" / "dead-letter" and entry.name == info.value.entry_id
    reason = json.loads((entry / "reason.json").read_text())
    assert reason["destination"] == "pacs" and reason["attempts"] == 3 and "no connection" in reason["error"]
    assert "/" not in info.value.entry_id
    assert dispatcher.dead_letters() == [info.value.entry_id]

    # Still down: replay fails and keeps the entry, recording why.
    [failed] = dispatcher.replay()
    assert not failed.ok and dispatcher.dead_letters() == [info.value.entry_id]
    assert dispatcher.read_reason(info.value.entry_id)["replay_attempts"] == 1

    # Destination comes up: replay delivers and removes the entry.
    scp = StoreSCP(port, tmp_path / "received")
    scp.start()
    try:
        [ok] = dispatcher.replay(info.value.entry_id)
    finally:
        scp.stop()
    assert ok.ok and ok.destination == "pacs"
    assert dispatcher.dead_letters() == [] and not entry.exists()
    got = scp.received()
    assert {ds.SOPInstanceUID for ds in originals} == set(got)
    assert all(got[ds.SOPInstanceUID].PixelData == ds.PixelData for ds in originals)


@pytest.mark.parametrize("status_if_delivered", ["sent", "not-processed"])
def test_replay_updates_the_outcome_record(tmp_path: Path, status_if_delivered: str) -> None:
    """Issue 28, case 4: after a successful ``bonebridge retry`` the outcome record (which the status page and the
    metric ``bonebridge_results`` read) says delivered, when, and after how many attempts; not dead-lettered."""
    from daemon.store.outcomes import STATUS_IF_DELIVERED, record_path, write_record

    up = {"now": False}

    def sender(dest: object, paths: object) -> None:
        if not up["now"]:
            raise DispatchError("no connection (destination down or unreachable)")

    data_dir = tmp_path / "var"
    f = tmp_path / "sr.dcm"
    make_dx(f)
    dispatcher = Dispatcher(data_dir, {"pacs": destination(1, retries=1, backoff_s=0)}, sender=sender,
                            sleep=lambda s: None)
    with pytest.raises(DeadLettered) as info:
        dispatcher.send("pacs", [f], "1.2.3-2", outcome=("1.2.3", 2))
    path = record_path(data_dir, "1.2.3", 2)
    write_record(path, {"study_uid": "1.2.3", "generation": 2, "status": "dead-lettered",
                        STATUS_IF_DELIVERED: status_if_delivered,
                        "destinations": {"pacs": f"dead-lettered: {info.value}"}})

    [still_down] = dispatcher.replay()
    assert not still_down.ok and json.loads(path.read_text())["status"] == "dead-lettered"
    up["now"] = True
    [ok] = dispatcher.replay()
    assert ok.ok
    record = json.loads(path.read_text())
    assert record["status"] == status_if_delivered and STATUS_IF_DELIVERED not in record
    assert record["destinations"] == {"pacs": "sent"} and record["delivered_at"]
    assert record["redelivered"]["pacs"]["attempts"] == 2 + 1 + 1  # two in the task, one failed replay, this one
    assert record["redelivered"]["pacs"]["entry"] == info.value.entry_id


def test_replay_of_an_entry_from_before_the_outcome_field_finds_its_record_by_label(tmp_path: Path) -> None:
    from daemon.store.outcomes import record_path, write_record

    data_dir = tmp_path / "var"
    f = tmp_path / "sr.dcm"
    make_dx(f)
    failing = Dispatcher(data_dir, {"pacs": destination(1, retries=0)},
                         sender=lambda d, p: (_ for _ in ()).throw(DispatchError("down")))
    with pytest.raises(DeadLettered):
        failing.send("pacs", [f], "1.2.840.5-1-failed")  # no outcome: as entries written by older versions
    write_record(record_path(data_dir, "1.2.840.5", 1), {"study_uid": "1.2.840.5", "generation": 1,
                                                         "status": "failed", "destinations": {"pacs": "dead-lettered"}})
    [ok] = Dispatcher(data_dir, {"pacs": destination(1)}, sender=lambda d, p: None).replay()
    record = json.loads(record_path(data_dir, "1.2.840.5", 1).read_text())
    assert ok.ok and record["status"] == "failed"  # the study did fail; only its report was late
    assert record["destinations"] == {"pacs": "sent"} and record["redelivered"]["pacs"]["attempts"] == 2


def test_backoff_is_capped_and_success_after_retry(tmp_path: Path) -> None:
    calls: list[int] = []

    def flaky(dest: object, paths: object) -> None:
        calls.append(1)
        if len(calls) < 4:
            raise DispatchError("temporarily down")

    sleeps: list[float] = []
    dispatcher = Dispatcher(
        tmp_path, {"pacs": destination(1, retries=5, backoff_s=40)}, sender=flaky, sleep=sleeps.append
    )
    dispatcher.send("pacs", [], "x")
    assert len(calls) == 4 and sleeps == [40, 60, 60]
    assert dispatcher.dead_letters() == []


def test_unknown_destination_is_dead_lettered(tmp_path: Path) -> None:
    f = tmp_path / "a.dcm"
    make_dx(f)
    dispatcher = Dispatcher(tmp_path / "var", {})
    with pytest.raises(DeadLettered, match="unknown destination"):
        dispatcher.send("nowhere", [f], "x")
    [result] = dispatcher.replay()
    assert not result.ok and "unknown destination" in (result.error or "")


def _bonebridge_listener(tmp_path: Path, on_instance=lambda ev: None):
    from daemon.receive.listener import start_listener
    from daemon.receive.spool import Spool

    cfg = SimpleNamespace(
        ae_title="BONEBRIDGE",
        host="127.0.0.1",
        port=0,
        allowed_callers=[SimpleNamespace(ae_title="OUTBOUND", host="127.0.0.1")],
        max_pdu=0,
        network_timeout_s=10,
    )
    spool = Spool(tmp_path / "listener", is_own_output=False)
    return start_listener(cfg, spool, on_instance, lambda a: None), spool


def test_round_trip_to_our_listener_keeps_compressed_syntax(tmp_path: Path) -> None:
    """Dispatcher -> BoneBridge listener: a JPEG 2000 CR is streamed, not decoded or converted."""
    data_store = pytest.importorskip("data_store")
    j2k = Path(data_store.__file__).parent / "data" / "RG3_J2KR.dcm"
    original = pydicom.dcmread(j2k)
    server, spool = _bonebridge_listener(tmp_path)
    try:
        dest = destination(server.server_address[1], ae_title="BONEBRIDGE", calling_ae="OUTBOUND")
        send_datasets(dest, [j2k])
    finally:
        server.shutdown()
    stored = pydicom.dcmread(spool.instance_path(original.StudyInstanceUID, original.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert stored.PixelData == original.PixelData


def test_rejection_and_failure_status_are_reported(tmp_path: Path) -> None:
    f = tmp_path / "a.dcm"
    make_dx(f)

    def refuse(ev: object) -> None:
        raise OSError("no space for state")

    server, _ = _bonebridge_listener(tmp_path, on_instance=refuse)
    try:
        port = server.server_address[1]
        with pytest.raises(DispatchError, match=r"rejected \(result 1, source 1, reason 3\)"):
            send_datasets(destination(port, ae_title="BONEBRIDGE", calling_ae="STRANGER"), [f])
        with pytest.raises(DispatchError, match="C-STORE status 0xA700"):
            send_datasets(destination(port, ae_title="BONEBRIDGE", calling_ae="OUTBOUND"), [f])
    finally:
        server.shutdown()
