"""What bone age costs per 2000 px radiograph with its heatmap: a candidate model against the shipped one.

Issue 30's budget: a 2000 px DICOM, decoded and read with its heatmap (Grad-CAM from the pass already made), in at
most 150 ms of this CPU. The input is pydicom-data's real CR (RG3, 1760 x 1760, MIT licence) resized to 2000 x 1600
as a 12-bit MONOCHROME2 DICOM in memory; what it shows does not change the cost. The reference is the shipped
``boneage-sex.pt`` on the same image in the same run, interleaved; the candidate (``--weights``) is read in fp32,
where the CPU runs it natively in bf16, and as its cards say (``candidate cards``: what the daemon runs). Ratio = reference / candidate (above 1: the candidate is cheaper).

``--ensemble B.pt`` makes the candidate an output ensemble (``models.<name>.ensemble``): the lead with its heatmap,
each further member one forward pass, as the daemon runs it.

Run: ``.venv/bin/python bench/bench_boneage.py --weights runs/ba384/boneage-sex.pt [--ensemble B.pt] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from daemon.ops.openmp_policy import prefer_sleeping_threads  # noqa: E402

prefer_sleeping_threads()  # as the worker does, before torch loads

from common import print_environment, summarise  # noqa: E402


def hand_sized_dicom():
    """A 2000 x 1600 12-bit DX data set built from the real CR's pixels."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from bench_latency import real_radiograph

    pixels = np.asarray(Image.fromarray(real_radiograph().astype(np.float32)).resize((1600, 2000)), dtype=np.float32)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.PatientSex = "DX", "HAND", "M"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    return ds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="the candidate bone-age checkpoint")
    parser.add_argument("--reference", type=Path, default=REPO / "models" / "weights" / "boneage-sex.pt")
    parser.add_argument("--ensemble", type=Path, action="append", default=[],
                        help="further members averaged with --weights (an output ensemble); repeatable")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print_environment()

    import torch

    from models.display_image import read_display_image
    from models.inference.ensemble import load_model
    from models.inference.predictor import load_predictor
    from models.nets.precision import bf16_supported

    ds = hand_sized_dicom()
    readers = {"reference fp32": load_predictor(args.reference, precision="fp32"),
               "candidate fp32": load_model(args.weights, args.ensemble, precision="fp32")}
    if bf16_supported(torch.device("cpu")):
        readers["candidate bf16"] = load_model(args.weights, args.ensemble, precision="bf16")
    # As the daemon runs it: each member in the precision its own card names.
    readers["candidate cards"] = load_model(args.weights, args.ensemble)

    def read(predictor) -> float:
        began = time.perf_counter()
        image = read_display_image(ds)
        predictor.predict([image], patient_sex=["M"], with_heatmaps=True, laterality=[None])
        return (time.perf_counter() - began) * 1000

    for predictor in readers.values():
        read(predictor)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.repeats):
        for name, predictor in readers.items():
            samples[name].append(read(predictor))
    for name, values in samples.items():
        print(f"  {name:16s} {statistics.median(values):7.1f} ms per 2000 px DICOM with heatmap "
              f"[{min(values):.1f}..{max(values):.1f}] (budget 150 ms)")
    for name in readers:
        if name != "reference fp32":
            summarise(f"boneage-2000px-{name.split()[1]}", "shipped boneage-sex.pt fp32", "ms",
                      samples["reference fp32"], samples[name], higher_is_better=False, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
