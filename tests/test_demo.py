"""The README's quick start, step by step: ``bonebridge serve --demo``, then ``storescu`` of ``bonebridge sample``.

Demo mode starts a private Orthanc as the config's local destination; the test follows what a new user does and
checks that the PACS's web page (Orthanc Explorer) answers at the printed address and that its REST API lists the
study with an SR series and a heatmap SC series. Where Debian's ``chromium`` is installed, the study's page is
rendered headless and must show both series (the screenshot kept in ``docs/`` was made this way). Only the ports
differ from the README (free ones, so the test never meets a real service on 11112/4242).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pydicom
import pytest

from tests.bonebridge_process import REPO, BoneBridgeProcess, write_config
from tests.orthanc_fixture import ORTHANC_BINARY, free_port, storescu, wait_for

pytestmark = pytest.mark.skipif(not ORTHANC_BINARY.exists(), reason="Debian orthanc not installed")


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body


def _series_by_description(rest: str, study_uid: str) -> dict[str, list[str]]:
    request = urllib.request.Request(f"{rest}/tools/find", method="POST", data=json.dumps(
        {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        series = json.loads(response.read())
    out: dict[str, list[str]] = {}
    for item in series:
        out.setdefault(item["MainDicomTags"].get("SeriesDescription", ""), []).append(item["ID"])
    return out


def test_readme_quick_start_ends_with_results_in_the_demo_pacs(tmp_path: Path) -> None:
    config = write_config(tmp_path, pacs_port=free_port(), anatomy_model=True)
    sample = subprocess.run([sys.executable, "-m", "daemon.cli", "sample"], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert sample.returncode == 0, sample.stderr
    radiograph = Path(sample.stdout.strip())
    study_uid = str(pydicom.dcmread(radiograph, stop_before_pixels=True).StudyInstanceUID)
    with BoneBridgeProcess(config, args=["--demo"]) as proc:
        url = (proc.data_dir / "run" / "demo-pacs.url").read_text().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/app/explorer.html")
        assert "Demo PACS (Orthanc" in proc.log_tail(400)
        assert b"<html" in _get(url).lower()  # the web page a user opens
        rest = url.removesuffix("/app/explorer.html")
        assert storescu(proc.port, "BONEBRIDGE", [radiograph]).returncode == 0
        wanted = {"BoneBridge report", "BoneBridge heatmap"}
        series = wait_for(lambda: (lambda s: s if wanted <= set(s) else None)(_series_by_description(rest, study_uid)),
                          180, interval=0.5, what="the SR and the heatmap SC in the demo PACS")
        assert set(series) == wanted  # BoneBridge sends what it made, not the radiograph
        if shutil.which("chromium"):
            shot = tmp_path / "demo.png"
            page = f"{url}#study?uuid={_study_id(rest, study_uid)}"
            run = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                  "--window-size=1280,800", "--virtual-time-budget=8000", f"--screenshot={shot}",
                                  page], capture_output=True, text=True, timeout=120)
            assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]
            dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                                  "--virtual-time-budget=8000", "--dump-dom", page],
                                 capture_output=True, text=True, timeout=120).stdout
            assert "BoneBridge report" in dom and "BoneBridge heatmap" in dom
    assert proc.proc is not None and proc.proc.returncode is not None
    # the demo PACS stopped with serve: its port answers no more
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=3)


def _study_id(rest: str, study_uid: str) -> str:
    request = urllib.request.Request(f"{rest}/tools/find", method="POST", data=json.dumps(
        {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).encode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())[0]
