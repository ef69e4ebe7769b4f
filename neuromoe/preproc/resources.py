"""Memory and walltime of the per-subject preprocessing jobs, from the size of their input images.

The rules' ``resources`` (``mem_mb``, ``runtime`` in minutes) are what a scheduler reserves: SLURM kills a job
past its ``--mem`` or ``-t``, and a workstation run packs jobs within ``--resources mem_mb``. Constants cannot
be right for every dataset: a 1,200-volume multiband BOLD holds four times the voxels of a 300-volume one. So
each job is sized from its images, read from their NIfTI headers only (no data: ~0.2 ms a file, cached per file
version), when Snakemake schedules it::

    mem_mb  = attempt * max(floor_mb,  MEM_MARGIN  * (base_mb + mb_per_mvox * image_mvox + t1_mb_per_mvox * t1w_mvox))
    runtime = attempt * max(floor_min, TIME_MARGIN * (base_s + s_per_mvox * image_mvox + t1_s_per_mvox * t1w_mvox) / 60)

``image_mvox``: millions of voxel-volumes of the stage's own image (X * Y * Z * T: the T1w for anat, the DWI or
BOLD series for dwi and func); ``t1w_mvox``: millions of voxels of the T1w grid, onto which dwi and func
register (its ``anat_brain``; the workflow reads the raw T1w, which has the same grid and exists before the
anat job has run, as when a SLURM group job is sized). ``attempt`` is Snakemake's (1, then 2, 3 with
``--retries``): a job killed for memory or time is retried with more. The floors are the memory the rules
had before and the walltime the SLURM profile gave them (demo-sized data never asks for less); values are
integers, as SLURM and ``--resources`` want.

Calibration (``STAGE_COSTS``). The fixed part is the interpreter, numpy/scipy/SimpleITK/nilearn imports and the
MNI templates; the per-voxel part is the working copies of the series (dwi: the int16 input read as float32 and
realigned in place, the float64 in-mask matrices of the tensor fit; its coefficients were fitted when it still
realigned into a second copy, so they over-ask; func reads its int16 series as float32, realigns it in place and
then keeps only the brain's rows, working through them in blocks: at most about 1.5 float32 copies, 6 MB per
million voxel-volumes, where it held 8.5 copies before 2026-12-07).
Both were fitted to each job's exact peak RSS (getrusage; bench/realsize.py's 0.1 s sampler of the job's process
tree agrees within 35 MB) and its seconds at two sizes, each with two T1w fields of view, run through the real
rules: ``bench/realsize.py --size small`` and ``--size medium`` (python backend, 1 thread; results in
``bench/results/realsize_small.json`` and ``realsize_medium.json``), then rounded up. ``MEM_MARGIN`` covers what
the fit cannot (allocator fragmentation, temporaries that peak together at larger sizes); ``TIME_MARGIN`` a
slower or shared node. At clinical size (BOLD 61 x 72 x 57 x 304, T1w 1 mm) func is predicted at 0.8 GB
(measured: 0.68 GB; 2.8 GB before its blocks) and asks for its 4 GB floor; a 1,200-volume 2 mm multiband BOLD
(104 x 90 x 72) asks for about 6.5 GB (35 GB before).
``bench/realsize.py`` (clinical size, the default) re-checks the coefficients: for every stage it records this
estimate beside the measured peak and wall time, with ``covers_peak`` / ``covers_wall``. The FSL backend's
tools hold the same series (mcflirt, eddy_correct: float32 4D copies); its costs are not measured separately.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import nibabel as nib

MEM_MARGIN = 1.25
TIME_MARGIN = 4.0
STAGE_IMAGE = {"anat": "t1w", "dwi": "dwi", "func": "bold"}  # the rule's input that sizes each stage


@dataclass(frozen=True)
class StageCost:
    """Linear cost of one stage: a fixed part plus parts per million voxels (see the module docstring)."""

    base_mb: float
    mb_per_mvox: float  # per million voxel-volumes of the stage's own image
    t1_mb_per_mvox: float  # per million voxels of the T1w grid (dwi, func)
    base_s: float
    s_per_mvox: float
    t1_s_per_mvox: float
    floor_mb: int  # the rule's constant before sizing
    floor_min: int  # the SLURM profile's walltime before sizing


# Fitted to the exact peaks (getrusage) and job seconds of bench/realsize.py --size small / medium (both fields of
# view; 1 thread, on a 2-core machine under a load of 5-7, so the seconds are high), rounded up:
#   anat  T1w 0.45 / 0.82 / 2.08 / 3.74 Mvox:                    318 / 325 / 404 / 530 MB;  8 /  8 / 18 / 25 s
#   dwi   DWI 1.50 / 21.0 Mvox (T1w 0.45-0.82 / 2.08-3.74 Mvox): 337-340 / 546-571 MB;      5-8 / 16-19 s
#   func  BOLD 3.54 / 37.9 Mvox (T1w as dwi):                    350-352 / 1525-1543 MB;  8-13 / 35-66 s
# func refitted on 2026-12-07 (commit f6fef6f, the stage in blocks and realigned in place; the results files now
# hold that run, under a load of ~3): func 283-286 / 467-483 MB, 8 / 24 s; in the same run anat 414-422 /
# 453-496 MB and dwi 289-294 / 494-520 MB, within their estimates (floors 3 and 4 GB).
# cache_subject (not sized: its inputs are the MNI maps, on the template's fixed grid) peaked at 222 MB at both.
STAGE_COSTS: dict[str, StageCost] = {
    "anat": StageCost(base_mb=300, mb_per_mvox=75, t1_mb_per_mvox=0, base_s=10, s_per_mvox=6, t1_s_per_mvox=0,
                      floor_mb=3000, floor_min=20),
    "dwi": StageCost(base_mb=320, mb_per_mvox=10, t1_mb_per_mvox=15, base_s=10, s_per_mvox=0.6, t1_s_per_mvox=3,
                     floor_mb=4000, floor_min=30),
    "func": StageCost(base_mb=270, mb_per_mvox=6, t1_mb_per_mvox=10, base_s=10, s_per_mvox=1.0, t1_s_per_mvox=3,
                      floor_mb=4000, floor_min=30),
}


@dataclass(frozen=True)
class Estimate:
    """A job's resources: ``mem_mb`` (MB) and ``runtime_min`` (minutes), integers."""

    mem_mb: int
    runtime_min: int


