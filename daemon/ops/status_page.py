"""A read-only status page for radiology IT: what came in, where it went, what failed.

Served by ``serve`` and ``listen`` on ``status.host:status.port`` (default 127.0.0.1:9109; port 0 turns it off)
from a thread of its own, it only *reads* what the daemon already writes: ``data_dir/studies/*.json`` (the
assembler's state), ``data_dir/results/<study>/<generation>.json`` (the workers' outcome records),
``data_dir/outbox`` (the SR and SC sent), ``data_dir/dispatch`` (the dispatch queue: what waits to be sent,
what was delivered in the last hour) and ``data_dir/dead-letter/*/reason.json``. Destinations are shown by their
address (an AE title and host, or a URL and the kind of authentication), never by a secret or its file. It never takes the
assembler's lock and never talks to the broker, so a slow page cannot hold up a C-STORE or a worker.

To stay fast with tens of thousands of studies on disk, the study list first filters by file modification time
(one ``stat`` per study, no parsing) to the last 24 hours, sorts newest first and parses only the rows shown. No
patient name or id is shown: the state and records do not hold them (the accession number, which identifies an
order and is how radiology IT looks a study up, is shown and searchable).

HTML is rendered on the server with Jinja2 templates (``daemon/ops/templates``), auto-escaped, refreshing itself every
15 seconds; there is no JavaScript.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from daemon.config.cards import card_fields
from daemon.store.layout import DataDir
from daemon.store.outcome_record import OutcomeRecord

LOGGER = logging.getLogger(__name__)

WINDOW_S = 24 * 3600
MAX_ROWS = 200
REFRESH_S = 15
THUMBNAIL_SIDE = 256


@dataclass
class StudyRow:
    study_uid: str
    received: str
    calling_ae: str
    instances: int
    state: str
    accession: str = ""
    route: str = ""
    anatomy: str = ""
    anatomy_source: str = ""
    outcome: str = ""
    seconds_to_result: float | None = None
    destinations: dict[str, str] = field(default_factory=dict)
    reason: str = ""


def _when(epoch: float | None) -> str:
    if not epoch:
        return ""
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class StatusData:
    """Everything the page shows, read from the data directory and the config on each request."""

    def __init__(self, config: Any, data_dir: Path) -> None:
        self.config = config
        self.data_dir = Path(data_dir)

    # ------------------------------------------------------------------ studies
    def recent_study_files(self, query: str = "", now: float | None = None) -> list[tuple[float, str]]:
        """(mtime, path) of the studies touched in the last 24 h (or matching ``query`` at any time), newest first.

        Paths stay strings: building 10,000 ``Path`` objects costs more than the ``stat`` calls.
        """
        now = time.time() if now is None else now
        folder = DataDir(self.data_dir).studies
        found: list[tuple[float, str]] = []
        if not folder.is_dir():
            return found
        query = query.strip()
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.endswith(".json"):
                    continue
                if query:
                    if query not in entry.name:
                        continue
                    found.append((entry.stat().st_mtime, entry.path))
                    continue
                mtime = entry.stat().st_mtime
                if now - mtime <= WINDOW_S:
                    found.append((mtime, entry.path))
        found.sort(reverse=True)
        return found

    def latest_record(self, study_uid: str) -> OutcomeRecord | None:
        """The outcome record of the study's latest generation; None when there is none or it cannot be read."""
        folder = DataDir(self.data_dir).results / study_uid
        if not folder.is_dir():
            return None
        records = sorted(folder.glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        if not records:
            return None
        try:
            return OutcomeRecord.read(records[-1])
        except (OSError, ValueError):  # gone, or not an outcome record (OutcomeRecordError): shown as none
            return None

    def row(self, state_path: Path) -> StudyRow | None:
        state = _read_json(state_path)
        if state is None:
            return None
        uid = state.get("study_uid", state_path.stem)
        row = StudyRow(uid, _when(state.get("first_received_at")), state.get("calling_ae") or "",
                       len(state.get("instances", {})), state.get("state", ""), state.get("accession_number") or "")
        record = self.latest_record(uid)
        if record is not None:
            summary = record.summary or {}
            row.route = record.route or summary.get("route") or ""
            row.anatomy = summary.get("anatomy") or ""
            row.anatomy_source = summary.get("anatomy_source") or ""
            row.outcome = record.status
            row.destinations = record.destinations
            row.reason = record.reason or summary.get("not_processed_reason") or ""
        if state.get("finished_at") and state.get("last_instance_at"):
            row.seconds_to_result = round(float(state["finished_at"]) - float(state["last_instance_at"]), 1)
        if state.get("failure_reason") and not row.reason:
            row.reason = state["failure_reason"]
        return row

    def by_accession(self, accession: str) -> list[tuple[float, str]]:
        """Studies whose accession number is ``accession``: each state file's text is checked before parsing."""
        folder = DataDir(self.data_dir).studies
        needle = json.dumps(accession)
        found: list[tuple[float, str]] = []
        if not folder.is_dir() or not accession:
            return found
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.endswith(".json"):
                    continue
                try:
                    text = Path(entry.path).read_text()
                except OSError:
                    continue
                if needle in text and (json.loads(text).get("accession_number") or "") == accession:
                    found.append((entry.stat().st_mtime, entry.path))
        found.sort(reverse=True)
        return found

    def studies(self, query: str = "") -> tuple[list[StudyRow], int]:
        """The last day's studies, or those whose StudyInstanceUID contains ``query`` or whose accession is it."""
        files = self.recent_study_files(query)
        if query.strip() and not files:
            files = self.by_accession(query.strip())
        rows = [row for _, path in files[:MAX_ROWS] if (row := self.row(Path(path))) is not None]
        return rows, len(files)

    def study(self, study_uid: str) -> dict[str, Any] | None:
        state = _read_json(DataDir(self.data_dir).studies / f"{os.path.basename(study_uid)}.json")
        if state is None:
            return None
        instances = [{"sop_instance_uid": uid, "series_uid": rec.get("series_uid", ""),
                      "sop_class_uid": rec.get("sop_class_uid", ""), "calling_ae": rec.get("calling_ae", ""),
                      "received": _when(rec.get("received_at"))}
                     for uid, rec in sorted(state.get("instances", {}).items())]
        record = self.latest_record(state["study_uid"])
        summary = (record.summary if record else None) or {}
        thumbnails = self.heatmaps(state["study_uid"], record.generation if record else None)
        return {"state": state, "instances": instances, "record": record, "summary": summary,
                "findings": summary.get("findings") or {}, "thumbnails": thumbnails}

    def heatmaps(self, study_uid: str, generation: Any) -> list[str]:
        """Names of the heatmap SC files in the outbox of the study's latest generation."""
        if generation is None:
            return []
        folder = DataDir(self.data_dir).outbox_folder(study_uid, generation)
        if not folder.is_dir():
            return []
        import pydicom

        names = []
        for path in sorted(folder.glob("*.dcm")):
            try:
                meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            except Exception:  # noqa: BLE001 - a file being written or damaged is simply not shown
                continue
            if str(meta.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.7":
                names.append(path.name)
        return names

    def thumbnail(self, study_uid: str, generation: str, name: str) -> bytes | None:
        path = DataDir(self.data_dir).outbox / os.path.basename(study_uid) / os.path.basename(generation) / os.path.basename(name)
        if not path.is_file():
            return None
        import pydicom
        from PIL import Image

        image = Image.fromarray(pydicom.dcmread(path).pixel_array)
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    # ------------------------------------------------------------------ the rest
    def dead_letters(self) -> list[dict[str, Any]]:
        folder = DataDir(self.data_dir).dead_letter
        entries = []
        if folder.is_dir():
            for entry in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                reason = _read_json(entry / "reason.json") or {}
                entries.append({"entry": entry.name, "reason": reason})
        return entries

    def dispatch(self) -> list[dict[str, Any]]:
        """The dispatch queue per destination (waiting, retrying and the next try, delivered in the last hour,
        dead-lettered, the oldest undelivered result's age): ``data_dir/dispatch`` and the dead-letter folder."""
        from daemon.dispatch.dispatch_queue import DispatchQueue

        rows = DispatchQueue(self.data_dir).summary(self.config.destinations)
        for row in rows:
            row["next_try"] = _when(row["next_try_at"]) if row["next_try_at"] else ""
        return rows

    def workers(self) -> list[dict[str, Any]]:
        run = DataDir(self.data_dir).run
        out = []
        for ready in sorted(run.glob("worker-*.ready")) if run.is_dir() else []:
            pid = ready.stem.removeprefix("worker-")
            alive = pid.isdigit() and Path(f"/proc/{pid}").exists()
            out.append({"pid": pid, "alive": alive})
        return out

    def broker(self) -> str:
        url = (DataDir(self.data_dir).run / "broker.url")
        return url.read_text().strip() if url.is_file() else str(self.config.broker)

    def models(self) -> list[dict[str, Any]]:
        """Every configured model with its card, read as plain JSON (:mod:`daemon.config.cards`): the listener's
        process never imports torch or ``models`` for this page. Why a model cannot run is the config's verdict."""
        status = self.config.model_status()
        out = []
        for name, ref in self.config.models.items():
            item: dict[str, Any] = {"name": name, "weights": str(ref.weights) if ref.weights else "",
                                    "problem": status.get(name)}
            card = card_fields(ref.weights) if ref.weights and Path(ref.weights).is_file() else {}
            if card:
                metrics = card.get("metrics")
                item.update(card={"task": str(card.get("task", "")), "name": str(card.get("name", "")),
                                  "version": str(card.get("version", "")), "sha256": str(card.get("sha256", "")),
                                  "metrics": _headline_metrics(metrics if isinstance(metrics, dict) else {}),
                                  "split": str(card.get("metrics_split", "")),
                                  "data": str(card.get("training_data", ""))})
            # An output ensemble's other members (their outputs are averaged with this model's): name and version.
            item["ensemble"] = [" ".join(str(member_card.get(k, "")) for k in ("name", "version")).strip()
                                or str(member)
                                for member in ref.ensemble for member_card in [card_fields(member)]]
            out.append(item)
        return out

    def counters(self) -> list[dict[str, Any]]:
        from daemon.ops.metrics import REGISTRY

        rows = []
        for family in REGISTRY.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = ", ".join(f"{k}={v}" for k, v in sample.labels.items())
                rows.append({"what": family.documentation, "labels": labels, "value": sample.value})
        return rows


def _headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class StatusPage:
    """The page's renderer: the templates and the data, joined per request."""

    def __init__(self, config: Any, data_dir: Path) -> None:
        self.data = StatusData(config, data_dir)
        self.config = config
        self.env = Environment(loader=PackageLoader("daemon.ops", "templates"), autoescape=select_autoescape())

    def index(self, query: str = "") -> str:
        started = time.perf_counter()
        studies, total = self.data.studies(query)
        listener = self.config.listener
        html = self.env.get_template("status.html").render(
            refresh=REFRESH_S, query=query, studies=studies, total=total, max_rows=MAX_ROWS,
            listener=listener, callers=[f"{c.ae_title}" + (f" from {c.host}" if c.host else "")
                                        for c in listener.allowed_callers],
            broker=self.data.broker(), workers=self.data.workers(), routes=self.config.routes,
            route_status=self.config.route_status(), models=self.data.models(),
            dead_letters=self.data.dead_letters(), counters=self.data.counters(), now=_when(time.time()),
            dispatch=self.data.dispatch(),
        )
        return html.replace("@@RENDER_MS@@", f"{(time.perf_counter() - started) * 1000:.0f}")

    def study(self, study_uid: str) -> str | None:
        found = self.data.study(study_uid)
        if found is None:
            return None
        return self.env.get_template("study.html").render(uid=study_uid, **found)


class _Handler(BaseHTTPRequestHandler):
    page: StatusPage

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        url = urllib.parse.urlsplit(self.path)
        params = urllib.parse.parse_qs(url.query)
        try:
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, self.page.index(params.get("q", [""])[0]).encode(), "text/html; charset=utf-8")
            elif url.path.startswith("/study/"):
                body = self.page.study(urllib.parse.unquote(url.path.removeprefix("/study/")))
                if body is None:
                    self._send(HTTPStatus.NOT_FOUND, b"no such study", "text/plain")
                else:
                    self._send(HTTPStatus.OK, body.encode(), "text/html; charset=utf-8")
            elif url.path.startswith("/heatmap/"):
                parts = url.path.removeprefix("/heatmap/").split("/")
                png = self.page.data.thumbnail(*parts) if len(parts) == 3 else None
                if png is None:
                    self._send(HTTPStatus.NOT_FOUND, b"no such heatmap", "text/plain")
                else:
                    self._send(HTTPStatus.OK, png, "image/png")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
        except Exception:  # noqa: BLE001 - a page error must never take the daemon down
            LOGGER.exception("status page: %s failed", url.path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"status page error (see the daemon's log)", "text/plain")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        LOGGER.debug("status page: " + format, *args)


def start_status_page(host: str, port: int, config: Any, data_dir: Path) -> ThreadingHTTPServer | None:
    """Serve the page from a daemon thread; returns the server (``shutdown()`` stops it), None when port is 0."""
    if not port:
        return None
    handler = type("StatusHandler", (_Handler,), {"page": StatusPage(config, data_dir)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="status-page", daemon=True).start()
    LOGGER.info("status page on http://%s:%d/", host, port)
    return server
