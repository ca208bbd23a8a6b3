"""Anatomy 1.2.1 (issue 25): the cascade in bf16, checked on validation by the rule of models/weights/README.md.

Both members are loaded as the daemon loads them (:class:`~models.inference.predictor.Predictor`: BN folded,
channels-last) with ``precision="bf16"``, and their backbones read the 666 validation images and examples under bf16
autocast, exactly as ``Predictor.anatomy_scores`` does; the pooled features leave autocast as fp32 and the head,
temperature and OOD score read them in fp32. The cascade's decisions (untagged and tagged right) are compared with the
fp32 pair's, read from the runs' feature caches. ``--test`` then reports the test split's decision table in bf16
(read once, after the validation verdict; it cannot change it).

Run: ``.venv/bin/python docs/experiments/anatomy_1_2_1_bf16.py [--test]``.
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

import torch  # noqa: E402

from anatomy_1_2_0_export import decisions, load_cache, originals  # noqa: E402


class Bf16Backbone(torch.nn.Module):
    """A predictor's (folded, channels-last) backbone under bf16 autocast, its output back in fp32."""

    def __init__(self, predictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.predictor.bf16):
            return self.predictor.model.features(x).float()


def bf16_features(members: list[Path], split: str, out: Path) -> list[dict]:
    from models.inference.predictor import load_predictor
    from models.train.anatomy_world import WorldImage, extract_features

    rows = originals(load_cache(REPO / "runs" / "anatomy" / "features.npz"), split)
    images = [WorldImage(Path(p), lab or None, sp, src)
              for p, lab, sp, src in zip(rows["path"], rows["label"], rows["split"], rows["source"])]
    arrays = []
    for weights in members:
        predictor = load_predictor(weights, precision="bf16")
        if not predictor.bf16:
            raise SystemExit("this CPU has no native bf16: nothing to check")
        found = extract_features(Bf16Backbone(predictor), images, predictor.geometry,
                                 out / f"{weights.stem}.{split}.bf16.npz", all_styles_for=(), progress=False)
        found = {key: value[found["view"] == "original"] for key, value in found.items()}
        found["label"] = rows["label"]
        arrays.append(found)
    return arrays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ship", type=Path, default=REPO / "runs" / "anatomy31" / "ship")
    parser.add_argument("--test", action="store_true", help="report the test split's table in bf16 (after the verdict)")
    args = parser.parse_args()
    os.chdir(REPO)

    from daemon.analyse.decision_table import evaluate_cascade
    from daemon.config.schema import load_config

    config = load_config(REPO / "config" / "bonebridge.yaml")
    members = [args.ship / "anatomy.pt", args.ship / "anatomy-finetuned.pt"]
    if args.test:
        arrays = bf16_features(members, "test", args.ship)
        report = evaluate_cascade(arrays, members, config, split="test")
        report.pop("members")
        (args.ship.parent / "test_report_bf16.json").write_text(json.dumps(report, indent=1, default=float))
        fp16 = json.loads((args.ship.parent / "test_report.json").read_text())
        print(report["decisions_markdown"])
        print(json.dumps({"top1": report["top1"], "fallback_share": report["fallback_share"]}, default=float))
        same = report["decisions"] == fp16["decisions"]
        print("test table in bf16", "identical to fp32's" if same else "DIFFERS from fp32's (see the two reports)")
        return 0
    fp32 = [originals(load_cache(REPO / "runs" / "anatomy" / "features.npz"), "val"),
            originals(load_cache(REPO / "runs" / "anatomy30" / "anatomy.features.npz"), "val")]
    bf16 = bf16_features(members, "val", args.ship)
    before = decisions(fp32, [REPO / "runs" / "anatomy11" / "anatomy.pt", REPO / "runs" / "anatomy30" / "anatomy.pt"],
                       config)  # 1.1.0's fp32 file: `git show 33f01de:models/weights/anatomy.pt`
    after = decisions(bf16, members, config)
    differ = [(b, a) for b, a in zip(before, after) if b != a]
    print(f"{len(before)} validation images and examples; decisions differing fp32 -> bf16: {len(differ)}")
    for b, a in differ:
        print(f"  {b[0]} truth {b[1]}: untagged {b[2]} -> {a[2]}, tagged {b[3]} -> {a[3]}")
    print("rule (1):", "PASS" if len(differ) <= 2 else "FAIL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
