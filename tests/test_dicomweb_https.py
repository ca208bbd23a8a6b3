"""Issue 27: DICOMweb destinations over HTTPS with a CA of the test's own, and with a bearer token.

Everything real, driven from outside: ``bonebridge serve`` in a subprocess (its own Redis, analysis and dispatch
workers) with ``type: dicomweb`` destinations in its config, and Debian's Orthanc with its DICOMweb plugin
(``orthanc-dicomweb``) storing what arrives by STOW-RS. A wrist radiograph goes to the fracture model, whose SR and
heatmap SC are what is sent. Nothing is imported from ``daemon``.

Orthanc is reached through a small reverse proxy in this process (``http.server``), as sites put nginx or an API
gateway in front of a PACS, because Debian's Orthanc 1.10.1 cannot do either part itself: it has no bearer tokens,
and with ``SslEnabled`` it crashes on the first HTTPS request (SIGSEGV, a jump to address 0 in a
``civetweb-worker`` thread of libcivetweb1 1.15+dfsg-4; seen on Debian 12). The proxy forwards every request to
Orthanc unchanged and returns Orthanc's answer as it is; what it adds is what the test is about:

- HTTPS: ``openssl`` makes a CA and a server certificate it signed for 127.0.0.1 and localhost; the proxy speaks
  TLS only (Python's ``ssl``, i.e. OpenSSL) with that certificate, Orthanc checks basic auth behind it. The
  destination whose ``ca_certificates`` names the CA delivers; one to the same URL without it fails the
  certificate check (a dead letter saying so) and never gets a request through.
- Bearer token: the proxy answers 401 unless ``Authorization: Bearer <the token>``. A destination with the right
  token delivers; one with a wrong token is dead-lettered after its retries with ``HTTP 401`` in ``reason.json``,
  and neither token is in any line serve and its workers logged, in any file under its data directory (the
  broker's append-only file included), on its status page or in its metrics. (serve's workers log at INFO whatever
  serve's ``--log-level``; ``tests/test_dicomweb.py`` checks the DEBUG lines of ``dicomweb-client`` and ``urllib3``.)
"""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.bonebridge_process import BoneBridgeProcess, write_config
from tests.dicom_factory import make_dx
from tests.orthanc_fixture import (DICOMWEB_PLUGIN, ORTHANC_BINARY, OrthancServer, free_port, missing_dcmtk_tools,
                                   storescu, wait_for)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (ORTHANC_BINARY.exists() and DICOMWEB_PLUGIN.exists()),
                       reason=f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}: apt-get install orthanc "
                              "orthanc-dicomweb, or deploy/install.sh)"),
    pytest.mark.skipif(shutil.which("openssl") is None or bool(missing_dcmtk_tools()), reason="needs openssl and dcmtk"),
]

PASSWORD = "pw-Hx27-https-never-logged"
TOKEN = "tok-7QmZp2-good-never-logged"
WRONG_TOKEN = "tok-9WvKd4-wrong-never-logged"




# ------------------------------------------------------------------------------------------------ test CA
def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=120)


