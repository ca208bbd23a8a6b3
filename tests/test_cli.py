"""The ``bonebridge`` command line, run as a user runs it (a subprocess), for the commands with no server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import data_store
import yaml

from tests.bonebridge_process import REPO, write_config
from tests.dicom_factory import make_dx
from tests.orthanc_fixture import free_port

CHEST = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"


def bonebridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_config_check_accepts_the_shipped_config_and_names_disabled_routes() -> None:
    out = bonebridge("config", "check", str(REPO / "config" / "bonebridge.yaml"))
    assert out.returncode == 0, out.stderr
    assert "fracture: enabled" in out.stdout and "3 of 3 enabled" in out.stdout  # the fracture model ships
    classes = next(line for line in out.stdout.splitlines() if "the model's classes:" in line)
    assert "hand" in classes and "knee" in classes  # the shipped anatomy model's classes, read from its card
    assert "routes name femur, finger: only the DICOM tags can give them" in out.stdout


def test_config_check_reports_file_line_and_field(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "config" / "bonebridge.yaml").read_text())
    config["routes"][0]["send_to"] = ["nowhere"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config, sort_keys=False))
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "nowhere" in text)
    out = bonebridge("config", "check", str(bad))
    assert out.returncode == 1
    assert f"{bad}:{line}" in out.stdout and "send_to" in out.stdout


def test_route_explain_names_the_route_and_why_not_the_others(tmp_path: Path) -> None:
    config = write_config(tmp_path, pacs_port=free_port())
    make_dx(tmp_path / "wrist.dcm", body_part="WRIST", age="030Y")
    out = bonebridge("route", "explain", "--config", str(config), str(CHEST), str(tmp_path / "wrist.dcm"))
    assert out.returncode == 0, out.stderr
    assert "other" in out.stdout and "chest" in out.stdout.lower()
    assert "fracture" in out.stdout and "wrist" in out.stdout.lower()


def test_predict_writes_a_not_processed_sr_for_a_chest(tmp_path: Path) -> None:
    import json

    import pydicom

    config = write_config(tmp_path, pacs_port=free_port())
    out = bonebridge("predict", "--config", str(config), str(CHEST), "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["route"] == "other" and "not processed" in summary["not_processed_reason"]
    written = list((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 1 and pydicom.dcmread(written[0]).Modality == "SR"


def test_retry_with_an_empty_dead_letter_folder_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path, pacs_port=free_port())
    out = bonebridge("retry", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "empty" in out.stdout


def test_predict_on_a_file_that_is_not_dicom_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    """Issue 26: ``bonebridge predict FILE.png`` ended in an InvalidDicomError traceback."""
    from PIL import Image

    config = write_config(tmp_path, pacs_port=free_port())
    png = tmp_path / "hand.png"
    Image.new("L", (8, 8)).save(png)
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    out = bonebridge("predict", "--config", str(config), str(png), str(text))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [line for line in lines if "cannot read as DICOM" in line] and len(lines) == 2
    assert lines[0].startswith(f"{png}: ") and lines[1].startswith(f"{text}: ")


def test_a_second_serve_on_the_same_data_directory_prints_one_line(tmp_path: Path) -> None:
    """Issue 26: a second ``serve --demo`` printed a full traceback before its clear BrokerError line."""
    import json

    config = write_config(tmp_path, pacs_port=free_port())
    data_dir = Path(yaml.safe_load(config.read_text())["storage"]["data_dir"])
    # the first serve: a live process whose command line says serve, recorded as the owner of the broker
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "serve"])
    try:
        (data_dir / "broker").mkdir(parents=True, exist_ok=True)
        (data_dir / "broker" / "owner.json").write_text(json.dumps({"serve_pid": first.pid, "redis_pid": first.pid}))
        out = bonebridge("serve", "--demo", "--config", str(config))
    finally:
        first.kill()
        first.wait()
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"bonebridge serve: another `bonebridge serve` (pid {first.pid}) is using {data_dir}; "
        "stop it first, or give this one another storage.data_dir"]


def test_serve_passes_its_log_level_to_the_workers_it_starts(tmp_path: Path) -> None:
    """`serve --log-level DEBUG` must reach the analysis and dispatch workers (their command line), not stop at serve."""
    import logging

    from daemon.serve import SupervisedWorker

    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.DEBUG)
        args = SupervisedWorker(tmp_path / "c.yaml", "redis://127.0.0.1:1/0", tmp_path, queues="dispatch").args
    finally:
        root.setLevel(before)
    assert args[args.index("--log-level") + 1] == "DEBUG" and args.index("--log-level") < args.index("worker")
