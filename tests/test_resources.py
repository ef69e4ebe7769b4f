"""neuromoe.preproc.resources: the preprocessing rules' memory and walltime grow with their inputs.

The growth is checked on header-only NIfTI files (348 bytes each: what a 300- and a 1,200-volume BOLD say they
hold, no data), which is all the estimate reads; one dry run of the workflow shows the rules use it.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import coarse_params, snakemake_cmd, write_workdir

from neuromoe import paths
from neuromoe.preproc.resources import STAGE_COSTS, Estimate, estimate, image_voxels, job_estimate

CLINICAL_BOLD = (61, 72, 57)  # 3 mm
MULTIBAND_BOLD = (104, 90, 72)  # 2 mm, HCP-like
CLINICAL_DWI = (91, 108, 85)  # 2 mm
CLINICAL_T1W = (181, 214, 182)  # 1 mm
SCANNER_T1W = (192, 256, 256)


def header_only(path: Path, shape: tuple[int, ...], dtype: type = np.int16) -> Path:
    """A NIfTI file holding only a header that says ``shape`` (no voxel data: reading the data would fail)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as fh:
        hdr.write_to(fh)
    return path


def test_header_only_files_are_read_without_their_data(tmp_path: Path) -> None:
    gz = header_only(tmp_path / "bold.nii.gz", (*CLINICAL_BOLD, 304))
    plain = header_only(tmp_path / "t1w.nii", CLINICAL_T1W)
    assert image_voxels(gz) == int(np.prod(CLINICAL_BOLD)) * 304
    assert image_voxels(plain) == int(np.prod(CLINICAL_T1W))
    with pytest.raises(Exception):  # noqa: B017 - the data really is absent
        np.asanyarray(nib.load(gz).dataobj)


def test_a_rewritten_image_is_read_again(tmp_path: Path) -> None:
    p = header_only(tmp_path / "bold.nii.gz", (*CLINICAL_BOLD, 304))
    assert image_voxels(p) == int(np.prod(CLINICAL_BOLD)) * 304
    header_only(p, (*CLINICAL_BOLD, 1204))  # the same bytes but one number: the cache key is (path, size, mtime)
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert image_voxels(p) == int(np.prod(CLINICAL_BOLD)) * 1204


@pytest.mark.parametrize("stage, grid", [("func", MULTIBAND_BOLD), ("dwi", CLINICAL_DWI)])
def test_memory_and_time_grow_with_the_series(stage: str, grid: tuple[int, ...], tmp_path: Path) -> None:
    """A 1,200-volume series is not scheduled with the resources of a 300-volume one (func at 2 mm: a 3 mm
    1,200-volume BOLD needs ~2.1 GB, within the func floor of 4 GB)."""
    t1w = header_only(tmp_path / "t1w.nii.gz", CLINICAL_T1W)
    short = job_estimate(stage, header_only(tmp_path / "short.nii.gz", (*grid, 304)), t1w)
    long = job_estimate(stage, header_only(tmp_path / "long.nii.gz", (*grid, 1204)), t1w)
    assert long.mem_mb > short.mem_mb and long.runtime_min >= short.runtime_min
    c = STAGE_COSTS[stage]
    # beyond the floor, the memory rises by the per-voxel cost of the 900 added volumes (with the margin)
    if short.mem_mb > c.floor_mb:
        assert long.mem_mb - short.mem_mb >= c.mb_per_mvox * np.prod(grid) * 900 / 1e6


def test_a_clinical_bold_asks_for_the_old_constant_and_a_multiband_one_for_what_its_series_holds() -> None:
    """The func job holds its series as float32 about 1.5 times at most (the int16 file read and converted; then
    realigned in place, and only the brain's rows kept), so a 1,200-volume multiband BOLD asks for that."""
    clinical = estimate("func", int(np.prod(CLINICAL_BOLD)) * 304, int(np.prod(CLINICAL_T1W)))
    voxels = int(np.prod(MULTIBAND_BOLD)) * 1200  # HCP-like, 2 mm, TR 0.72 s
    multiband = estimate("func", voxels, int(np.prod(CLINICAL_T1W)))
    assert clinical.mem_mb >= STAGE_COSTS["func"].floor_mb
    assert multiband.mem_mb > 1.5 * 4 * voxels / 1e6 and multiband.mem_mb > clinical.mem_mb


def test_the_t1w_grid_counts_for_anat_dwi_and_func() -> None:
    t1, scanner = int(np.prod(CLINICAL_T1W)), int(np.prod(SCANNER_T1W))
    assert estimate("anat", scanner).mem_mb >= estimate("anat", t1).mem_mb
    for stage in ("dwi", "func"):
        series = int(np.prod(CLINICAL_BOLD)) * 304
        assert estimate(stage, series, scanner).mem_mb >= estimate(stage, series, t1).mem_mb


@pytest.mark.parametrize("stage", sorted(STAGE_COSTS))
def test_floors_are_the_old_constants_and_values_are_integers(stage: str) -> None:
    tiny = estimate(stage, 1000, 1000)
    assert tiny == Estimate(STAGE_COSTS[stage].floor_mb, STAGE_COSTS[stage].floor_min)
    assert {"anat": (3000, 20), "dwi": (4000, 30), "func": (4000, 30)}[stage] == (tiny.mem_mb, tiny.runtime_min)
    big = estimate(stage, 10**9, 10**7)
    assert type(big.mem_mb) is int and type(big.runtime_min) is int


@pytest.mark.parametrize("voxels", [1000, 76_000_000, 800_000_000])
def test_each_retry_asks_for_more(voxels: int) -> None:
    first = estimate("func", voxels, 7_000_000)
    for attempt in (2, 3):
        again = estimate("func", voxels, 7_000_000, attempt=attempt)
        assert again == Estimate(first.mem_mb * attempt, first.runtime_min * attempt)


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="cache"):
        estimate("cache", 10)
    with pytest.raises(ValueError, match="attempt"):
        estimate("func", 10, attempt=0)
    with pytest.raises(ValueError, match="-5"):
        estimate("func", -5)


def test_a_missing_t1w_counts_nothing(tmp_path: Path) -> None:
    bold = header_only(tmp_path / "bold.nii.gz", (*CLINICAL_BOLD, 304))
    assert job_estimate("func", bold, tmp_path / "absent.nii.gz") == estimate("func", image_voxels(bold))


def test_the_workflow_sizes_each_preprocessing_job_from_its_images(tmp_path: Path) -> None:
    """A dry run prints each job's resources: those of job_estimate on the subject's own images."""
    from neuromoe.inputs.synth import make_cohort

    bids = make_cohort(tmp_path / "bids", 1, seed=3, params=coarse_params())
    wd = write_workdir(tmp_path / "wd", bids)
    run = subprocess.run(snakemake_cmd(wd, "--cores", "1", "participant", "--dry-run"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    t1w = paths.raw(bids, "01", "T1w")
    for stage, image in (("anat", "T1w"), ("dwi", "dwi"), ("func", "bold")):
        block = re.search(rf"(?ms)^rule {stage}:\n.*?^\s+resources: (.*?)$", run.stdout)
        assert block, run.stdout[-4000:]
        res = dict(kv.split("=", 1) for kv in block.group(1).split(", "))
        want = job_estimate(stage, paths.raw(bids, "01", image), None if stage == "anat" else t1w)
        assert (int(res["mem_mb"]), int(res["runtime"])) == (want.mem_mb, want.runtime_min), block.group(0)
