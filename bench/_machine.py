"""The machine a benchmark ran on, recorded beside its numbers (one helper for every bench and study).

    from _machine import machine      # scripts put bench/ on sys.path
    record = {"machine": machine(), ...}
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_generation() -> dict[str, Any]:
    """Family / model and the widest vector instructions of the CPU: "AMD EPYC" alone names hosts of different
    generations (on this project's VM, an AVX2-only host and an AVX-512 one ran the same jobs about 2x apart)."""
    info: dict[str, Any] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            name = {"cpu family": "cpu_family", "model": "cpu_model"}.get(key)
            if name and name not in info:
                info[name] = int(value)
            elif key == "flags":
                flags = set(value.split())
                info["isa"] = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
                break
    except (OSError, ValueError):
        pass
    return info


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine() -> dict[str, Any]:
    """CPU model (with family, model and vector ISA), cores (all and usable), RAM (GiB), GPU (None on CPU),
    library versions, torch threads,
    and the 1-minute load at call time (a shared machine's load explains slow CPU figures): call it before
    the benchmark adds its own load."""
    import nibabel
    import numpy
    import scipy
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(), **_cpu_generation(), "cores": os.cpu_count(), "cores_usable": usable,
        "ram_gib": _ram_gib(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__, "scipy": scipy.__version__, "nibabel": nibabel.__version__,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
