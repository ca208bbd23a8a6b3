"""Anatomy 1.2.0 (issue 25): the cascade's test split, read once, and the ship rule of models/weights/README.md.

The shipped pair (the fp16-stored files ``anatomy_1_2_0_export.py`` wrote) gets one feature pass each over the test
images as they are and the test-only examples; the cascade's decision table runs the daemon's own decision and
routing under the shipped config (:func:`daemon.analyse.decision_table.evaluate_cascade`), and (a)-(d) are checked
against 1.1.0's table (``runs/anatomy11/test_report.json``). The fp32 pair's table is printed beside it from the runs'
feature caches. (e), the speed, is ``bench/bench_anatomy.py``.

Run: ``.venv/bin/python docs/experiments/anatomy_1_2_0_test.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from anatomy_1_2_0_export import load_cache, originals  # noqa: E402

from daemon.analyse.decision_table import evaluate_cascade  # noqa: E402

SETS = ("fracatlas", "rsna", "knee-oai-224", "chest-kermany")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ship", type=Path, default=REPO / "runs" / "anatomy31" / "ship")
    parser.add_argument("--baseline", type=Path, default=REPO / "runs" / "anatomy11" / "test_report.json")
    args = parser.parse_args()
    os.chdir(REPO)

    from daemon.config.schema import load_config
    from models.nets.checkpoint import load_checkpoint
    from models.train.anatomy_world import WorldImage, extract_features

    config = load_config(REPO / "config" / "bonebridge.yaml")
    caches = [load_cache(REPO / "runs" / "anatomy" / "features.npz"),
              load_cache(REPO / "runs" / "anatomy30" / "anatomy.features.npz")]
    fp32 = evaluate_cascade(caches, [REPO / "runs" / "anatomy11" / "anatomy.pt", REPO / "runs" / "anatomy30" / "anatomy.pt"],
                            config, split="test")  # 1.1.0's fp32 file: `git show 33f01de:models/weights/anatomy.pt`

    test = originals(caches[0], "test")
    images = [WorldImage(Path(p), lab or None, sp, src)
              for p, lab, sp, src in zip(test["path"], test["label"], test["split"], test["source"])]
    members = [args.ship / "anatomy.pt", args.ship / "anatomy-finetuned.pt"]
    arrays = []
    for weights in members:
        model, card = load_checkpoint(weights)
        found = extract_features(model.features, images, card.geometry, args.ship / f"{weights.stem}.test.npz",
                                 all_styles_for=(), progress=False)
        found = {key: value[found["view"] == "original"] for key, value in found.items()}
        found["label"] = test["label"]
        arrays.append(found)
    report = evaluate_cascade(arrays, members, config, split="test")
    report.pop("members")  # their OOD sections need the training rows; the fp32 report below has them
    report["fp32_pair"] = {key: fp32[key] for key in ("top1", "fallback_share", "decisions")}
    report["fp32_pair_members"] = [{key: m.get(key) for key in ("top1", "calibration", "ood")}
                                   for m in fp32["members"]]
    out = args.ship.parent / "test_report.json"
    out.write_text(json.dumps(report, indent=1, default=float))

    base = json.loads(args.baseline.read_text())["new"]["decisions"]
    table = report["decisions"]
    checks = {
        "(a) correct tags overruled: no more than 1.1.0 on the four sets": all(
            table[s]["correct"]["overruled_correct_tag"] <= base[s]["correct"]["overruled_correct_tag"] for s in SETS),
        "(b) sent where it must not go: 0 on chests, knees, RSNA; FracAtlas at most 2 images more than 1.1.0": all(
            table[s][t]["forbidden_model"] == 0 for s in SETS[1:] for t in ("none", "correct")) and all(
            (table["fracatlas"][t]["forbidden_model"] - base["fracatlas"][t]["forbidden_model"])
            * table["fracatlas"][t]["n"] <= 2 + 1e-9 for t in ("none", "correct")),
        "(c) untagged FracAtlas right > 1.1.0's and untagged knees knee/leg >= 95 %": (
            table["fracatlas"]["none"]["right"] > base["fracatlas"]["none"]["right"]
            and table["knee-oai-224"]["none"]["right"] >= 0.95),
        "(d) FracAtlas class top-1 as they are >= 96.1 %": report["top1"]["fracatlas"] >= 0.961,
    }
    print(report["decisions_markdown"])
    print(json.dumps({"top1": report["top1"], "fallback_share": report["fallback_share"],
                      "fp32 pair top1": fp32["top1"]}, indent=1, default=float))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
