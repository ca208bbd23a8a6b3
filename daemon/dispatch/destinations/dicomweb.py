"""``type: dicomweb``: STOW-RS to a DICOMweb service (Orthanc, dcm4chee, cloud DICOM stores), with ``dicomweb-client``.

One POST per delivery carries every result file of the study generation (``multipart/related;
type="application/dicom"``, built by ``dicomweb-client``, not here). The outcome:

- 200, or 202 whose failures are all "already stored": delivered. Re-sending is harmless, so a redelivered
  dispatch task does no damage;
- 409 Conflict whose body names no failure other than a duplicate SOP instance (or has no readable body: several
  cloud stores answer a duplicate with a bare 409): the instances are already there, delivered;
- any other status, a timeout or no connection: :class:`~daemon.dispatch.destinations.DispatchError` naming the HTTP status
  (``reason.json`` of a dead-letter entry carries it). 400, 404, 405, 413 and 415 say the request itself is wrong,
  which no retry changes: they are permanent. 401 and 403 are retried, since the secret files are read afresh at
  each try (a rotated token is picked up without a restart).

Secrets (a basic-auth password, a bearer token) are read from their files for each delivery and given to
``requests`` as an auth object, so they never appear in a URL, in the headers ``dicomweb-client`` logs at DEBUG, in
an error message or on the status page. ``dicomweb-client``'s own HTTP retries are off: the dispatch stage's
Celery retries are the one place retries happen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.dispatch.destinations import DispatchError

LOGGER = logging.getLogger("daemon.dispatch.dispatcher")

#: Failure reason of a SOP instance that the server already holds (PS3.4 C.4.2.1.4 / PS3.18 STOW-RS): not a failure.
DUPLICATE_SOP_INSTANCE = 0x0111
#: Statuses that say the request itself is wrong: retrying the same bytes cannot help.
PERMANENT_STATUSES = frozenset({400, 404, 405, 413, 415})


def _secret(path: Path, what: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DispatchError(f"cannot read the {what} file {path}: {exc.__class__.__name__}") from None
    if not value:
        raise DispatchError(f"the {what} file {path} is empty")
    return value


def _session(dest: Any):
    import requests
    from requests.auth import AuthBase, HTTPBasicAuth

    class BearerAuth(AuthBase):
        """``Authorization: Bearer`` added to each request by requests itself (never in a logged header dict)."""

        def __init__(self, token: str) -> None:
            self._token = token

        def __call__(self, request):
            request.headers["Authorization"] = f"Bearer {self._token}"
            return request

        def __repr__(self) -> str:  # nothing that prints the session prints the token
            return "BearerAuth(***)"

    ca_certificates = getattr(dest, "ca_certificates", None)

    class DestinationSession(requests.Session):
        """A session whose ``ca_certificates`` win over ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``.

        requests merges the environment into every request and, where one of those variables is set (Debian images,
        CI runners, corporate proxies), it replaces ``session.verify``: the configured CA would be silently ignored
        and the certificate check fail. Proxy settings from the environment are kept (``trust_env = False`` would
        drop them too).
        """

        def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[override]
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if ca_certificates is not None:
                settings["verify"] = str(ca_certificates)
            return settings

    session = DestinationSession()
    auth = getattr(dest, "auth", None)
    if auth is not None and auth.basic is not None:
        session.auth = HTTPBasicAuth(auth.basic.user, _secret(auth.basic.password_file, "password"))
    elif auth is not None and auth.bearer_token_file is not None:
        session.auth = BearerAuth(_secret(auth.bearer_token_file, "bearer token"))
    if ca_certificates is not None:
        session.verify = str(ca_certificates)
    return session


def _failures(dataset: Any) -> list[tuple[str, int]]:
    """(SOP Instance UID, failure reason) of each FailedSOPSequence item of a STOW-RS response."""
    found = []
    for item in getattr(dataset, "FailedSOPSequence", None) or []:
        try:
            reason = int(getattr(item, "FailureReason", 0x0110))
        except (TypeError, ValueError):
            reason = 0x0110
        found.append((str(getattr(item, "ReferencedSOPInstanceUID", "?")), reason))
    return found


def _response_dataset(response: Any) -> Any:
    """The DICOM JSON body of a STOW-RS answer, None when there is none or it is not DICOM JSON."""
    import pydicom

    if response is None or not response.content:
        return None
    kind = (response.headers.get("Content-Type") or "").split(";")[0].strip()
    if kind not in ("application/dicom+json", "application/json"):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except Exception:  # noqa: BLE001 - an unreadable body is judged by its status alone
        return None


def send(dest: Any, paths: Sequence[Path]) -> None:
    """STOW-RS every file in *paths* to ``dest.url`` in one request; raises DispatchError unless all are stored."""
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    paths = [Path(p) for p in paths]
    if not paths:
        return
    where = f"STOW-RS {dest.url}"
    try:
        datasets = [pydicom.dcmread(p) for p in paths]
    except Exception as exc:  # noqa: BLE001 - any unreadable file makes the delivery impossible
        raise DispatchError(f"{where}: cannot read a result file: {exc}", permanent=True) from None
    session = _session(dest)
    try:
        client = DICOMwebClient(url=dest.url, session=session, timeout=float(dest.timeout_s))
        client.set_http_retry_params(retry=False)  # Celery retries; not a second layer in here
        answer = client.store_instances(datasets)
    except requests.exceptions.HTTPError as exc:
        response = exc.response
        status = response.status_code if response is not None else 0
        if status == 409:
            body = _response_dataset(response)
            others = [(uid, r) for uid, r in _failures(body) if r != DUPLICATE_SOP_INSTANCE]
            if not others:
                LOGGER.warning("%s: HTTP 409, the instance(s) are already there: counted as delivered", where)
                return
            raise DispatchError(f"{where}: HTTP 409 Conflict: {_describe_failures(others)}", permanent=True) from None
        text = response.reason if response is not None else ""
        raise DispatchError(f"{where}: HTTP {status} {text}".rstrip(), permanent=status in PERMANENT_STATUSES) \
            from None
    except requests.exceptions.SSLError as exc:
        raise DispatchError(f"{where}: TLS failed ({_first_line(exc)})") from None
    except requests.exceptions.Timeout:
        raise DispatchError(f"{where}: no answer within {dest.timeout_s:g} s") from None
    except requests.exceptions.ConnectionError:
        raise DispatchError(f"{where}: no connection (destination down or unreachable)") from None
    except requests.exceptions.RequestException as exc:
        raise DispatchError(f"{where}: {exc.__class__.__name__}") from None
    finally:
        session.close()
    failures = [(uid, r) for uid, r in _failures(answer) if r != DUPLICATE_SOP_INSTANCE]
    if failures:
        raise DispatchError(f"{where}: not stored: {_describe_failures(failures)}")
    LOGGER.debug("%s: stored %d instance(s)", where, len(paths))


def _describe_failures(failures: list[tuple[str, int]]) -> str:
    return ", ".join(f"{uid} (failure reason 0x{reason:04X})" for uid, reason in failures[:5]) + (
        f" and {len(failures) - 5} more" if len(failures) > 5 else "")


def _first_line(exc: BaseException) -> str:
    """An exception's first line, cut short; requests' messages name the host and port, never the credentials."""
    return str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__
