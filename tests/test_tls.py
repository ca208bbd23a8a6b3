"""DICOM TLS with real certificates (made by ``openssl``) and dcmtk as the independent other side.

- The listener with ``listener.tls``: dcmtk's ``storescu +tls`` with a client certificate from our CA stores an
  instance; plain TCP fails; with ``require_client_certificate`` a caller without a certificate (``+tla``,
  anonymous TLS) is refused, and nothing of either refused caller reaches the spool.
- A destination with ``tls``: results reach dcmtk's ``storescp +tls``, which checks our client certificate.
- The config rejects a TLS section naming a missing file, or asking for client certificates without a CA.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from daemon.config.schema import ConfigError, DestinationTls, ListenerTls, load_config
from daemon.dispatch.dispatcher import send_datasets
from daemon.receive.listener import start_listener
from daemon.receive.spool import Spool
from tests.bonebridge_process import write_config
from tests.orthanc_fixture import free_port, wait_for
from tests.test_listener import Recorder
from tests.test_spool import make_dx

pytestmark = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("storescu")),
                                reason="needs openssl and dcmtk")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, and a server and a client certificate it signed (RSA 2048, SHA-256, 1 day)."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=BoneBridge test CA", cwd=folder)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'localhost' if name == 'server' else 'STORESCU'}", cwd=folder)
        (folder / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)
    return folder


def _listener(tmp_path: Path, pki: Path, require_client: bool):
    tls = ListenerTls(certificate=pki / "server.crt", private_key=pki / "server.key", ca_certificates=pki / "ca.crt",
                      require_client_certificate=require_client)
    cfg = SimpleNamespace(ae_title="BONEBRIDGE", host="127.0.0.1", port=0, max_pdu=16384, network_timeout_s=10,
                          allowed_callers=[SimpleNamespace(ae_title="STORESCU", host="127.0.0.1")], tls=tls)
    spool = Spool(tmp_path / "var", is_own_output=False)
    recorder = Recorder()
    server = start_listener(cfg, spool, recorder.on_instance, recorder.on_closed)
    return server, recorder


def _storescu(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "BONEBRIDGE", *tls, "127.0.0.1", str(port),
                           str(path)], capture_output=True, text=True, timeout=60)


def test_listener_with_tls_takes_tls_callers_only(tmp_path: Path, pki: Path) -> None:
    make_dx(tmp_path / "a.dcm")
    server, recorder = _listener(tmp_path, pki, require_client=True)
    port = server.server_address[1]
    try:
        with_cert = _storescu(port, tmp_path / "a.dcm", "+tls", str(pki / "client.key"), str(pki / "client.crt"),
                              "+cf", str(pki / "ca.crt"))
        assert with_cert.returncode == 0, with_cert.stderr
        assert len(recorder.instances) == 1
        assert _storescu(port, tmp_path / "a.dcm").returncode != 0  # plain TCP to a TLS port
        anonymous = _storescu(port, tmp_path / "a.dcm", "+tla", "+cf", str(pki / "ca.crt"))
        assert anonymous.returncode != 0  # TLS, but no client certificate
        assert len(recorder.instances) == 1
    finally:
        server.shutdown()


def test_results_reach_a_tls_pacs_with_our_client_certificate(tmp_path: Path, pki: Path) -> None:
    if shutil.which("storescp") is None:
        pytest.skip("dcmtk storescp not installed")
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    scp = subprocess.Popen(["storescp", "-aet", "PACS", "+tls", str(pki / "server.key"), str(pki / "server.crt"),
                            "+cf", str(pki / "ca.crt"), "--require-peer-cert", "-od", str(received), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        make_dx(tmp_path / "out.dcm")
        dest = SimpleNamespace(ae_title="PACS", host="127.0.0.1", port=port, calling_ae="BONEBRIDGE",
                               tls=DestinationTls(ca_certificates=pki / "ca.crt", certificate=pki / "client.crt",
                                                  private_key=pki / "client.key", server_hostname="localhost"))
        wait_for(lambda: send_datasets(dest, [tmp_path / "out.dcm"]) is None, 20, interval=0.5, what="TLS C-STORE")
        assert len(list(received.iterdir())) == 1
    finally:
        scp.terminate()
        scp.wait(timeout=10)


def test_config_checks_tls_files(tmp_path: Path, pki: Path) -> None:
    path = write_config(tmp_path, pacs_port=free_port())
    data = yaml.safe_load(path.read_text())
    data["listener"]["tls"] = {"certificate": str(pki / "server.crt"), "private_key": str(pki / "server.key"),
                               "ca_certificates": str(pki / "ca.crt"), "require_client_certificate": True}
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).listener.tls.require_client_certificate
    data["listener"]["tls"]["certificate"] = str(tmp_path / "missing.crt")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="not a readable file"):
        load_config(path)
    data["listener"]["tls"] = {"certificate": str(pki / "server.crt"), "private_key": str(pki / "server.key"),
                               "require_client_certificate": True}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="needs ca_certificates"):
        load_config(path)
