"""Destination types: one small module per way of delivering results, behind one interface.

A destination type is a module with ``send(dest, paths)``: deliver every file in *paths* to *dest* (its config
section) or raise :class:`DispatchError` saying why in words an operator can act on. Delivery must be idempotent:
the dispatch stage may send the same SOP instances again after a crash or a lost acknowledgement, and a PACS
answers that with success or a warning (C-STORE) or 200/202/409 (STOW-RS), never by storing a second copy.

- ``dicom`` (:mod:`daemon.dispatch.destinations.dicom`): C-STORE SCU, DICOM TLS optional;
- ``dicomweb`` (:mod:`daemon.dispatch.destinations.dicomweb`): STOW-RS with ``dicomweb-client``, basic or bearer auth.

The modules are imported when first used, so the listener (which never sends) does not load an HTTP client.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class DispatchError(Exception):
    """Sending to a destination failed; ``reason`` says why in words an operator can act on (never a secret).

    ``permanent`` marks a refusal that no retry can change (the server says the request itself is wrong): the
    dispatch stage dead-letters it at once instead of waiting out the retries.
    """

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


_MODULES = {"dicom": "daemon.dispatch.destinations.dicom", "dicomweb": "daemon.dispatch.destinations.dicomweb"}


def send(dest: Any, paths: Sequence[Path]) -> None:
    """Deliver *paths* to *dest* with the module of its ``type`` (``dicom`` when it has none)."""
    kind = getattr(dest, "type", "dicom") or "dicom"
    module = _MODULES.get(kind)
    if module is None:
        raise DispatchError(f"unknown destination type {kind!r}", permanent=True)
    importlib.import_module(module).send(dest, paths)


def describe(dest: Any) -> dict[str, Any]:
    """What a dead-letter entry and the status page show of a destination: its address, never a secret."""
    kind = getattr(dest, "type", "dicom") or "dicom"
    if kind == "dicomweb":
        auth = getattr(dest, "auth", None)
        return {"type": kind, "url": getattr(dest, "url", None), "auth": auth.kind() if auth is not None else None}
    return {"type": kind, "ae_title": getattr(dest, "ae_title", None), "host": getattr(dest, "host", None),
            "port": getattr(dest, "port", None)}
