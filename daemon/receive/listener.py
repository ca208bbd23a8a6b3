"""The DICOM listener: Verification and Storage SCP for radiographs.

It accepts only the SOP classes BoneBridge can use (CR, DX for presentation and for processing)
plus the classes of our own outputs (Secondary Capture, Enhanced / Comprehensive SR) so that a
PACS routing them back gets a clean *Success* and the spool can recognise and ignore them. Other
SOP classes and transfer syntaxes are refused during negotiation (pynetdicom rejects presentation
contexts it has no supported context for), so a sender learns at once rather than after sending.

Callers are checked in ``EVT_REQUESTED`` against ``allowed_callers`` (AE title, optionally the
address); unknown callers get A-ASSOCIATE-RJ *rejected-permanent, service-user, calling AE title
not recognised*. Every instance is written durably by the :class:`~daemon.receive.spool.Spool` and handed
to ``on_instance`` before the C-STORE response is sent, so *Success* always means "safe on disk".
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from pydicom.uid import (
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
)

from daemon.receive import pynetdicom_patches
from daemon.receive.spool import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, InstanceEvent, Spool, SpoolError

LOGGER = logging.getLogger(__name__)

#: Storage SOP classes accepted: radiographs, and our own output classes (recognised, ignored).
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
)

#: Transfer syntaxes accepted: everything models.display_image can decode.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)

#: A-ASSOCIATE-RJ: rejected-permanent, DICOM UL service-user, calling AE title not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)



#: How many SOP class names a refused-context summary names per reason before it says "and N more".
REFUSED_NAMES_SHOWN = 3


def refused_contexts_summary(contexts: list) -> str:
    """``"116 presentation context(s) refused: abstract syntax not supported (114: CT Image Storage 1.2.840...,
    ...; and 111 more); transfer syntax not supported (2: ... in 1.2.840...)"``, from pynetdicom's rejected contexts
    (their ``status``): the SOP class by name and UID, and for a transfer-syntax refusal the syntaxes offered."""
    groups: dict[str, list[str]] = {}
    for cx in contexts:
        reason = str(getattr(cx, "status", "") or "refused").lower().replace("_", " ")
        name = f"{getattr(cx.abstract_syntax, 'name', cx.abstract_syntax)} {cx.abstract_syntax}"
        if "transfer" in reason:  # the SOP class is fine: say which transfer syntaxes were offered
            name += " in " + ", ".join(str(ts) for ts in cx.transfer_syntax)
        groups.setdefault(reason, []).append(name)
    parts = []
    for reason, names in sorted(groups.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(names[:REFUSED_NAMES_SHOWN])
        more = f"; and {len(names) - REFUSED_NAMES_SHOWN} more" if len(names) > REFUSED_NAMES_SHOWN else ""
        parts.append(f"{reason} ({len(names)}: {shown}{more})")
    return f"{len(contexts)} presentation context(s) refused: " + "; ".join(parts)


class CallerLike(Protocol):
    """What the listener needs of ``config.Caller``."""

    ae_title: str
    host: str | None


class ListenerConfigLike(Protocol):
    """What the listener needs of ``config.ListenerConfig``."""

    ae_title: str
    host: str
    port: int
    allowed_callers: Sequence[CallerLike]
    max_pdu: int
    network_timeout_s: float


@dataclass
class _AssocState:
    """Per-association bookkeeping, attached to the pynetdicom Association object."""

    assoc_id: str
    closed: bool = False
    requested: bool = False  # an A-ASSOCIATE-RQ arrived (accepted or rejected, the log says which)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _resolve(host: str) -> frozenset[str]:
    """Addresses a configured caller host stands for (literal IPs resolve to themselves)."""
    addresses = {host}
    try:
        for info in socket.getaddrinfo(host, None):
            addresses.add(str(info[4][0]))
    except OSError:
        LOGGER.warning("allowed caller host %r does not resolve; matching it literally", host)
    return frozenset(addresses)


class CallerPolicy:
    """Decides which calling AE titles (and addresses) may associate.

    An empty list rejects everyone: a listener that accepts anything would forward patient data
    from any device on the network into the pipeline, so the safe default is closed.
    """

    def __init__(self, callers: Iterable[CallerLike]) -> None:
        self._rules: list[tuple[str, frozenset[str] | None]] = [
            (c.ae_title.strip(), _resolve(c.host) if c.host else None) for c in callers
        ]
        if not self._rules:
            LOGGER.warning(
                "listener.allowed_callers is empty: EVERY association will be rejected; "
                "add the modalities / PACS that may send to BoneBridge"
            )

    def allows(self, ae_title: str, address: str) -> bool:
        title = ae_title.strip()
        for rule_title, hosts in self._rules:
            if rule_title == title and (hosts is None or address in hosts):
                return True
        return False


class ListenerAE(AE):
    """A pynetdicom AE that also carries the event handlers its server needs."""

    evt_handlers: list[tuple[Any, ...]]
    bind_address: tuple[str, int]
    ssl_context: Any = None

    def start_listening(self) -> ThreadedAssociationServer:
        """Start the non-blocking association server (port 0 picks a free port)."""
        server = self.start_server(self.bind_address, block=False, evt_handlers=self.evt_handlers,
                                   ssl_context=self.ssl_context)
        assert server is not None
        host, port = server.server_address[:2]
        LOGGER.info("listening as %s on %s:%s%s", self.ae_title, host, port,
                    " with DICOM TLS" if self.ssl_context is not None else "")
        return server


class _Handlers:
    """The listener's pynetdicom event handlers (one instance per AE)."""

    def __init__(
        self,
        policy: CallerPolicy,
        spool: Spool,
        on_instance: Callable[[InstanceEvent], None],
        on_assoc_closed: Callable[[str], None],
        network_timeout_s: float | None = None,
    ) -> None:
        self.policy = policy
        self.spool = spool
        self.on_instance = on_instance
        self.on_assoc_closed = on_assoc_closed
        self.network_timeout_s = network_timeout_s

    @staticmethod
    def state(assoc: Any) -> _AssocState:
        st = getattr(assoc, "_bonebridge", None)
        if st is None:  # EVT_CONN_OPEN normally sets it; be robust if it did not run
            st = _AssocState(uuid.uuid4().hex)
            assoc._bonebridge = st
        return st

    def conn_open(self, event: Event) -> None:
        """Give the association its id, receive its data sets into the spool, switch off Nagle, time out reads.

        Sockets from ``accept()`` block for ever: without a timeout a peer that sends half a PDU and goes silent
        would hold a thread and an association slot until it closes. With it, pynetdicom treats the timed-out
        read as a closed connection.
        """
        event.assoc._bonebridge = _AssocState(uuid.uuid4().hex)
        pynetdicom_patches.on_connection_open(event.assoc, self.spool.receive_target)
        try:
            sock = event.assoc.dul.socket.socket
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.network_timeout_s:
                    sock.settimeout(self.network_timeout_s)
        except (AttributeError, OSError) as exc:
            LOGGER.debug("could not set TCP_NODELAY or the read timeout: %s", exc)

    def requested(self, event: Event) -> None:
        """Reject callers that are not in ``allowed_callers``."""
        self.state(event.assoc).requested = True
        requestor = event.assoc.requestor
        title = str(requestor.primitive.calling_ae_title or "").strip()
        address = str(requestor.address)
        if self.policy.allows(title, address):
            LOGGER.info("association request from %r at %s accepted", title, address)
            return
        LOGGER.warning(
            "rejecting association from calling AE %r at %s: calling AE title not recognised",
            title,
            address,
        )
        event.assoc.acse.send_reject(*REJECT_CALLING_AE)
        event.assoc.kill()

    def store(self, event: Event) -> int:
        """Spool the instance, tell the assembler, and only then answer."""
        assoc = event.assoc
        st = self.state(assoc)
        calling = str(assoc.requestor.ae_title or "").strip()
        try:
            instance = self.spool.store_event(event, calling_ae=calling, assoc_id=st.assoc_id)
        except SpoolError as exc:
            LOGGER.error(
                "refusing instance %r from %r (status 0x%04X): %s",
                event.request.AffectedSOPInstanceUID,
                calling,
                exc.status,
                exc.reason,
            )
            return exc.status
        except Exception:  # noqa: BLE001 - never let a bug answer Success
            LOGGER.exception("unexpected error spooling an instance from %s", calling)
            return STATUS_OUT_OF_RESOURCES
        try:
            self.on_instance(instance)
        except Exception:  # noqa: BLE001
            LOGGER.exception(
                "instance %s is on disk but could not be recorded; asking %s to resend",
                instance.sop_instance_uid,
                calling,
            )
            return STATUS_OUT_OF_RESOURCES
        # The connection may have dropped while we were writing (EVT_CONN_CLOSE runs in the DUL
        # thread); re-announce the close so the study is not left with an association open forever.
        if st.closed:
            self._announce_closed(st)
        return STATUS_SUCCESS

    def accepted(self, event: Event) -> None:
        """One line per accepted association that had presentation contexts refused: how many, and why.

        storescu proposes every storage class it knows (116 of them), so a line per refused context drowned the log
        (580 of 709 lines in one short run). :func:`refused_contexts_summary` groups them by reason and names the
        first few SOP classes of each group. INFO while some context was accepted (the caller can send what it
        meant to); WARNING when none was, since then nothing can be sent on that association.
        """
        refused = list(event.assoc.rejected_contexts)
        if not refused:
            return
        title = str(event.assoc.requestor.ae_title or "").strip()
        level = logging.INFO if event.assoc.accepted_contexts else logging.WARNING
        LOGGER.log(level, "association from %r at %s: %s", title, event.assoc.requestor.address,
                   refused_contexts_summary(refused))

    def closed(self, event: Event) -> None:
        """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: announce the close once, free what the association held.

        A connection closed before any A-ASSOCIATE-RQ (a port scan, garbage, a PDU out of sequence) gets a log
        line, and the acceptor thread waiting for that request is woken at once rather than after ARTIM, so a burst
        of bare connections cannot hold every association slot.
        """
        st = self.state(event.assoc)
        # EVT_CONN_CLOSE: the DUL's thread, done with the socket and its wakeup
        discarded = pynetdicom_patches.on_connection_closed(event.assoc,
                                                            connection_closed=event.event == evt.EVT_CONN_CLOSE)
        if discarded:
            LOGGER.warning("association %s ended inside a data set: %d partial file(s) removed, nothing acknowledged",
                           st.assoc_id, discarded)
        with st.lock:
            if st.closed:
                return
            st.closed = True
        if not st.requested and event.event == evt.EVT_CONN_CLOSE:
            LOGGER.warning("connection from %s closed without a valid association request (nothing, garbage or a "
                           "PDU out of sequence was received)", event.assoc.requestor.address)
            event.assoc.dul.to_user_queue.put(None)  # what pynetdicom's acceptor gets when ARTIM expires
        self._announce_closed(st)

    def _announce_closed(self, st: _AssocState) -> None:
        try:
            self.on_assoc_closed(st.assoc_id)
        except Exception:  # noqa: BLE001
            LOGGER.exception("association-closed callback failed for %s", st.assoc_id)

    def as_list(self) -> list[tuple[Any, ...]]:
        return [
            (evt.EVT_CONN_OPEN, self.conn_open),
            (evt.EVT_REQUESTED, self.requested),
            (evt.EVT_ACCEPTED, self.accepted),
            (evt.EVT_C_STORE, self.store),
            (evt.EVT_RELEASED, self.closed),
            (evt.EVT_ABORTED, self.closed),
            (evt.EVT_CONN_CLOSE, self.closed),
        ]


