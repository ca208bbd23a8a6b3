"""Real server processes for integration tests: an Orthanc PACS and a Redis broker.

BoneBridge talks DICOM to a PACS and Celery to Redis. Mocks of either would only test our idea of
how they behave, so the integration tests run the real programs (Debian's ``orthanc`` 1.10 and
``redis-server``) as child processes on free ports, each in its own temporary folder, and stop them
afterwards.

Orthanc 1.10 has no setting for the address it listens on: it binds every interface. We keep it
harmless by giving it fresh ports, switching remote access off and only ever talking to 127.0.0.1.

The REST helpers use :mod:`urllib` only, so the tests need no HTTP client package.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
"""Where the Debian ``orthanc`` package installs the server."""

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
"""Where the Debian ``orthanc-dicomweb`` package installs the DICOMweb plugin (STOW-RS, QIDO-RS, WADO-RS)."""

REDIS_BINARY = "redis-server"

LOCALHOST = "127.0.0.1"

T = TypeVar("T")


class ProcessStartError(RuntimeError):
    """A server process did not come up; the message carries the tail of its log."""


class OrthancError(RuntimeError):
    """Orthanc answered a REST call with an error status (the body explains why)."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


def free_port() -> int:
    """Return a TCP port that was free a moment ago on 127.0.0.1.

    The socket is closed before returning, so another process could take the port in between; with
    ports drawn from the kernel's ephemeral range that race is rare enough for tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "") -> T:
    """Call ``predicate`` until it returns something truthy and return that value.

    Exceptions from the predicate count as "not yet" (a server that is still starting refuses
    connections); the last one is chained to the :class:`TimeoutError` raised after ``timeout``
    seconds so a failure says what actually went wrong.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last_exc = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            label = what or getattr(predicate, "__name__", "condition")
            raise TimeoutError(f"{label} not met within {timeout:.1f} s") from last_exc
        time.sleep(interval)


