"""``bonebridge serve --demo``: a private Orthanc as the PACS, so a first run ends with a result one can see.

On a fresh machine nothing answers at the default destination (ORTHANC at 127.0.0.1:4242): results would be
retried and dead-lettered. In demo mode ``serve`` starts Debian's ``orthanc`` (when installed) as that
destination: the AE title and DICOM port the config gives for it, its own storage under
``data_dir/demo-pacs``, its web page (Orthanc Explorer) on 127.0.0.1:8042 or, when that port is taken, a free
one. The address is logged and written to ``data_dir/run/demo-pacs.url``. Orthanc only serves 127.0.0.1
(``RemoteAccessAllowed: false``), dies with ``serve`` (parent-death signal) and is stopped with it.

Orthanc 1.10 has no listen-address setting; its ports are the config's own, on a machine the user chose for a demo.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from daemon.ops.children import die_with_parent

LOGGER = logging.getLogger(__name__)

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DEFAULT_HTTP_PORT = 8042
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class DemoPacsError(RuntimeError):
    """The demo PACS cannot run here; the message says why and what to do."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))  # Orthanc binds every interface
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


class DemoPacs:
    """One Orthanc process acting as the destination ``ae_title`` on ``dicom_port``."""

    def __init__(self, folder: Path, ae_title: str, dicom_port: int, http_port: int | None = None,
                 binary: Path = ORTHANC_BINARY) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.dicom_port = int(dicom_port)
        self.binary = Path(binary)
        wanted = http_port or DEFAULT_HTTP_PORT
        self.http_port = wanted if _port_free(wanted) else _free_port()
        self.log_path = self.folder / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Orthanc Explorer, the web page that lists the studies with their series."""
        return f"http://127.0.0.1:{self.http_port}/app/explorer.html"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def orthanc_config(self) -> dict[str, Any]:
        return {
            "Name": "BoneBridge demo PACS",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "TemporaryDirectory": str(self.folder / "tmp"),
            "Plugins": [], "LuaScripts": [],
            "HttpServerEnabled": True, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "OrthancExplorerEnabled": True,
            "DicomServerEnabled": True, "DicomAet": self.ae_title, "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
            "DicomModalitiesInDatabase": False, "SaveJobs": False, "TcpNoDelay": True,
        }

    def start(self, timeout: float = 30.0) -> "DemoPacs":
        if not self.binary.exists():
            raise DemoPacsError(f"--demo needs Orthanc ({self.binary} not found): `apt-get install orthanc`, "
                                "or run without --demo and point destinations at your PACS")
        if not _port_free(self.dicom_port):
            raise DemoPacsError(f"--demo: port {self.dicom_port} (the destination's) is already in use; is a PACS "
                                "already running there? Then run without --demo")
        for sub in ("storage", "index", "tmp"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.orthanc_config(), indent=2))
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([str(self.binary), str(config_path)], cwd=self.folder, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          preexec_fn=die_with_parent())
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
                raise DemoPacsError("the demo PACS (Orthanc) did not start:\n" + "\n".join(tail))
            time.sleep(0.2)
        LOGGER.info("demo PACS (Orthanc) as %s on DICOM port %d; web page %s", self.ae_title, self.dicom_port,
                    self.url)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.rest_url + "/system", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def demo_destination(config: Any) -> tuple[str, Any]:
    """The destination the demo PACS plays: ``pacs`` if the config has it, else the first; it must be local."""
    destinations = config.destinations
    if not destinations:
        raise DemoPacsError("--demo: the config has no destinations for the demo PACS to play")
    name = "pacs" if "pacs" in destinations else next(iter(destinations))
    dest = destinations[name]
    if getattr(dest, "type", "dicom") != "dicom":
        raise DemoPacsError(f"--demo: destination {name!r} is {dest.type}; the demo PACS stands in for a DICOM one")
    if str(dest.host) not in LOCAL_HOSTS:
        raise DemoPacsError(f"--demo: destination {name!r} is {dest.host}:{dest.port}, not this machine; "
                            "the demo PACS can only stand in for a destination on 127.0.0.1")
    return name, dest
