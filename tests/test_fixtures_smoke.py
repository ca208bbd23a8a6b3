"""The test harness itself works: Orthanc, Redis and dcmtk run for real and the helpers see their effects.

Every integration test builds on these fixtures, so a broken fixture shows up here first, with the
server's log in the failure message, rather than as a confusing failure deep in a pipeline test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from tests.dicom_factory import make_dx
from tests.orthanc_fixture import OrthancServer, RedisServer, StoreSCP, echoscu, free_port, run_tool, storescu


def _explain(server: OrthancServer) -> str:
    return f"Orthanc log tail:\n{server.log_tail()}"


# ------------------------------------------------------------------------- factory
def test_make_dx_writes_a_valid_part10_dx_for_presentation(tmp_path: Path) -> None:
    study_uid = generate_uid()
    written = make_dx(tmp_path / "a.dcm", study_uid=study_uid, body_part="WRIST", age="012Y", sex="F", size=64)

    # dcmtk's own check of the Part 10 header (preamble, DICM, meta group)
    check = run_tool(["dcmftest", str(tmp_path / "a.dcm")])
    assert check.returncode == 0 and "yes" in check.stdout, check.stdout + check.stderr

    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == DigitalXRayImageStorageForPresentation
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == written.SOPInstanceUID
    assert (ds.StudyInstanceUID, ds.BodyPartExamined, ds.PatientAge, ds.PatientSex) == (study_uid, "WRIST", "012Y", "F")
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    pixels = ds.pixel_array
    assert pixels.shape == (64, 64) and pixels.dtype == np.uint16
    assert pixels.max() < 2**ds.BitsStored and pixels.std() > 0


def test_make_dx_can_leave_tags_out(tmp_path: Path) -> None:
    make_dx(tmp_path / "b.dcm", body_part=None, age=None, sex="", size=32)
    ds = pydicom.dcmread(tmp_path / "b.dcm")
    assert "BodyPartExamined" not in ds and "PatientAge" not in ds
    assert "PatientSex" in ds and ds.PatientSex == ""


def test_dicom_dir_holds_one_study(dicom_dir: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in sorted(dicom_dir.glob("*.dcm"))]
    assert len(datasets) == 2
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 2


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # raises if the port were taken


# ------------------------------------------------------------------------- Orthanc
def test_orthanc_runs_with_our_config_and_no_plugins(orthanc_module: OrthancServer) -> None:
    system = orthanc_module.get("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc_module.dicom_port
    assert system["HttpPort"] == orthanc_module.http_port
    # "explorer.js" is Orthanc's built-in pseudo-entry, not a plugin
    assert [p for p in orthanc_module.get("/plugins") if p != "explorer.js"] == [], _explain(orthanc_module)
    assert "plugin" not in orthanc_module.log_tail(200).lower(), _explain(orthanc_module)
    modalities = orthanc_module.get("/modalities?expand")
    assert modalities["bonebridge"]["AET"] == "BONEBRIDGE"
    assert modalities["bonebridge"]["Port"] == orthanc_module.modality_port
    written = json.loads(orthanc_module.config_path.read_text())
    assert written["TcpNoDelay"] is True and written["RemoteAccessAllowed"] is False


def test_echoscu_reaches_orthanc(orthanc_module: OrthancServer, dcmtk: None) -> None:
    result = echoscu(orthanc_module.dicom_port, "ORTHANC", calling_aet="ECHOSCU")
    assert result.returncode == 0, result.stdout + result.stderr + _explain(orthanc_module)


def test_echoscu_fails_against_a_closed_port(dcmtk: None) -> None:
    # guards the test above: echoscu must report failure when nothing answers
    assert echoscu(free_port(), "ORTHANC", timeout=20).returncode != 0


def test_storescu_instance_appears_in_orthanc(orthanc_module: OrthancServer, dcmtk: None, tmp_path: Path) -> None:
    sent = make_dx(tmp_path / "dx.dcm", size=96)
    result = storescu(orthanc_module.dicom_port, "ORTHANC", [sent.filename])
    assert result.returncode == 0, result.stdout + result.stderr + _explain(orthanc_module)

    found = orthanc_module.wait_for(lambda: orthanc_module.instances_in_study(sent.StudyInstanceUID), timeout=20)
    assert [i["MainDicomTags"]["SOPInstanceUID"] for i in found] == [sent.SOPInstanceUID]

    stored = orthanc_module.get_instance_dataset(found[0]["ID"])
    assert stored.SOPInstanceUID == sent.SOPInstanceUID
    assert np.array_equal(stored.pixel_array, pydicom.dcmread(sent.filename).pixel_array)
    assert orthanc_module.instances_in_study(generate_uid()) == []


def test_upload_and_store_to_modality(orthanc: OrthancServer, storescp: StoreSCP, tmp_path: Path) -> None:
    sent = make_dx(tmp_path / "up.dcm", size=64, body_part="ELBOW")
    answer = orthanc.upload(sent.filename)
    assert answer["Status"] == "Success"

    # Point the "bonebridge" modality at a dcmtk receiver at run time, as tests do with a real listener.
    orthanc.set_modality("bonebridge", storescp.aet, storescp.port)
    assert orthanc.get("/modalities?expand")["bonebridge"]["Port"] == storescp.port
    job = orthanc.store_to_modality("bonebridge", [answer["ID"]])
    assert job.get("InstancesCount") == 1 and job.get("FailedInstancesCount", 0) == 0, job

    received = orthanc.wait_for(storescp.received, timeout=10)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in received] == [sent.SOPInstanceUID]


def test_store_to_unreachable_modality_raises(orthanc: OrthancServer, tmp_path: Path) -> None:
    from tests.orthanc_fixture import OrthancError

    answer = orthanc.upload(make_dx(tmp_path / "x.dcm", size=32).filename)
    orthanc.set_modality("nowhere", "NOWHERE", free_port())
    with pytest.raises(OrthancError):
        orthanc.store_to_modality("nowhere", [answer["ID"]], timeout=10)


def test_orthanc_stops_cleanly(tmp_path: Path) -> None:
    from tests.orthanc_fixture import ORTHANC_BINARY

    if not ORTHANC_BINARY.exists():
        pytest.skip("Orthanc not installed")
    server = OrthancServer(tmp_path / "o").start()
    assert server.running
    server.stop()
    assert not server.running
    with pytest.raises(OSError):  # urllib's URLError: nothing listens any more
        server.get("/system")


# --------------------------------------------------------------------------- Redis
def test_redis_answers_ping(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        key = f"smoke:{generate_uid()}"
        client.set(key, b"bonebridge", ex=60)
        assert client.get(key) == b"bonebridge"
    finally:
        client.close()
    assert redis_url.startswith("redis://127.0.0.1:") and redis_url.endswith("/0")


def test_redis_server_binds_loopback_only(redis_server: RedisServer) -> None:
    cmd = redis_server.command()
    assert cmd[cmd.index("--bind") + 1] == "127.0.0.1"
    assert redis_server.running


# ---------------------------------------------------------------------- shared data
def test_shared_data_fixture_finds_the_folder(shared_data: Path) -> None:
    assert shared_data.is_dir()
    assert (shared_data / "README.md").is_file()
