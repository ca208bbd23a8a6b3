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
