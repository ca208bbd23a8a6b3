"""Bone age measured through the daemon's own analysis path, not the model alone.

Each radiograph of an RSNA split is wrapped as the DICOM a modality would send (a DX, 12-bit MONOCHROME2, tagged
``BodyPartExamined HAND``, PatientSex from the label, PatientAge in whole years) and handed to
``daemon.analyse.pipeline.Analyser`` with a configuration (the shipped default unless ``--config``): decoding, the anatomy
decision, the route and the bone-age model run exactly as the worker runs them. A study that does not reach the
bone-age model (another route, "not processed") is counted and reported, never dropped silently. Prints the MAE with
its 95 % bootstrap interval, the bias, and how many studies got a bone age.

Run: ``.venv/bin/python docs/measure_boneage_through_daemon.py --data ../shared/data/rsna-boneage-512 --split test``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def as_dicom(image: np.ndarray, male: bool, age_months: float):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "DX", "HAND"
    ds.PatientSex, ds.PatientAge = ("M" if male else "F"), f"{min(18, max(1, round(age_months / 12))):03d}Y"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.InstanceNumber, ds.SeriesNumber = 1, 1
    ds.PixelData = np.round(np.clip(image, 0, 1) * 4095).astype(np.uint16).tobytes()
    return ds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an RSNA folder (labels.csv, images/)")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--config", type=Path, help="a BoneBridge config (default: the shipped one)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--limit", type=int, help="only the first N radiographs of the split (a quick try)")
    args = parser.parse_args()

    from daemon.config.schema import default_config_path, load_config
    from daemon.analyse.pipeline import Analyser
    from models.train.boneage import rsna_examples
    from models.metrics.bootstrap import mean_interval
    from models.data.preprocess import load_image

    analyser = Analyser(load_config(args.config or default_config_path()))
    examples = rsna_examples(args.data / "labels.csv")[args.split][:args.limit]
    errors, missed = [], {}
    for example in examples:
        ds = as_dicom(load_image(example.path), example.male > 0.5, example.target)
        result = analyser.analyse([ds]).result
        if "bone_age_months" in result.findings:
            errors.append(float(result.findings["bone_age_months"]) - example.target)
        else:
            reason = f"route {result.route}: {result.not_processed_reason or 'no bone age'}"
            missed[reason] = missed.get(reason, 0) + 1
    err = np.array(errors)
    report = {"split": args.split, "n": len(examples), "with_bone_age": len(errors), "missed": missed,
              "mae_months": float(np.abs(err).mean()) if len(err) else None,
              "mae_months_ci95": mean_interval(np.abs(err)) if len(err) else None,
              "bias_months": float(err.mean()) if len(err) else None}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
