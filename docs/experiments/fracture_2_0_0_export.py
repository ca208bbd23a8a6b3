"""Fracture 2.0.0: run 2.0.0's kept checkpoint and 1.0.0, written as the two members of the shipped ensemble (issue 29).

The ensemble of the run's candidate (lead: its learnt map) and 1.0.0 passed the rule of ``models/weights/README.md``
("Fracture run 2.0.0") on validation. What this writes:

- ``fracture-384.pt``, version 2.0.0: ``runs/fx384/fracture.pt`` (epoch 12) with its weights stored in fp16
  (``weights_storage``). Its card keeps the model's own threshold and names the one the *ensemble* needs
  (``ensemble_thresholds``, keyed by the member's sha256): Youden's J of the ensemble's scores on the common
  0.1-share validation split (307 images), fixed before the test split was read.
- ``fracture.pt``, version 1.0.1: 1.0.0's weights, byte for byte in value up to fp16 rounding, stored in fp16 so the
  two members fit within the repository's 60 MB of weights. The shipped figures are read from these files.

Run: ``.venv/bin/python docs/experiments/fracture_2_0_0_export.py [--threshold T] [--out runs/ship]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from models.nets.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

#: Youden's J of the ensemble (run 2.0.0 epoch 12 + 1.0.0) on the common validation split, fp32 weights.
ENSEMBLE_THRESHOLD = 0.4241282194852829


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "fx384" / "fracture.pt")
    parser.add_argument("--shipped", type=Path, default=REPO / "models" / "weights" / "fracture.pt")
    parser.add_argument("--threshold", type=float, default=ENSEMBLE_THRESHOLD)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ship")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from models.nets.checkpoint import sha256_file

    model, card = load_checkpoint(args.shipped)
    card = card.model_copy(update={"version": "1.0.1", "weights_storage": "fp16"})
    member = save_checkpoint(model, card, args.out / "fracture.pt")
    print(f"wrote {member} ({member.stat().st_size / 1e6:.1f} MB), card {card.name} {card.version}")

    model, card = load_checkpoint(args.run)
    training = dict(card.training)
    training["ensemble_threshold_rule"] = (
        "Youden's J on the common 0.1-share validation split (307 images) of the output ensemble with "
        "fracture.pt 1.0.1, the way the daemon runs it; 'threshold' is the model's own (Youden's J on its own "
        "0.2-share validation pass)")
    card = card.model_copy(update={
        "version": "2.0.0", "weights_storage": "fp16", "training": training,
        "ensemble_thresholds": {sha256_file(member): args.threshold},
        "metrics_split": card.metrics_split + " (training's own validation pass, fp32 weights, the model alone)",
    })
    lead = save_checkpoint(model, card, args.out / "fracture-384.pt")
    print(f"wrote {lead} ({lead.stat().st_size / 1e6:.1f} MB), card {card.name} {card.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
