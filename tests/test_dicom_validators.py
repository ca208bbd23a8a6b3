"""Our SR and heatmap SC checked by an independent validator: dicom3tools' ``dciodvfy`` (Debian ``dicom3tools``).

Zero errors are required. Two kinds of warning are expected and explained, and every other warning fails:

- ``Unrecognized tag`` for (0009,10xx): BoneBridge's private block (creator ``BONEBRIDGE 1.0``), which marks its
  own output so a PACS echo is never analysed again; a validator cannot know private tags.
- ``Unrecognized defined term <99BB>`` for Coding Scheme Designator: the local coding scheme of the concepts that
  have no standard code (PS3.16 8.2 allows designators starting "99"), declared in the SR's Coding Scheme
  Identification Sequence.

Sources: a synthetic DX study and a real Fuji CR (MONOCHROME1 lower leg) from the ``pydicom-data`` package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from daemon.output.sc import build_heatmap_sc
from daemon.output.sr import build_sr
from daemon.output.study_result import ImageProbability, MapPeak, StudyResult
from tests.dicom_factory import make_study
from tests.test_results import MODELS

pytestmark = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy not installed")

EXPLAINED = (
    re.compile(r"^\(0x0009,0x10[0-9a-f]{2}\)\s+\?\s+- Warning - Unrecognized tag"),
    re.compile(r"^Warning - Unrecognized defined term <99BB> for value 1 of attribute <Coding Scheme Designator>$"),
)


def dciodvfy_findings(path: Path) -> tuple[list[str], list[str]]:
    """(errors, unexplained warnings) of dciodvfy on one file."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line]
    warnings = [line for line in lines if "Warning" in line and not any(p.search(line) for p in EXPLAINED)]
    return errors, warnings


def _rg3() -> pydicom.Dataset:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG3_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data's RG3_UNCR.dcm is not available")
    return pydicom.dcmread(path)


def _result(sources: list[pydicom.Dataset], anatomy: str) -> StudyResult:
    return StudyResult(
        study_uid=str(sources[0].StudyInstanceUID), route="fracture", anatomy=anatomy, anatomy_source="model",
        anatomy_probability=0.93,
        findings={"abnormality_probability": 0.71, "abnormality_decision": "abnormal", "abnormality_threshold": 0.4,
                  "fracture": "present"},
        models=MODELS[:1],
        image_probabilities=[ImageProbability(str(s.SOPClassUID), str(s.SOPInstanceUID), 0.71,
                                              map_peak=MapPeak(column=10.5, row=20.5, probability=0.83))
                             for s in sources],
        anatomy_evidence={"model_top1": f"{anatomy} 0.93", "decided_by": "model", "disagreement": "no"},
    )


@pytest.mark.parametrize("source_kind", ["synthetic DX", "real CR (RG3, MONOCHROME1)"])
def test_sr_and_sc_pass_dciodvfy(tmp_path: Path, source_kind: str) -> None:
    if source_kind == "synthetic DX":
        sources = [pydicom.dcmread(ds.filename) for ds in make_study(tmp_path / "src", count=2, size=64)]
        anatomy = "wrist"
    else:
        sources, anatomy = [_rg3()], "leg"
    result = _result(sources, anatomy)
    heat = np.zeros((16, 16), dtype=np.float32)
    heat[4:8, 4:8] = 0.9
    files = {"SR": build_sr(sources, result), "SC": build_heatmap_sc(sources[0], heat, result, 0)}
    for kind, dataset in files.items():
        path = tmp_path / f"{kind}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        errors, warnings = dciodvfy_findings(path)
        assert errors == [], f"{kind} from {source_kind}: {errors}"
        assert warnings == [], f"{kind} from {source_kind}: unexplained warnings {warnings}"
