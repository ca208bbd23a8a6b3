"""Issue 27: ``type: dicomweb`` destinations, STOW-RS with ``dicomweb-client``, against a real Orthanc with Debian's
DICOMweb plugin (``orthanc-dicomweb``) behind HTTP basic authentication, and a real ``serve`` sending a real study's
SR and heatmap SC there. What a real server will not easily answer (409 Conflict) comes from a local HTTP server.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from daemon.config.schema import ConfigError, DicomWebDestination, load_config
from daemon.dispatch.destinations import DispatchError
from daemon.dispatch.destinations import dicomweb
from daemon.dispatch.dispatcher import DeadLettered, Dispatcher
from tests.bonebridge_process import REPO, BoneBridgeProcess, write_config
from tests.dicom_factory import make_dx
from tests.orthanc_fixture import DICOMWEB_PLUGIN, ORTHANC_BINARY, OrthancServer, free_port, storescu, wait_for

PASSWORD = "pw-Zq81-never-logged"
needs_plugin = pytest.mark.skipif(
    not (ORTHANC_BINARY.exists() and DICOMWEB_PLUGIN.exists()),
    reason=f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}: apt-get install orthanc orthanc-dicomweb, "
           "or deploy/install.sh)")


@pytest.fixture
def dicomweb_orthanc(tmp_path: Path):
    server = OrthancServer(tmp_path / "orthanc", dicomweb=True, users={"bonebridge": PASSWORD}).start()
    try:
        yield server
    finally:
        server.stop(wait=False)


def _destination(tmp_path: Path, url: str, password: str = PASSWORD, **extra) -> DicomWebDestination:
    secret = tmp_path / "stow-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    return DicomWebDestination.model_validate({"type": "dicomweb", "url": url, "retries": 1, "backoff_s": 0,
                                               "auth": {"basic": {"user": "bonebridge", "password_file": str(secret)}},
                                               "timeout_s": 10, **extra})


def _instances(orthanc: OrthancServer) -> list[str]:
    return sorted(orthanc.get("/instances") or [])


@needs_plugin
def test_stow_rs_with_basic_auth_stores_the_files_and_a_resend_is_harmless(tmp_path: Path, dicomweb_orthanc) -> None:
    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    sent = [make_dx(files[0], seed=1, size=64), make_dx(files[1], seed=2, size=64)]
    dest = _destination(tmp_path, dicomweb_orthanc.dicomweb_url)
    dicomweb.send(dest, files)
    stored = {dicomweb_orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in _instances(dicomweb_orthanc)}
    assert stored == {str(ds.SOPInstanceUID) for ds in sent}
    dicomweb.send(dest, files)  # idempotent: the same SOP instances again
    assert len(_instances(dicomweb_orthanc)) == 2


@needs_plugin
def test_a_wrong_password_is_dead_lettered_with_the_http_status_and_no_secret(tmp_path: Path, dicomweb_orthanc,
                                                                              caplog) -> None:
    caplog.set_level(logging.DEBUG)  # dicomweb-client and urllib3 log requests at DEBUG: none may carry the secret
    f = tmp_path / "a.dcm"
    make_dx(f, size=64)
    wrong = "wrong-" + PASSWORD
    dest = _destination(tmp_path, dicomweb_orthanc.dicomweb_url, password=wrong)
    dispatcher = Dispatcher(tmp_path / "var", {"cloud": dest}, sleep=lambda s: None)
    with pytest.raises(DeadLettered) as info:
        dispatcher.send("cloud", [f], "1.2.3-1", outcome=("1.2.3", 1))
    reason = json.loads((info.value.path / "reason.json").read_text())
    assert "HTTP 401" in reason["error"] and reason["attempts"] == 2
    assert reason["type"] == "dicomweb" and reason["url"] == dicomweb_orthanc.dicomweb_url and reason["auth"] == "basic auth"
    assert wrong not in json.dumps(reason) and "stow-password" not in json.dumps(reason)
    assert "HTTP 401" in caplog.text and wrong not in caplog.text and PASSWORD not in caplog.text
    assert _instances(dicomweb_orthanc) == []


class _Stub(BaseHTTPRequestHandler):
    """A STOW-RS endpoint that answers every POST with the class's ``status`` and ``body``."""

    status = 409
    body: dict | None = None

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        payload = json.dumps(self.body).encode() if self.body is not None else b""
        self.send_response(self.status)
        if payload:
            self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


def _failed(reason: int) -> dict:
    return {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
                                                  "00081197": {"vr": "US", "Value": [reason]}}]}}


@pytest.mark.parametrize("body, delivered", [(None, True), (_failed(0x0111), True), (_failed(0xA900), False)],
                         ids=["bare-409", "409-duplicate", "409-other-failure"])
