"""Fracture run 4.1.0, the reading that does not decide: the stride-8 run against its parent on the whole 0.2 share.

The rule of ``models/weights/README.md`` ("Fracture run 4.1.0") is read on the common 0.1-share validation split
(307 images, 46 fractured), the split every shipped fracture model leaves out. The run and its parent
``fracture-384.pt`` (run 2.0.0, stride 16) both left out the larger 0.2 share (640 images, 110 fractured), so on it
the one question "does the finer map point better?" is asked of 2.4 times as many fractures. Both chose their epoch
on that share (the run after its parent did), so a gain there is an upper bound. It writes two
``evaluate abnormality``-shaped reports and prints the paired comparison ``bonebridge compare`` would.

Run: ``.venv/bin/python docs/experiments/fracture_4_1_0_wide_read.py --base models/weights/fracture-384.pt
--candidate runs/fx41s8/fracture.pt --data ../shared/data/fracatlas --out runs/eval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from models.data.fracatlas import case_split, read_fracatlas  # noqa: E402
from models.eval.abnormality import fracture_metrics, predict_cases  # noqa: E402
from models.eval.compare import abnormality_lines, compare_abnormality  # noqa: E402
from models.inference.predictor import load_predictor  # noqa: E402

#: The validation share both models left out (``train abnormality --val-fraction 0.2``).
WIDE_SHARE = 0.2


def report_of(weights: Path, cases: list, batch_size: int) -> dict:
    """An ``evaluate abnormality``-shaped report of one model (alone, fp32) on ``cases``."""
    predictor = load_predictor(weights, precision="fp32")
    rows, timing = predict_cases(predictor, cases, batch_size, progress=False)
    threshold = predictor.card.threshold if predictor.card.threshold is not None else 0.5
    metrics = fracture_metrics(rows, threshold)
    return {"task": "abnormality", "model": str(weights), "split": f"val (share {WIDE_SHARE})",
            "auroc": metrics["auroc"], "pointing_hit_rate": metrics["pointing_hit_rate"],
            "pointing_hit_rate_strict": metrics["pointing_hit_rate_strict"], "metrics": metrics, "timing": timing,
            "per_image": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=REPO / "models" / "weights" / "fracture-384.pt")
    parser.add_argument("--candidate", type=Path, default=REPO / "runs" / "fx41s8" / "fracture.pt")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "fracatlas")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "eval")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    cases = [c for c in read_fracatlas(args.data) if case_split(c, WIDE_SHARE) == "val"]
    reports = {}
    for name, weights in (("base", args.base), ("candidate", args.candidate)):
        reports[name] = report_of(weights, cases, args.batch_size)
        (args.out / f"wide_{name}.json").write_text(json.dumps(reports[name], indent=1))
    result = compare_abnormality(reports["base"], reports["candidate"])
    (args.out / "wide_compare.json").write_text(json.dumps(result, indent=1))
    print("\n".join(abnormality_lines(result, f"{args.candidate.name} - {args.base.name}")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