def make_pki(folder: Path) -> Path:
    """A CA (``ca.crt``) and a server certificate (``server.crt``, ``server.key``) it signed for 127.0.0.1 and
    localhost. RSA 2048, SHA-256, 1 day."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "1",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=BoneBridge DICOMweb test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost")
    (folder / "server.ext").write_text("basicConstraints=critical,CA:FALSE\n"
                                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                       "extendedKeyUsage=serverAuth\n"
                                       "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                       "authorityKeyIdentifier=keyid\n")
    _openssl(folder, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-sha256", "-days", "1", "-extfile", "server.ext", "-out", "server.crt")
    return folder


# -------------------------------------------------------------------------------------------- the gateway
class Gateway:
    """A reverse proxy on 127.0.0.1 in front of ``upstream`` (Orthanc's plain HTTP).

    With ``certificate``/``private_key`` it speaks HTTPS only. With ``token`` it lets through only ``Authorization:
    Bearer <token>`` (401 otherwise) and does not pass that header on; without, ``Authorization`` goes to Orthanc
    (basic auth is Orthanc's to check). The rest of the request (method, path, headers but the hop-by-hop ones, the
    body; a chunked body is de-chunked, as proxies may) goes to ``upstream`` and its answer comes back unchanged.
    Each request is noted as (method, path, status) in :attr:`seen`, never with its headers.
    """

    HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
           "proxy-connection", "host", "content-length"}

    def __init__(self, upstream: str, *, token: str | None = None, certificate: Path | None = None,
                 private_key: Path | None = None) -> None:
        self.upstream = urlsplit(upstream)
        self.token = token
        self.seen: list[tuple[str, str, int]] = []
        self.handshake_failures = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                drop = set(Gateway.HOP)
                if proxy.token is not None:
                    if self.headers.get("Authorization") != f"Bearer {proxy.token}":
                        self._answer(401, {"WWW-Authenticate": 'Bearer realm="dicomweb"',
                                           "Content-Type": "text/plain"}, b"missing or wrong bearer token\n")
                        return
                    drop.add("authorization")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    answer = conn.getresponse()
                    payload = answer.read()
                    self._answer(answer.status, {k: v for k, v in answer.getheaders()
                                                 if k.lower() not in Gateway.HOP}, payload)
                finally:
                    conn.close()

            def _answer(self, status: int, headers: dict[str, str], payload: bytes) -> None:
                proxy.seen.append((self.command, self.path, status))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # a refused TLS handshake: counted, not printed
                proxy.handshake_failures += 1

        self.server = Server(("127.0.0.1", 0), Handler)
        scheme = "http"
        if certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(certificate), str(private_key))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True,
                                                     do_handshake_on_connect=False)
            scheme = "https"
            self._context = context
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Gateway":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------- helpers
def _secret_file(folder: Path, name: str, value: str) -> Path:
    path = folder / "secrets" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def _config(tmp_path: Path, destinations: dict[str, dict]) -> Path:
    """A serve config whose routes send to every one of ``destinations``."""
    config = write_config(tmp_path, pacs_port=free_port(), extra={"destinations": destinations})
    import yaml

    data = yaml.safe_load(config.read_text())
    data["routes"] = [{**route, "send_to": list(destinations)} for route in data["routes"]]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def _send_wrist(tmp_path: Path, proc: BoneBridgeProcess) -> str:
    wrist = make_dx(tmp_path / "wrist.dcm", body_part="WRIST", age="040Y", size=256)
    assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "wrist.dcm"]).returncode == 0
    return str(wrist.StudyInstanceUID)


def _stored(orthanc: OrthancServer) -> dict[str, str]:
    """SOP Instance UID -> Modality of every instance Orthanc holds."""
    tags = [orthanc.get(f"/instances/{i}/simplified-tags") for i in orthanc.get("/instances") or []]
    return {t["SOPInstanceUID"]: t["Modality"] for t in tags}


def _outputs(proc: BoneBridgeProcess, record: dict) -> dict[str, str]:
    """SOP Instance UID -> Modality of the result files BoneBridge made for the record."""
    import pydicom

    found = {}
    for name in record["outputs"]:
        ds = pydicom.dcmread(proc.data_dir / name, stop_before_pixels=True)
        found[str(ds.SOPInstanceUID)] = str(ds.Modality)
    return found


def _reasons(proc: BoneBridgeProcess) -> dict[str, dict]:
    """Destination -> the reason.json of its dead-letter entry."""
    reasons = [json.loads(p.read_text()) for p in (proc.data_dir / "dead-letter").glob("*/reason.json")]
    return {r["destination"]: r for r in reasons}


def _pages(proc: BoneBridgeProcess) -> list[str]:
    return [urllib.request.urlopen(f"http://127.0.0.1:{proc.config[k]['port']}/{p}", timeout=30).read().decode()
            for k, p in (("status", ""), ("metrics", "metrics"))]


def _files_holding(folder: Path, secrets: list[str]) -> list[str]:
    """Files under ``folder`` (outcome records, pending and dead-letter entries, the broker's append-only file,
    logs...) whose bytes contain any of ``secrets``."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s[:6]}..." for s in secrets if s.encode() in data]
    return found


