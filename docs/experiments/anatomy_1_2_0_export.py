"""Anatomy 1.2.0 (issue 25): the cascade's two members written in fp16, and the storage condition checked on validation.

Writes (to ``--out``, default ``runs/anatomy31/ship``):

- ``anatomy.pt``, version 1.1.1: 1.1.0's weights stored in fp16 (``weights_storage``), the same head, temperature,
  OOD model (``anatomy.ood.npz``, copied) and threshold;
- ``anatomy-finetuned.pt``, version 3.0.1: the fine-tuned 3.0.0 candidate (``runs/anatomy30/anatomy.pt``) in fp16,
  its OOD model renamed ``anatomy-finetuned.ood.npz`` beside it.

Then the condition of ``models/weights/README.md`` ("Anatomy 1.2.0"): one feature pass of each fp16-stored network over
the validation images as they are (and the test-only examples), the cascade's answer and decision per image
(untagged and tagged right) against the fp32 pair's (read from the runs' feature caches): the same decision for every
image, or at most 2 images differing, each listed. The test split is not read here.

Run: ``.venv/bin/python docs/experiments/anatomy_1_2_0_export.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from daemon.analyse.anatomy_decision import decide_anatomy, witness_of  # noqa: E402
from daemon.analyse.decision_table import cascade_sets  # noqa: E402
from models.eval.anatomy import head_figures  # noqa: E402
from models.nets.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


def export(source: Path, out: Path, version: str, ood_name: str) -> Path:
    model, card = load_checkpoint(source)
    calibration = dict(card.calibration or {})
    ood = dict(calibration["ood"])
    shutil.copyfile(source.parent / ood["file"], out / ood_name)
    ood["file"] = ood_name
    calibration["ood"] = ood
    card = card.model_copy(update={"version": version, "weights_storage": "fp16", "calibration": calibration})
    written = save_checkpoint(model, card, out / f"{Path(ood_name).name.removesuffix('.ood.npz')}.pt")
    print(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB), card {card.name} {card.version}")
    return written


def load_cache(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in stored.files}
    arrays["path"] = np.array([os.path.relpath(os.path.normpath(os.path.join(REPO, p)), REPO) for p in arrays["path"]])
    return arrays


def originals(arrays: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
    examples = np.isin(arrays["source"], ["mura", "hands-fullres", "pydicom"])
    keep = (arrays["view"] == "original") & ((arrays["split"] == split) | examples)
    return {key: value[keep] for key, value in arrays.items()}


def decisions(members, weights, config) -> list[tuple[str, str, str | None, str | None]]:
    """(set, truth, decided untagged, decided tagged right) per image, in the rows' order."""
    figures = [head_figures(a, w, "val") for a, w in zip(members, weights)]
    out = []
    for set_name, rows in cascade_sets(figures).items():
        for truth, probs, ood, threshold, because in rows:
            witness = witness_of(probs, figures[0].classes, ood, threshold, because)
            untagged = decide_anatomy(None, "no anatomy", witness, config.anatomy.min_probability).label
            tagged = decide_anatomy(truth, f"BodyPartExamined={truth.upper()}", witness,
                                    config.anatomy.min_probability).label
            out.append((set_name, truth, untagged, tagged))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 1.1.0's fp32 file (the same bytes as `git show 33f01de:models/weights/anatomy.pt`)
    parser.add_argument("--first", type=Path, default=REPO / "runs" / "anatomy11" / "anatomy.pt")
    parser.add_argument("--first-cache", type=Path, default=REPO / "runs" / "anatomy" / "features.npz")
    parser.add_argument("--fallback", type=Path, default=REPO / "runs" / "anatomy30" / "anatomy.pt")
    parser.add_argument("--fallback-cache", type=Path, default=REPO / "runs" / "anatomy30" / "anatomy.features.npz")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "anatomy31" / "ship")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)

    from daemon.config.schema import load_config
    from models.train.anatomy_world import WorldImage, extract_features

    config = load_config(REPO / "config" / "bonebridge.yaml")
    first = export(args.first, args.out, "1.1.1", "anatomy.ood.npz")
    fallback = export(args.fallback, args.out, "3.0.1", "anatomy-finetuned.ood.npz")

    fp32 = [originals(load_cache(args.first_cache), "val"), originals(load_cache(args.fallback_cache), "val")]
    if not (fp32[0]["path"] == fp32[1]["path"]).all():
        raise SystemExit("the two feature caches list different images")
    images = [WorldImage(Path(p), lab or None, sp, src)
              for p, lab, sp, src in zip(fp32[0]["path"], fp32[0]["label"], fp32[0]["split"], fp32[0]["source"])]
    fp16 = []
    for weights in (first, fallback):
        model, card = load_checkpoint(weights)
        arrays = extract_features(model.features, images, card.geometry, args.out / f"{weights.stem}.val.npz",
                                  all_styles_for=(), progress=False)
        arrays = {key: value[arrays["view"] == "original"] for key, value in arrays.items()}
        arrays["label"] = fp32[0]["label"]
        fp16.append(arrays)
    before = decisions(fp32, [args.first, args.fallback], config)
    after = decisions(fp16, [first, fallback], config)
    differ = [(b, a) for b, a in zip(before, after) if b != a]
    print(f"{len(before)} validation images and examples; decisions differing fp32 -> fp16: {len(differ)}")
    for b, a in differ:
        print(f"  {b[0]} truth {b[1]}: untagged {b[2]} -> {a[2]}, tagged {b[3]} -> {a[3]}")
    print("storage condition:", "PASS" if len(differ) <= 2 else "FAIL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