def test_409_for_an_instance_already_there_counts_as_delivered(tmp_path: Path, body, delivered) -> None:
    handler = type("Stub", (_Stub,), {"status": 409, "body": body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    f = tmp_path / "a.dcm"
    make_dx(f, size=32)
    try:
        dest = _destination(tmp_path, f"http://127.0.0.1:{server.server_address[1]}/dicom-web")
        if delivered:
            dicomweb.send(dest, [f])
        else:
            with pytest.raises(DispatchError, match="HTTP 409.*0xA900") as info:
                dicomweb.send(dest, [f])
            assert info.value.permanent
    finally:
        server.shutdown()


def test_no_server_is_a_retryable_error(tmp_path: Path) -> None:
    f = tmp_path / "a.dcm"
    make_dx(f, size=32)
    with pytest.raises(DispatchError, match="no connection") as info:
        dicomweb.send(_destination(tmp_path, f"http://127.0.0.1:{free_port()}/dicom-web"), [f])
    assert not info.value.permanent


def test_config_check_reports_each_dicomweb_field_with_its_line(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc")
    good = {"destinations": {"cloud": {"type": "dicomweb", "url": "https://pacs.example.org/dicom-web/",
                                       "auth": {"bearer_token_file": str(token)}, "timeout_s": 15}},
            "anatomy": {"model": None},
            "routes": [{"name": "all", "when": {}, "report": "not-processed", "send_to": ["cloud"]}]}
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(good, sort_keys=False))
    config = load_config(path)
    cloud = config.destinations["cloud"]
    assert isinstance(cloud, DicomWebDestination) and cloud.url == "https://pacs.example.org/dicom-web"
    assert cloud.describe() == "STOW-RS to https://pacs.example.org/dicom-web (bearer token)"

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "destinations:\n"                                   # 1
        "  cloud:\n"                                         # 2
        "    type: dicomweb\n"                               # 3
        "    url: https://user:pw@pacs.example.org/dw\n"     # 4
        "    timout: 3\n"                                    # 5
        "    auth:\n"                                        # 6
        "      basic: {user: bb, password_file: nowhere}\n"  # 7
        "  other:\n"                                         # 8
        "    type: ftp\n"                                    # 9
        "  pacs: {ae_title: ORTHANC, host: h, port: 104, url: x}\n"  # 10
        "anatomy: {model: null}\n"
        "routes:\n"
        "  - {name: all, report: not-processed, send_to: [cloud]}\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    found = {(i.line, i.field): i.message for i in info.value.errors}
    assert "must not carry credentials" in found[(4, "destinations.cloud.url")]
    assert "did you mean 'timeout_s'" in found[(5, "destinations.cloud.timout")]
    assert "password_file" in found[(7, "destinations.cloud.auth.basic.password_file")]
    assert "unknown destination type ftp (known: dicom, dicomweb)" in found[(9, "destinations.other.type")]
    assert "unknown field 'url'" in found[(10, "destinations.pacs.url")]
    assert len(found) == 5, found


@needs_plugin
def test_serve_sends_a_real_studys_sr_and_sc_by_stow_rs_and_shows_no_secret(tmp_path: Path, dicomweb_orthanc) -> None:
    """The issue's "done when": ``destinations: {pacs: {type: dicomweb, url, auth}}`` in a real serve's config; a wrist
    of an adult goes to the fracture model, whose SR and heatmap SC reach Orthanc through its DICOMweb endpoint."""
    secret = tmp_path / "stow-password"
    secret.write_text(PASSWORD)
    dest = {"type": "dicomweb", "url": dicomweb_orthanc.dicomweb_url, "retries": 2, "backoff_s": 0.5,
            "auth": {"basic": {"user": "bonebridge", "password_file": str(secret)}}}
    config = write_config(tmp_path, pacs_port=free_port(), extra={"destinations": {"pacs": dest}})
    wrist = make_dx(tmp_path / "wrist.dcm", body_part="WRIST", age="040Y", size=256)
    study_uid = str(wrist.StudyInstanceUID)
    with BoneBridgeProcess(config) as proc:
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "wrist.dcm"]).returncode == 0
        [record] = wait_for(lambda: proc.results(study_uid), 240, interval=0.2, what="the study delivered")
        pages = [urllib.request.urlopen(f"http://127.0.0.1:{proc.config[k]['port']}/{p}", timeout=30).read().decode()
                 for k, p in (("status", ""), ("metrics", "metrics"))]
        log = proc.log_tail(2000)
    assert record["status"] == "sent" and record["destinations"] == {"pacs": "sent"}
    modalities = sorted(dicomweb_orthanc.get(f"/instances/{i}/simplified-tags")["Modality"]
                        for i in _instances(dicomweb_orthanc))
    assert modalities == ["OT", "SR"] or modalities == ["SC", "SR"] or len(modalities) == 2, modalities
    stored = {dicomweb_orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in _instances(dicomweb_orthanc)}
    assert record["sr"][3] in stored
    delay = record["timing"]["dispatched_at"] - record["timing"]["finished_at"]
    print(f"\nDICOMweb: results delivered {delay:.3f} s after the analysis ended (record timing)")
    for text in (log, *pages):
        assert PASSWORD not in text
    assert "STOW-RS to " + dicomweb_orthanc.dicomweb_url in pages[0]
