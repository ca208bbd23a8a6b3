"""Bone age 3.0.0: run 3.0.0b's kept checkpoint written as a shippable file (issue 30).

What changes against ``runs/ba384b/boneage-sex.pt``: the card's version (3.0.0) and inference precision (bf16,
earned on validation: paired +0.01 months, -0.08 to +0.09, against fp32), and the storage of the convolution and
linear weights in fp16 (``weights_storage``), which halves the file so it fits beside 2.1.0 within the repository's
60 MB of weights. The figures in ``models/weights/README.md`` are read from the file this writes, not from the run's.

Run: ``.venv/bin/python docs/experiments/boneage_3_0_0_export.py [--out runs/ship/boneage-sex-384.pt]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from models.nets.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "ba384b" / "boneage-sex.pt")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ship" / "boneage-sex-384.pt")
    args = parser.parse_args()
    model, card = load_checkpoint(args.run)
    card = card.model_copy(update={
        "version": "3.0.0", "inference_precision": "bf16", "weights_storage": "fp16",
        "metrics_split": card.metrics_split + " (training's own validation pass, fp32 weights)",
    })
    path = save_checkpoint(model, card, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), card {card.name} {card.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
