"""What the anatomy step adds per image: the shipped anatomy model against decoding the same DICOM image.

Anatomy runs first on every study, so its cost lands on every study's latency. The reference is the work every
study pays anyway and that nobody would call slow: reading and decoding the DICOM file (pydicom + the daemon's
VOI/MONOCHROME1 handling), measured in the same run, interleaved. The input is pydicom-data's real CR of a lower
leg (1760 x 1760, MONOCHROME1), as a four-image study: the daemon batches a study's images through the model.

What is timed is what the daemon calls: :meth:`Predictor.anatomy_scores` (calibrated probabilities and, where the
card has one, the out-of-distribution score) of the configured model. Where the configuration is an anatomy cascade
(``models.anatomy.ensemble``), the first member alone is what a study it accepts costs, and every member in turn is
what a study it sends on costs: both are timed and printed. ``--candidate W.pt`` times another anatomy checkpoint in
the same rounds, so a model that would replace the shipped one is compared on the same machine state.
``--torch-reference`` times the first member once more with its features computed by PyTorch eager instead of ONNX
Runtime (the default for anatomy models since 1.2.3, :mod:`models.inference.onnx_features`), in the same rounds.

Run: ``.venv/bin/python bench/bench_anatomy.py [--repeats 5] [--images 4] [--candidate W.pt] [--torch-reference]``.
Prints ms per image for each and the ratio (reference / anatomy: above 1 means the anatomy step costs less than
decoding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=4, help="images per study (batched through the model)")
    parser.add_argument("--candidate", type=Path, help="another anatomy checkpoint, timed in the same rounds")
    parser.add_argument("--torch-reference", action="store_true",
                        help="time the first member with PyTorch eager features too, in the same rounds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import data_store
    import pydicom

    from daemon.config.schema import load_config
    from models.display_image import read_display_image
    from models.inference.anatomy_cascade import member_answers
    from models.inference.ensemble import load_model
    from models.inference.predictor import load_predictor

    config = load_config(REPO / "config" / "bonebridge.yaml")
    ref = config.models["anatomy"]
    configured = load_model(ref.weights, ref.ensemble)
    members = list(getattr(configured, "members", [configured]))
    predictor = members[0]
    path = Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm"

    def decode() -> list:
        return [read_display_image(pydicom.dcmread(path)) for _ in range(args.images)]

    images = decode()
    if args.candidate and args.torch_reference:
        parser.error("--candidate and --torch-reference each take the candidate's place: give one")
    candidate = load_predictor(args.candidate) if args.candidate else None
    if args.torch_reference:
        candidate = load_predictor(predictor.weights, runtime="torch")
        args.candidate = f"{predictor.weights.name} in PyTorch eager"
    for model in filter(None, (*members, candidate)):
        model.anatomy_scores(images)  # warm: first call allocates

    reference, anatomy, other, every = [], [], [], []
    for _ in range(args.repeats):
        began = time.perf_counter()
        decode()
        reference.append((time.perf_counter() - began) * 1000 / args.images)
        began = time.perf_counter()
        predictor.anatomy_scores(images)
        anatomy.append((time.perf_counter() - began) * 1000 / args.images)
        if len(members) > 1:
            began = time.perf_counter()  # every member, as the daemon runs a study the first sends on
            list(member_answers(configured, images))
            every.append((time.perf_counter() - began) * 1000 / args.images)
        if candidate is not None:
            began = time.perf_counter()
            candidate.anatomy_scores(images)
            other.append((time.perf_counter() - began) * 1000 / args.images)
    ref, ours = statistics.median(reference), statistics.median(anatomy)
    ratio = ref / ours
    if args.json:
        print(json.dumps({"name": "anatomy-step", "reference": "decode-dicom", "unit": "ms/image",
                          "higher_is_better": False, "reference_samples": reference, "bonebridge_samples": anatomy,
                          "ratio": ratio, **({"cascade_all_members_samples": every} if every else {}),
                          **({"candidate": str(args.candidate), "candidate_samples": other}
                                             if candidate is not None else {})}))
    else:
        print(f"anatomy-step  reference=decode-dicom  ref {ref:.1f} ms/image [{min(reference):.1f}..{max(reference):.1f}]"
              f"  bonebridge {ours:.1f} ms/image [{min(anatomy):.1f}..{max(anatomy):.1f}]"
              f"  ratio {ratio:.2f} (higher is better)  ({args.images}-image study, {predictor.geometry.size} px,"
              f" torch threads {__import__('torch').get_num_threads()}, features by {predictor.runtime})")
        if every:
            print(f"  anatomy cascade: the first member alone (a study it accepts) {ours:.1f} ms/image; all "
                  f"{len(members)} members in turn (a study it sends on) {statistics.median(every):.1f} ms/image "
                  f"[{min(every):.1f}..{max(every):.1f}]")
        if candidate is not None:
            print(f"  candidate {args.candidate}: {statistics.median(other):.1f} ms/image [{min(other):.1f}.."
                  f"{max(other):.1f}] (shipped {predictor.card.version}: {ours:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
