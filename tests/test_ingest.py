"""Starting from fMRIPrep / QSIPrep outputs (inputs.derivatives): discovery, the maps, the plan.

The derivative trees are written here in those tools' layout and names from our own preprocessing of the same
subject, each series moved into the tool's T1w space exactly (the rigid BOLD -> T1w or DWI -> T1w transform folded
into the image's affine: the same voxels, the world coordinates fMRIPrep's and QSIPrep's ``space-T1w`` files
have) and the T1w -> MNI transform written as the tools write it (an ITK ``.h5``). Maps computed from such a tree
must then be those of our own run: only the order of float operations differs.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from conftest import REPO, coarse_params, snakemake_cmd

from neuromoe import paths
from neuromoe.errors import InputError, ValidationReport
from neuromoe.inputs.ingested import discover, find_fmriprep, find_qsiprep
from neuromoe.inputs.synth import make_cohort
from neuromoe.preproc import registration as reg
from neuromoe.preproc import run_stage
from neuromoe.preproc.ingest import leading_outliers, run_ingested

CFG = {"preprocessing": {"backend": "python", "keep_series": True, "anat": {"registration": "affine"}}}
SUB = "01"
MNI = "MNI152NLin2009cAsym"
# Maps from an ingested tree against our own run's: the series is regressed a second time (a projection: the
# same residuals up to float32 rounding) and the MNI resampling composes the same transform in another order.
RTOL = 3e-3  # of each map's largest value (measured: fALFF 2e-4, ReHo 8e-4 (ranks of values equal to float32
# rounding can swap), tensor maps 1e-6)


def _outputs(out, prefix):
    return {k: paths.derivative(out, SUB, k) for k in paths.stage_outputs(prefix, keep_series=True)}


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """Two coarse subjects; subject 01 preprocessed by our own stages, the series kept."""
    work = tmp_path_factory.mktemp("ingest")
    bids = make_cohort(work / "bids", 2, seed=21, params=coarse_params())
    out = work / "own"
    raw = {k: paths.raw(bids, SUB, k) for k in ("T1w", "dwi", "bval", "bvec", "bold", "bold_json")}
    anat_out = _outputs(out, "anat_")
    run_stage("anat", {"t1w": raw["T1w"]}, anat_out, SUB, CFG)
    anat_in = {"anat_brain": anat_out["anat_brain"], "anat_mask": anat_out["anat_mask"],
               "anat_xfm": anat_out["anat_xfm"]}
    run_stage("dwi", {"dwi": raw["dwi"], "bval": raw["bval"], "bvec": raw["bvec"], **anat_in}, _outputs(out, "dwi_"),
              SUB, CFG)
    run_stage("func", {"bold": raw["bold"], "bold_json": raw["bold_json"], **anat_in}, _outputs(out, "func_"), SUB,
              CFG)
    return {"work": work, "bids": bids, "out": out, "raw": raw}


def _in_t1w(src, xfm, dst, mask=False):
    """``src`` with the rigid transform ``xfm`` (T1w points -> series points) folded into its affine: the same
    voxels, at their T1w-space coordinates."""
    img = nib.load(src)
    affine = np.linalg.inv(reg.transform_to_ras(reg.read_transform(xfm))) @ img.affine
    data = np.asarray(img.dataobj)
    out = nib.Nifti1Image(data.astype(np.uint8) if mask else data, affine, img.header)
    out.set_sform(affine, 1)
    out.set_qform(affine, 1)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, dst)
    return img


def _description(root, name):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": f"{name} outputs", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": name, "Version": "24.1.1"}]}))


def _xfm_h5(own, root):
    dst = root / f"sub-{SUB}" / "anat" / f"sub-{SUB}_from-T1w_to-{MNI}_mode-image_xfm.h5"
    dst.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(reg.read_transform(paths.derivative(own["out"], SUB, "anat_xfm")), str(dst))


N_NON_STEADY = 2


@pytest.fixture(scope="module")
def fmriprep(own):
    """fMRIPrep's layout, space-T1w, with two leading volumes it flagged as non-steady-state (copies of the
    first: ingestion must drop them)."""
    root = own["work"] / "fmriprep"
    _description(root, "fMRIPrep")
    func = root / f"sub-{SUB}" / "func"
    stem = f"sub-{SUB}_task-rest"
    xfm = paths.derivative(own["out"], SUB, "func_xfm")
    bold = func / f"{stem}_space-T1w_desc-preproc_bold.nii.gz"
    series = _in_t1w(paths.derivative(own["out"], SUB, "func_preproc"), xfm, bold)
    data = np.asarray(series.dataobj)
    data = np.concatenate([data[..., :N_NON_STEADY], data], axis=3)
    img = nib.load(bold)
    img = nib.Nifti1Image(data, img.affine, img.header)
    img.header.set_data_shape(data.shape)
    nib.save(img, bold)
    _in_t1w(paths.derivative(own["out"], SUB, "func_mask"), xfm, func / f"{stem}_space-T1w_desc-brain_mask.nii.gz",
            mask=True)
    conf = pd.read_csv(paths.derivative(own["out"], SUB, "func_confounds"), sep="\t")
    conf = pd.concat([conf.iloc[:N_NON_STEADY], conf], ignore_index=True)
    for i in range(N_NON_STEADY):
        conf[f"non_steady_state_outlier{i:02d}"] = (np.arange(len(conf)) == i).astype(int)
    conf.to_csv(func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")
    shutil.copy(own["raw"]["bold_json"], func / f"{stem}_space-T1w_desc-preproc_bold.json")
    _xfm_h5(own, root)
    return root


@pytest.fixture(scope="module")
def qsiprep(own):
    """QSIPrep's layout, space-T1w: our corrected series, its rotated gradients, mask and motion."""
    root = own["work"] / "qsiprep"
    _description(root, "qsiprep")
    dwi = root / f"sub-{SUB}" / "dwi"
    stem = f"sub-{SUB}_space-T1w_desc-preproc_dwi"
    xfm = paths.derivative(own["out"], SUB, "dwi_xfm")
    _in_t1w(paths.derivative(own["out"], SUB, "dwi_preproc"), xfm, dwi / f"{stem}.nii.gz")
    shutil.copy(paths.derivative(own["out"], SUB, "dwi_bval"), dwi / f"{stem}.bval")
    shutil.copy(paths.derivative(own["out"], SUB, "dwi_bvec"), dwi / f"{stem}.bvec")
    _in_t1w(paths.derivative(own["out"], SUB, "dwi_mask"), xfm, dwi / f"sub-{SUB}_space-T1w_desc-brain_mask.nii.gz",
            mask=True)
    shutil.copy(paths.derivative(own["out"], SUB, "dwi_motion"), dwi / f"sub-{SUB}_desc-confounds_timeseries.tsv")
    _xfm_h5(own, root)
    return root


