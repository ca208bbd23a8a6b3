"""Run ``bonebridge serve`` as a real process for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.orthanc_fixture import LOCALHOST, echoscu, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]


def write_config(workdir: Path, *, pacs_port: int, listen_port: int | None = None, broker: str = "embedded",
                 quiet_period_s: float = 1.0, visibility_timeout_s: float = 600, dest_retries: int = 5,
                 dest_backoff_s: float = 1.0, extra: dict[str, Any] | None = None,
                 anatomy_model: bool = False) -> Path:
    """A test config: the shipped routes and models, on free ports, with short timings.

    Anatomy comes from the DICOM tags unless ``anatomy_model``: most tests send synthetic gradients tagged HAND to
    exercise transport, and what an image model says about a gradient means nothing. Tests that send real
    radiographs turn the shipped anatomy model on.
    """
    shipped = yaml.safe_load((REPO / "config" / "bonebridge.yaml").read_text())
    config = {
        **shipped,
        "listener": {
            "ae_title": "BONEBRIDGE", "host": LOCALHOST, "port": listen_port or free_port(),
            "allowed_callers": [{"ae_title": t, "host": LOCALHOST} for t in ("ORTHANC", "STORESCU", "ECHOSCU")],
        },
        "storage": {"data_dir": str(workdir / "var")},
        "metrics": {"host": LOCALHOST, "port": free_port()},
        "status": {"host": LOCALHOST, "port": free_port()},
        "assembly": {"quiet_period_s": quiet_period_s},
        "broker": broker,
        "queue": {"visibility_timeout_s": visibility_timeout_s, "max_retries": 3, "retry_backoff_s": 1},
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": LOCALHOST, "port": pacs_port,
                                  "retries": dest_retries, "backoff_s": dest_backoff_s}},
        **({} if anatomy_model else {"anatomy": {"model": None}}),
        **(extra or {}),
    }
    # the catch-all route waits less than the others: exercises per-route quiet periods in every test
    config["routes"] = [*config["routes"][:-1], {**config["routes"][-1], "quiet_period_s": quiet_period_s / 2}]
    path = workdir / "bonebridge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class BoneBridgeProcess:
    """``bonebridge serve`` in a subprocess, its log in a file, stopped with SIGTERM."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.config_path = config_path
        self.args = list(args or [])
        self.config = yaml.safe_load(config_path.read_text())
        self.port = int(self.config["listener"]["port"])
        self.data_dir = Path(self.config["storage"]["data_dir"])
        self.log_path = config_path.parent / "bonebridge.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> "BoneBridgeProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--config", str(self.config_path), *self.args],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env, start_new_session=True,
        )
        try:
            wait_for(lambda: self._answers(), timeout, interval=0.3,
                     what=f"bonebridge echo on {self.port}\n{self.log_tail()}")
            wait_for(self.worker_ready, timeout, interval=0.2, what=f"a ready worker\n{self.log_tail()}")
        except BaseException:
            self.stop()  # a serve that did not come up in time must not outlive the test (no __exit__ runs)
            raise
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"bonebridge serve exited with {self.proc.returncode}\n{self.log_tail()}")
        return echoscu(self.port, "BONEBRIDGE").returncode == 0

    def worker_ready(self) -> bool:
        """The current worker has loaded its models and consumes the queue."""
        try:
            return (self.data_dir / "run" / f"worker-{self.worker_pid()}.ready").exists()
        except (OSError, ValueError):
            return False

    def worker_pid(self) -> int:
        return int((self.data_dir / "run" / "worker.pid").read_text())

    def results(self, study_uid: str, *, settled: bool = True) -> list[dict]:
        """The study's outcome records, by generation. With ``settled`` (the default) only those the dispatch stage
        is done with: a record whose results still wait for a destination (``ready-to-send``, or ``failed`` with
        its report not yet sent) is left out, so ``wait_for(lambda: proc.results(uid))`` waits for the delivery."""
        folder = self.data_dir / "results" / study_uid
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []
        if settled:
            records = [r for r in records if not any(str(v) in ("waiting", "retrying")
                                                     for v in (r.get("destinations") or {}).values())]
        return records

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "BoneBridgeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sr_values(ds) -> dict[str, Any]:
    """Concept meaning -> value for every numeric, code and text item of an SR, however deeply nested."""
    values: dict[str, Any] = {}

    def walk(items) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else None
            if name is not None:
                if item.ValueType == "NUM" and "MeasuredValueSequence" in item:
                    values[name] = float(item.MeasuredValueSequence[0].NumericValue)
                elif item.ValueType == "CODE":
                    values[name] = item.ConceptCodeSequence[0].CodeMeaning
                elif item.ValueType == "TEXT":
                    values[name] = str(item.TextValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return values
