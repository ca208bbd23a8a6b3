"""Anatomy 1.2.3 (issue 25): the shipped cascade's decisions with its features from ONNX Runtime and from PyTorch.

The rule of ``models/weights/README.md`` ("Anatomy 1.2.3"), part (1): on the 666 validation images and examples of
1.2.0's storage check (the images as sent, listed by that check's feature cache
``runs/anatomy31/ship/anatomy.val.npz``), each shipped network's pooled features are computed through
:meth:`Predictor.pooled_features` twice, once per runtime, on the same preprocessed batches; the cascade's decision
per image (untagged and tagged right) must be the same for every image. The largest feature difference is printed
too. The test split is not read.

Run: ``.venv/bin/python docs/experiments/anatomy_1_2_3_runtime.py`` (a few minutes: it decodes every image once).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "docs" / "experiments"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from anatomy_1_2_0_export import decisions, load_cache  # noqa: E402
from models.data.preprocess import load_image  # noqa: E402
from models.inference.predictor import load_predictor  # noqa: E402

WEIGHTS = [REPO / "models" / "weights" / "anatomy.pt", REPO / "models" / "weights" / "anatomy-finetuned.pt"]


def main() -> int:
    os.chdir(REPO)
    from daemon.config.schema import load_config

    config = load_config(REPO / "config" / "bonebridge.yaml")
    listed = load_cache(REPO / "runs" / "anatomy31" / "ship" / "anatomy.val.npz")
    keep = listed["view"] == "original"
    meta = {key: value[keep] for key, value in listed.items() if key != "x"}
    print(f"{len(meta['path'])} images (validation as sent, and the examples)")
    runtimes = {"torch": [], "onnxruntime": []}
    for weights in WEIGHTS:
        pair = {name: load_predictor(weights, runtime=name) for name in runtimes}
        rows = {name: [] for name in runtimes}
        paths = list(meta["path"])
        for start in range(0, len(paths), 16):
            images = [load_image(p) for p in paths[start:start + 16]]
            (batch,) = pair["torch"].model_inputs(images)  # one preprocessing, both runtimes
            with torch.no_grad():
                for name, predictor in pair.items():
                    rows[name].append(predictor.pooled_features(batch).numpy())
        for name in runtimes:
            runtimes[name].append({"x": np.concatenate(rows[name]), **meta})
        gap = np.abs(runtimes["torch"][-1]["x"] - runtimes["onnxruntime"][-1]["x"]).max()
        print(f"{weights.name}: largest pooled-feature difference {gap:.2e}")
    before = decisions(runtimes["torch"], WEIGHTS, config)
    after = decisions(runtimes["onnxruntime"], WEIGHTS, config)
    differ = [(b, a) for b, a in zip(before, after) if b != a]
    print(f"{len(before)} decisions (untagged and tagged right) compared; differing torch -> onnxruntime: "
          f"{len(differ)}")
    for b, a in differ:
        print(f"  {b[0]} truth {b[1]}: untagged {b[2]} -> {a[2]}, tagged {b[3]} -> {a[3]}")
    print("rule (1):", "PASS" if not differ else "FAIL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