def _agree(ours_path, theirs_path):
    ours = np.asarray(nib.load(ours_path).dataobj, dtype=float)
    theirs = np.asarray(nib.load(theirs_path).dataobj, dtype=float)
    assert ours.shape == theirs.shape
    scale = np.abs(ours).max()
    assert scale > 0
    print(f"{ours_path.name if hasattr(ours_path, 'name') else ours_path}: {np.abs(ours - theirs).max() / scale:.1e}")
    assert np.abs(ours - theirs).max() <= RTOL * scale, (ours_path, np.abs(ours - theirs).max() / scale)


def test_fmriprep_bold_gives_our_maps(own, fmriprep, tmp_path):
    found = find_fmriprep(fmriprep, SUB)
    assert found is not None and found.space == "T1w" and found.files["xfm"].endswith(".h5")
    outputs = {k: paths.derivative(tmp_path, SUB, k) for k in paths.stage_outputs("func_") if k != "func_xfm"}
    outputs |= {k: paths.derivative(tmp_path, SUB, k) for k in ("qc_func_maps", "qc_func_motion")}
    run_ingested("func", {**found.files, "raw_json": own["raw"]["bold_json"]}, outputs, SUB,
                 {**CFG, "inputs": {"derivatives": {"fmriprep": str(fmriprep)}}})
    for key in ("func_falff", "func_reho", "func_falff_mni", "func_reho_mni"):
        _agree(paths.derivative(own["out"], SUB, key), outputs[key])
    ours_mask = np.asarray(nib.load(paths.derivative(own["out"], SUB, "func_mask")).dataobj)
    assert (np.asarray(nib.load(outputs["func_mask"]).dataobj) == ours_mask).all()
    n_ours = len(pd.read_csv(paths.derivative(own["out"], SUB, "func_confounds"), sep="\t"))
    assert len(pd.read_csv(outputs["func_confounds"], sep="\t")) == n_ours  # the flagged volumes dropped
    side = json.loads(open(outputs["func_falff_mni_json"]).read())
    assert f"bids:fmriprep:sub-{SUB}/anat/sub-{SUB}_from-T1w_to-{MNI}_mode-image_xfm.h5" in side["Sources"]
    assert "fMRIPrep" in side["Software"] and not (tmp_path / "func_xfm").exists()