def estimate(stage: str, image_voxels: int, t1w_voxels: int = 0, attempt: int = 1) -> Estimate:
    """Resources of one ``stage`` job (anat, dwi, func) whose own image has ``image_voxels`` voxel-volumes
    (X * Y * Z * T) and whose T1w grid ``t1w_voxels`` voxels, at Snakemake's ``attempt`` (1 first).
    Pure arithmetic: ``STAGE_COSTS[stage]`` with ``MEM_MARGIN`` / ``TIME_MARGIN``, floored, times ``attempt``."""
    if stage not in STAGE_COSTS:
        raise ValueError(f"no resource estimate for stage {stage!r}; one of {sorted(STAGE_COSTS)}")
    if image_voxels < 0 or t1w_voxels < 0 or attempt < 1:
        raise ValueError(f"voxel counts must be >= 0 and attempt >= 1, got {image_voxels}, {t1w_voxels}, {attempt}")
    c = STAGE_COSTS[stage]
    mvox, t1 = image_voxels / 1e6, t1w_voxels / 1e6
    mem = max(c.floor_mb, math.ceil(MEM_MARGIN * (c.base_mb + c.mb_per_mvox * mvox + c.t1_mb_per_mvox * t1)))
    minutes = max(c.floor_min, math.ceil(TIME_MARGIN * (c.base_s + c.s_per_mvox * mvox + c.t1_s_per_mvox * t1) / 60))
    return Estimate(mem_mb=int(mem) * int(attempt), runtime_min=int(minutes) * int(attempt))


def image_voxels(path: str | Path) -> int:
    """Voxels (times volumes) of a NIfTI image, from its header alone (.nii or .nii.gz); cached per file
    version (path, size, mtime), so each image is read once however many jobs and resources ask."""
    st = os.stat(path)
    return _header_voxels(str(path), st.st_size, st.st_mtime_ns)


@cache
def _header_voxels(path: str, size: int, mtime_ns: int) -> int:
    del size, mtime_ns  # the cache key: a rewritten file is read again
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            shape = nib.Nifti1Header.from_fileobj(fh).get_data_shape()  # 348 bytes, not nib.load's ~5x cost
    except Exception:  # NIfTI-2, or anything else nibabel reads: let it decide the format
        shape = nib.load(path).shape
    return math.prod(int(n) for n in shape)


def job_estimate(stage: str, image: str | Path, t1w: str | Path | None = None, attempt: int = 1) -> Estimate:
    """``estimate`` for a job whose own image is the file ``image`` and whose T1w grid is that of ``t1w``
    (dwi, func; a missing T1w counts 0 voxels: the floor and the series still size the job)."""
    t1 = image_voxels(t1w) if t1w is not None and os.path.exists(t1w) else 0
    return estimate(stage, image_voxels(image), t1, attempt)
