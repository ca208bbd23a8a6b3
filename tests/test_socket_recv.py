"""The listener's whole-PDU socket read (pure socket logic, on a real socket pair)."""

from __future__ import annotations

import socket
import threading

from daemon.receive.pynetdicom_patches.socket_recv import read_exactly


def test_reads_exactly_what_was_asked_across_many_small_sends() -> None:
    ours, peer = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB
    sender = threading.Thread(target=lambda: [peer.sendall(payload[i:i + 1000]) for i in range(0, len(payload), 1000)])
    sender.start()
    try:
        assert read_exactly(ours, 6) == payload[:6]
        assert read_exactly(ours, len(payload) - 6) == payload[6:]
    finally:
        sender.join()
        ours.close()
        peer.close()


def test_returns_what_arrived_when_the_peer_closes_early() -> None:
    ours, peer = socket.socketpair()
    peer.sendall(b"\x04\x00\x00\x00")
    peer.close()
    try:
        data = read_exactly(ours, 100)
        assert data == b"\x04\x00\x00\x00" and isinstance(data, bytearray)
    finally:
        ours.close()
