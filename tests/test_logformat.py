"""Log lines a peer cannot forge (pure formatting logic)."""

from __future__ import annotations

import logging
import sys

from daemon.ops.logformat import FloodGuard, SafeFormatter, escape_control


def _format(msg: str, *args: object, exc: bool = False) -> str:
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args, None)
    if exc:
        try:
            raise ValueError("bad UID 1.2\nFORGED INFO line\x1b[31m")
        except ValueError:
            record.exc_info = sys.exc_info()
    return SafeFormatter("%(levelname)s %(message)s").format(record)


def test_control_characters_in_the_message_are_escaped() -> None:
    text = _format("refusing instance %s from %s", "1.2.3\nFORGED", "\x1b[31mAE")
    assert text == "ERROR refusing instance 1.2.3\\nFORGED from \\x1b[31mAE"


def test_traceback_lines_are_indented_and_escaped() -> None:
    lines = _format("spooling failed", exc=True).splitlines()
    assert lines[0] == "ERROR spooling failed"
    assert all(line.startswith("  | ") for line in lines[1:]) and len(lines) > 2
    assert not any("\x1b" in line for line in lines)


def test_escape_keeps_printable_text() -> None:
    assert escape_control("Müller^Anna 1.2.840") == "Müller^Anna 1.2.840"


def _records(logger_name: str, messages: list[str], created: list[float] | None = None) -> list[logging.LogRecord]:
    records = []
    for i, message in enumerate(messages):
        record = logging.LogRecord(logger_name, logging.ERROR, __file__, 1, message, None, None)
        if created is not None:
            record.created = created[i]
        records.append(record)
    return records


def test_flood_guard_holds_back_a_flood_of_one_shape_from_pynetdicom() -> None:
    guard = FloodGuard(burst=3, window_s=10)
    flood = _records("pynetdicom.dul", [f"Unknown PDU type received '0x{b:02X}'" for b in range(680)],
                     created=[100.0 + i * 0.001 for i in range(680)])
    passed = [r for r in flood if guard.filter(r)]
    assert len(passed) == 4
    assert "not logged" in passed[-1].getMessage()
    later = _records("pynetdicom.dul", ["Unknown PDU type received '0x41'"], created=[111.0])[0]
    assert guard.filter(later) and "676 more like it" in later.getMessage()


def test_flood_guard_lets_other_shapes_and_our_own_records_through() -> None:
    guard = FloodGuard(burst=1, window_s=10)
    assert all(guard.filter(r) for r in _records("daemon.receive.listener", ["stored one instance"] * 50))
    different = _records("pynetdicom.assoc", ["Association Aborted", "Unable to decode the received PDU data"])
    assert all(guard.filter(r) for r in different)


def test_setup_logging_installs_the_flood_guard() -> None:
    from daemon.serve import setup_logging

    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        root.handlers.clear()
        setup_logging("INFO")
        assert any(isinstance(f, FloodGuard) for h in root.handlers for f in h.filters)
    finally:
        root.handlers[:] = saved