def log_tail(path: Path, lines: int = 40) -> str:
    """Last ``lines`` lines of a log file, or a note that there is none (for failure messages)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


_STOPPING: list[subprocess.Popen[bytes]] = []
"""Processes told to terminate but not yet waited for (see ``_stop_process(wait=False)``)."""


def _stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 10.0, wait: bool = True) -> None:
    """Terminate, wait, and kill if it will not go: a test run must never leave servers behind.

    Orthanc needs about three seconds to shut its HTTP and DICOM servers down. With ``wait=False`` the
    process gets SIGTERM now and is waited for (and killed if need be) by :func:`reap_stopped`, which
    conftest calls at the end of the session and :mod:`atexit` calls as a fallback; its ports are never
    reused, since every server takes fresh ones.
    """
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    if not wait:
        _STOPPING.append(proc)
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


def reap_stopped(grace_s: float = 10.0) -> None:
    """Wait for every process stopped with ``wait=False``; kill the ones still running after the grace time."""
    deadline = time.monotonic() + grace_s
    while _STOPPING:
        proc = _STOPPING.pop()
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


atexit.register(reap_stopped)


class OrthancServer:
    """One private Orthanc instance: its own storage, index, HTTP and DICOM ports.

    ``modality_port`` is the port of the ``bonebridge`` DICOM modality (AE ``BONEBRIDGE`` on
    127.0.0.1) that Orthanc knows from its configuration. When the test does not give one, a free port
    is reserved so the test can start its own listener there; :meth:`set_modality` changes it later
    through the REST API without a restart.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        modality_port: int | None = None,
        aet: str = "ORTHANC",
        stable_age_s: int = 1,
        binary: Path = ORTHANC_BINARY,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        """``dicomweb`` loads Debian's DICOMweb plugin (its service root is :attr:`dicomweb_url`); ``users`` turns
        HTTP basic authentication on with these user names and passwords (the REST helpers use the first)."""
        self.dicomweb = dicomweb
        self.users = dict(users or {})
        self.workdir = Path(workdir)
        self.aet = aet
        self.binary = Path(binary)
        self.stable_age_s = stable_age_s
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modality_port = modality_port if modality_port is not None else free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root (STOW-RS posts to ``{dicomweb_url}/studies``)."""
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        """The configuration Orthanc is started with (kept as data so tests can inspect it)."""
        return {
            "Name": f"bonebridge-test-{self.http_port}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "TemporaryDirectory": str(self.workdir / "tmp"),
            # Debian's own config loads /usr/share/orthanc/plugins; an explicit empty list keeps the
            # test server to the core so plugin behaviour cannot leak into our results.
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            **({"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}} if self.dicomweb else {}),
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            **({"RegisteredUsers": self.users} if self.users else {}),
            "OrthancExplorerEnabled": False,
            "HttpThreadsCount": 8,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomThreadsCount": 2,
            "DicomScuTimeout": 10,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {
                "bonebridge": ["BONEBRIDGE", LOCALHOST, self.modality_port],
            },
            "StableAge": self.stable_age_s,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "SyncStorageArea": False,
            "StoreMD5ForAttachments": True,
            "OverwriteInstances": True,
            "MetricsEnabled": False,
        }

    def start(self, timeout: float = 30.0) -> OrthancServer:
        """Write the config, start Orthanc and wait until ``GET /system`` answers."""
        if not self.binary.exists():
            raise FileNotFoundError(f"Orthanc binary not found at {self.binary}")
        if self.dicomweb and not DICOMWEB_PLUGIN.exists():
            raise FileNotFoundError(f"Orthanc's DICOMweb plugin not found at {DICOMWEB_PLUGIN} "
                                    "(apt-get install orthanc-dicomweb)")
        for sub in ("storage", "index", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(self.binary), str(self.config_path)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        try:
            wait_for(self._system_answers, timeout, interval=0.1, what="Orthanc GET /system")
        except TimeoutError as exc:
            self.stop()
            raise ProcessStartError(
                f"Orthanc did not start within {timeout} s (log {self.log_path}):\n{log_tail(self.log_path)}"
            ) from exc
        return self

    def _system_answers(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise ProcessStartError(f"Orthanc exited with status {self._proc.returncode}")
        return bool(self.get("/system"))

    def stop(self, wait: bool = True) -> None:
        """SIGTERM; with ``wait`` (default) block until it has exited, else leave that to ``reap_stopped``."""
        _stop_process(self._proc, wait=wait)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    # ---------------------------------------------------------------------- REST
    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict[str, Any] | list[Any] | None = None,
        *,
        content_type: str | None = None,
        timeout: float = 60.0,
    ) -> bytes:
        """One REST call; returns the raw body and raises :class:`OrthancError` on HTTP errors."""
        data: bytes | None
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(method, path, exc.code, exc.read().decode(errors="replace")) from None

    def _json(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        raw = self.request(method, path, body, **kwargs)
        return json.loads(raw) if raw.strip() else None

    def get(self, path: str) -> Any:
        return self._json("GET", path)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self._json("POST", path, body, **kwargs)

    def put(self, path: str, body: Any = None) -> Any:
        return self._json("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self._json("DELETE", path)

    # ---------------------------------------------------------------- helpers
    def upload(self, path: str | Path) -> dict[str, Any]:
        """``POST /instances`` one DICOM file; returns Orthanc's answer (``ID``, ``Status``, ...)."""
        answer = self.post("/instances", Path(path).read_bytes(), content_type="application/dicom")
        assert isinstance(answer, dict), answer
        return answer

    def instances_in_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance Orthanc holds for a StudyInstanceUID, expanded (``ID``, ``MainDicomTags``...)."""
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        answer = self.post("/tools/find", query)
        return list(answer or [])

    def get_instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of one instance, byte for byte as Orthanc keeps it."""
        return self.request("GET", f"/instances/{orthanc_id}/file")

    def get_instance_dataset(self, orthanc_id: str) -> Any:
        """The stored instance parsed by pydicom (imported lazily: the module itself needs none)."""
        from io import BytesIO

        import pydicom

        return pydicom.dcmread(BytesIO(self.get_instance_file(orthanc_id)))

    def set_modality(self, name: str, ae_title: str, port: int, host: str = LOCALHOST) -> None:
        """Define or change a DICOM modality at run time (``PUT /modalities/{name}``)."""
        self.put(f"/modalities/{name}", {"AET": ae_title, "Host": host, "Port": int(port)})
        if name == "bonebridge":
            self.modality_port = int(port)

    def store_to_modality(self, modality: str, resource_ids: Iterable[str], timeout: float = 60.0) -> dict[str, Any]:
        """C-STORE resources (instances, series, studies...) to a modality, synchronously.

        Raises :class:`OrthancError` when the C-STORE fails, so a refused association is a test failure
        and not a silent no-op.
        """
        body = {"Resources": list(resource_ids), "Synchronous": True, "Timeout": int(timeout)}
        answer = self.post(f"/modalities/{modality}/store", body, timeout=timeout + 10)
        return dict(answer or {})

    def study_ids(self) -> list[str]:
        return list(self.get("/studies") or [])

    def clear(self) -> None:
        """Delete every patient, so a module-scoped server starts each test empty if asked to."""
        for patient in self.get("/patients") or []:
            self.delete(f"/patients/{patient}")

    def wait_for(self, predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1) -> T:
        return wait_for(predicate, timeout, interval)


