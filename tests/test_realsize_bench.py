"""bench/realsize.py: its scanner field of view keeps the head where it was, its memory figures see the job's
process tree, and (slow) a --small run writes the record the clinical run will."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import realsize  # noqa: E402


def test_scanner_fov_pads_with_air_and_keeps_every_voxel_in_place(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(1, 500, size=(73, 86, 72)).astype(np.int16)
    affine = np.array([[-2.5, 0, 0, 90], [0, 2.5, 0, -126], [0, 0, 2.5, -72], [0, 0, 0, 1]])
    path = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    shape = realsize.pad_to_fov(path)
    assert shape == (77, 103, 103)  # ceil(192 / 2.5), ceil(256 / 2.5) x 2
    img = nib.load(path)
    out = np.asanyarray(img.dataobj)
    assert img.get_data_dtype() == np.int16 and out.shape == shape
    assert out.sum() == data.sum() and np.count_nonzero(out) == data.size  # only air was added
    # a voxel of the old grid and the voxel of the new grid at the same world point hold the same value
    ijk = np.array([10, 20, 30])
    world = affine @ np.r_[ijk, 1]
    new_ijk = np.rint(np.linalg.inv(img.affine) @ world)[:3].astype(int)
    assert out[tuple(new_ijk)] == data[tuple(ijk)]
    np.testing.assert_allclose(img.header.get_best_affine(), img.affine)


def test_memory_figures_see_a_grandchild(tmp_path: Path) -> None:
    """The job runs under Snakemake, not as the command itself: a 200 MB grandchild must show in both figures."""
    job = "b = bytearray(200 * 2**20); import time; time.sleep(0.6)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {job!r}], check=True)"
    rec = realsize.run_measured([sys.executable, "-c", parent], tmp_path, tmp_path / "x.log")
    assert rec["peak_rss_mb"] >= 190 and rec["max_rss_getrusage_mb"] >= 200
    assert rec["peak_tree_rss_mb"] > rec["peak_rss_mb"] and rec["samples"] >= 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_run_writes_the_record(tmp_path: Path) -> None:
    out = tmp_path / "realsize.json"
    # the anat stage only (the others are measured the same way; CI time): the record's whole schema
    realsize.main(["--small", "--no-scanner-fov", "--stages", "anat", "--registration", "affine",
                   "--workdir", str(tmp_path / "work"), "--out", str(out)])
    rec = json.loads(out.read_text())
    assert not (tmp_path / "work").exists()  # removed without --keep
    assert rec["size"] == "small" and rec["cores"] == 2 and rec["machine"]["cores"] and rec["registration"] == "affine"
    assert list(rec["subjects"]) == ["template_fov"]  # the padding has its own test above
    for name, sub in rec["subjects"].items():
        assert list(sub["stages"]) == ["anat"] == rec["stages_run"]
        for stage, s in sub["stages"].items():
            assert s["wall_s"] > 0 and s["job_s"] > 0 and s["peak_rss_mb"] > 100, (name, stage, s)
            assert s["benchmark_file_max_rss_mb"] > 100 and s["max_rss_getrusage_mb"] > 100
            if stage != "cache_subject":
                assert s["estimate"]["covers_peak"] and s["estimate"]["covers_wall"]
        assert sub["disk"]["per_subject_bytes"] == sub["disk"]["derivatives_bytes"] + sub["disk"]["cache_bytes"] > 0
    assert rec["total_wall_s"] == rec["subjects"]["template_fov"]["total_wall_s"]
    assert rec["peak_rss_mb"] > 100 and rec["disk_bytes_per_subject"] > 0 and "met" in rec["acceptance"]
