"""The P-DATA fast path: which PDUs it takes, which it leaves to pynetdicom, and what lands on disk."""

from __future__ import annotations

import queue
import shutil
import socket
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest

from daemon.receive.pynetdicom_patches import pdata_fast_path
from daemon.receive.listener import start_listener
from daemon.receive.pynetdicom_patches.pdata_fast_path import FastPDataDUL, middle_dataset_fragments
from daemon.receive.pynetdicom_patches.receive_file import ReceiveFile
from daemon.receive.spool import Spool
from tests.test_spool import make_dx


def pdv(data: bytes, control: int, context_id: int = 1) -> bytes:
    """One presentation data value item: length, context id, message control header, data (PS3.8 9.3.5.1)."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def test_middle_dataset_fragments_are_returned_in_order() -> None:
    items = pdv(b"first", 0b00) + pdv(b"second!", 0b00, context_id=3)
    fragments = middle_dataset_fragments(memoryview(items))
    assert fragments is not None
    assert [bytes(f) for f in fragments] == [b"first", b"second!"]


@pytest.mark.parametrize(
    ("items", "why"),
    [
        (pdv(b"x" * 10, 0b01), "a command fragment"),
        (pdv(b"x" * 10, 0b11), "the last command fragment"),
        (pdv(b"x" * 10, 0b10), "the last data-set fragment completes the message: pynetdicom's"),
        (pdv(b"x" * 10, 0b00) + pdv(b"y", 0b10), "a middle fragment followed by the last one"),
        (b"", "no items"),
        (pdv(b"x" * 10, 0b00)[:-1], "an item longer than the PDU"),
        (struct.pack(">LBB", 1, 1, 0), "an item length under 2"),
        (pdv(b"x", 0b00) + b"\x00\x00", "trailing bytes that are not an item"),
    ],
)
def test_anything_but_middle_dataset_fragments_is_left_to_pynetdicom(items: bytes, why: str) -> None:
    assert middle_dataset_fragments(memoryview(items)) is None, why


def _fake_dul(*, tls: bool = False, state: str = "Sta6", queued: bool = False, streaming: bool = True,
              pdu_handler: bool = False) -> Any:
    """Just the attributes ``_streaming_target`` reads (a pure decision; the integration test below is real)."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    events: queue.Queue[str] = queue.Queue()
    if queued:
        events.put("Evt10")
    target = ReceiveFile.__new__(ReceiveFile) if streaming else None
    handlers = {"EVT_PDU_RECV": [(print, None)]} if pdu_handler else {}
    dul = SimpleNamespace(
        socket=SimpleNamespace(socket=SimpleNamespace() if tls else raw),
        state_machine=SimpleNamespace(current_state=state),
        event_queue=events,
        _recv_pdu=queue.Queue(),
        assoc=SimpleNamespace(dimse=SimpleNamespace(message=SimpleNamespace(_data_set_file=target)),
                              get_handlers=lambda event: handlers.get(event.name, [])),
    )
    dul.raw = raw
    return dul


