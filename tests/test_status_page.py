"""The status page: its data through HTTP, from a data directory written in the daemon's own formats, and from
a real ``serve`` that processed real studies (a routed one with a heatmap, a not-processed one).

The data directory of the first tests is written with the assembler's :class:`StudyState` and the workers'
record layout, then served by :func:`start_status_page` on a free port and read with ``urllib``: what a browser
gets. A dead-letter entry is written as the dispatcher writes one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from daemon.assemble.assembler import InstanceRecord, StudyState
from daemon.config.schema import load_config
from daemon.ops.status_page import start_status_page
from tests.bonebridge_process import BoneBridgeProcess, write_config
from tests.dicom_factory import make_dx
from tests.orthanc_fixture import free_port, storescu, wait_for


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), ""


def _write_study(data: Path, uid: str, *, status: str, route: str, age_s: float = 60, reason: str = "") -> None:
    now = time.time() - age_s
    state = StudyState(uid, state="done", first_received_at=now - 5, last_instance_at=now - 4, finished_at=now,
                       calling_ae="XRAY_ROOM_1", accession_number=f"ACC-{uid.rsplit('.', 1)[-1]}",
                       instances={f"{uid}.1": InstanceRecord("x.dcm", f"{uid}.9", "1.2.840.10008.5.1.4.1.1.1.1",
                                                             "XRAY_ROOM_1", now - 4)})
    path = data / "studies" / f"{uid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state.to_json()))
    os.utime(path, (now, now))
    record = {"study_uid": uid, "generation": 1, "route": route, "status": status, "destinations": {"pacs": "sent"},
              "summary": {"route": route, "anatomy": "hand", "anatomy_source": "model bonebridge-anatomy 1.0.0",
                          "findings": {"bone_age_months": 121.5} if status == "sent" else {},
                          "not_processed_reason": reason or None}}
    if reason:
        record["reason"] = reason
    (data / "results" / uid).mkdir(parents=True, exist_ok=True)
    (data / "results" / uid / "1.json").write_text(json.dumps(record))


@pytest.fixture
def page(tmp_path: Path):
    config = load_config(write_config(tmp_path, pacs_port=free_port()))
    data = Path(config.storage.data_dir)
    _write_study(data, "1.2.3.100", status="sent", route="pediatric-hand", age_s=30)
    _write_study(data, "1.2.3.200", status="not-processed", route="other", reason="route 'other' reports ...")
    _write_study(data, "1.2.3.300", status="sent", route="pediatric-hand", age_s=3 * 24 * 3600)  # too old
    entry = data / "dead-letter" / "20261125T120000Z-1.2.3.400-1-abcd1234"
    entry.mkdir(parents=True)
    (entry / "reason.json").write_text(json.dumps({"destination": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                                   "port": 4242, "error": "association rejected", "attempts": 6,
                                                   "time": "2026-11-25T12:00:00Z", "files": []}))
    port = free_port()
    server = start_status_page("127.0.0.1", port, config, data)
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def test_page_lists_the_last_day_newest_first_with_routes_models_and_dead_letters(page: str) -> None:
    status, body, kind = _get(page + "/")
    html = body.decode()
    assert status == 200 and kind.startswith("text/html")
    assert html.index("1.2.3.100") < html.index("1.2.3.200")  # newest first (30 s ago, then 60 s ago)
    assert "1.2.3.300" not in html  # older than 24 hours
    assert "pediatric-hand" in html and "not-processed" in html and "route &#39;other&#39; reports" in html
    assert "XRAY_ROOM_1" in html and "BONEBRIDGE" in html and "STORESCU" in html
    assert "association rejected" in html and "ORTHANC at 127.0.0.1:4242" in html
    assert "bonebridge-anatomy" in html and "sha256" in html  # the models with their cards
    assert 'http-equiv="refresh"' in html and "<script" not in html


def test_search_finds_a_study_by_uid_or_accession_at_any_age_and_detail_opens(page: str) -> None:
    html = _get(page + "/?q=1.2.3.300")[1].decode()
    assert "1.2.3.300" in html and "1.2.3.100" not in html
    html = _get(page + "/?q=ACC-200")[1].decode()
    assert "1.2.3.200" in html and "1.2.3.100" not in html and "1.2.3.300" not in html
    assert "1.2.3." not in _get(page + "/?q=ACC-999")[1].decode().split("<h2>Dead letters")[0].split("Studies,")[1]
    status, body, _ = _get(page + "/study/1.2.3.100")
    assert status == 200 and b"bone age months" in body and b"121.5" in body and b"XRAY_ROOM_1" in body
    assert _get(page + "/study/9.9.9")[0] == 404
    assert _get(page + "/study/..%2F..%2Fetc%2Fpasswd")[0] == 404


def test_real_serve_shows_a_routed_and_a_not_processed_study(tmp_path: Path, orthanc) -> None:
    config = write_config(tmp_path, pacs_port=orthanc.dicom_port)
    port = yaml.safe_load(config.read_text())["status"]["port"]
    hand = make_dx(tmp_path / "hand.dcm", body_part="HAND", age="010Y", size=128, accession_number="RAD-0042")
    chest = make_dx(tmp_path / "chest.dcm", body_part="CHEST", age="050Y", size=128)
    with BoneBridgeProcess(config) as proc:
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "hand.dcm", tmp_path / "chest.dcm"]).returncode == 0
        for uid in (str(hand.StudyInstanceUID), str(chest.StudyInstanceUID)):
            wait_for(lambda: proc.results(uid), 120, interval=0.2, what=f"the outcome of {uid}")
        base = f"http://127.0.0.1:{port}"
        html = _get(base + "/")[1].decode()
        detail = _get(base + f"/study/{hand.StudyInstanceUID}")[1].decode()
        thumb = detail.split('<img src="', 1)[1].split('"', 1)[0] if "<img" in detail else ""
        image = _get(base + thumb) if thumb else (0, b"", "")
        found = _get(base + "/?q=RAD-0042")[1].decode()
    assert str(hand.StudyInstanceUID) in html and str(chest.StudyInstanceUID) in html
    assert "pediatric-hand" in html and "not-processed" in html and "STORESCU" in html
    assert str(hand.PatientName) not in html and str(hand.PatientID) not in html
    assert "bone age months" in detail
    assert str(hand.StudyInstanceUID) in found and str(chest.StudyInstanceUID) not in found
    assert image[0] == 200 and image[2] == "image/png" and image[1][:8] == b"\x89PNG\r\n\x1a\n"


def test_real_serve_shows_a_dead_lettered_study_and_its_reason(tmp_path: Path) -> None:
    """The PACS is down and there are no retries: the study's row says dead-lettered and the entry has its reason."""
    config = write_config(tmp_path, pacs_port=free_port(), dest_retries=0)
    port = yaml.safe_load(config.read_text())["status"]["port"]
    chest = make_dx(tmp_path / "chest.dcm", body_part="CHEST", age="050Y", size=64)
    with BoneBridgeProcess(config) as proc:
        assert storescu(proc.port, "BONEBRIDGE", [tmp_path / "chest.dcm"]).returncode == 0
        uid = str(chest.StudyInstanceUID)
        wait_for(lambda: proc.results(uid), 120, interval=0.2, what="the outcome record")
        html = _get(f"http://127.0.0.1:{port}/")[1].decode()
    assert proc.results(uid)[0]["status"] == "dead-lettered"
    row = html.split(uid, 1)[0].rsplit("<tr>", 1)[1]
    assert "dead-lettered" in row
    dead = html.split("<h2>Dead letters (1)</h2>", 1)[1].split("</table>", 1)[0]
    assert uid in dead and "ORTHANC at 127.0.0.1" in dead


