"""Bone age 2.1.1: 2.1.0's weights stored in fp16, so a fracture member fits the 60 MB of shipped weights.

What changes against ``models/weights/boneage-sex.pt`` 2.1.0: the card's version (2.1.1) and the storage of the
convolution and linear weights in fp16 (``weights_storage``, loaded as fp32 again); the head, preprocessing and
inference precision stay. The rule it faces is in ``models/weights/README.md`` ("boneage-sex.pt 2.1.1"); the
figures there are read from the file this writes.

Run: ``.venv/bin/python docs/experiments/boneage_2_1_1_export.py [--out runs/ship/boneage-sex.pt]``.
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
    parser.add_argument("--weights", type=Path, default=REPO / "models" / "weights" / "boneage-sex.pt")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ship" / "boneage-sex.pt")
    args = parser.parse_args()
    model, card = load_checkpoint(args.weights)
    if card.version != "2.1.0" or card.weights_storage != "fp32":
        raise SystemExit(f"{args.weights}: expected 2.1.0 stored in fp32, "
                         f"found {card.version} in {card.weights_storage}")
    card = card.model_copy(update={"version": "2.1.1", "weights_storage": "fp16"})
    path = save_checkpoint(model, card, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), card {card.name} {card.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
