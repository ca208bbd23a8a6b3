"""DICOM TLS (PS3.15 Annex B, the BCP 195 profiles): SSL contexts for the listener and for destinations.

The listener wraps every accepted connection in TLS when ``listener.tls`` is set: it presents its certificate
and, with ``require_client_certificate``, accepts only callers whose certificate chains to ``ca_certificates``
(mutual TLS, on top of the AE-title allow-list). A destination with ``tls`` verifies the PACS's certificate
against its ``ca_certificates`` (the hostname too, when ``server_hostname`` is given) and presents a client
certificate when one is configured. TLS 1.2 is the minimum, as BCP 195 asks; Python's defaults choose the
ciphers.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Protocol


class ListenerTlsLike(Protocol):
    certificate: Path
    private_key: Path
    ca_certificates: Path | None
    require_client_certificate: bool


class DestinationTlsLike(Protocol):
    ca_certificates: Path | None
    certificate: Path | None
    private_key: Path | None
    server_hostname: str | None


def server_context(tls: ListenerTlsLike) -> ssl.SSLContext:
    """The listener's context: our certificate; callers' certificates verified when required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


def client_args(tls: DestinationTlsLike) -> tuple[ssl.SSLContext, str]:
    """``tls_args`` for :meth:`pynetdicom.AE.associate`: the PACS's certificate verified, ours presented if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
    else:
        context.load_default_certs()
    context.check_hostname = tls.server_hostname is not None
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context, tls.server_hostname or ""
