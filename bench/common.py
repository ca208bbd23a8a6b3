"""What every benchmark prints: the environment its ratio depends on, and one summary line per measurement.

See ``bench/README.md``: the result of a benchmark is the ratio of medians against a reference measured in the
same run, in the direction where higher is better.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from importlib import metadata


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _dcmtk_version() -> str:
    try:
        out = subprocess.run(["storescu", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    return next((line.strip() for line in out.splitlines() if "dcmtk" in line.lower()), "unknown")


def print_environment() -> None:
    """One line with the Python, library and dcmtk versions, the CPU and the load at the start."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# python {platform.python_version()}, pynetdicom {_version('pynetdicom')}, pydicom {_version('pydicom')}, "
          f"torch {_version('torch')}, dcmtk {_dcmtk_version()}; {_cpu_model()} x {os.cpu_count()}; "
          f"load {load:.2f}")


def summarise(name: str, reference: str, unit: str, reference_samples: list[float], bonebridge_samples: list[float],
              *, higher_is_better: bool, as_json: bool = False, note: str = "") -> float:
    """Print the summary line (or JSON object) of one measurement; returns the ratio (higher is better)."""
    ref, ours = statistics.median(reference_samples), statistics.median(bonebridge_samples)
    ratio = ours / ref if higher_is_better else ref / ours
    if as_json:
        print(json.dumps({"name": name, "reference": reference, "unit": unit, "higher_is_better": higher_is_better,
                          "reference_samples": reference_samples, "bonebridge_samples": bonebridge_samples,
                          "ratio": round(ratio, 3), "note": note}))
    else:
        print(f"{name}  reference={reference}  ref {ref:.3g} {unit} [{min(reference_samples):.3g}.."
              f"{max(reference_samples):.3g}]  bonebridge {ours:.3g} {unit} [{min(bonebridge_samples):.3g}.."
              f"{max(bonebridge_samples):.3g}]  ratio {ratio:.2f} (higher is better){'  ' + note if note else ''}")
    return ratio