def build_ae(
    listener_config: ListenerConfigLike,
    spool: Spool,
    on_instance: Callable[[InstanceEvent], None],
    on_assoc_closed: Callable[[str], None],
) -> ListenerAE:
    """Build the listener AE; ``ae.evt_handlers`` are the handlers to start its server with.

    Side effects, process-wide: sets pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` so that received data sets
    stream to a file instead of memory, and installs :mod:`daemon.receive.pynetdicom_patches` (version-checked) so
    that file is the spool's own.
    Unless pynetdicom's own logger would print INFO lines, its standard logging handlers are not bound: they
    only log at INFO and DEBUG, yet built an event object for every PDU received and sent (a 2 MB instance is
    16 PDUs), about a twentieth of the listener's CPU per instance.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"
    pynetdicom_patches.install()
    ae = ListenerAE(ae_title=listener_config.ae_title)
    ae.maximum_pdu_size = int(listener_config.max_pdu)
    ae.network_timeout = float(listener_config.network_timeout_s)
    ae.maximum_associations = max(ae.maximum_associations, 32)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    # ARTIM (PS3.8 9.1.5): how long to wait for the A-ASSOCIATE-RQ after a connection, and for A-RELEASE-RP
    ae.acse_timeout = float(listener_config.network_timeout_s)
    handlers = _Handlers(CallerPolicy(listener_config.allowed_callers), spool, on_instance, on_assoc_closed,
                         float(listener_config.network_timeout_s))
    ae.evt_handlers = handlers.as_list()
    ae.bind_address = (listener_config.host, int(listener_config.port))
    tls = getattr(listener_config, "tls", None)
    if tls is not None:
        from daemon.dicom.tls import server_context

        ae.ssl_context = server_context(tls)
    return ae


def start_listener(
    listener_config: ListenerConfigLike,
    spool: Spool,
    on_instance: Callable[[InstanceEvent], None],
    on_assoc_closed: Callable[[str], None],
) -> ThreadedAssociationServer:
    """Build the AE and start serving in a background thread; ``server.shutdown()`` stops it."""
    return build_ae(listener_config, spool, on_instance, on_assoc_closed).start_listening()
