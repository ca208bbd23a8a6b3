"""Issue 26: the outcome record ``results/<study>/<generation>.json`` as a typed model.

What the worker, the dispatch stage and ``bonebridge retry`` write must come back as written (keys and values; the
status page, the metrics and site scripts read these files), records already on disk must still be read (keys the
model does not know are kept), and a record that is not one must be refused with an error a reader can skip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemon.store.outcome_record import STATUS_IF_DELIVERED, OutcomeRecord, OutcomeRecordError
from daemon.store.outcomes import record_dispatch, record_path, record_redelivery, write_record

UID = "1.2.826.0.1.3680043.8.498.1"


def worker_record(status: str = "ready-to-send") -> dict[str, Any]:
    """A record as ``WorkerRuntime.process`` writes it once its results are in the outbox, keys in its order."""
    return {
        "study_uid": UID, "generation": 2, "route": "pediatric-hand",
        "summary": {"study_uid": UID, "route": "pediatric-hand", "anatomy": "hand", "anatomy_probability": 0.97,
                    "findings": {"bone_age_months": 121.5}, "not_processed_reason": None, "models": [],
                    "destinations": ["pacs"], "skipped_images": [], "outputs": ["1.2.3.4"]},
        "status": status, "destinations": {"pacs": "waiting", "archive": "waiting"},
        "sr": [UID, "1.2.3", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.3.4"],
        "outputs": [f"outbox/{UID}/2/1.2.3.4.dcm"], "label": f"{UID}-2", "ready_at": 1700000000.25,
        STATUS_IF_DELIVERED: "sent", "seconds": 1.234,
        "timing": {"started_at": 1699999999.0, "analysed_at": 1700000000.0, "finished_at": 1700000000.5},
    }


def test_a_worker_record_round_trips_byte_for_byte(tmp_path: Path) -> None:
    data = worker_record()
    path = OutcomeRecord.path(tmp_path, UID, 2)
    assert path == tmp_path / "results" / UID / "2.json" == record_path(tmp_path, UID, 2)
    OutcomeRecord.model_validate(data).write(path)
    # what write_record wrote when records were dicts: json.dumps(record, indent=2, default=str)
    assert path.read_text() == json.dumps(data, indent=2, default=str)
    record = OutcomeRecord.read(path)
    assert record.status == "ready-to-send" and record.status_if_delivered == "sent"
    assert record.undelivered() == ["pacs", "archive"] and record.sr is not None and len(record.sr) == 4
    assert record.to_json() == data


def test_fields_nobody_set_are_not_written_as_null(tmp_path: Path) -> None:
    """The smallest record the worker writes (a study without instances) has four keys on disk, not twenty."""
    record = OutcomeRecord(study_uid=UID, generation=1, status="failed", reason="no instances on disk for this study")
    path = OutcomeRecord.path(tmp_path, UID, 1)
    record.write(path)
    assert json.loads(path.read_text()) == {"study_uid": UID, "generation": 1, "status": "failed",
                                            "reason": "no instances on disk for this study"}


def test_an_old_record_keeps_keys_the_model_does_not_know(tmp_path: Path) -> None:
    old = {"study_uid": UID, "generation": 1, "status": "sent", "destinations": {"pacs": "sent"},
           "outbox": f"outbox/{UID}/1", "site_note": {"ticket": 4711},
           "delivery": {"pacs": {"attempts": 1, "delivered_at": 1700000000.0, "by_proxy": "dicom-gw-2"}}}
    path = OutcomeRecord.path(tmp_path, UID, 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old, indent=2))
    record = OutcomeRecord.read(path)
    assert record.model_extra == {"outbox": f"outbox/{UID}/1", "site_note": {"ticket": 4711}}
    record.destinations["archive"] = "sent"
    record.write(path)
    again = json.loads(path.read_text())
    assert again["outbox"] == old["outbox"] and again["site_note"] == {"ticket": 4711}
    assert again["delivery"] == old["delivery"]  # an unknown key inside a known one survives too
    assert again["destinations"] == {"pacs": "sent", "archive": "sent"}


def test_a_record_without_its_study_or_generation_takes_them_from_its_path(tmp_path: Path) -> None:
    path = OutcomeRecord.path(tmp_path, "1.2.5", 3)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"status": "sent"}))
    record = OutcomeRecord.read(path)
    assert (record.study_uid, record.generation, record.status) == ("1.2.5", 3, "sent")


def test_a_bad_status_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path = OutcomeRecord.path(tmp_path, UID, 1)
    with pytest.raises(ValueError):  # when it is set
        OutcomeRecord(study_uid=UID, generation=1, status="sent").status = "delivered"  # type: ignore[assignment]
    unchecked = OutcomeRecord.model_construct(study_uid=UID, generation=1, status="delivered")
    with pytest.raises(OutcomeRecordError, match="status"):  # and when it is written, however it was made
        unchecked.write(path)
    with pytest.raises(OutcomeRecordError, match="status"):
        write_record(path, {"study_uid": UID, "generation": 1, "status": "dead-letter"})
    record = OutcomeRecord(study_uid=UID, generation=1, status="sent")
    record.destinations["pacs"] = 3  # type: ignore[assignment]  # filled in place: only write can check it
    with pytest.raises(OutcomeRecordError, match="destinations"):
        record.write(path)
    assert not path.exists()


@pytest.mark.parametrize("text, what", [("{\"study_uid\": \"1.2\", \"gener", "not JSON"),
                                        ("[1, 2]", "a JSON list, not an object"),
                                        ("", "not JSON")])
def test_a_corrupt_file_raises_a_clear_error(tmp_path: Path, text: str, what: str) -> None:
    path = OutcomeRecord.path(tmp_path, UID, 1)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(OutcomeRecordError, match=what) as info:
        OutcomeRecord.read(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)  # every reader that skipped a corrupt record on ValueError still does
    with pytest.raises(FileNotFoundError):  # and a missing one is still an OSError, not a corrupt record
        OutcomeRecord.read(OutcomeRecord.path(tmp_path, UID, 9))


def test_the_dispatch_stage_settles_the_record(tmp_path: Path) -> None:
    """record_dispatch through the model: the status the record takes, status_if_delivered gone, keys it had kept."""
    path = OutcomeRecord.path(tmp_path, UID, 2)
    OutcomeRecord.model_validate(worker_record()).write(path)
    after_pacs = record_dispatch(tmp_path, UID, 2, "pacs", "sent", attempts=1, delivered_at=1700000001.0)
    assert after_pacs is not None and after_pacs.status == "ready-to-send"
    record_dispatch(tmp_path, UID, 2, "archive", "retrying", attempts=1, last_error="down", next_try_at=1.0)
    record_dispatch(tmp_path, UID, 2, "archive", "sent", attempts=2, delivered_at=1700000002.0)
    on_disk = json.loads(path.read_text())
    assert on_disk["status"] == "sent" and STATUS_IF_DELIVERED not in on_disk and on_disk["delivered_at"]
    assert on_disk["destinations"] == {"pacs": "sent", "archive": "sent"}
    assert on_disk["delivery"] == {"pacs": {"attempts": 1, "delivered_at": 1700000001.0},
                                   "archive": {"attempts": 2, "last_error": "down", "next_try_at": 1.0,
                                               "delivered_at": 1700000002.0}}
    assert set(on_disk["timing"]) == {"started_at", "analysed_at", "finished_at", "dispatched_at"}
    assert record_dispatch(tmp_path, UID, 7, "pacs", "sent") is None  # no record: nothing to update


def test_a_dead_lettered_record_is_settled_by_bonebridge_retry(tmp_path: Path) -> None:
    path = OutcomeRecord.path(tmp_path, UID, 2)
    data = worker_record() | {"status_if_delivered": "not-processed", "destinations": {"pacs": "waiting"}}
    del data["timing"]  # an older record without timing gains only what the dispatch stage adds
    OutcomeRecord.model_validate(data).write(path)
    record_dispatch(tmp_path, UID, 2, "pacs", "dead-lettered: pacs-x", attempts=3, entry="pacs-x", last_error="down")
    dead = json.loads(path.read_text())
    assert dead["status"] == "dead-lettered" and dead[STATUS_IF_DELIVERED] == "not-processed"
    assert dead["timing"] == {"dispatched_at": pytest.approx(dead["timing"]["dispatched_at"])}
    record = record_redelivery(tmp_path, UID, 2, "pacs", entry_id="pacs-x", delivered_at="2024-01-01T00:00:00+00:00",
                               attempts=4)
    assert record is not None and record.status == "not-processed"
    again = json.loads(path.read_text())
    assert again["status"] == "not-processed" and STATUS_IF_DELIVERED not in again
    assert again["redelivered"] == {"pacs": {"entry": "pacs-x", "delivered_at": "2024-01-01T00:00:00+00:00",
                                             "attempts": 4, "by": "bonebridge retry"}}
    assert again["delivered_at"] == "2024-01-01T00:00:00+00:00"


def test_the_status_page_shows_no_outcome_for_a_corrupt_record(tmp_path: Path) -> None:
    from daemon.ops.status_page import StatusData

    path = OutcomeRecord.path(tmp_path, UID, 1)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert StatusData(None, tmp_path).latest_record(UID) is None
    OutcomeRecord(study_uid=UID, generation=2, status="sent").write(OutcomeRecord.path(tmp_path, UID, 2))
    latest = StatusData(None, tmp_path).latest_record(UID)
    assert latest is not None and latest.generation == 2