class RedisServer:
    """A throw-away ``redis-server`` on 127.0.0.1 without persistence, in its own folder."""

    def __init__(self, workdir: Path, *, binary: str = REDIS_BINARY) -> None:
        self.workdir = Path(workdir)
        self.binary = binary
        self.port = free_port()
        self.log_path = self.workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", LOCALHOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if shutil.which(self.binary) is None:
            raise FileNotFoundError(f"{self.binary} not found on PATH")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            wait_for(self._pings, timeout, interval=0.05, what="Redis PING")
        except TimeoutError as exc:
            self.stop()
            raise ProcessStartError(
                f"redis-server did not start within {timeout} s (log {self.log_path}):\n{log_tail(self.log_path)}"
            ) from exc
        return self

    def _pings(self) -> bool:
        import redis

        if self._proc is not None and self._proc.poll() is not None:
            raise ProcessStartError(f"redis-server exited with status {self._proc.returncode}")
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def stop(self) -> None:
        _stop_process(self._proc)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


DCMTK_TOOLS = ("echoscu", "storescu", "storescp")


def missing_dcmtk_tools() -> list[str]:
    """The dcmtk programs the tests use that are not on PATH (empty when dcmtk is installed)."""
    return [tool for tool in DCMTK_TOOLS if shutil.which(tool) is None]


def run_tool(args: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command line tool and capture its output (for assertions and failure messages)."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False)


def echoscu(port: int, called_aet: str, *, calling_aet: str = "ECHOSCU", host: str = LOCALHOST,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """C-ECHO with dcmtk's ``echoscu``; ``returncode == 0`` means the peer accepted and answered."""
    return run_tool(["echoscu", "-aet", calling_aet, "-aec", called_aet, host, str(port)], timeout)


def storescu(port: int, called_aet: str, files: Iterable[str | Path], *, calling_aet: str = "STORESCU",
             host: str = LOCALHOST, extra: Sequence[str] = (), timeout: float = 120.0
             ) -> subprocess.CompletedProcess[str]:
    """C-STORE files with dcmtk's ``storescu`` in one association (``extra`` adds options such as ``-xs``)."""
    args = ["storescu", "-aet", calling_aet, "-aec", called_aet, *extra, host, str(port), *map(str, files)]
    return run_tool(args, timeout)


class StoreSCP:
    """dcmtk's ``storescp`` as a stand-in PACS destination that writes whatever it receives to a folder.

    It accepts every transfer syntax dcmtk knows (``+xa``) so compressed objects are stored as sent.
    One association at a time, which is all a dispatcher test needs.
    """

    def __init__(self, workdir: Path, *, aet: str = "STORESCP", port: int | None = None,
                 unique_filenames: bool = False) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        #: ``+uf``: every C-STORE gets a file of its own, so a result sent twice shows as two files
        self.unique_filenames = unique_filenames
        self.port = port if port is not None else free_port()
        self.output_dir = self.workdir / "received"
        self.log_path = self.workdir / "storescp.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> StoreSCP:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        args = ["storescp", "+xa", *(["+uf"] if self.unique_filenames else []), "-aet", self.aet,
                "-od", str(self.output_dir), str(self.port)]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def answers_echo() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise ProcessStartError(f"storescp exited with status {self._proc.returncode}")
            return echoscu(self.port, self.aet, timeout=5).returncode == 0

        try:
            wait_for(answers_echo, timeout, interval=0.1, what="storescp C-ECHO")
        except TimeoutError as exc:
            self.stop()
            raise ProcessStartError(f"storescp did not start:\n{log_tail(self.log_path)}") from exc
        return self

    def received(self) -> list[Path]:
        """Files written so far (storescp writes them complete before answering the C-STORE)."""
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())

    def stop(self) -> None:
        _stop_process(self._proc)
        self._proc = None

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
