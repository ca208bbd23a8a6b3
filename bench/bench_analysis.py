"""Analysis cost per radiograph, warm: CPU and wall time of each stage of the worker's analysis, same-run reference.

One full-resolution radiograph (pydicom-data's RG3, a 1760 x 1760 CR of a lower leg, tagged as a leg so the shipped
config routes it to the fracture model) goes through ``daemon.analyse.pipeline.Analyser`` as the worker runs it: decode
(modality LUT, window), anatomy model, fracture model with its learnt map, the heatmap Secondary Capture and the
SR. Each stage is timed on its own (median of ``--repeats``), CPU (all threads of this process) and wall.

The reference, measured in the same run: the two steps this pass rewrote, done the straightforward way — the
window through pydicom's generic ``apply_voi_lut`` in float64, and the heatmap coloured through matplotlib for
every pixel. Ratio = reference / BoneBridge for those steps (higher is better). Issue 9's goal is at most 0.25 s of
CPU per full-resolution image with its heatmap (decode, models, SC); the SR is built once per study and is printed
apart. Run: ``.venv/bin/python bench/bench_analysis.py [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from daemon.ops.openmp_policy import prefer_sleeping_threads  # noqa: E402

prefer_sleeping_threads()  # as the worker does (bonebridge's CLI), before torch loads; OMP_WAIT_POLICY=ACTIVE to compare

from common import print_environment, summarise  # noqa: E402


def timed(func: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median (cpu_s, wall_s) of *repeats* calls."""
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        func()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def straightforward_decode(ds) -> np.ndarray:
    """Modality LUT and window through pydicom's generic functions in float64, scaled to [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    out = apply_voi_lut(values, ds, index=0)
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    ends = apply_voi_lut(np.array([centre - 21 * width, centre + 21 * width]), ds, index=0)
    return np.nan_to_num(np.clip((out - ends.min()) / (ends.max() - ends.min()), 0, 1)).astype(np.float32)


def straightforward_blend(base: np.ndarray, heat: np.ndarray, floor: float = 0.2, alpha: float = 0.45) -> np.ndarray:
    colour = matplotlib.colormaps["turbo"](heat)[..., :3]
    weight = alpha * np.clip((heat - floor) / (1.0 - floor), 0.0, 1.0)[..., None]
    return np.round(np.clip((1.0 - weight) * base[..., None] + weight * colour, 0, 1) * 255).astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print_environment()
    import tempfile

    import pydicom

    from bench_latency import one_study, real_radiograph
    from daemon.config.schema import load_config
    from models.display_image import read_display_image
    from daemon.output.heatmap_render import blend_above_floor, picture_shape
    from daemon.analyse.pipeline import Analyser
    from daemon.output.sc import build_heatmap_sc
    from daemon.output.sr import build_sr

    analyser = Analyser(load_config(REPO / "config" / "bonebridge.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = one_study(Path(tmp), real_radiograph(), "full")
        ds = pydicom.dcmread(path)
    analysis = analyser.analyse([ds])  # warm: models loaded, first-call costs paid
    image = read_display_image(ds)
    fracture = analyser.predictor("abnormality")
    heatmap = fracture.predict([image], [None], with_heatmaps=True)[0].heatmap
    stages = {
        "decode": lambda: read_display_image(ds),
        "anatomy model": lambda: analyser._anatomy([ds], [image]),
        "fracture model + learnt map": lambda: fracture.predict([image], [None], with_heatmaps=True),
        "heatmap SC": lambda: build_heatmap_sc(ds, heatmap, analysis.result, 0, display_image=image),
        "SR (per study)": lambda: build_sr([ds], analysis.result),
    }
    per_image_cpu = 0.0
    print(f"{ds.Rows} x {ds.Columns} radiograph, route {analysis.result.route}, median of {args.repeats}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for name, func in stages.items():
        cpu, wall = timed(func, args.repeats)
        if name != "SR (per study)":
            per_image_cpu += cpu
        print(f"  {name:30s} cpu {cpu * 1000:6.0f} ms  wall {wall * 1000:6.0f} ms")
    total_cpu, total_wall = timed(lambda: analyser.analyse([ds]), args.repeats)
    print(f"  whole analysis (as the worker) cpu {total_cpu * 1000:6.0f} ms  wall {total_wall * 1000:6.0f} ms")
    print(f"per image with its heatmap (decode, models, SC): cpu {per_image_cpu:.3f} s (goal <= 0.25 s)")

    rows, cols = picture_shape(*image.shape)
    from PIL import Image

    base = np.asarray(Image.fromarray(image).resize((cols, rows)), dtype=np.float32)
    heat = np.asarray(Image.fromarray(np.asarray(heatmap, dtype=np.float32)).resize((cols, rows)), dtype=np.float32)
    for name, ref, ours in (
        ("analysis-decode", lambda: straightforward_decode(ds), lambda: read_display_image(ds)),
        ("analysis-heatmap-blend", lambda: straightforward_blend(base, heat), lambda: blend_above_floor(base, heat)),
    ):
        ref_samples, our_samples = [], []
        for _ in range(args.repeats):  # interleaved
            ref_samples.append(timed(ref, 1)[1] * 1000)
            our_samples.append(timed(ours, 1)[1] * 1000)
        summarise(name, "straightforward-pydicom-matplotlib", "ms", ref_samples, our_samples, higher_is_better=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
