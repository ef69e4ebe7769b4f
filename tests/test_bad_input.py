"""Bad input a real cohort throws: each case is caught at start-up (or handled) with subject, file and fix.

Each test builds its faulty copy of the tiny synthetic cohort. Start-up means `neuromoe validate` /
``validate_dataset`` and the workflow's own start (``snakemake -n``), before any job.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import snakemake_cmd, write_workdir

from neuromoe import paths
from neuromoe.config import ConfigError, validate_config
from neuromoe.errors import StageError, ValidationReport
from neuromoe.inputs.bids import validate_dataset


@pytest.fixture
def bids(synth_cohort: Path, tmp_path: Path) -> Path:
    """A writable copy of the 6-subject synthetic cohort (2 per diagnosis)."""
    return Path(shutil.copytree(synth_cohort, tmp_path / "bids"))


def problems_of(bids: Path, **cfg) -> list:
    with pytest.raises(ValidationReport) as info:
        validate_dataset(bids, validate_config({"bids_dir": str(bids), **cfg}))
    return info.value.problems


def only(problems: list, subject: str):
    mine = [p for p in problems if p.subject == subject]
    assert len(mine) == 1 and len(problems) == 1, [p.format() for p in problems]
    assert mine[0].fix, mine[0].format()
    return mine[0]


def test_zero_affine_t1w_is_refused_at_startup(bids: Path) -> None:
    f = bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    img = nib.load(f)
    raw, hdr = img.dataobj.get_unscaled(), img.header.copy()
    for row in ("srow_x", "srow_y", "srow_z"):
        hdr[row] = 0.0
    hdr["sform_code"], hdr["qform_code"] = 1, 0  # nibabel itself refuses to write such a header: by hand
    with gzip.open(f, "wb") as fh:
        hdr.write_to(fh)  # the 348-byte header and the 4-byte extension flag: the data follow at 352
        fh.write(np.asarray(raw, dtype=hdr.get_data_dtype()).tobytes(order="F"))
    assert not np.linalg.det(nib.load(f).affine[:3, :3])
    p = only(problems_of(bids), "sub-02")
    assert p.path == "sub-02/anat/sub-02_T1w.nii.gz" and "affine" in p.cause and "sform" in p.fix


def test_zero_bvector_on_a_weighted_volume_is_refused_at_startup(bids: Path) -> None:
    bval = np.loadtxt(bids / "sub-03" / "dwi" / "sub-03_dwi.bval")
    f = bids / "sub-03" / "dwi" / "sub-03_dwi.bvec"
    vecs = np.loadtxt(f)
    k = int(np.flatnonzero(bval > 500)[0])
    vecs[:, k] = 0.0
    np.savetxt(f, vecs, fmt="%.6f")
    p = only(problems_of(bids), "sub-03")
    assert p.path.endswith("sub-03_dwi.bvec") and f"volume(s) {k}" in p.cause and f"b = {bval[k]:g}" in p.cause


def test_nan_in_bval_is_refused_at_startup(bids: Path) -> None:
    f = bids / "sub-01" / "dwi" / "sub-01_dwi.bval"
    vals = f.read_text().split()
    vals[3] = "nan"
    f.write_text(" ".join(vals) + "\n")
    p = only(problems_of(bids), "sub-01")
    assert p.path.endswith("sub-01_dwi.bval") and "nan" in p.cause and "volume(s) 3" in p.cause


def test_too_short_bold_is_refused_at_startup(bids: Path) -> None:
    f = bids / "sub-04" / "func" / "sub-04_task-rest_bold.nii.gz"
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., :10], img.affine, img.header), f)
    p = only(problems_of(bids), "sub-04")
    assert p.path.endswith("_bold.nii.gz") and "10 volumes" in p.cause and "dummy_scans" in p.fix


def test_missing_repetition_time_says_missing(bids: Path) -> None:
    f = bids / "sub-05" / "func" / "sub-05_task-rest_bold.json"
    meta = json.loads(f.read_text())
    del meta["RepetitionTime"]
    f.write_text(json.dumps(meta))
    p = only(problems_of(bids), "sub-05")
    assert "RepetitionTime is missing" in p.cause and "None" not in p.format()


def test_a_nii_gz_that_is_not_gzip_needs_gzip_not_a_reexport(bids: Path) -> None:
    f = bids / "sub-06" / "anat" / "sub-06_T1w.nii.gz"
    f.write_bytes(gzip.decompress(f.read_bytes()))
    p = only(problems_of(bids), "sub-06")
    assert "not gzip-compressed" in p.cause and "gzip" in p.fix and ".nii" in p.fix


def test_uncompressed_nii_is_accepted_everywhere(bids: Path, tmp_path: Path) -> None:
    sub = bids / "sub-01"
    for f in [*sub.glob("*/*.nii.gz")]:
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    ds = validate_dataset(bids, validate_config({"bids_dir": str(bids)}))
    assert all(ds.subjects["01"].has(m) for m in ("anat", "dwi", "func"))
    assert paths.raw(bids, "01", "bold").endswith("sub-01_task-rest_bold.nii")
    work = write_workdir(tmp_path / "work", bids)
    res = subprocess.run(snakemake_cmd(work, "-n", "--cores", "1", "participant"),  # preprocessing's plan
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    for name in ("sub-01_T1w.nii", "sub-01_dwi.nii", "sub-01_task-rest_bold.nii"):
        assert re.search(rf"{name}(,|\s)", res.stdout), (name, res.stdout[-3000:])


def test_label_with_other_characters_says_which_are_allowed(bids: Path) -> None:
    (bids / "sub-01").rename(bids / "sub-0_1")
    text = "\n".join(p.format() for p in problems_of(bids))
    assert "'_'" in text and "A-Z, a-z" in text and "0-9" in text


def test_yaml_exponent_read_as_text_gets_a_hint() -> None:
    with pytest.raises(ConfigError, match=r"train.lr: '1e-3' is not of type 'number' \(YAML read 1e-3 as text"):
        validate_config({"bids_dir": "x", **yaml.safe_load("train:\n  lr: 1e-3\n")})


def test_too_few_subjects_per_class_for_the_folds_stops_at_startup(bids: Path, tmp_path: Path) -> None:
    work = write_workdir(tmp_path / "work", bids)  # config.yaml: 5 folds; 2 subjects per class here
    res = subprocess.run(snakemake_cmd(work, "-n", "--cores", "1"), capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "stratified 5-fold cv" in out and "'HC' has 2" in out, out[-3000:]
    assert "fix: even 2 folds need 4 subjects per class (with the validation part)" in out
    assert not (work / "results").exists()
    # preprocessing alone needs no splits: the participant level still plans
    res = subprocess.run(snakemake_cmd(work, "-n", "--cores", "1", "participant"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_t1w_with_a_few_nan_voxels_is_handled_with_a_warning(bids: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    from neuromoe.config import AnatConfig
    from neuromoe.preproc import anat

    f = bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    img = nib.load(f)
    data = np.asarray(img.dataobj, dtype=np.float32)
    rng = np.random.default_rng(0)
    np.put(data, rng.choice(data.size, data.size // 90, replace=False), np.nan)  # 1.1 %, as reported
    nib.save(nib.Nifti1Image(data, img.affine), f)  # float32 (the int16 original cannot hold NaN)
    outputs = {k: paths.derivative(tmp_path / "out", "01", k) for k in paths.stage_outputs("anat_")
               if not k.endswith("_json")}  # the sidecars are run_stage's
    outputs["qc_anat_mask"] = paths.derivative(tmp_path / "out", "01", "qc_anat_mask")
    with caplog.at_level(logging.WARNING):
        anat.run_anat(f, outputs, "01", AnatConfig.of({"registration": "affine"}), threads=1)
    assert all(Path(p).exists() for p in outputs.values())
    assert any("1.11% of the voxels" in r.getMessage() and str(f) in r.getMessage() for r in caplog.records)
    brain = np.asarray(nib.load(outputs["anat_brain_mni"]).dataobj)
    assert np.isfinite(brain).all() and brain.max() > 0
    # mostly NaN is no head: refused, with the fix
    data[...] = np.nan
    with pytest.raises(StageError, match="NaN or infinite: too little image") as info:
        anat.check_t1(nib.Nifti1Image(data, img.affine), "01")
    assert info.value.fix


@pytest.mark.parametrize(("argv", "expected"), [
    ([], True), (["--cores", "2", "-n"], True), (["all"], True), (["--cores", "2", "--scheduler-subsample", "9"], True),
    (["participant"], False), (["--until", "anat"], False), (["cache_cohort"], False), (["--lint"], False),
    (["--summary"], False), (["--report", "r.zip"], False), (["--unlock"], False), (["--dag"], False),
])
def test_start_up_knows_which_invocations_train(argv: list[str], expected: bool) -> None:
    """The class-size check runs only for invocations that make splits (neuromoe.smk.trains)."""
    from snakemake.cli import get_argument_parser

    from neuromoe.smk import trains

    assert trains(get_argument_parser().parse_known_args(argv)[0]) is expected
    assert trains(None) is False
