"""Shared pytest fixtures: real Orthanc, Redis and dcmtk processes, synthetic DICOM, the shared data folder.

Tests that use a server fixture are marked ``integration`` automatically and tests that use
``shared_data`` are marked ``data``, so ``pytest -m "not integration"`` gives a quick unit run and
a machine without the data folder skips only what needs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.dicom_factory import make_study
from tests.orthanc_fixture import (
    ORTHANC_BINARY,
    REDIS_BINARY,
    OrthancServer,
    RedisServer,
    StoreSCP,
    missing_dcmtk_tools,
    reap_stopped,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

INTEGRATION_FIXTURES = frozenset(
    {"orthanc", "orthanc_module", "orthanc_factory", "redis_server", "redis_url", "dcmtk", "storescp"}
)
DATA_FIXTURES = frozenset({"shared_data"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by the fixtures they use (including fixtures those fixtures use)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & INTEGRATION_FIXTURES:
            item.add_marker(pytest.mark.integration)
        if names & DATA_FIXTURES:
            item.add_marker(pytest.mark.data)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Wait for servers whose teardown only sent SIGTERM, so none outlives the test run."""
    reap_stopped()


# --------------------------------------------------------------------------- Orthanc
def _require_orthanc() -> None:
    if not ORTHANC_BINARY.exists():
        pytest.skip(f"Orthanc is not installed ({ORTHANC_BINARY} missing; `apt-get install orthanc`, see .ci/run)")


def _started_orthanc(workdir: Path, modality_port: int | None = None) -> OrthancServer:
    _require_orthanc()
    return OrthancServer(workdir, modality_port=modality_port).start()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A fresh, empty Orthanc for one test (AE ``ORTHANC``; knows modality ``bonebridge``)."""
    server = _started_orthanc(tmp_path / "orthanc")
    try:
        yield server
    finally:
        server.stop(wait=False)  # Orthanc takes ~3 s to exit; reaped at session end


@pytest.fixture(scope="module")
def orthanc_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc shared by a test module: tests must use their own study UIDs (or call ``clear()``)."""
    server = _started_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop(wait=False)


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Start Orthanc servers with a chosen ``modality_port`` (for a BoneBridge listener already running)."""
    servers: list[OrthancServer] = []

    def start(modality_port: int | None = None) -> OrthancServer:
        server = _started_orthanc(tmp_path / f"orthanc{len(servers)}", modality_port)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop(wait=False)


# ----------------------------------------------------------------------------- Redis
@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for a test module (no persistence; bound to 127.0.0.1)."""
    if shutil.which(REDIS_BINARY) is None:
        pytest.skip("redis-server is not installed (`apt-get install redis-server`, see .ci/run)")
    pytest.importorskip("redis", reason="the redis Python package is needed to talk to redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:<port>/0`` of a server that has answered PING."""
    return redis_server.url


# ----------------------------------------------------------------------------- dcmtk
@pytest.fixture(scope="session")
def dcmtk() -> None:
    """Skip unless dcmtk's echoscu, storescu and storescp are on PATH (use the helpers in orthanc_fixture)."""
    missing = missing_dcmtk_tools()
    if missing:
        pytest.skip(f"dcmtk tools missing: {', '.join(missing)} (`apt-get install dcmtk`, see .ci/run)")


@pytest.fixture
def storescp(tmp_path: Path, dcmtk: None) -> Iterator[StoreSCP]:
    """A dcmtk storescp (AE ``STORESCP``, free port) that keeps what it receives in ``.output_dir``."""
    with StoreSCP(tmp_path / "storescp") as server:
        yield server


# -------------------------------------------------------------------------- DICOM
@pytest.fixture
def dicom_dir(tmp_path: Path) -> Path:
    """A folder with one synthetic DX hand study of two instances (see ``tests.dicom_factory``)."""
    folder = tmp_path / "dicom"
    make_study(folder, count=2, size=128)
    return folder


# ---------------------------------------------------------------------- shared data
def _shared_data_candidates() -> list[Path]:
    candidates = []
    env = os.environ.get("BONEBRIDGE_SHARED_DATA")
    if env:
        candidates.append(Path(env))
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    candidates.append(Path("/work/shared/data"))
    return candidates


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only training/evaluation data folder; tests that need it are skipped where it is absent.

    Looked up in ``$BONEBRIDGE_SHARED_DATA``, then ``../shared/data`` next to the checkout, then
    ``/work/shared/data``.
    """
    for candidate in _shared_data_candidates():
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in _shared_data_candidates())
    pytest.skip(f"shared data folder not found (tried {tried}; set BONEBRIDGE_SHARED_DATA)")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Model tests use it (``pytest.mark.usefixtures("one_torch_thread")``). One intra-op thread: tiny networks gain nothing from more, and on a shared CPU OpenMP threads that wait
    for a busy core make every convolution many times slower."""
    import torch

    patch = pytest.MonkeyPatch()
    patch.setenv("BONEBRIDGE_TORCH_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    patch.undo()