@pytest.mark.parametrize(
    ("conditions", "taken"),
    [
        ({}, True),
        ({"tls": True}, False),
        ({"state": "Sta13"}, False),
        ({"queued": True}, False),
        ({"streaming": False}, False),
        ({"pdu_handler": True}, False),
    ],
)
def test_the_fast_path_is_taken_only_when_nothing_else_can_notice(conditions: dict, taken: bool) -> None:
    dul = _fake_dul(**conditions)
    try:
        assert (FastPDataDUL._streaming_target(dul) is not None) is taken
    finally:
        dul.raw.close()


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")
@pytest.mark.parametrize("max_pdu", [16384, 0])  # storescu then sends 16 KiB or 128 KiB PDUs
def test_storescu_data_sets_arrive_whole_through_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              max_pdu: int) -> None:
    taken = []

    def counting(items: memoryview) -> list[memoryview] | None:
        fragments = middle_dataset_fragments(items)
        taken.append(fragments is not None)
        return fragments

    monkeypatch.setattr(pdata_fast_path, "middle_dataset_fragments", counting)
    cfg = SimpleNamespace(ae_title="BONEBRIDGE", host="127.0.0.1", port=0, max_pdu=max_pdu, network_timeout_s=10,
                          allowed_callers=[SimpleNamespace(ae_title="STORESCU", host="127.0.0.1")])
    spool = Spool(tmp_path / "var", is_own_output=False)
    received = []
    server = start_listener(cfg, spool, received.append, lambda assoc_id: None)
    try:
        sent = [make_dx(tmp_path / f"{i}.dcm", seed=i, rows=700, cols=700) for i in range(3)]  # about 1 MB each
        result = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "BONEBRIDGE", "127.0.0.1",
                                 str(server.server_address[1]), *(str(tmp_path / f"{i}.dcm") for i in range(3))],
                                capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert len(received) == 3
    assert sum(taken) >= 3 * (50 if max_pdu else 5), f"the fast path took {sum(taken)} of {len(taken)} PDUs"
    assert taken.count(False) >= 3, "each last fragment must go through pynetdicom"
    for original in sent:
        stored = pydicom.dcmread(spool.instance_path(original.StudyInstanceUID, original.SOPInstanceUID))
        assert stored == original
        assert stored.PixelData == original.PixelData


def _p_data_pdu(data: bytes, control: int) -> bytes:
    item = pdv(data, control)
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def _socket_dul(tmp_path: Path) -> tuple[Any, socket.socket, ReceiveFile]:
    """A FastPDataDUL on one end of a real socket pair, streaming into a real ReceiveFile (no association)."""
    from daemon.receive.pynetdicom_patches.receive_file import ReceiveTarget

    ours, theirs = socket.socketpair()
    target = ReceiveFile(ReceiveTarget(tmp_path))
    dul = FastPDataDUL.__new__(FastPDataDUL)
    dul.socket = SimpleNamespace(socket=ours)
    dul.event_queue = queue.Queue()
    dul._recv_pdu = queue.Queue()
    dul._kill_thread = False
    dul._assoc = SimpleNamespace(get_handlers=lambda event: [])  # no EVT_DATA_RECV / EVT_PDU_RECV handlers
    dul._streaming_target = lambda: target
    return dul, theirs, target


def test_one_turn_takes_the_pdus_already_waiting_up_to_its_limit(tmp_path: Path) -> None:
    """Consecutive middle PDUs are written in one turn of the reactor, at most PDUS_PER_CALL of them; the last
    fragment still goes to pynetdicom's decoder, as an event and a decoded PDU, after the ones before it."""
    dul, peer, target = _socket_dul(tmp_path)
    limit = pdata_fast_path.PDUS_PER_CALL
    middles = [bytes([i]) * 1000 for i in range(limit + 8)]
    try:
        peer.sendall(b"".join(_p_data_pdu(m, 0b00) for m in middles) + _p_data_pdu(b"end", 0b10))
        dul._read_pdu_data()
        assert Path(target.name).stat().st_size == limit * 1000 and dul.event_queue.empty()
        dul._read_pdu_data()  # the other 8, then the last fragment is pynetdicom's
        assert Path(target.name).read_bytes() == b"".join(middles)
        assert dul.event_queue.get_nowait() == "Evt10"
        decoded = dul._recv_pdu.get_nowait()
        assert [bytes(v.presentation_data_value)[1:] for v in decoded.presentation_data_value_items] == [b"end"]
    finally:
        peer.close()
        dul.socket.socket.close()
        target.close()


def test_a_turn_ends_when_nothing_more_has_arrived(tmp_path: Path) -> None:
    dul, peer, target = _socket_dul(tmp_path)
    try:
        peer.sendall(_p_data_pdu(b"a" * 500, 0b00))
        dul._read_pdu_data()  # returns instead of waiting for a PDU that has not come
        peer.sendall(_p_data_pdu(b"b" * 500, 0b00))
        dul._read_pdu_data()
        assert Path(target.name).read_bytes() == b"a" * 500 + b"b" * 500
    finally:
        peer.close()
        dul.socket.socket.close()
        target.close()
