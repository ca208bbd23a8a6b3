"""The status page's load time with 10,000 studies on disk, against reading every study's state file.

The page must stay fast however many studies the data directory holds. The reference is the straightforward
implementation: parse every ``data_dir/studies/*.json`` and its latest result record, then keep the last day's.
BoneBridge's page filters by modification time first (one ``stat`` per study) and parses only the rows it shows.
Both run on the same synthetic data directory (10,000 studies over three days, each with a result record and
one instance), interleaved; the page is rendered in full (HTML) through :class:`daemon.ops.status_page.StatusPage`.

Run: ``.venv/bin/python bench/bench_status_page.py [--studies 10000] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def populate(data: Path, count: int) -> None:
    from daemon.assemble.assembler import InstanceRecord, StudyState

    now = time.time()
    (data / "studies").mkdir(parents=True)
    for i in range(count):
        uid = f"1.2.826.0.1.3680043.10.{i}"
        when = now - (i / count) * 3 * 24 * 3600
        state = StudyState(uid, state="done", first_received_at=when - 5, last_instance_at=when - 4, finished_at=when,
                           calling_ae="XRAY_ROOM_1",
                           instances={f"{uid}.1": InstanceRecord("x.dcm", f"{uid}.2", "1.2.840.10008.5.1.4.1.1.1",
                                                                 "XRAY_ROOM_1", when - 4)})
        path = data / "studies" / f"{uid}.json"
        path.write_text(json.dumps(state.to_json()))
        os.utime(path, (when, when))
        (data / "results" / uid).mkdir(parents=True)
        (data / "results" / uid / "1.json").write_text(json.dumps(
            {"study_uid": uid, "generation": 1, "route": "fracture", "status": "sent", "destinations": {"pacs": "sent"},
             "summary": {"anatomy": "wrist", "anatomy_source": "model", "findings": {"abnormality_probability": 0.3}}}))


def read_everything(data: Path) -> int:
    """The reference: every state and record parsed, the last day kept."""
    cutoff = time.time() - 24 * 3600
    kept = 0
    for path in (data / "studies").glob("*.json"):
        state = json.loads(path.read_text())
        records = sorted((data / "results" / state["study_uid"]).glob("*.json"))
        if records:
            json.loads(records[-1].read_text())
        kept += state["finished_at"] >= cutoff
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from daemon.config.schema import load_config
    from daemon.ops.status_page import StatusPage

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        populate(data, args.studies)
        page = StatusPage(load_config(REPO / "config" / "bonebridge.yaml"), data)
        page.index()
        reference, ours = [], []
        for _ in range(args.repeats):
            began = time.perf_counter()
            read_everything(data)
            reference.append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            html = page.index()
            ours.append((time.perf_counter() - began) * 1000)
        ref, mine = statistics.median(reference), statistics.median(ours)
        print(f"status-page  reference=parse-every-study  ref {ref:.0f} ms [{min(reference):.0f}..{max(reference):.0f}]"
              f"  bonebridge {mine:.0f} ms [{min(ours):.0f}..{max(ours):.0f}]  ratio {ref / mine:.2f} (higher is better)"
              f"  ({args.studies} studies on disk, {html.count('<tr>') } table rows rendered, {len(html) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
