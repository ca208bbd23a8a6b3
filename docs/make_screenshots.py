"""Screenshots of the web pages a user sees, made with headless Chromium (Debian ``chromium``): ``docs/*.png``.

- ``demo_pacs.png``: the README's quick start, ``bonebridge serve --demo`` after ``storescu`` of ``bonebridge
  sample``: the demo PACS's study page listing the SR and the heatmap series;
- ``status_page.png`` and ``status_study.png``: the status page after a pediatric hand, a chest (a real CR, not processed)
  and the sample CR, and the CR's detail page.

Ports are free ones and the data directory is temporary; everything started here is stopped at the end.
Run: ``.venv/bin/python docs/make_screenshots.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shoot(url: str, out: Path, height: int = 900) -> None:
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1280,{height}", "--virtual-time-budget=8000", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")


def main() -> int:
    import pydicom

    from tests.bonebridge_process import BoneBridgeProcess, write_config
    from tests.dicom_factory import make_dx
    from tests.orthanc_fixture import free_port, storescu, wait_for

    docs = REPO / "docs"
    sample = Path(subprocess.run([sys.executable, "-m", "daemon.cli", "sample"], capture_output=True, text=True,
                                 check=True, cwd=REPO).stdout.strip())
    sample_uid = str(pydicom.dcmread(sample, stop_before_pixels=True).StudyInstanceUID)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = write_config(work, pacs_port=free_port(), anatomy_model=True)
        status_port = yaml.safe_load(config.read_text())["status"]["port"]
        hand = make_dx(work / "hand.dcm", body_part="HAND", age="010Y", size=512)
        import data_store

        chest = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"  # a real CR chest
        with BoneBridgeProcess(config, args=["--demo"]) as proc:
            url = (proc.data_dir / "run" / "demo-pacs.url").read_text().strip()
            rest = url.removesuffix("/app/explorer.html")
            storescu(proc.port, "BONEBRIDGE", [sample])
            storescu(proc.port, "BONEBRIDGE", [work / "hand.dcm", chest])
            for uid in (sample_uid, str(hand.StudyInstanceUID)):
                wait_for(lambda: proc.results(uid), 180, interval=0.5, what=f"the outcome of {uid}")
            time.sleep(2)
            request = urllib.request.Request(f"{rest}/tools/find", method="POST", data=json.dumps(
                {"Level": "Study", "Query": {"StudyInstanceUID": sample_uid}}).encode())
            with urllib.request.urlopen(request, timeout=10) as response:
                study_id = json.loads(response.read())[0]
            shoot(f"{url}#study?uuid={study_id}", docs / "demo_pacs.png")
            shoot(f"http://127.0.0.1:{status_port}/", docs / "status_page.png", height=2000)
            shoot(f"http://127.0.0.1:{status_port}/study/{sample_uid}", docs / "status_study.png", height=1100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
