"""Anatomy 3.0.0 candidate (issue 25): the whole network fine-tuned on the four sources, then calibrated.

The same as ``bonebridge train anatomy --clusters models/weights/anatomy.clusters.yaml --extra
.../knee-oai-224/images=knee --extra .../chest-kermany/images=chest --finetune --size 224 --site-style-probability
0.5 --ema-decay 0.995 --weight-decay 0.01 --epochs 8 --batch-size 32``, plus the test-only sets (the MURA
examples, the full-resolution hands, pydicom-data's two CRs) embedded in the same feature pass for
``bonebridge evaluate anatomy --features-cache``. Resumable: rerun the same command.

Run: ``nohup .venv/bin/python docs/experiments/anatomy_3_0_0_finetune.py [--out runs/anatomy30b/anatomy.pt] >
runs/anatomy30b/train.log 2>&1 &``. The first candidate (``runs/anatomy30``) chose its epoch on the pooled validation
top-1; the code now chooses on the mean of the sources' top-1 (``multiclass_spec(val_sources=...)``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from models.data.preprocess import Geometry  # noqa: E402
from models.train.anatomy_finetune import train_world_finetune  # noqa: E402
from models.train.anatomy_world import WorldImage  # noqa: E402
from models.train.classify import classifier_card  # noqa: E402
from models.train.loop import TrainConfig  # noqa: E402

DATA = REPO.parent / "shared" / "data"
OUT = REPO / "runs" / "anatomy30" / "anatomy.pt"
LICENCE = ("FracAtlas (Abedeen et al., Scientific Data 2023;10:521), CC BY 4.0, attribution required; RSNA Pediatric "
           "Bone Age Challenge images (Halabi et al., Radiology 2019;290:498-503), research use only, with attribution; "
           "knee radiographs of the Osteoarthritis Initiative (OAI; as published by Chen et al. 2019), research use "
           "with acknowledgement of the OAI; paediatric chest radiographs of Kermany et al. (Cell 2018), CC BY 4.0.")


def measure_only() -> list[WorldImage]:
    import data_store

    from models.eval.anatomy import mura_truth

    images = [WorldImage(p, mura_truth(p), "test", "mura") for p in sorted((DATA / "examples/mura").glob("*.png"))]
    images += [WorldImage(p, "hand", "test", "hands-fullres")
               for p in sorted((DATA / "examples/hands-fullres").glob("*.png"))]
    ds = Path(data_store.__file__).parent / "data"
    images += [WorldImage(ds / "RG1_UNCR.dcm", "chest", "test", "pydicom"),
               WorldImage(ds / "RG3_UNCR.dcm", "leg", "test", "pydicom")]
    return images


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    geometry = Geometry(size=224, aspect="pad")
    card = classifier_card("anatomy", geometry, "efficientnet_lite0", [], "", LICENCE)
    cfg = TrainConfig(out=args.out, epochs=8, batch_size=32, lr=1e-3, weight_decay=0.01, ema_decay=0.995, patience=100,
                      site_style_probability=0.5, progress=False)
    extras = [(DATA / "knee-oai-224" / "images", "knee"), (DATA / "chest-kermany" / "images", "chest")]
    path, validation = train_world_finetune(REPO / "models" / "weights" / "anatomy.clusters.yaml", extras, cfg,
                                            geometry, card, args.out.with_suffix(".features.npz"), measure_only())
    print(f"wrote {path}: {validation}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
