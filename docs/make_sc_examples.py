"""Render the heatmap Secondary Captures the daemon sends, for people to look at: ``docs/sc_*.png``.

Each example goes through the daemon's own path (:class:`daemon.analyse.pipeline.Analyser` on the shipped
``config/bonebridge.yaml``: decode, anatomy, route, model, SR and SC), and the SC's pixels are saved as PNG:

- ``sc_hand.png``: a full-resolution pediatric hand (``../shared/data/examples/hands-fullres/0.png``, wrapped as
  a DX of a 10-year-old tagged HAND: on this image the anatomy model is unsure, 0.45 < 0.5, so the tags decide)
  -> bone age;
- ``sc_fracture.png``: a fractured radiograph from FracAtlas's held-out test split (wrapped as an untagged DX of
  an adult) -> fracture model, with the radiologists' box drawn on a copy beside it (``sc_fracture_box.png``);
- ``sc_cr_monochrome1.png``: pydicom-data's real Fuji CR of a lower leg (MONOCHROME1) -> fracture model.

Run: ``.venv/bin/python docs/make_sc_examples.py`` (needs ``../shared/data`` for the first two).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def _save_sc(analysis, out: Path) -> Path:
    captures = [ds for ds in analysis.outputs if ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage]
    if not captures:
        raise SystemExit(f"{out.name}: route {analysis.result.route!r} gave no heatmap "
                         f"({analysis.result.not_processed_reason})")
    Image.fromarray(captures[0].pixel_array).save(out)
    print(f"wrote {out} (route {analysis.result.route}, findings {analysis.result.findings})")
    return out


def main() -> int:
    from daemon.config.schema import load_config
    from daemon.analyse.pipeline import Analyser
    from models.data.fracatlas import case_split, read_fracatlas
    from models.data.preprocess import load_image
    from tests.dicom_factory import make_dx

    analyser = Analyser(load_config(REPO / "config" / "bonebridge.yaml"))
    work = Path("/tmp/bonebridge-sc-examples")
    work.mkdir(exist_ok=True)
    docs = REPO / "docs"

    def as_dx(image: np.ndarray, name: str, age: str, body_part: str | None = None) -> pydicom.Dataset:
        pixels = np.round(image * 4095).astype(np.uint16)
        make_dx(work / f"{name}.dcm", body_part=body_part, age=age, pixels=pixels)
        return pydicom.dcmread(work / f"{name}.dcm")

    if SHARED.is_dir():
        hand = load_image(SHARED / "examples" / "hands-fullres" / "0.png")
        _save_sc(analyser.analyse([as_dx(hand, "hand", "010Y", body_part="HAND")]), docs / "sc_hand.png")
        cases = [c for c in read_fracatlas(SHARED / "fracatlas") if c.fractured and case_split(c) == "test"]
        case = max(cases, key=lambda c: max(w * h for _, _, w, h in c.boxes))  # the clearest box to look at
        image = load_image(case.path)
        _save_sc(analyser.analyse([as_dx(image, "fracture", "040Y")]), docs / "sc_fracture.png")
        boxed = Image.fromarray((image * 255).astype(np.uint8)).convert("RGB")
        pen = ImageDraw.Draw(boxed)
        for x, y, w, h in case.boxes:
            pen.rectangle([x, y, x + w, y + h], outline=(0, 255, 0), width=2)
        boxed.save(docs / "sc_fracture_box.png")
        print(f"wrote {docs / 'sc_fracture_box.png'} ({case.image_id}, the radiologists' box in green)")
    import data_store

    leg = pydicom.dcmread(Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm")
    _save_sc(analyser.analyse([leg]), docs / "sc_cr_monochrome1.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