# ------------------------------------------------------------------------------------------------- tests
def test_https_with_a_test_ca_delivers_and_without_the_ca_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    orthanc = OrthancServer(tmp_path / "orthanc", dicomweb=True, users={"bonebridge": PASSWORD}).start()
    try:
        with Gateway(orthanc.url, certificate=pki / "server.crt", private_key=pki / "server.key") as gateway:
            url = gateway.url + "/dicom-web"
            assert url.startswith("https://127.0.0.1:")
            password = _secret_file(tmp_path, "stow-password", PASSWORD)
            basic = {"basic": {"user": "bonebridge", "password_file": str(password)}}
            config = _config(tmp_path, {
                "cloud": {"type": "dicomweb", "url": url, "auth": basic, "timeout_s": 20,
                          "ca_certificates": str(pki / "ca.crt"), "retries": 2, "backoff_s": 0.5},
                # the same server without its CA: the system's trust store does not know the test CA
                "untrusted": {"type": "dicomweb", "url": url, "auth": basic, "timeout_s": 20,
                              "retries": 0, "backoff_s": 0.5},
            })
            with BoneBridgeProcess(config) as proc:
                study_uid = _send_wrist(tmp_path, proc)
                [record] = wait_for(lambda: proc.results(study_uid), 240, interval=0.2,
                                    what=f"the study delivered or dead-lettered\n{proc.log_tail()}")
                pages = _pages(proc)
                log = proc.log_path.read_text(errors="replace")
            seen, refused = list(gateway.seen), gateway.handshake_failures
        stored = _stored(orthanc)
    finally:
        orthanc.stop(wait=False)
    made = _outputs(proc, record)
    assert sorted(made.values()) in (["OT", "SR"], ["SC", "SR"]), made  # the report and the heatmap capture
    assert record["destinations"]["cloud"] == "sent", record
    assert stored == made  # both arrived, by HTTPS through the gateway
    assert seen == [("POST", "/dicom-web/studies", 200)] and refused >= 1, (seen, refused)
    assert str(record["destinations"]["untrusted"]).startswith("dead-lettered"), record
    reason = _reasons(proc)["untrusted"]
    assert "TLS failed" in reason["error"] and "CERTIFICATE_VERIFY_FAILED" in reason["error"], reason
    assert reason["url"] == url and reason["attempts"] == 1
    for text in (log, *pages):
        assert PASSWORD not in text
    assert not _files_holding(proc.data_dir, [PASSWORD])


def test_bearer_token_delivers_and_a_wrong_one_is_dead_lettered_with_the_status_and_no_secret(tmp_path: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc", dicomweb=True).start()  # no auth of its own: the gateway's job
    try:
        with Gateway(orthanc.url, token=TOKEN) as gateway:
            url = gateway.url + "/dicom-web"
            config = _config(tmp_path, {
                "cloud": {"type": "dicomweb", "url": url, "timeout_s": 20, "retries": 2, "backoff_s": 0.5,
                          "auth": {"bearer_token_file": str(_secret_file(tmp_path, "token", TOKEN))}},
                "wrongtoken": {"type": "dicomweb", "url": url, "timeout_s": 20, "retries": 1, "backoff_s": 0.5,
                               "auth": {"bearer_token_file": str(_secret_file(tmp_path, "wrong-token", WRONG_TOKEN))}},
            })
            with BoneBridgeProcess(config) as proc:
                study_uid = _send_wrist(tmp_path, proc)
                [record] = wait_for(lambda: proc.results(study_uid), 240, interval=0.2,
                                    what=f"the study delivered or dead-lettered\n{proc.log_tail()}")
                pages = _pages(proc)
                log = proc.log_path.read_text(errors="replace")
            seen = list(gateway.seen)
        stored = _stored(orthanc)
    finally:
        orthanc.stop(wait=False)
    made = _outputs(proc, record)
    assert record["destinations"]["cloud"] == "sent", record
    assert stored == made and sorted(made.values()) in (["OT", "SR"], ["SC", "SR"]), (stored, made)
    assert str(record["destinations"]["wrongtoken"]).startswith("dead-lettered"), record
    reason = _reasons(proc)["wrongtoken"]
    assert "HTTP 401" in reason["error"] and reason["attempts"] == 2, reason  # the first try and its one retry
    assert reason["type"] == "dicomweb" and reason["url"] == url and reason["auth"] == "bearer token"
    assert sorted(seen) == sorted([("POST", "/dicom-web/studies", 200)] + [("POST", "/dicom-web/studies", 401)] * 2)
    leaks = [line for line in log.splitlines() if TOKEN in line or WRONG_TOKEN in line]
    assert not leaks, leaks[:3]
    for text in pages:
        assert TOKEN not in text and WRONG_TOKEN not in text
    assert not _files_holding(proc.data_dir, [TOKEN, WRONG_TOKEN])


def test_ca_certificates_win_over_a_ca_bundle_in_the_environment(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    orthanc = OrthancServer(tmp_path / "orthanc", dicomweb=True).start()
    try:
        with Gateway(orthanc.url, certificate=pki / "server.crt", private_key=pki / "server.key") as gateway:
            config = _config(tmp_path, {"cloud": {"type": "dicomweb", "url": gateway.url + "/dicom-web",
                                                  "ca_certificates": str(pki / "ca.crt"), "retries": 0}})
            system_bundle = ssl.get_default_verify_paths().openssl_cafile  # does not hold the test CA
            with BoneBridgeProcess(config, env={"REQUESTS_CA_BUNDLE": system_bundle}) as proc:
                study_uid = _send_wrist(tmp_path, proc)
                [record] = wait_for(lambda: proc.results(study_uid), 240, interval=0.2,
                                    what=f"the study delivered or dead-lettered\n{proc.log_tail()}")
    finally:
        orthanc.stop(wait=False)
    assert record["destinations"] == {"cloud": "sent"}, record["destinations"]
