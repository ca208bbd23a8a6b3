"""The product's spine, end to end, with real processes: Orthanc, Redis, dcmtk, and ``bonebridge serve``.

Each test starts a private Orthanc (the PACS) and BoneBridge on free ports, sends radiographs in with dcmtk's
``storescu`` or with Orthanc itself, and reads what comes back out of Orthanc's REST API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from daemon.config.schema import load_config
from tests.bonebridge_process import REPO, BoneBridgeProcess, sr_values, write_config
from tests.dicom_factory import make_dx
from tests.orthanc_fixture import OrthancServer, storescu, wait_for

pytestmark = pytest.mark.integration
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

BONE_AGE_READY = load_config(REPO / "config" / "bonebridge.yaml").route_status().get("pediatric-hand") is None
needs_boneage = pytest.mark.skipif(not BONE_AGE_READY, reason="shipped bone-age weights not present")


def _by_modality(orthanc: OrthancServer, study_uid: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for inst in orthanc.instances_in_study(study_uid):
        tags = orthanc.get(f"/instances/{inst['ID']}/simplified-tags")
        found.setdefault(tags.get("Modality", "?"), []).append({"id": inst["ID"], **tags})
    return found


def _wait_for_sr(orthanc: OrthancServer, study_uid: str, timeout: float = 120.0) -> dict[str, list[dict]]:
    def ready():
        found = _by_modality(orthanc, study_uid)
        return found if "SR" in found else None

    return wait_for(ready, timeout, interval=0.05, what=f"an SR in study {study_uid}")


def _predict(config_path: Path, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "predict", "--config", str(config_path), str(path)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def pacs(orthanc: OrthancServer) -> OrthancServer:
    return orthanc


@pytest.fixture
def bonebridge(tmp_path: Path, pacs: OrthancServer):
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, listen_port=pacs.modality_port)
    with BoneBridgeProcess(config) as proc:
        yield proc
    print(proc.log_tail(30))


@needs_boneage
def test_storescu_hand_gets_sr_and_heatmap_matching_predict(tmp_path: Path, pacs, bonebridge) -> None:
    hand = make_dx(tmp_path / "hand.dcm", body_part="HAND", age="010Y", sex="M", size=512)
    study_uid = str(hand.StudyInstanceUID)
    sent = storescu(bonebridge.port, "BONEBRIDGE", [tmp_path / "hand.dcm"])
    assert sent.returncode == 0, sent.stderr
    t0 = time.perf_counter()
    found = _wait_for_sr(pacs, study_uid)
    latency = time.perf_counter() - t0
    print(f"\nLATENCY last C-STORE -> SR stored in Orthanc: {latency:.2f} s (quiet period 1.0 s)")
    (tmp_path / "latency.txt").write_text(f"{latency:.3f}\n")
    def heatmaps() -> list[dict]:
        found = _by_modality(pacs, study_uid)
        return [i for mod in found for i in found[mod] if i.get("SOPClassUID") == SECONDARY_CAPTURE]

    sc = wait_for(heatmaps, 30, what="the heatmap SC")
    found = _by_modality(pacs, study_uid)
    assert len(found["SR"]) == 1
    assert len(sc) == 1
    assert sc[0]["StudyInstanceUID"] == study_uid

    sr = pacs.get_instance_dataset(found["SR"][0]["id"])
    assert sr.StudyInstanceUID == study_uid
    values = sr_values(sr)
    offline = _predict(bonebridge.config_path, tmp_path / "hand.dcm")
    assert offline["route"] == "pediatric-hand"
    bone_age = [v for k, v in values.items() if "bone age" in k.lower() and isinstance(v, float)]
    assert bone_age and bone_age[0] == pytest.approx(offline["findings"]["bone_age_months"], abs=0.1)
    assert offline["outputs"][0] == sr.SOPInstanceUID  # same derived UID offline and in the PACS


def test_chest_cr_gets_not_processed_report(tmp_path: Path, pacs, bonebridge) -> None:
    import data_store

    chest = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    study_uid = str(pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID)
    assert storescu(bonebridge.port, "BONEBRIDGE", [chest]).returncode == 0
    found = _wait_for_sr(pacs, study_uid)
    text = json.dumps(sr_values(pacs.get_instance_dataset(found["SR"][0]["id"])))
    assert "not processed" in text.lower()
    assert "other" in text  # the route that reported it, with its reason
    assert not [i for mod in found for i in found[mod] if i.get("SOPClassUID") == SECONDARY_CAPTURE]


def test_orthanc_pushes_study(tmp_path: Path, pacs, bonebridge) -> None:
    hand = make_dx(tmp_path / "pushed.dcm", body_part="WRIST", age="040Y", size=256)
    uploaded = pacs.upload(tmp_path / "pushed.dcm")
    pacs.store_to_modality("bonebridge", [uploaded["ID"]])
    found = _wait_for_sr(pacs, str(hand.StudyInstanceUID))
    values = sr_values(pacs.get_instance_dataset(found["SR"][0]["id"]))
    # an adult's wrist: the fracture model runs and the SR codes its decision as SNOMED CT "Fracture of bone"
    assert values["BoneBridge route"] == "fracture"
    assert values["Fracture of bone"] in ("Present", "Absent")
    assert 0.0 <= values["Abnormality probability"] <= 1.0


ANATOMY_READY = load_config(REPO / "config" / "bonebridge.yaml").model_status().get("anatomy") is None


@pytest.mark.skipif(not ANATOMY_READY, reason="shipped anatomy weights not present")
def test_real_leg_cr_is_sorted_by_the_anatomy_model_and_checked_for_fractures(tmp_path: Path, pacs) -> None:
    """The shipped config with its anatomy model on: a real CR of a lower leg, tagged only EXTREMITY in
    BodyPartExamined, is sorted from its pixels, goes to the fracture model, and its SR says what the model and the
    tags said; its heatmap SC arrives with it."""
    import data_store

    config = write_config(tmp_path, pacs_port=pacs.dicom_port, anatomy_model=True)
    leg = Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm"
    study_uid = str(pydicom.dcmread(leg, stop_before_pixels=True).StudyInstanceUID)
    with BoneBridgeProcess(config) as proc:
        assert storescu(proc.port, "BONEBRIDGE", [leg]).returncode == 0
        found = _wait_for_sr(pacs, study_uid)
        captures = wait_for(lambda: [i for items in _by_modality(pacs, study_uid).values() for i in items
                                     if i.get("SOPClassUID") == SECONDARY_CAPTURE], 30, what="the heatmap SC")
    values = sr_values(pacs.get_instance_dataset(found["SR"][0]["id"]))
    assert len(captures) == 1
    assert values["Anatomy decided by"] == "model"
    assert values["Anatomy source"].startswith("model bonebridge-anatomy")
    assert values["Anatomy"] in {"knee", "leg", "ankle", "foot", "femur"}
    assert values["Anatomy from DICOM tags"].startswith("leg (StudyDescription=")
    assert values["Anatomy model disagrees with DICOM tags"] == "No"
    assert values["BoneBridge route"] == "fracture" and values["Fracture of bone"] in ("Present", "Absent")
    assert "not processed" not in json.dumps(values).lower()
    # The shipped model calls this lesion a fracture (0.59 against its 0.27): the SR then names where its map
    # points, as a SCOORD point on the radiograph itself.
    points = _scoord_points(pacs.get_instance_dataset(found["SR"][0]["id"]))
    if values["Fracture of bone"] == "Present":
        ((column, row),) = points
        source = pydicom.dcmread(leg, stop_before_pixels=True)
        assert 0 < column < source.Columns and 0 < row < source.Rows
    else:
        assert points == []


def _scoord_points(sr) -> list[tuple[float, float]]:
    """(column, row) of every SCOORD POINT in an SR, however deeply nested."""
    points = []

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "SCOORD" and item.GraphicType == "POINT":
                points.append((float(item.GraphicData[0]), float(item.GraphicData[1])))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return points


def test_study_failing_for_good_reaches_the_pacs_as_a_not_processed_report(tmp_path: Path, pacs) -> None:
    """A spooled file damaged on disk makes every attempt fail: after the retries the PACS still gets an SR that
    names the failure, in the study, and the outcome record says failed (what the metrics count)."""
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, quiet_period_s=3.0)
    with BoneBridgeProcess(config) as proc:
        hand = make_dx(tmp_path / "hand.dcm", body_part="HAND", age="010Y", size=128)
        study_uid = str(hand.StudyInstanceUID)
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "hand.dcm"]).returncode == 0
        (proc.data_dir / "incoming" / study_uid / "damaged.dcm").write_bytes(b"\0" * 64 + b"not DICOM")
        found = _wait_for_sr(pacs, study_uid, timeout=90)
        record = wait_for(lambda: (proc.results(study_uid) or [None])[0], 30, what="the outcome record")
    text = json.dumps(sr_values(pacs.get_instance_dataset(found["SR"][0]["id"])))
    assert "analysis failed after 4 attempts" in text and "InvalidDicomError" in text
    assert record["status"] == "failed" and record["destinations"] == {"pacs": "sent"}
    assert "failed for good" in proc.log_tail(400)


def _sr_texts(ds, meaning: str) -> list[str]:
    """Every TEXT value of an SR whose concept is ``meaning`` (``sr_values`` keeps only the last)."""
    found = []

    def walk(items) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == meaning:
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []) or [])

    walk(ds.ContentSequence)
    return found


def _metric(proc: BoneBridgeProcess, line_start: str) -> float | None:
    import urllib.request

    port = proc.config["metrics"]["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start + " ")]
    return values[0] if values else None


def test_failing_for_good_under_the_shipped_retry_limit_ends_in_a_report_and_is_never_requeued(
        tmp_path: Path, pacs) -> None:
    """Issue 28, case 1, with the shipped queue.max_retries (5), not the tests' 3: Celery's own default of 3 must not
    cut the retries short. Every attempt fails (a damaged file in the study), the source header has values invalid
    for their VR (PatientBirthDate and InstanceNumber ``abc``): after 1 + 5 attempts a not-processed SR naming the
    unreadable attributes reaches the PACS, the study counts as failed, and a restart does not queue it again."""
    import yaml

    from tests.bad_headers import put_raw

    shipped = yaml.safe_load((REPO / "config" / "bonebridge.yaml").read_text())["queue"]
    assert shipped["max_retries"] == 5
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, quiet_period_s=3.0,
                          extra={"queue": {**shipped, "retry_backoff_s": 0.1}})  # 0.1 + 0.2 + ... + 1.6 s
    hand = make_dx(tmp_path / "hand.dcm", body_part="HAND", age="010Y", size=128)
    put_raw(hand, "PatientBirthDate", b"abc")
    put_raw(hand, "InstanceNumber", b"abc")
    hand.save_as(tmp_path / "hand.dcm", enforce_file_format=True)
    study_uid = str(hand.StudyInstanceUID)
    with BoneBridgeProcess(config) as proc:
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "hand.dcm"]).returncode == 0
        (proc.data_dir / "incoming" / study_uid / "damaged.dcm").write_bytes(b"\0" * 64 + b"not DICOM")
        found = _wait_for_sr(pacs, study_uid, timeout=120)
        record = wait_for(lambda: (proc.results(study_uid) or [None])[0], 30, what="the outcome record")
        wait_for(lambda: _metric(proc, 'bonebridge_studies{state="failed"}') == 1.0, 10,
                 what="the failed study in the metrics")
        assert _metric(proc, 'bonebridge_results{status="failed"}') == 1.0
    report = pacs.get_instance_dataset(found["SR"][0]["id"])
    assert "analysis failed after 6 attempts" in json.dumps(sr_values(report))
    unreadable = _sr_texts(report, "Unreadable source attribute")
    assert any(t.startswith("PatientBirthDate: not a valid DA") for t in unreadable), unreadable
    assert any(t.startswith("InstanceNumber: not a valid IS") for t in unreadable), unreadable
    assert record["status"] == "failed" and record["attempts"] == 6 and record["destinations"] == {"pacs": "sent"}

    with BoneBridgeProcess(config) as again:  # a restart finds the record: nothing is queued again
        time.sleep(4)
        assert "re-enqueued" not in again.log_tail(400)
        assert again.results(study_uid) == [record]
        assert len(_by_modality(pacs, study_uid)["SR"]) == 1
        assert _metric(again, 'bonebridge_studies{state="failed"}') == 1.0


def test_resent_instance_with_other_content_is_kept_and_the_study_reported_again(tmp_path: Path, pacs,
                                                                                 bonebridge) -> None:
    """Issue 28, case 3: after the study's report, the same SOP Instance UID arrives with a chest instead of the
    leg. Both files are kept (the leg, which the first report describes, under ``superseded/``), a WARNING says so,
    and the study is reported again as generation 2, whose SR names the first as its predecessor and gets UIDs of
    its own. Sending the chest once more is a duplicate: nothing new."""
    leg = make_dx(tmp_path / "leg.dcm", body_part="LEG", age="040Y", size=128, seed=1)
    study_uid, sop_uid = str(leg.StudyInstanceUID), str(leg.SOPInstanceUID)
    assert storescu(bonebridge.port, "BONEBRIDGE", [tmp_path / "leg.dcm"]).returncode == 0
    earlier = _wait_for_sr(pacs, study_uid)["SR"][0]
    wait_for(lambda: bonebridge.results(study_uid), 30, what="the first outcome record")
    stored = bonebridge.data_dir / "incoming" / study_uid / f"{sop_uid}.dcm"
    leg_bytes = stored.read_bytes()

    make_dx(tmp_path / "chest.dcm", study_uid=study_uid, series_uid=str(leg.SeriesInstanceUID),
            sop_instance_uid=sop_uid, body_part="CHEST", age="040Y", size=128, seed=7)
    assert storescu(bonebridge.port, "BONEBRIDGE", [tmp_path / "chest.dcm"]).returncode == 0
    newer = wait_for(lambda: [i for i in _by_modality(pacs, study_uid)["SR"] if i["id"] != earlier["id"]], 120,
                     what="a second SR after the re-sent instance")
    assert len(newer) == 1 and newer[0]["SOPInstanceUID"] != earlier["SOPInstanceUID"]
    sr = pacs.get_instance_dataset(newer[0]["id"])
    predecessors = [ref.ReferencedSOPInstanceUID for s in sr.PredecessorDocumentsSequence
                    for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
    assert predecessors == [earlier["SOPInstanceUID"]]
    assert "chest" in json.dumps(sr_values(sr)).lower()
    [kept] = (stored.parent / "superseded").glob("*.dcm")
    assert kept.read_bytes() == leg_bytes and pydicom.dcmread(stored).BodyPartExamined == "CHEST"
    log = bonebridge.log_tail(400)
    assert any("WARNING" in line and "re-sent with other content" in line for line in log.splitlines()), log
    records = wait_for(lambda: r if len(r := bonebridge.results(study_uid)) == 2 else None, 30,
                       what="the second outcome record")
    assert [r["generation"] for r in records] == [1, 2]

    assert storescu(bonebridge.port, "BONEBRIDGE", [tmp_path / "chest.dcm"]).returncode == 0  # identical now
    time.sleep(3)  # > quiet period
    assert [r["generation"] for r in bonebridge.results(study_uid)] == [1, 2]
    assert len(_by_modality(pacs, study_uid)["SR"]) == 2
    assert len(list((stored.parent / "superseded").glob("*.dcm"))) == 1
    assert "nothing new, not re-opening" in bonebridge.log_tail(100)


def test_unknown_caller_is_rejected(tmp_path: Path, pacs, bonebridge) -> None:
    hand = make_dx(tmp_path / "x.dcm")
    result = storescu(bonebridge.port, "BONEBRIDGE", [tmp_path / "x.dcm"], calling_aet="STRANGER")
    assert result.returncode != 0
    assert not (bonebridge.data_dir / "incoming" / str(hand.StudyInstanceUID)).exists()
    assert "STRANGER" in bonebridge.log_tail(200)


def test_worker_killed_mid_study_result_arrives_once(tmp_path: Path, pacs) -> None:
    marker = tmp_path / "paused.pid"
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, visibility_timeout_s=4)
    env = {"BONEBRIDGE_FAULT_PAUSE_S": "60", "BONEBRIDGE_FAULT_MARKER": str(marker)}
    with BoneBridgeProcess(config, env=env) as proc:
        chest = make_dx(tmp_path / "c.dcm", body_part="CHEST", age="050Y")
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "c.dcm"]).returncode == 0
        wait_for(marker.exists, 60, what="the worker to pause mid-study")
        first_worker = int(marker.read_text())
        os.kill(first_worker, signal.SIGKILL)
        found = _wait_for_sr(pacs, str(chest.StudyInstanceUID), timeout=120)
        assert proc.worker_pid() != first_worker  # serve restarted the worker
        time.sleep(3)  # a duplicate delivery would land by now
        found = _by_modality(pacs, str(chest.StudyInstanceUID))
        assert len(found["SR"]) == 1
        records = proc.results(str(chest.StudyInstanceUID))
        assert [r["status"] for r in records] == ["sent"]


def test_destination_down_then_up_result_arrives_after_retry(tmp_path: Path) -> None:
    pacs = OrthancServer(tmp_path / "pacs")
    config = write_config(tmp_path, pacs_port=pacs.dicom_port, dest_retries=8, dest_backoff_s=1.0)
    with BoneBridgeProcess(config) as proc:
        study = make_dx(tmp_path / "d.dcm", body_part="CHEST", age="030Y")
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "d.dcm"]).returncode == 0
        wait_for(lambda: "retry" in proc.log_tail(200).lower() or "attempt" in proc.log_tail(200).lower(), 60,
                 what="a failed first attempt")
        with pacs:  # __enter__ starts it
            found = _wait_for_sr(pacs, str(study.StudyInstanceUID), timeout=90)
            assert len(found["SR"]) == 1
        assert proc.results(str(study.StudyInstanceUID))[0]["status"] == "sent"


def test_metrics_endpoint_counts_received_instances(tmp_path: Path, pacs, bonebridge) -> None:
    import urllib.request

    make_dx(tmp_path / "m.dcm", body_part="CHEST", age="050Y")
    assert storescu(bonebridge.port, "BONEBRIDGE", [tmp_path / "m.dcm"]).returncode == 0
    port = bonebridge.config["metrics"]["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'bonebridge_instances_received_total{calling_ae="STORESCU"} 1.0' in text
    assert "bonebridge_studies{" in text


def test_late_instance_reopens_study_and_own_outputs_are_ignored(tmp_path: Path, pacs, bonebridge) -> None:
    first = make_dx(tmp_path / "a.dcm", body_part="KNEE", age="040Y")
    study_uid = str(first.StudyInstanceUID)
    assert storescu(bonebridge.port, "BONEBRIDGE", [tmp_path / "a.dcm"]).returncode == 0
    earlier = _wait_for_sr(pacs, study_uid)["SR"][0]

    # Orthanc forwards the whole study, our SR included, back to BoneBridge: the SR must not start a new round.
    pacs.store_to_modality("bonebridge", [earlier["id"]])
    time.sleep(2.5)  # > quiet period
    assert [r["generation"] for r in bonebridge.results(study_uid)] == [1]
    assert list((bonebridge.data_dir / "returned").rglob("*.dcm"))

    make_dx(tmp_path / "b.dcm", study_uid=study_uid, body_part="KNEE", age="040Y", instance_number=2)
    assert storescu(bonebridge.port, "BONEBRIDGE", [tmp_path / "b.dcm"]).returncode == 0
    newer = wait_for(lambda: [i for i in _by_modality(pacs, study_uid)["SR"] if i["id"] != earlier["id"]], 120,
                     what="a second SR after the late instance")[0]
    sr = pacs.get_instance_dataset(newer["id"])
    predecessors = [ref.ReferencedSOPInstanceUID for s in sr.PredecessorDocumentsSequence
                    for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
    assert predecessors == [earlier["SOPInstanceUID"]]
    referenced = {ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert len(referenced) == 2  # the new report covers both images
