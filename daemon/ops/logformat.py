"""Log lines a peer cannot forge: control characters in messages are escaped, tracebacks are indented.

Parts of what is logged come from the network: a calling AE title, a request's SOP Instance UID, the text of an
exception pynetdicom or pydicom raised about a malformed data set. Written raw, a newline there starts a line the
peer wrote ("... INFO ... study done"), and an ESC sequence rewrites the terminal of whoever tails the log.
:class:`SafeFormatter` writes every control character of the message as a Python escape (``\\n``, ``\\x1b``) and
prefixes each line of a traceback with ``"  | "``, so every line that starts at the left margin is one of ours.
"""

from __future__ import annotations

import logging
import re
import threading

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    """*text* with each control character written as its Python escape."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class SafeFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose output has one line per record, plus indented traceback lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: N802, ANN001 - logging's name and signature
        return self._indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return self._indent(super().formatStack(stack_info))

    @staticmethod
    def _indent(text: str) -> str:
        return "\n".join("  | " + escape_control(line) for line in text.splitlines())


_NUMBERS = re.compile(r"0x[0-9A-Fa-f]+|\d+")


class FloodGuard(logging.Filter):
    """At most ``burst`` records of one shape from one thread of pynetdicom per ``window_s``; the rest are counted.

    pynetdicom's DUL reads garbage six bytes at a time and logs "Unknown PDU type received '0x..'" for each
    read until the connection closes: 4 KiB of garbage on the port was about 680 ERROR lines, so a port scanner
    could fill the log. Records from ``pynetdicom`` loggers with the same level and the same message once its
    numbers are blanked, from the same thread (a DUL thread serves one connection), pass ``burst`` times per
    window, the one after them says that more are held back, and the first to pass after the window says how many
    were. BoneBridge's own records are never held back.
    """

    def __init__(self, burst: int = 3, window_s: float = 10.0, prefix: str = "pynetdicom") -> None:
        super().__init__()
        self.burst, self.window_s, self.prefix = burst, window_s, prefix
        self._seen: dict[tuple, list] = {}  # key -> [window start, records in window, suppressed]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        # the thread's name, not its ident: idents are reused by later threads, "Thread-N" never is
        key = (record.threadName, record.name, record.levelno, _NUMBERS.sub("#", str(record.msg)))
        now = record.created
        with self._lock:
            state = self._seen.get(key)
            if state is None or now - state[0] >= self.window_s:
                suppressed = state[2] if state is not None else 0
                self._seen[key] = [now, 1, 0]
                self._forget_old(now)
                if suppressed:
                    record.msg = f"{record.msg} ({suppressed} more like it in the last {self.window_s:g} s not logged)"
                return True
            state[1] += 1
            if state[1] <= self.burst:
                return True
            if state[1] == self.burst + 1:
                record.msg = (f"{record.msg} (and more like it from this connection: not logged for "
                              f"{self.window_s:g} s)")
                return True
            state[2] += 1
            return False

    def _forget_old(self, now: float) -> None:
        """Keep the table small: threads come and go with connections."""
        if len(self._seen) > 256:
            for key in [k for k, v in self._seen.items() if now - v[0] >= self.window_s]:
                del self._seen[key]