def test_qsiprep_dwi_gives_our_maps(own, qsiprep, tmp_path):
    found = find_qsiprep(qsiprep, SUB)
    assert found is not None and found.space == "T1w" and "mask" in found.files
    outputs = {k: paths.derivative(tmp_path, SUB, k) for k in paths.stage_outputs("dwi_") if k != "dwi_xfm"}
    outputs |= {k: paths.derivative(tmp_path, SUB, k) for k in ("qc_dwi_fa", "qc_dwi_motion")}
    run_ingested("dwi", found.files, outputs, SUB, {**CFG, "inputs": {"derivatives": {"qsiprep": str(qsiprep)}}})
    for m in ("fa", "md", "ad", "rd"):
        _agree(paths.derivative(own["out"], SUB, f"dwi_{m}"), outputs[f"dwi_{m}"])
        _agree(paths.derivative(own["out"], SUB, f"dwi_{m}_mni"), outputs[f"dwi_{m}_mni"])
    side = json.loads(open(outputs["dwi_fa_json"]).read())
    assert side["Sources"][0] == f"bids:qsiprep:sub-{SUB}/dwi/sub-{SUB}_space-T1w_desc-preproc_dwi.nii.gz"


def test_leading_outliers_counts_only_the_first_run_of_flagged_volumes():
    conf = pd.DataFrame({"non_steady_state_outlier00": [1, 0, 0, 0], "non_steady_state_outlier01": [0, 1, 0, 0],
                         "trans_x": 0.0})
    assert leading_outliers(conf) == 2
    assert leading_outliers(pd.DataFrame({"trans_x": [0.0, 1.0]})) == 0


def _tree(root, files):
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("")


def test_a_partial_tree_is_an_error_naming_subject_file_and_fix(tmp_path):
    _tree(tmp_path, ["sub-02/func/sub-02_task-rest_space-T1w_desc-preproc_bold.nii.gz",
                     "sub-02/func/sub-02_task-rest_space-T1w_desc-brain_mask.nii.gz",
                     "sub-02/func/sub-02_task-rest_desc-confounds_timeseries.tsv"])
    with pytest.raises(InputError) as exc:  # no T1w -> MNI transform
        find_fmriprep(tmp_path, "02")
    text = str(exc.value)
    assert "sub-02" in text and "from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5" in text and "fix" in text
    (tmp_path / "sub-02/func/sub-02_task-rest_desc-confounds_timeseries.tsv").unlink()
    _tree(tmp_path, ["sub-02/anat/sub-02_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5"])
    with pytest.raises(InputError, match="confounds table"):
        find_fmriprep(tmp_path, "02")