def test_dispatch_queue_per_destination_on_the_page_and_in_the_metrics(tmp_path: Path) -> None:
    """Issue 27: per destination, what waits for its first try, what is retrying and when it tries next, what was
    delivered in the last hour, what is dead-lettered, and the oldest undelivered result's age (the alert)."""
    from daemon.dispatch.dispatch_queue import DispatchQueue
    from daemon.ops.metrics import dispatch_gauges

    config = load_config(write_config(tmp_path, pacs_port=free_port()))
    data = Path(config.storage.data_dir)
    queue = DispatchQueue(data)
    now = time.time()
    result = data / "outbox" / "1.2.3" / "1" / "sr.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"x")
    queue.add("pacs", "1.2.3.1", 1, [result], "1.2.3.1-1", queued_at=now - 120)
    retrying = queue.add("pacs", "1.2.3.2", 1, [result], "1.2.3.2-1", queued_at=now - 30)
    queue.retrying(retrying, 2, now + 40, "ORTHANC@127.0.0.1:4242: no connection (destination down or unreachable)")
    queue.delivered(queue.add("pacs", "1.2.3.3", 1, [result], "1.2.3.3-1", queued_at=now - 10), 1)
    old = queue.add("pacs", "1.2.3.4", 1, [result], "1.2.3.4-1", queued_at=now - 7200)
    queue.delivered(old, 1)
    marker = queue.delivered_path("pacs", "1.2.3.4", 1)
    os.utime(marker, (now - 7200, now - 7200))  # delivered two hours ago: not in the last hour
    entry = data / "dead-letter" / "20261125T120000Z-1.2.3.5-1-abcd1234"
    entry.mkdir(parents=True)
    (entry / "reason.json").write_text(json.dumps({"destination": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                                   "port": 4242, "error": "down", "attempts": 6, "files": [],
                                                   "queued_at": now - 600}))

    [row] = queue.summary(config.destinations, now=now)
    assert (row["waiting"], row["retrying"], row["delivered_last_hour"], row["dead_lettered"]) == (1, 1, 1, 1)
    assert row["next_try_at"] == pytest.approx(now + 40) and "no connection" in row["last_error"]
    assert row["oldest_undelivered_s"] == pytest.approx(600, abs=1)  # the dead-lettered one is the oldest
    gauges = {f.name: {s.labels["destination"]: s.value for s in f.samples} for f in dispatch_gauges(data, config.destinations)}
    assert gauges["bonebridge_dispatch_waiting"] == {"pacs": 1} and gauges["bonebridge_dispatch_retrying"] == {"pacs": 1}
    assert gauges["bonebridge_dispatch_oldest_undelivered_seconds"]["pacs"] >= 600
    assert gauges["bonebridge_dispatch_next_try_timestamp_seconds"]["pacs"] == pytest.approx(now + 40)

    port = free_port()
    server = start_status_page("127.0.0.1", port, config, data)
    try:
        html = _get(f"http://127.0.0.1:{port}/")[1].decode()
    finally:
        server.shutdown()
    table = html.split("<h2>Dispatch queue</h2>", 1)[1].split("</table>", 1)[0]
    assert "<tr><td>pacs</td><td>ORTHANC at 127.0.0.1:" in table
    assert ">1 (next " in table and "no connection" in table  # retrying 1, with its next try and why
    oldest = float(table.rsplit("<td>", 1)[1].split(" s</td>")[0])
    assert oldest >= 600  # the dead-lettered result, ready 600 s before the page was asked

    queue.delivered(queue.read("pacs", "1.2.3.1", 1), 1)
    queue.dead_lettered(queue.read("pacs", "1.2.3.2", 1))
    shutil.rmtree(entry)
    [row] = queue.summary(config.destinations)
    assert (row["waiting"], row["retrying"], row["oldest_undelivered_s"]) == (0, 0, 0.0)
