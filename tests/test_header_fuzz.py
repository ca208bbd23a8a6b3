"""Header fuzz through a real ``serve``: every acknowledged study ends with an SR at the PACS or a ``failed`` record.

The cases are the table in ``tests/bad_headers.py``: for each attribute the pipeline reads (patient age, sex and
birth date, study date, laterality, instance and series number, pixel spacing, photometric interpretation, window
values, body part, study and series descriptions, patient name) a value that is empty, wrong for its VR, absurdly
long, or of the wrong multiplicity, written as raw bytes into an otherwise good child's hand radiograph (the
route that reads the most of the header: bone age uses age, sex and laterality). Each case is its own study; all
go to one ``serve`` in one ``storescu`` association, with the shipped retry limit (5) and a short backoff, and the
test waits until each has its outcome. One serve for the module; under three minutes on a 2-core machine busy
with a training run (146 s from the send to the last outcome: 42 SRs, 38 with findings, 4 not processed).

Per study: an outcome record within the retry budget (at most 1 + max_retries attempts); an SR in the PACS unless
the record says ``failed`` with no destination reached; an SR of a study whose header had a value invalid for its
VR names that attribute. The counts are printed (``-s``) and written to ``header_fuzz_summary.json`` in the
test's temporary folder.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.bad_headers import BAD_VALUES, write_with_bad_value
from tests.bonebridge_process import REPO, BoneBridgeProcess, write_config
from tests.dicom_factory import make_dx
from tests.orthanc_fixture import OrthancServer, echoscu, storescu, wait_for

pytestmark = pytest.mark.integration


def _sr_texts(ds, meaning: str) -> list[str]:
    found: list[str] = []

    def walk(items) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == meaning:
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []) or [])

    walk(ds.ContentSequence)
    return found


def test_every_bad_header_ends_in_a_report_or_a_failed_record(tmp_path: Path, orthanc: OrthancServer) -> None:
    shipped = yaml.safe_load((REPO / "config" / "bonebridge.yaml").read_text())["queue"]
    max_retries = int(shipped["max_retries"])
    config = write_config(tmp_path, pacs_port=orthanc.dicom_port, quiet_period_s=1.0,
                          extra={"queue": {**shipped, "retry_backoff_s": 0.1}})
    cases = tmp_path / "cases"
    cases.mkdir()
    files: dict[str, Path] = {}
    studies: dict[str, str] = {}
    for i, bad in enumerate(BAD_VALUES):
        base = make_dx(cases / f"base-{i}.dcm", body_part="HAND", age="010Y", sex="F", laterality="L", size=128,
                       seed=i)
        written = write_with_bad_value(cases / f"base-{i}.dcm", cases / f"{bad.case}.dcm", bad)
        (cases / f"base-{i}.dcm").unlink()
        files[bad.case] = cases / f"{bad.case}.dcm"
        studies[bad.case] = str(base.StudyInstanceUID)
        assert str(written.StudyInstanceUID) == studies[bad.case]

    began = time.monotonic()
    with BoneBridgeProcess(config) as proc:
        sent = storescu(proc.port, "BONEBRIDGE", list(files.values()), timeout=300)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        acknowledged = {case for case, uid in studies.items() if (proc.data_dir / "incoming" / uid).is_dir()}
        assert acknowledged == set(studies), set(studies) - acknowledged

        def outcomes() -> dict[str, dict] | None:
            found = {case: proc.results(uid) for case, uid in studies.items()}
            return {case: records[0] for case, records in found.items()} if all(found.values()) else None

        records = wait_for(outcomes, 300, interval=1.0, what=f"an outcome for each of {len(studies)} studies")
        seconds = time.monotonic() - began
        in_pacs = {case: [i for i in orthanc.instances_in_study(uid)] for case, uid in studies.items()}
        assert echoscu(proc.port, "BONEBRIDGE").returncode == 0  # still up after all of it

    problems = []
    statuses: Counter[str] = Counter()
    named = 0
    for bad in BAD_VALUES:
        record = records[bad.case]
        statuses[record["status"]] += 1
        if record.get("attempts", 1) > 1 + max_retries:
            problems.append(f"{bad.case}: {record['attempts']} attempts")
        srs = []
        for instance in in_pacs[bad.case]:
            ds = orthanc.get_instance_dataset(instance["ID"])
            if ds.Modality == "SR":
                srs.append(ds)
        if not srs:
            if record["status"] != "failed" or "sent" in (record.get("destinations") or {}).values():
                problems.append(f"{bad.case}: no SR in the PACS, record {record['status']}")
            continue
        unreadable = [t for sr in srs for t in _sr_texts(sr, "Unreadable source attribute")]
        if bad.unreadable:
            if any(t.startswith(bad.keyword + ":") for t in unreadable):
                named += 1
            else:
                problems.append(f"{bad.case}: the SR does not name {bad.keyword} ({unreadable})")
    summary = {"cases": len(BAD_VALUES), "attributes": len({b.keyword for b in BAD_VALUES}),
               "invalid_for_vr": sum(b.unreadable for b in BAD_VALUES), "named_in_sr": named,
               "outcomes": dict(statuses), "seconds_from_send_to_last_outcome": round(seconds, 1),
               "problems": problems}
    (tmp_path / "header_fuzz_summary.json").write_text(json.dumps(summary, indent=2))
    print("header fuzz:", json.dumps(summary))
    assert problems == []