def test_mni_space_is_preferred_and_sessions_and_other_tasks_are_kept_apart(tmp_path):
    mni = "space-MNI152NLin2009cAsym_res-2"
    _tree(tmp_path, [f"sub-03/ses-1/func/sub-03_ses-1_task-rest_{mni}_desc-preproc_bold.nii.gz",
                     f"sub-03/ses-1/func/sub-03_ses-1_task-rest_{mni}_desc-brain_mask.nii.gz",
                     # the same run at another resolution: the 2 mm one is read
                     "sub-03/ses-1/func/sub-03_ses-1_task-rest_space-MNI152NLin2009cAsym_res-1_desc-preproc_bold.nii.gz",
                     "sub-03/ses-1/func/sub-03_ses-1_task-rest_desc-confounds_timeseries.tsv",
                     "sub-03/ses-1/func/sub-03_ses-1_task-rest_space-T1w_desc-preproc_bold.nii.gz",
                     f"sub-03/ses-1/func/sub-03_ses-1_task-nback_{mni}_desc-preproc_bold.nii.gz"])
    found = find_fmriprep(tmp_path, "03", "1")
    assert found.space == "MNI152NLin2009cAsym" and "xfm" not in found.files and "_res-2_" in found.files["bold"]
    assert found.files["confounds"].endswith("sub-03_ses-1_task-rest_desc-confounds_timeseries.tsv")
    assert find_fmriprep(tmp_path, "03", "2") is None and find_fmriprep(tmp_path, "04") is None
    _tree(tmp_path, [f"sub-03/ses-1/func/sub-03_ses-1_task-rest_run-2_{mni}_desc-preproc_bold.nii.gz"])
    with pytest.raises(InputError, match="one run per subject"):  # two runs: which one is not ours to guess
        find_fmriprep(tmp_path, "03", "1")


def test_every_incomplete_unit_is_listed_at_once(tmp_path):
    _tree(tmp_path, ["sub-01/dwi/sub-01_space-T1w_desc-preproc_dwi.nii.gz",
                     "sub-02/dwi/sub-02_space-ACPC_desc-preproc_dwi.nii.gz"])

    class Unit:
        def __init__(self, sid):
            self.id, self.session = sid, None

    with pytest.raises(ValidationReport) as exc:
        discover({"inputs": {"derivatives": {"qsiprep": str(tmp_path)}}}, {"01": Unit("01"), "02": Unit("02")})
    assert "sub-01" in str(exc.value) and "sub-02" in str(exc.value) and ".bval" in str(exc.value)
    with pytest.raises(InputError, match="folder not found"):
        discover({"inputs": {"derivatives": {"fmriprep": str(tmp_path / "nope")}}}, {})


