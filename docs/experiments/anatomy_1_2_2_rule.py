"""Anatomy 1.2.2 (issue 25): the fallback's overrule toward a part no route runs a model on, by the weights README's rule.

Reads the fp16 pair's cached features (``anatomy_1_2_0_export.py`` wrote the validation ones, ``anatomy_1_2_0_test.py``
the test ones) and builds the cascade's decision table twice on the same rows: under 1.2.0's decision (a fallback
never overrules a tag) and under 1.2.2's (it may, toward a part that runs no model). Then checks (a)-(c).

Run: ``.venv/bin/python docs/experiments/anatomy_1_2_2_rule.py --split val`` (then ``--split test``, once).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from anatomy_1_2_0_export import load_cache, originals  # noqa: E402

import daemon.analyse.decision_table as decision_table  # noqa: E402

SETS = ("fracatlas", "rsna", "knee-oai-224", "chest-kermany")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["val", "test"], required=True)
    parser.add_argument("--ship", type=Path, default=REPO / "runs" / "anatomy31" / "ship")
    args = parser.parse_args()
    os.chdir(REPO)
    from daemon.config.schema import load_config

    config = load_config(REPO / "config" / "bonebridge.yaml")
    rows = originals(load_cache(REPO / "runs" / "anatomy" / "features.npz"), args.split)
    members = [args.ship / "anatomy.pt", args.ship / "anatomy-finetuned.pt"]
    arrays = []
    for weights in members:
        with np.load(args.ship / f"{weights.stem}.{args.split}.npz", allow_pickle=False) as stored:
            found = {key: stored[key] for key in stored.files}
        found = {key: value[found["view"] == "original"] for key, value in found.items()}
        if not (np.array([os.path.relpath(os.path.normpath(os.path.join(REPO, p)), REPO) for p in found["path"]])
                == rows["path"]).all():
            raise SystemExit("the cached features list other images than the split")
        found["label"] = rows["label"]
        arrays.append(found)

    new = decision_table.evaluate_cascade(arrays, members, config, split=args.split)["decisions"]
    real = decision_table.runs_a_model
    decision_table.runs_a_model = lambda *a, **k: True  # 1.2.0: a fallback never overrules
    try:
        old = decision_table.evaluate_cascade(arrays, members, config, split=args.split)["decisions"]
    finally:
        decision_table.runs_a_model = real
    print(decision_table.table_markdown(new))
    for s in new:
        for t in new[s]:
            if new[s][t] != old[s][t]:
                print(f"changed: {s} {t}: " + ", ".join(f"{k} {old[s][t][k]:.3f} -> {new[s][t][k]:.3f}"
                                                         for k in new[s][t] if new[s][t][k] != old[s][t][k]))
    added = sum((new[s]["correct"]["overruled_correct_tag"] - old[s]["correct"]["overruled_correct_tag"])
                * new[s]["correct"]["n"] for s in SETS)
    checks = {
        "(a) at most 1 more correct tag overruled on the four sets, none on RSNA": round(added) <= 1 and
        new["rsna"]["correct"]["overruled_correct_tag"] <= old["rsna"]["correct"]["overruled_correct_tag"],
        "(b) chests tagged HAND sent to a model: lower than 1.2.0": new["chest-kermany"]["wrong"]["forbidden_model"]
        < old["chest-kermany"]["wrong"]["forbidden_model"],
        "(c) the four sets' untagged and tagged-right rows otherwise unchanged": all(
            {k: v for k, v in new[s][t].items() if k != "overruled_correct_tag" and k != "right"}
            == {k: v for k, v in old[s][t].items() if k != "overruled_correct_tag" and k != "right"}
            if t == "correct" else new[s][t] == old[s][t] for s in SETS for t in ("none", "correct")),
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
