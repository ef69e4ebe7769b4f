"""Input validation: every bad-input case gives one clear error naming the subject, the file and the fix.

Each test copies the tiny synthetic cohort, plants exactly one fault, and checks the report.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neuromoe.config import load_config
from neuromoe.errors import ValidationReport
from neuromoe.inputs.bids import validate_dataset


@pytest.fixture
def cfg() -> dict:
    return load_config()


@pytest.fixture
def bids(synth_cohort: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bids"
    shutil.copytree(synth_cohort, dst, ignore=shutil.ignore_patterns("derivatives"))
    return dst


def only_problem(bids: Path, cfg: dict) -> str:
    with pytest.raises(ValidationReport) as exc:
        validate_dataset(bids, cfg)
    assert len(exc.value.problems) == 1, str(exc.value)
    return str(exc.value.problems[0])


def test_clean_cohort_validates(bids: Path, cfg: dict) -> None:
    ds = validate_dataset(bids, cfg)
    assert sorted(ds.subjects) == sorted(p.name[4:] for p in bids.glob("sub-*"))
    assert all(sub.has(m) for sub in ds.subjects.values() for m in ("anat", "dwi", "func"))
    assert ds.warnings == []


def test_missing_bval(bids: Path, cfg: dict) -> None:
    (bids / "sub-02/dwi/sub-02_dwi.bval").unlink()
    msg = only_problem(bids, cfg)
    assert "sub-02" in msg and "sub-02_dwi.bval" in msg and "fix:" in msg


def test_bval_count_disagrees_with_volumes(bids: Path, cfg: dict) -> None:
    p = bids / "sub-01/dwi/sub-01_dwi.bval"
    vals = p.read_text().split()
    p.write_text(" ".join(vals[:-1]) + "\n")
    msg = only_problem(bids, cfg)
    assert "sub-01" in msg and f"{len(vals) - 1} b-values" in msg and f"{len(vals)} volumes" in msg


def test_bvec_count_disagrees(bids: Path, cfg: dict) -> None:
    p = bids / "sub-01/dwi/sub-01_dwi.bvec"
    rows = [r.split() for r in p.read_text().strip().splitlines()]
    p.write_text("\n".join(" ".join(r[:-2]) for r in rows) + "\n")
    msg = only_problem(bids, cfg)
    assert "sub-01" in msg and "b-vectors" in msg and "sub-01_dwi.bvec" in msg


def test_3d_image_where_4d_needed(bids: Path, cfg: dict) -> None:
    p = bids / "sub-03/func/sub-03_task-rest_bold.nii.gz"
    img = nib.load(p)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), p)
    msg = only_problem(bids, cfg)
    assert "sub-03" in msg and "3D" in msg and "4D" in msg and "sub-03_task-rest_bold.nii.gz" in msg


def test_truncated_nifti(bids: Path, cfg: dict) -> None:
    p = bids / "sub-02/anat/sub-02_T1w.nii.gz"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    msg = only_problem(bids, cfg)
    assert "sub-02" in msg and "sub-02_T1w.nii.gz" in msg and ("truncated" in msg or "cannot read" in msg)


def test_unreadable_nifti(bids: Path, cfg: dict) -> None:
    p = bids / "sub-01/anat/sub-01_T1w.nii.gz"
    p.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    msg = only_problem(bids, cfg)
    assert "sub-01" in msg and "cannot read" in msg


def test_a_cluster_jobs_discovery_reads_no_file_and_finds_the_same_units(bids: Path, cfg: dict) -> None:
    """check_files=False (a cluster job's Snakemake, after the main process checked everything): the same units
    and modalities, from the layout alone; a broken image is not even opened."""
    full = validate_dataset(bids, cfg)
    (bids / "sub-01/anat/sub-01_T1w.nii.gz").write_bytes(b"not a nifti")
    (bids / "sub-02/dwi/sub-02_dwi.bval").write_text("0 1000\n")
    quick = validate_dataset(bids, cfg, check_files=False)
    assert {k: (u.present, u.session, u.anat_session) for k, u in quick.subjects.items()} == \
        {k: (u.present, u.session, u.anat_session) for k, u in full.subjects.items()}
    with pytest.raises(ValidationReport, match="sub-01_T1w.nii.gz"):
        validate_dataset(bids, cfg)


def test_subject_in_table_without_images(bids: Path, cfg: dict) -> None:
    df = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str)
    extra = df.iloc[[0]].copy()
    extra["participant_id"] = "sub-99"
    pd.concat([df, extra]).to_csv(bids / "participants.tsv", sep="\t", index=False)
    msg = only_problem(bids, cfg)
    assert "sub-99" in msg and "no folder" in msg


def test_unknown_diagnosis_label(bids: Path, cfg: dict) -> None:
    df = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str)
    df.loc[1, "diagnosis"] = "Parkinson"
    df.to_csv(bids / "participants.tsv", sep="\t", index=False)
    msg = only_problem(bids, cfg)
    assert df.loc[1, "participant_id"] in msg and "'Parkinson'" in msg and "participants.labels" in msg


def test_non_numeric_clinical_value(bids: Path, cfg: dict) -> None:
    df = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str)
    df.loc[0, "moca"] = "twenty"
    df.to_csv(bids / "participants.tsv", sep="\t", index=False)
    msg = only_problem(bids, cfg)
    assert df.loc[0, "participant_id"] in msg and "moca" in msg and "'twenty'" in msg


def test_missing_repetition_time(bids: Path, cfg: dict) -> None:
    p = bids / "sub-01/func/sub-01_task-rest_bold.json"
    meta = json.loads(p.read_text())
    meta.pop("RepetitionTime")
    p.write_text(json.dumps(meta))
    msg = only_problem(bids, cfg)
    assert "sub-01" in msg and "RepetitionTime" in msg


def test_all_problems_reported_at_once(bids: Path, cfg: dict) -> None:
    (bids / "sub-01/dwi/sub-01_dwi.bvec").unlink()
    (bids / "sub-02/dwi/sub-02_dwi.bval").unlink()
    with pytest.raises(ValidationReport) as exc:
        validate_dataset(bids, cfg)
    assert len(exc.value.problems) == 2
    assert "2 problem(s)" in str(exc.value)


@pytest.mark.parametrize("policy", ["exclude", "keep"])
def test_missing_modality_policy(bids: Path, cfg: dict, policy: str) -> None:
    shutil.rmtree(bids / "sub-02" / "func")
    cfg["participants"]["missing_modality"] = policy
    ds = validate_dataset(bids, cfg)
    assert any("sub-02" in w and "func" in w for w in ds.warnings)
    if policy == "exclude":
        assert "02" not in ds.subjects
    else:
        assert ds.subjects["02"].has("anat") and not ds.subjects["02"].has("func")
        assert "02" not in ds.with_modality("func")