def _workdir(own, tmp_path, derivatives):
    cfg = {"bids_dir": str(own["bids"]), "output_dir": "results", "synthetic": {"generate": False},
           "preprocessing": {"anat": {"registration": "affine"}}, "inputs": {"derivatives": derivatives}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def test_the_workflow_plans_no_preprocessing_for_an_ingested_modality(own, fmriprep, qsiprep, tmp_path):
    work = _workdir(own, tmp_path, {"fmriprep": str(fmriprep), "qsiprep": str(qsiprep)})
    run = subprocess.run(snakemake_cmd(work, "-n", "--cores", "1", "participant"), capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = {}
    for block in run.stdout.split("\nrule ")[1:]:
        name = block.split(":", 1)[0]
        sub = block.split("subject=")[1].split(",")[0].split()[0] if "subject=" in block else None
        jobs.setdefault(name, set()).add(sub)
    assert jobs["func_fmriprep"] == {SUB} and jobs["dwi_qsiprep"] == {SUB}
    assert jobs["func"] == {"02"} and jobs["dwi"] == {"02"}  # only the subject without derivatives
    assert "fMRIPrep's BOLD found for 1 of 2 units" in run.stderr
    # and for real: the ingest rules' files, with their sidecars and the dataset's links
    targets = [paths.derivative("results", SUB, k) for k in ("func_falff_mni", "dwi_fa_mni", "dwi_fa_mni_json")]
    run = subprocess.run(snakemake_cmd(work, "--cores", "2", *targets,
                                       "results/derivatives/neuromoe/dataset_description.json"),
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    _agree(paths.derivative(own["out"], SUB, "func_falff_mni"), work / targets[0])
    desc = json.loads((work / "results/derivatives/neuromoe/dataset_description.json").read_text())
    assert desc["DatasetLinks"]["qsiprep"] == f"file://{qsiprep.resolve()}"


def test_a_missing_derivative_file_stops_the_start(own, fmriprep, tmp_path):
    broken = tmp_path / "fmriprep"
    shutil.copytree(fmriprep, broken)
    (broken / f"sub-{SUB}/func/sub-{SUB}_task-rest_desc-confounds_timeseries.tsv").unlink()
    (tmp_path / "w").mkdir()
    work = _workdir(own, tmp_path / "w", {"fmriprep": str(broken)})
    run = subprocess.run(snakemake_cmd(work, "-n", "--cores", "1", "participant"), capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    text = run.stdout + run.stderr
    assert run.returncode != 0
    assert f"sub-{SUB}" in text and "desc-confounds_timeseries.tsv" in text and "fix:" in text
    assert "Traceback" not in text


def test_fmriprep_bold_in_mni_space_gives_maps_like_ours(own, tmp_path):
    """An MNI-space series (fMRIPrep's most common output): our cleaned series resampled onto the 2 mm template
    grid, as fMRIPrep would write it. The maps are then computed after the interpolation instead of before it,
    so they agree in pattern, not voxel for voxel."""
    from neuromoe.inputs.templates import mni_t1

    root = tmp_path / "fmriprep"
    func = root / f"sub-{SUB}" / "func"
    func.mkdir(parents=True)
    stem = f"sub-{SUB}_task-rest_space-{MNI}_res-2"
    mni_to_bold = reg.compose(reg.read_transform(paths.derivative(own["out"], SUB, "anat_xfm")),
                              reg.read_transform(paths.derivative(own["out"], SUB, "func_xfm")))
    grid = mni_t1()
    series = nib.load(paths.derivative(own["out"], SUB, "func_preproc"))
    vols = [reg.resample(nib.Nifti1Image(np.asarray(series.dataobj[..., t]), series.affine), grid, mni_to_bold)
            for t in range(series.shape[3])]
    data = np.stack([np.asarray(v.dataobj) for v in vols], axis=3)
    nib.save(nib.Nifti1Image(data, grid.affine), func / f"{stem}_desc-preproc_bold.nii.gz")
    mask = reg.resample(nib.load(paths.derivative(own["out"], SUB, "func_mask")), grid, mni_to_bold, interp="nearest")
    nib.save(nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.uint8), grid.affine),
             func / f"{stem}_desc-brain_mask.nii.gz")
    shutil.copy(paths.derivative(own["out"], SUB, "func_confounds"),
                func / f"sub-{SUB}_task-rest_desc-confounds_timeseries.tsv")
    found = find_fmriprep(root, SUB)
    assert found.space == MNI and "xfm" not in found.files
    outputs = {k: paths.derivative(tmp_path / "out", SUB, k) for k in paths.stage_outputs("func_") if k != "func_xfm"}
    run_ingested("func", {**found.files, "raw_json": own["raw"]["bold_json"]}, outputs, SUB, CFG)
    from scipy import ndimage

    inside = ndimage.binary_erosion(np.asarray(mask.dataobj) > 0, iterations=2)  # away from the mask's edge
    # Measured (coarse 5 mm BOLD): fALFF r 0.85, ReHo 0.68 (ReHo's 27 neighbours span 6 mm on the template grid,
    # 15 mm on the native one: not the same statistic); shifting either map 4 mm along any axis lowers r.
    for key, least in (("func_falff_mni", 0.75), ("func_reho_mni", 0.5)):
        ours = np.asarray(nib.load(paths.derivative(own["out"], SUB, key)).dataobj)
        theirs = np.asarray(nib.load(outputs[key]).dataobj)
        r = np.corrcoef(ours[inside], theirs[inside])[0, 1]
        shifted = [np.corrcoef(ours[inside], np.roll(theirs, s, axis=a)[inside])[0, 1] for a in range(3)
                   for s in (-2, 2)]
        print(f"{key}: r = {r:.3f}, shifted by 4 mm: {max(shifted):.3f}")
        assert r > least and r > max(shifted), (key, r, shifted)
