"""Log lines a peer cannot forge (pure formatting logic)."""

from __future__ import annotations

import logging
import sys

from daemon.logformat import SafeFormatter, escape_control


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
