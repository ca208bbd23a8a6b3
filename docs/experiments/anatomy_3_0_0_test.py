"""Anatomy 3.0.0 candidate (issue 25): the test split, read once, and the ship rule of models/weights/README.md.

Reads the feature cache the training run wrote (the fine-tuned backbone's features of every set, the test-only sets
included), runs the daemon's decision table under the shipped config, and checks (a)-(d) against 1.1.0's table
(``runs/anatomy11/test_report.json``, read from 1.1.0's own features). (e), the speed, is ``bench_anatomy.py``.

Run: ``.venv/bin/python docs/experiments/anatomy_3_0_0_test.py [--weights runs/anatomy30/anatomy.pt]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from daemon.analyse.decision_table import evaluate_heads  # noqa: E402
from daemon.config.schema import load_config  # noqa: E402

SETS = ("fracatlas", "rsna", "knee-oai-224", "chest-kermany")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO / "runs" / "anatomy30" / "anatomy.pt")
    parser.add_argument("--baseline", type=Path, default=REPO / "runs" / "anatomy11" / "test_report.json")
    args = parser.parse_args()
    with np.load(args.weights.with_suffix(".features.npz"), allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in stored.files}
    report = evaluate_heads(arrays, args.weights, load_config(REPO / "config" / "bonebridge.yaml"))
    out = args.weights.parent / "test_report.json"
    out.write_text(json.dumps(report, indent=1, default=float))
    old = json.loads(args.baseline.read_text())["new"]
    table, base = report["decisions"], old["decisions"]
    checks = {
        "(a) no correct tag overruled on the four sets": all(table[s]["correct"]["overruled_correct_tag"] == 0
                                                              for s in SETS),
        "(b) sent where it must not go: no more than 1.1.0": all(
            table[s][t]["forbidden_model"] <= base[s][t]["forbidden_model"] for s in SETS for t in ("none", "correct")),
        "(c) untagged FracAtlas right > 1.1.0 and untagged knees knee/leg > 1.1.0": (
            table["fracatlas"]["none"]["right"] > base["fracatlas"]["none"]["right"]
            and table["knee-oai-224"]["none"]["right"] > base["knee-oai-224"]["none"]["right"]),
        "(d) FracAtlas class top-1 as they are >= 96.1 %": report["top1"]["fracatlas"]["original"] >= 0.961,
    }
    print(report["decisions_markdown"])
    print(json.dumps({"top1": report["top1"], "calibration": {k: v for k, v in report["calibration"].items()
                                                              if not k.startswith("reliab")},
                      "ood": report.get("ood")}, indent=1, default=float))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
