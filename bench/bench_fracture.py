"""What the fracture model costs per 512 px image, with its learnt heatmap, against the same network's Grad-CAM.

The issue's budget is 150 ms of this CPU per 512 px image with its heatmap. The reference is the heatmap the
model replaces: Grad-CAM (pytorch-grad-cam, a backward pass) on the very same network and input, measured in the
same run, interleaved. The input is FracAtlas-like: a 512 x 420 grayscale radiograph (pydicom-data's real CR of a
lower leg, resized), as a one-image study; the configured fracture model (``config/bonebridge.yaml``'s
``models.abnormality``, its ensemble included) is used unless ``--weights`` names another.
``--ensemble B.pt`` makes the model an output ensemble (``models.<name>.ensemble``) exactly as the daemon runs it:
the lead with its map, each further member one forward pass without a map; Grad-CAM stays the lead's.

Run: ``.venv/bin/python bench/bench_fracture.py [--weights A.pt] [--ensemble B.pt] [--repeats 7]``. Prints ms per image for the model without a
heatmap, with its learnt map, and with Grad-CAM; the ratio is Grad-CAM's time over the learnt map's (above 1:
the learnt map is cheaper).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--weights", type=Path, help="default: the configured fracture model and its ensemble")
    parser.add_argument("--ensemble", type=Path, action="append", default=[],
                        help="further members averaged with --weights (an output ensemble); repeatable")
    parser.add_argument("--precision", choices=["cards", "fp32", "bf16"], default="cards",
                        help="inference precision: as each card says (the daemon's choice), or forced")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import data_store
    import numpy as np
    import pydicom
    import torch
    from PIL import Image

    from models.display_image import read_display_image
    from models.nets.cam import grad_cam, to_image
    from models.inference.ensemble import load_model
    from models.data.preprocess import to_model_input

    if args.weights is None:
        from daemon.config.schema import load_config

        ref = load_config(REPO / "config" / "bonebridge.yaml").models["abnormality"]
        args.weights, args.ensemble = Path(ref.weights), [Path(w) for w in ref.ensemble] + args.ensemble
    forced = {} if args.precision == "cards" else {"precision": args.precision}
    predictor = load_model(args.weights, args.ensemble, **forced)
    lead = getattr(predictor, "lead", predictor)
    full = read_display_image(pydicom.dcmread(Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm"))
    image = np.asarray(Image.fromarray(full).resize((420, 512), Image.Resampling.BILINEAR), dtype=np.float32)

    def plain() -> None:
        predictor.predict([image], with_heatmaps=False)

    def learnt() -> None:
        predictor.predict([image], with_heatmaps=True)

    def gradcam() -> None:
        x = to_model_input([image], lead.geometry).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            lead.model(x)
        to_image(grad_cam(lead.model, x, "abnormality")[0], image, lead.geometry)

    for warm in (plain, learnt, gradcam):
        warm()
    samples: dict[str, list[float]] = {"plain": [], "learnt": [], "gradcam": []}
    for _ in range(args.repeats):
        for name, run in (("gradcam", gradcam), ("learnt", learnt), ("plain", plain)):
            began = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - began) * 1000)
    med = {name: statistics.median(values) for name, values in samples.items()}
    ratio = med["gradcam"] / med["learnt"]
    if args.json:
        print(json.dumps({"name": "fracture-heatmap", "reference": "grad-cam", "unit": "ms/image",
                          "higher_is_better": False, "reference_samples": samples["gradcam"],
                          "bonebridge_samples": samples["learnt"], "without_heatmap_samples": samples["plain"],
                          "ratio": ratio}))
    else:
        spread = {n: f"[{min(v):.1f}..{max(v):.1f}]" for n, v in samples.items()}
        print(f"fracture-heatmap  reference=grad-cam  ref {med['gradcam']:.1f} ms/image {spread['gradcam']}"
              f"  bonebridge {med['learnt']:.1f} ms/image {spread['learnt']}  ratio {ratio:.2f} (higher is better)"
              f"  (without heatmap {med['plain']:.1f} ms/image {spread['plain']}; 512 x 420 input,"
              f" {lead.geometry.size} px lead, {1 + len(args.ensemble)} member(s), precision {args.precision}, torch threads {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
