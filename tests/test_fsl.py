"""Tests of neuromoe.preproc.fsl (tools, transforms, stages), the FSL backend.

Without FSL (the usual case on CI: FSL's conda channel is not a PyPI package) these still check everything that
does not need the binaries: the exact argv each tool is given (nipype's ``.cmdline``, paths with spaces included),
the choice of eddy or eddy_correct, the FLIRT/FNIRT <-> ITK transform conversions and the motion-parameter
conversions (checked against matrices built here from their definitions, not with the code under test), the
environment check, and that both backends plan the same outputs in the workflow. The contract test that runs the
backend on a synthetic subject is marked ``fsl`` and skipped, with the reason, when FSL is absent.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from neuromoe import paths
from neuromoe.config import ConfigError, FslConfig
from neuromoe.errors import StageError
from neuromoe.preproc import registration as reg
from neuromoe.preproc import run_stage
from neuromoe.preproc.fsl import tools as T
from neuromoe.preproc.fsl import transforms as X
from neuromoe.preproc.motion import MOTION_COLUMNS, rotation_matrix

REPO = Path(__file__).resolve().parents[1]
FSL_MISSING = T.fsl_problems()
FSL_REASON = ("FSL is not installed here (" + "; ".join(p.split(" (")[0].removeprefix("FSL program ")
                                                        for p in FSL_MISSING) + ")") if FSL_MISSING else ""
LPS = np.array([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder with a space in its name, holding empty input files (nipype checks that inputs exist)."""
    d = tmp_path / "my data"
    d.mkdir()
    for name in ("t1 w.nii.gz", "ref.nii.gz", "mask.nii.gz", "x.mat", "dwi.nii.gz", "dwi.bval", "dwi.bvec",
                 "index.txt", "acqp.txt", "bold.nii.gz", "coef.nii.gz"):
        (d / name).touch()
    return d


def argv(iface) -> list[str]:
    """The argv a shell would pass for the interface's command line (what run_interface executes)."""
    return shlex.split(iface.cmdline)


def vox_to_fsl(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """FSL coordinates by definition: voxels scaled by the voxel sizes, x reversed for a positive determinant."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    out = np.diag([*zooms, 1.0])
    if np.linalg.det(affine[:3, :3]) > 0:
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, shape[0] - 1
        out = out @ flip
    return out


def flirt_matrix(world_src_to_ref: np.ndarray, src: nib.Nifti1Image, ref: nib.Nifti1Image) -> np.ndarray:
    """The FLIRT matrix (-in src -ref ref) of a world map, from the definition of FSL coordinates."""
    return (vox_to_fsl(ref.affine, ref.shape) @ np.linalg.inv(ref.affine) @ world_src_to_ref @ src.affine
            @ np.linalg.inv(vox_to_fsl(src.affine, src.shape)))


def fsl_decompose(aff: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(rx, ry, rz, tx, ty, tz) of a rigid FSL matrix: MISCMATHS::decompose_aff with rotmat2euler (R = Rx.Ry.Rz),
    written here from FSL's formulas."""
    r = aff[:3, :3]
    cy = np.hypot(r[0, 0], r[0, 1])
    angles = [np.arctan2(r[1, 2] / cy, r[2, 2] / cy), np.arctan2(-r[0, 2], cy), np.arctan2(r[0, 1] / cy, r[0, 0] / cy)]
    return np.r_[angles, r @ centre + aff[:3, 3] - centre]


def rigid(rot_deg, trans_mm, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 world map y = R (x - c) + c + t with R = Rz Ry Rx (the python backend's convention)."""
    rot = rotation_matrix(*np.deg2rad(rot_deg))
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = np.asarray(centre) - rot @ np.asarray(centre) + np.asarray(trans_mm)
    return out


def image(shape, zooms, flip_x=False, oblique_deg=0.0, data=None) -> nib.Nifti1Image:
    lin = np.diag(np.asarray(zooms, float) * np.array([-1.0 if flip_x else 1.0, 1, 1]))
    lin = Rotation.from_euler("z", oblique_deg, degrees=True).as_matrix() @ lin
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = -lin @ (np.asarray(shape[:3]) - 1) / 2 + np.array([3.0, -5.0, 7.0])
    arr = np.zeros(shape, np.float32) if data is None else data
    # The affine as the header stores it (float32), which is what FSL and fslpy read.
    return nib.Nifti1Image(arr, nib.Nifti1Image(arr[..., :1], aff).header.get_sform())


# ------------------------------------------------------------------------------------------------ argv
@pytest.mark.parametrize(("robust", "frac", "gradient"), [(True, 0.5, 0.0), (False, 0.3, -0.2)])
def test_bet_argv_follows_config(data_dir, robust, frac, gradient):
    opts = FslConfig(bet_frac=frac, bet_gradient=gradient, bet_robust=robust)
    iface = T.bet_interface(data_dir / "t1 w.nii.gz", data_dir / "t1 w_brain.nii.gz", opts)
    expected = ["bet", str(data_dir / "t1 w.nii.gz"), str(data_dir / "t1 w_brain.nii.gz"), "-f", f"{frac:.2f}",
                "-m", *(["-R"] if robust else []), "-g", f"{gradient:.2f}"]
    assert argv(iface) == expected
    # nipype quotes: the command line a shell would see
    assert iface.cmdline.startswith(f"bet '{data_dir}/t1 w.nii.gz' '{data_dir}/t1 w_brain.nii.gz' ")
    assert iface.inputs.environ["FSLOUTPUTTYPE"] == "NIFTI_GZ"


def test_bet_options_come_from_config():
    cfg = {"preprocessing": {"backend": "fsl", "fsl": {"bet_frac": 0.35, "bet_gradient": 0.1, "bet_robust": False,
                                                       "dwi_correction": "eddy"}}}
    assert FslConfig.from_config(cfg) == FslConfig(0.35, 0.1, False, "eddy")
    assert FslConfig.from_config({}) == FslConfig()
    with pytest.raises(ConfigError, match="dwi_correction"):
        FslConfig.from_config({"preprocessing": {"fsl": {"dwi_correction": "topup"}}})
    with pytest.raises(ConfigError, match="bet_frac"):
        FslConfig.from_config({"preprocessing": {"fsl": {"bet_frac": 1.5}}})
    with pytest.raises(ConfigError, match="nonlinear"):  # moved to preprocessing.anat.registration
        FslConfig.from_config({"preprocessing": {"fsl": {"nonlinear": True}}})


def test_flirt_and_applyxfm_argv(data_dir):
    d = data_dir
    iface = T.flirt_interface(d / "t1 w.nii.gz", d / "ref.nii.gz", d / "out.nii.gz", d / "t1 w_to_mni.mat", dof=12)
    assert argv(iface) == ["flirt", "-in", f"{d}/t1 w.nii.gz", "-ref", f"{d}/ref.nii.gz", "-out", f"{d}/out.nii.gz",
                           "-omat", f"{d}/t1 w_to_mni.mat", "-cost", "corratio", "-dof", "12", "-interp", "trilinear"]
    iface = T.flirt_interface(d / "dwi.nii.gz", d / "t1 w.nii.gz", d / "o.nii.gz", d / "o.mat", dof=6)
    assert argv(iface)[argv(iface).index("-dof") + 1] == "6"
    iface = T.applyxfm_interface(d / "mask.nii.gz", d / "ref.nii.gz", d / "x.mat", d / "mask mni.nii.gz")
    assert argv(iface) == ["flirt", "-in", f"{d}/mask.nii.gz", "-ref", f"{d}/ref.nii.gz", "-out",
                           f"{d}/mask mni.nii.gz", "-omat", f"{d}/mask mni_applied.mat", "-applyxfm", "-init",
                           f"{d}/x.mat", "-interp", "trilinear"]


def test_fnirt_and_applywarp_argv(data_dir):
    d = data_dir
    iface = T.fnirt_interface(d / "t1 w.nii.gz", d / "ref.nii.gz", d / "x.mat", d / "mask.nii.gz",
                              d / "coef out.nii.gz", d / "warped.nii.gz", d / "fnirt log.txt")
    assert argv(iface) == ["fnirt", f"--aff={d}/x.mat", "--config=T1_2_MNI152_2mm", f"--cout={d}/coef out.nii.gz",
                           f"--in={d}/t1 w.nii.gz", f"--logout={d}/fnirt log.txt", f"--ref={d}/ref.nii.gz",
                           f"--refmask={d}/mask.nii.gz", f"--iout={d}/warped.nii.gz"]
    iface = T.applywarp_interface(d / "dwi.nii.gz", d / "ref.nii.gz", d / "coef.nii.gz", d / "fa mni.nii.gz",
                                  premat=d / "x.mat", relative=True)
    assert argv(iface) == ["applywarp", f"--in={d}/dwi.nii.gz", f"--ref={d}/ref.nii.gz", f"--out={d}/fa mni.nii.gz",
                           f"--warp={d}/coef.nii.gz", f"--premat={d}/x.mat", "--interp=trilinear", "--rel"]
    iface = T.applywarp_interface(d / "dwi.nii.gz", d / "ref.nii.gz", d / "coef.nii.gz", d / "o.nii.gz")
    assert "--premat" not in iface.cmdline and "--rel" not in iface.cmdline


def test_dwi_tools_argv(data_dir):
    d = data_dir
    iface = T.eddy_correct_interface(d / "dwi.nii.gz", d / "dwi ec.nii.gz", ref_num=2)
    assert argv(iface) == ["eddy_correct", f"{d}/dwi.nii.gz", f"{d}/dwi ec.nii.gz", "2"]
    iface = T.eddy_interface(d / "dwi.nii.gz", d / "mask.nii.gz", d / "index.txt", d / "acqp.txt", d / "dwi.bvec",
                             d / "dwi.bval", d / "eddy out", threads=3, command="eddy_cpu")
    got = argv(iface)
    assert got[0] == "eddy_cpu"
    for arg in (f"--imain={d}/dwi.nii.gz", f"--mask={d}/mask.nii.gz", f"--index={d}/index.txt",
                f"--acqp={d}/acqp.txt", f"--bvecs={d}/dwi.bvec", f"--bvals={d}/dwi.bval", f"--out={d}/eddy out"):
        assert arg in got
    assert iface.inputs.environ["OMP_NUM_THREADS"] == "3"
    iface = T.dtifit_interface(d / "dwi.nii.gz", d / "mask.nii.gz", d / "dwi.bvec", d / "dwi.bval", d / "dti out")
    assert argv(iface) == ["dtifit", "-k", f"{d}/dwi.nii.gz", "-o", f"{d}/dti out", "-m", f"{d}/mask.nii.gz", "-r",
                           f"{d}/dwi.bvec", "-b", f"{d}/dwi.bval", "--wls"]
    ols = T.dtifit_interface(d / "dwi.nii.gz", d / "mask.nii.gz", d / "dwi.bvec", d / "dwi.bval", d / "dti", wls=False)
    assert "--wls" not in argv(ols)


def test_func_tools_argv(data_dir):
    d = data_dir
    assert argv(T.fslroi_interface(d / "bold.nii.gz", d / "bold trimmed.nii.gz", 4)) == [
        "fslroi", f"{d}/bold.nii.gz", f"{d}/bold trimmed.nii.gz", "4", "-1"]
    assert argv(T.mcflirt_interface(d / "bold.nii.gz", d / "bold mc.nii.gz", ref_vol=48)) == [
        "mcflirt", "-in", f"{d}/bold.nii.gz", "-out", f"{d}/bold mc.nii.gz", "-refvol", "48", "-plots"]
    assert argv(T.tmean_interface(d / "bold.nii.gz", d / "bold mean.nii.gz")) == [
        "fslmaths", f"{d}/bold.nii.gz", "-Tmean", f"{d}/bold mean.nii.gz"]
    assert argv(T.binarise_interface(d / "mask.nii.gz", d / "mask bin.nii.gz")) == [
        "fslmaths", f"{d}/mask.nii.gz", "-thr", "0.5", "-bin", f"{d}/mask bin.nii.gz", "-odt", "char"]


@pytest.mark.parametrize("correction", ["eddy_correct", "eddy"])
def test_eddy_or_eddy_correct_follows_config(data_dir, correction):
    d = data_dir
    opts = FslConfig(dwi_correction=correction)
    tools = [alt for alt, _ in T.required_tools(opts, "dwi")]
    assert (("eddy_correct",) in tools) == (correction == "eddy_correct")
    assert (T.EDDY_COMMANDS in tools) == (correction == "eddy")
    iface = T.dwi_correction_interface(opts, d / "dwi.nii.gz", d, ref_num=0, mask=d / "mask.nii.gz",
                                       index=d / "index.txt", acqp=d / "acqp.txt", bvecs=d / "dwi.bvec",
                                       bvals=d / "dwi.bval", command="eddy")
    assert argv(iface)[0] == ("eddy_correct" if correction == "eddy_correct" else "eddy")


def test_run_interface_passes_argv_without_a_shell(tmp_path, data_dir, monkeypatch):
    """A stand-in `bet` records the argv it receives: paths with spaces arrive whole, nothing is interpreted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.json"
    tool = bin_dir / "bet"
    tool.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump([sys.argv[1:], os.environ.get('FSLOUTPUTTYPE')], open({str(record)!r}, 'w'))\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    weird = data_dir / "a $HOME; b.nii.gz"
    weird.touch()
    T.run_interface(T.bet_interface(weird, data_dir / "out.nii.gz", FslConfig()), tmp_path, subject="01",
                    stage="anat", step="bet")
    args, out_type = json.loads(record.read_text())
    assert args == [str(weird), str(data_dir / "out.nii.gz"), "-f", "0.50", "-m", "-R", "-g", "0.00"]
    assert out_type == "NIFTI_GZ"
    tool.write_text("#!/bin/sh\necho 'bet: cannot read image' >&2\nexit 3\n")
    with pytest.raises(StageError, match=r"sub-01.*status 3.*cannot read image"):
        T.run_interface(T.bet_interface(weird, data_dir / "out.nii.gz", FslConfig()), tmp_path, subject="01",
                        stage="anat", step="bet")


# ------------------------------------------------------------------------------------------------ environment check
ALL_TOOLS = ["bet", "flirt", "mcflirt", "dtifit", "eddy_correct", "eddy", "fslmaths", "fslroi", "fnirt", "applywarp"]


def test_fsl_problems_names_every_missing_tool(tmp_path):
    env = {"PATH": str(tmp_path / "empty")}
    problems = T.fsl_problems(env)
    text = "\n".join(problems)
    for tool in ["bet", "flirt", "mcflirt", "dtifit", "eddy_correct", "fslmaths", "fslroi", "fnirt", "applywarp"]:
        assert f"`{tool}`" in text, tool  # nonlinear registration (fnirt, applywarp) by default
    assert any("FSLDIR" in p for p in problems) and any("FSLOUTPUTTYPE" in p for p in problems)
    affine = "\n".join(T.fsl_problems(env, {"preprocessing": {"anat": {"registration": "affine"},
                                                               "fsl": {"dwi_correction": "eddy"}}}))
    assert "fnirt" not in affine and "applywarp" not in affine
    assert "`eddy` or `eddy_cpu` or `eddy_openmp`" in affine and "`eddy_correct`" not in affine
    for word in ("--use-conda", "envs/fsl.yaml", "FSLDIR", "backend: python"):
        assert word in T.FSL_FIX


def test_fsl_problems_none_with_fsl_on_path(tmp_path):
    bin_dir = tmp_path / "fsl" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ALL_TOOLS:
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"/nonexistent:{bin_dir}", "FSLDIR": str(tmp_path / "fsl"), "FSLOUTPUTTYPE": "NIFTI_GZ"}
    assert T.fsl_problems(env) == []
    assert T.fsl_problems(env, {"preprocessing": {"anat": {"registration": "nonlinear"},
                                                  "fsl": {"dwi_correction": "eddy"}}}) == []
    (bin_dir / "mcflirt").unlink()
    assert T.fsl_problems(env) == ["FSL program `mcflirt` not found on PATH (needed for motion correction)."]
    assert T.fsl_problems({**env, "FSLOUTPUTTYPE": "ANALYZE"}, stage="anat") == [
        "FSLOUTPUTTYPE=ANALYZE is not an FSL output type (use NIFTI_GZ)."]
    assert T.eddy_command(env) == "eddy"


def test_stage_without_fsl_fails_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = {k: str(tmp_path / k) for k in paths.OUTPUTS if k.startswith("anat_")}
    with pytest.raises(StageError, match="--use-conda") as err:
        run_stage("anat", {"t1w": tmp_path / "missing.nii.gz"}, out, "01", {"preprocessing": {"backend": "fsl"}})
    assert "sub-01" in str(err.value) and "`bet`" in str(err.value)


# ------------------------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize("rigid_out", [True, False])
def test_flirt_matrix_to_itk_maps_the_same_points(rigid_out):
    """A known rigid world map between two images with different grids (3 x 3 x 4 mm oblique LAS, det < 0, and
    2 mm RAS, det > 0: FSL reverses x in one only), written as the FLIRT matrix FSL would write, converts to the ITK
    transform that maps the same points (ref -> src, fixed = -ref); and back."""
    src = image((40, 48, 30), (3.0, 3.0, 4.0), flip_x=True, oblique_deg=10.0)
    ref = image((60, 70, 50), (2.0, 2.0, 2.0))
    world = rigid((4.0, -3.0, 7.0), (5.0, -2.0, 3.5), centre=(10.0, 0.0, -5.0))  # src world -> ref world
    mat = flirt_matrix(world, src, ref)
    tf = X.flirt_to_itk(mat, src, ref, rigid=rigid_out)
    assert isinstance(tf, sitk.Euler3DTransform if rigid_out else sitk.AffineTransform)
    pts = np.random.default_rng(0).uniform(-60, 60, size=(20, 3))  # ref world, RAS
    expected = (np.linalg.inv(world) @ np.c_[pts, np.ones(20)].T).T[:, :3]
    got = np.array([tf.TransformPoint(tuple(p * LPS)) for p in pts]) * LPS
    np.testing.assert_allclose(got, expected, atol=1e-4)  # mm; fslpy reads the header's float32 affines
    np.testing.assert_allclose(X.itk_to_flirt(tf, src, ref), mat, atol=1e-6)
    # The same conversion through fslpy's own definition of FSL coordinates.
    np.testing.assert_allclose(X.flirt_to_world(mat, src, ref), world, atol=1e-4)


def test_flirt_file_round_trip_through_itk_text(tmp_path):
    src = image((30, 30, 20), (2.5, 2.5, 3.0), flip_x=True)
    ref = image((40, 40, 40), (2.0, 2.0, 2.0))
    mat = flirt_matrix(rigid((1.0, 2.0, -3.0), (1.0, 2.0, 3.0)), src, ref)
    X.write_flirt(mat, tmp_path / "m.mat")
    reg.write_transform(X.flirt_to_itk(X.read_flirt(tmp_path / "m.mat"), src, ref, rigid=True), tmp_path / "x.txt")
    np.testing.assert_allclose(X.itk_to_flirt(reg.read_transform(tmp_path / "x.txt"), src, ref), mat, atol=1e-7)


def _composite(grid: nib.Nifti1Image, seed: int = 0) -> sitk.CompositeTransform:
    """A smooth nonlinear MNI -> T1w transform: a random B-spline (~3 mm) then an affine, on ``grid``."""
    rng = np.random.default_rng(seed)
    disp = np.zeros(grid.shape[:3] + (3,))
    g = np.indices(grid.shape[:3], dtype=float) / np.asarray(grid.shape[:3], float)[:, None, None, None]
    for c in range(3):
        a, b = rng.uniform(-3, 3, 2)
        disp[..., c] = a * np.sin(np.pi * g[(c + 1) % 3]) + b * np.cos(np.pi * g[(c + 2) % 3] * 1.5)
    bs = X.fit_bspline(disp, grid, spacing_mm=12.0)
    aff = reg.ras_to_transform(rigid((3.0, -2.0, 5.0), (4.0, -6.0, 2.0)) @ np.diag([1.05, 0.97, 1.02, 1.0]))
    return sitk.CompositeTransform([aff, bs])


def test_bspline_fit_is_exact_for_a_bspline():
    grid = image((30, 36, 30), (6.0, 6.0, 6.0))
    tf = _composite(grid)
    bs = tf.GetNthTransform(1)
    pts = X.grid_lps(grid).reshape(-1, 3)[::37]
    disp = np.array([np.asarray(bs.TransformPoint(tuple(p))) - p for p in pts])
    refit = X.fit_bspline(np.stack([np.asarray(bs.TransformPoint(tuple(p))) - p
                                    for p in X.grid_lps(grid).reshape(-1, 3)]).reshape(grid.shape + (3,)), grid,
                          spacing_mm=12.0)
    again = np.array([np.asarray(refit.TransformPoint(tuple(p))) - p for p in pts])
    assert np.abs(disp).max() > 1.0  # a real deformation
    np.testing.assert_allclose(again, disp, atol=1e-6)


def test_itk_nonlinear_to_fnirt_warp_and_back(tmp_path):
    """ITK composite -> FNIRT relative warp (fslpy reads it back as the same map) -> ITK composite again."""
    from fsl.transform.fnirt import readFnirt

    grid = image((30, 36, 30), (6.0, 6.0, 6.0))  # stands for the MNI grid
    t1 = image((50, 60, 50), (3.0, 3.0, 3.0), flip_x=True)
    tf = _composite(grid)
    warp = X.itk_to_fnirt_warp(tf, t1, grid, tmp_path / "warp field.nii.gz")
    field = readFnirt(warp, src=X.fsl_image(t1), ref=X.fsl_image(grid))
    x_lps = X.grid_lps(grid).reshape(-1, 3)
    expected_ras = np.array([tf.TransformPoint(tuple(p)) for p in x_lps]) * LPS
    got_ras = field.transform(x_lps * LPS, from_="world", to="world")
    np.testing.assert_allclose(got_ras, expected_ras, atol=1e-3)  # float32 field
    back = X.nonlinear_to_itk(field, tf.GetNthTransform(0), grid, spacing_mm=12.0)
    assert isinstance(back, sitk.CompositeTransform) and back.GetNumberOfTransforms() == 2
    again = np.array([back.TransformPoint(tuple(p)) for p in x_lps[::11]]) * LPS
    np.testing.assert_allclose(again, expected_ras[::11], atol=1e-3)
    reg.write_transform(back, tmp_path / "xfm.txt")  # the ITK text form the python backend also writes
    assert reg.read_transform(tmp_path / "xfm.txt").GetNumberOfTransforms() == 2


# ------------------------------------------------------------------------------------------------ motion
def _series() -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    """A 4D BOLD-like header (RAS, det > 0, anisotropic voxels), its reference volume (a bright box) and brain
    centre."""
    shape = (32, 40, 24)
    vol = np.zeros(shape, np.float32) + 5.0
    vol[8:20, 10:30, 6:18] = 100.0
    img = image(shape + (6,), (3.0, 3.0, 4.0))
    centre = img.affine[:3, :3] @ np.array([13.5, 19.5, 11.5]) + img.affine[:3, 3]
    return img, vol, centre


TRUE_MOTION = [((0, 0, 0), (0, 0, 0)), ((1.0, -0.5, 2.0), (0.4, -0.8, 1.2)), ((-2.0, 1.5, 0.3), (-1.0, 0.5, 0.2)),
               ((0.5, 3.0, -1.0), (2.0, 1.0, -0.5)), ((4.0, 0.2, 0.1), (0.0, -2.5, 0.7)), ((-1, -1, -1), (1, 1, 1))]


def _truth(centre: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    maps = [rigid(r, t, centre) for r, t in TRUE_MOTION]  # reference -> volume, world
    table = np.array([[*t, *np.deg2rad(r)] for r, t in TRUE_MOTION])
    return maps, table


def test_par_to_confounds_columns():
    """mcflirt's .par (rx ry rz tx ty tz about the reference's centre of gravity in FSL coordinates, matrices
    volume -> reference), written here with FSL's decomposition, converts to the python backend's columns."""
    img, vol, centre = _series()
    maps, table = _truth(centre)
    v2f = vox_to_fsl(img.affine, img.shape)
    w = vol - vol.min()
    cog_fsl = (v2f @ np.r_[[np.sum(w * g) / w.sum() for g in np.indices(w.shape)], 1.0])[:3]
    np.testing.assert_allclose(X.mcflirt_centre(vol, img), cog_fsl, atol=1e-9)
    ref3 = nib.Nifti1Image(vol, img.affine)
    par = np.array([fsl_decompose(flirt_matrix(np.linalg.inv(m), ref3, ref3), cog_fsl) for m in maps])
    motion = X.par_to_motion(par, img, vol, centre)
    assert list(motion.columns) == MOTION_COLUMNS
    np.testing.assert_allclose(motion.to_numpy(), table, atol=1e-9)
    # The .par text as mcflirt writes it (six numbers then two spaces each) reads back the same.
    text = "\n".join("".join(f"{v:.6g}  " for v in row) for row in par)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"neuromoe-test-{os.getpid()}.par"
    path.write_text(text + "\n")
    try:
        np.testing.assert_allclose(X.read_par(path), par, atol=1e-5)
    finally:
        path.unlink()
    # ... and feeds the confounds the python backend writes (FD from these columns).
    from neuromoe.preproc.func import framewise_displacement

    fd = framewise_displacement(motion)
    d = np.abs(np.diff(table, axis=0))
    np.testing.assert_allclose(fd[1:], d[:, :3].sum(1) + 50.0 * d[:, 3:].sum(1), atol=1e-9)


def test_ecclog_matrices_to_motion_and_bvecs(tmp_path):
    from neuromoe.preproc.motion import rotate_bvecs

    img, vol, centre = _series()
    maps, table = _truth(centre)
    ref3 = nib.Nifti1Image(vol, img.affine)
    blocks = []
    for k, m in enumerate(maps):
        mat = flirt_matrix(np.linalg.inv(m), ref3, ref3)
        rows = "\n".join(" ".join(f"{v:.9f}" for v in row) + " " for row in mat)
        blocks.append(f"processing dwi_ec_tmp{k:04d}\n\nFinal result: \n{rows}\n")
    (tmp_path / "dwi_ec.ecclog").write_text("\n".join(blocks))
    mats = X.read_ecclog(tmp_path / "dwi_ec.ecclog")
    assert mats.shape == (6, 4, 4)
    motion = X.flirt_motion(mats, img, centre)
    np.testing.assert_allclose(motion.to_numpy(), table, atol=1e-7)
    bvecs = np.eye(3)[:, [0, 1, 2, 0, 1, 2]]
    rotated = rotate_bvecs(bvecs, motion.attrs["rotations"], img.affine)
    expected = rotate_bvecs(bvecs, np.stack([m[:3, :3] for m in maps]), img.affine)
    np.testing.assert_allclose(rotated, expected, atol=1e-7)


def test_eddy_parameters_to_motion():
    """eddy's .eddy_parameters (tx ty tz rx ry rz, FSL coordinates, about the field-of-view centre, reference ->
    volume) convert to the same columns."""
    img, _, centre = _series()
    maps, table = _truth(centre)
    shape3 = img.shape[:3]
    ref3 = nib.Nifti1Image(np.zeros(shape3, np.float32), img.affine)
    fov_centre = (np.asarray(shape3) - 1) * np.asarray(img.header.get_zooms()[:3]) / 2
    params = []
    for m in maps:
        p = fsl_decompose(flirt_matrix(m, ref3, ref3), fov_centre)
        params.append([*p[3:], *p[:3], 0.01, -0.02])  # eddy appends its eddy-current terms
    mats = X.eddy_params_to_matrices(np.array(params)[:, :6], img)
    motion = X.eddy_motion(mats, img, centre)
    np.testing.assert_allclose(motion.to_numpy(), table, atol=1e-9)


# ------------------------------------------------------------------------------------------------ the workflow
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")


def _tiny_bids(root: Path) -> Path:
    """A 3-subject BIDS tree of tiny images: enough for the workflow's start-up validation and its plan."""
    b = root / "bids"
    (b).mkdir(parents=True)
    (b / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.8.0"}))
    rows = ["participant_id\tdiagnosis\tage\tsex\tupdrs3\tmoca\trbdsq\tserum_nfl\tserum_asyn"]
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for i, dx in enumerate(["HC", "PD", "iRBD"], 1):
        s = f"sub-{i:02d}"
        for d in ("anat", "dwi", "func"):
            (b / s / d).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.int16), aff), str(b / s / "anat" / f"{s}_T1w.nii.gz"))
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 7), np.int16), aff), str(b / s / "dwi" / f"{s}_dwi.nii.gz"))
        (b / s / "dwi" / f"{s}_dwi.bval").write_text("0 1000 1000 1000 1000 1000 1000\n")
        g = np.c_[np.zeros(3), np.eye(3), np.eye(3)[:, ::-1]]
        (b / s / "dwi" / f"{s}_dwi.bvec").write_text("\n".join(" ".join(map(str, r)) for r in g) + "\n")
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 60), np.int16), aff),  # 100 s after the dummy scans
                 str(b / s / "func" / f"{s}_task-rest_bold.nii.gz"))
        (b / s / "func" / f"{s}_task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2.0}))
        rows.append(f"{s}\t{dx}\t60\tM\t10\t27\t3\t10\t1")
    (b / "participants.tsv").write_text("\n".join(rows) + "\n")
    return b


def _workdir(root: Path, bids: Path, backend: str) -> Path:
    import yaml

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg.update(bids_dir=str(bids), output_dir="results")
    cfg["synthetic"]["generate"] = False
    cfg["preprocessing"]["backend"] = backend
    wd = root / backend
    wd.mkdir()
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    return wd


def _no_fsl_env() -> dict[str, str]:
    """Our environment without FSL: PATH folders holding an FSL program dropped, FSLDIR unset."""
    keep = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and not any((Path(p) / t).exists() for t in ("bet", "flirt", "mcflirt"))]
    env = {k: v for k, v in os.environ.items() if k not in ("FSLDIR", "FSLOUTPUTTYPE")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *keep])
    return env


def _stub_fsl_env(fsldir: Path) -> dict[str, str]:
    """An environment in which every FSL program exists (as a script that fails if run) and FSL is configured."""
    bindir = fsldir / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for tool in ("bet", "flirt", "fslmaths", "eddy_correct", "eddy", "dtifit", "fslroi", "mcflirt", "fnirt",
                 "applywarp"):
        script = bindir / tool
        script.write_text("#!/bin/sh\necho 'stand-in: not for running' >&2\nexit 1\n")
        script.chmod(0o755)
    return dict(os.environ, FSLDIR=str(fsldir), FSLOUTPUTTYPE="NIFTI_GZ",
                PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture(scope="module", autouse=True)
def _plans_started(tmp_path_factory) -> Iterator[dict[str, subprocess.Popen] | None]:
    """Start the workflow's plans (below) when the module starts, so they run while the other tests do."""
    if SNAKEMAKE is None:
        yield None
        return
    root = tmp_path_factory.mktemp("plans")
    bids = _tiny_bids(root)
    cmds = {
        "python": ([SNAKEMAKE, "--summary"], _workdir(root, bids, "python"), dict(os.environ)),
        # planning only: stand-in executables satisfy the start-up check (none of them is run)
        "fsl": ([SNAKEMAKE, "--summary"], _workdir(root, bids, "fsl"), _stub_fsl_env(root / "stub fsl")),
        "fsl_absent": ([SNAKEMAKE, "--dry-run", "--quiet"], root / "fsl", _no_fsl_env()),
    }
    procs = {k: subprocess.Popen([*cmd, "--snakefile", str(REPO / "Snakefile"), "--cores", "1"], cwd=wd, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, (cmd, wd, env) in cmds.items()}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.fixture(scope="module")
def plans(_plans_started) -> dict[str, subprocess.CompletedProcess]:
    """``snakemake --summary`` (the planned output files, per rule) for each backend, and a dry run with backend fsl
    and no FSL."""
    if _plans_started is None:
        pytest.skip("snakemake is not installed next to this Python")
    t0 = time.perf_counter()
    out = {}
    for k, p in _plans_started.items():
        stdout, _ = p.communicate(timeout=max(10.0, 300 - (time.perf_counter() - t0)))
        out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, "")
    return out


def _planned(res: subprocess.CompletedProcess) -> set[tuple[str, str]]:
    assert res.returncode == 0, res.stdout[-4000:]
    lines = res.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("output_file\t"))
    return {tuple(ln.split("\t")[0:3:2]) for ln in lines[start + 1:] if "\t" in ln}


# ------------------------------------------------------------------------------------------------ stand-in FSL
# Tiny Python stand-ins for the FSL programs the stages call, with FSL's argv and output names: enough to run the
# stage code end to end (argv, file names, grids, conversions, outputs) where FSL is absent. Registrations return the
# world identity (the test subject is built in MNI world coordinates), motion correction returns no motion.
FAKE_FSL = r"""
import shutil, sys
import numpy as np, nibabel as nib
from scipy import ndimage

def save(data, like, path):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), like.affine), path)

def opt(args, flag):
    return args[args.index(flag) + 1] if flag in args else None

def main(tool, args):
    if tool == "bet":
        img = nib.load(args[0]); d = img.get_fdata()
        m = d > 0.25 * np.percentile(d[d > 0], 99)
        m = ndimage.binary_fill_holes(m)
        out = args[1]
        save(d * m, img, out)
        if "-m" in args:
            nib.save(nib.Nifti1Image(m.astype(np.uint8), img.affine), out.replace(".nii.gz", "") + "_mask.nii.gz")
    elif tool == "flirt":
        from fsl.data.image import Image
        from fsl.transform.flirt import fromFlirt, toFlirt
        src, ref = nib.load(opt(args, "-in")), nib.load(opt(args, "-ref"))
        if "-applyxfm" in args:
            mat = np.loadtxt(opt(args, "-init"))
        else:
            mat = toFlirt(np.eye(4), Image(src), Image(ref), "world", "world")
        np.savetxt(opt(args, "-omat"), mat, fmt="%.8f")
        world = fromFlirt(mat, Image(src), Image(ref), "world", "world")
        vox = np.linalg.inv(src.affine) @ np.linalg.inv(world) @ ref.affine
        out = ndimage.affine_transform(src.get_fdata(), vox[:3, :3], vox[:3, 3], output_shape=ref.shape[:3], order=1)
        save(out, ref, opt(args, "-out"))
    elif tool == "eddy_correct":
        shutil.copyfile(args[0], args[1])
        n = nib.load(args[0]).shape[3]
        eye = "".join(" ".join(f"{v:.6f}" for v in row) + " \n" for row in np.eye(4))
        log = "".join(f"processing vol{k:04d}\n\nFinal result: \n{eye}\n" for k in range(n))
        open(args[1].replace(".nii.gz", "") + ".ecclog", "w").write(log)
    elif tool == "dtifit":
        from neuromoe.preproc.dwi import fit_tensor
        img = nib.load(opt(args, "-k"))
        mask = nib.load(opt(args, "-m")).get_fdata() > 0
        fit = fit_tensor(img.get_fdata(), np.loadtxt(opt(args, "-b")), np.loadtxt(opt(args, "-r")), mask, "OLS")
        for k in range(3):
            save(fit["evals"][..., k], img, opt(args, "-o") + f"_L{k + 1}.nii.gz")
        save(fit["FA"], img, opt(args, "-o") + "_FA.nii.gz")
    elif tool == "mcflirt":
        shutil.copyfile(opt(args, "-in"), opt(args, "-out"))
        np.savetxt(opt(args, "-out") + ".par", np.zeros((nib.load(opt(args, "-in")).shape[3], 6)), fmt="%.6f")
    elif tool == "fslmaths":
        img = nib.load(args[0]); d = img.get_fdata()
        if args[1] == "-Tmean":
            save(d.mean(axis=3), img, args[2])
        else:
            nib.save(nib.Nifti1Image((d >= float(args[2])).astype(np.uint8), img.affine), args[4])
    elif tool == "fslroi":
        img = nib.load(args[0]); t0 = int(args[2])
        save(img.get_fdata()[..., t0:], img, args[1])
    else:
        sys.exit(f"{tool}: not faked")
"""
FAKED = ["bet", "flirt", "eddy_correct", "dtifit", "mcflirt", "fslmaths", "fslroi"]


def install_fake_fsl(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Put the stand-ins on PATH (as executables in ``root/bin``, FSLDIR = root) and make the backend run them in
    this process (a Python start per call would cost seconds): ``run_interface`` still builds and splits the argv;
    the stand-in gets that argv. Returns the list of argvs run."""
    import types

    (root / "bin").mkdir(parents=True)
    module = types.ModuleType("fakefsl")
    exec(compile(FAKE_FSL, "fakefsl", "exec"), module.__dict__)
    for tool in FAKED:
        exe = root / "bin" / tool
        exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path[:0] = [{str(REPO)!r}]\n"
                       f"exec(compile({FAKE_FSL!r}, 'fakefsl', 'exec'))\nmain({tool!r}, sys.argv[1:])\n")
        exe.chmod(0o755)
    calls: list[list[str]] = []

    def run(argv, cwd, env, **kw):
        assert shutil.which(argv[0], path=env["PATH"]), argv[0]
        assert env["FSLOUTPUTTYPE"] == "NIFTI_GZ"
        calls.append(list(argv))
        module.main(Path(argv[0]).name, list(argv[1:]))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FSLDIR", str(root))
    monkeypatch.setenv("FSLOUTPUTTYPE", "NIFTI_GZ")
    monkeypatch.setattr(T, "subprocess", types.SimpleNamespace(run=run))
    return calls


def mni_subject(root: Path) -> dict[str, Path]:
    """A subject in MNI world coordinates: the template as T1w (2 mm), a DWI and a BOLD (TR 3 s, 4 dummy scans + 40
    volumes) on a 6 mm grid over it."""
    from neuromoe.preproc.anat import mni_template

    tpl, tpl_mask = mni_template()
    t = np.asarray(tpl.dataobj, np.float32)
    brain = np.asarray(tpl_mask.dataobj) > 0
    root.mkdir(parents=True)
    files = {"t1w": root / "sub-01_T1w.nii.gz", "dwi": root / "sub-01_dwi.nii.gz", "bval": root / "sub-01_dwi.bval",
             "bvec": root / "sub-01_dwi.bvec", "bold": root / "sub-01_task-rest_bold.nii.gz",
             "bold_json": root / "sub-01_task-rest_bold.json"}
    nib.save(nib.Nifti1Image(1000 * t + 50 * (~brain), tpl.affine), str(files["t1w"]))
    aff6 = tpl.affine.copy()
    aff6[:3, :3] *= 3
    s0 = 500 * t[::3, ::3, ::3]
    g = np.c_[np.zeros((3, 2)), np.eye(3), np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]]).T / np.sqrt(2)]
    b = np.r_[0, 0, [1000] * 6]
    dt = np.diag([1.7e-3, 0.3e-3, 0.3e-3])
    sig = s0[..., None] * np.exp(-b * np.einsum("in,ij,jn->n", g, dt, g))[None, None, None, :]
    nib.save(nib.Nifti1Image(sig.astype(np.float32), aff6), str(files["dwi"]))
    files["bval"].write_text(" ".join(map(str, b)) + "\n")
    files["bvec"].write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in g) + "\n")
    rng = np.random.default_rng(0)
    bold = (100 * t[::3, ::3, ::3])[..., None] * (1 + 0.01 * rng.standard_normal(s0.shape + (44,)))
    img = nib.Nifti1Image(bold.astype(np.float32), aff6)
    img.header.set_zooms((6.0, 6.0, 6.0, 3.0))
    nib.save(img, str(files["bold"]))
    files["bold_json"].write_text(json.dumps({"RepetitionTime": 3.0}))
    return files


def test_stages_run_end_to_end_with_stand_in_fsl_tools(tmp_path, monkeypatch):
    """The three stages with the stand-ins above, inputs and outputs in folders with spaces: every output of
    neuromoe.paths (QC figures aside) written with its type and grid, transforms and motion as the identity."""
    from neuromoe.preproc.anat import mni_template

    calls = install_fake_fsl(tmp_path / "fake fsl", monkeypatch)
    files = mni_subject(tmp_path / "my data" / "raw input")
    out = tmp_path / "my data" / "out put"
    o = {k: paths.derivative(out, "01", k) for k in paths.OUTPUTS if not k.startswith("qc_")}
    cfg = {"preprocessing": {"backend": "fsl", "anat": {"registration": "affine"},  # fnirt has no stand-in
                             "dwi": {"b0_threshold": 50, "fit_method": "WLS"},
                             "func": {"dummy_scans": 4, "band_hz": [0.01, 0.08], "nuisance": ["motion", "wm", "csf"]},
                             "fsl": {"bet_frac": 0.4, "bet_gradient": 0.0, "bet_robust": True,
                                     "dwi_correction": "eddy_correct"}}}
    run_stage("anat", {"t1w": files["t1w"]}, {k: v for k, v in o.items() if k.startswith("anat_")}, "01", cfg)
    anat_in = {k: o[k] for k in ("anat_brain", "anat_mask", "anat_xfm")}
    run_stage("dwi", {"dwi": str(files["dwi"]), "bval": str(files["bval"]), "bvec": str(files["bvec"]), **anat_in},
              {k: v for k, v in o.items() if k.startswith("dwi_")}, "01", cfg)
    run_stage("func", {"bold": str(files["bold"]), "bold_json": str(files["bold_json"]), **anat_in},
              {k: v for k, v in o.items() if k.startswith("func_")}, "01", cfg)

    tpl = mni_template()[0]
    for key, path in o.items():
        assert Path(path).is_file(), key
    for key in [k for k in o if k.endswith("_mni")]:
        img = nib.load(o[key])
        assert img.shape == (99, 117, 95), key
        np.testing.assert_allclose(img.affine, tpl.affine, atol=1e-5)
        assert img.get_data_dtype() == (np.uint8 if "mask" in key else np.float32), key
    for key in ("anat_mask", "dwi_mask", "func_mask", "anat_mask_mni"):
        assert nib.load(o[key]).get_data_dtype() == np.uint8, key
    pts = [(0.0, 0.0, 0.0), (30.0, -40.0, 20.0)]
    for key in ("anat_xfm", "dwi_xfm", "func_xfm"):  # world-identity registrations
        tf = reg.read_transform(o[key])
        np.testing.assert_allclose([tf.TransformPoint(p) for p in pts], pts, atol=1e-3)
    assert isinstance(reg.read_transform(o["dwi_xfm"]), sitk.Euler3DTransform)
    mask_mni = np.asarray(nib.load(o["anat_mask_mni"]).dataobj) > 0
    tpl_brain = np.asarray(mni_template()[1].dataobj) > 0
    assert 2 * (mask_mni & tpl_brain).sum() / (mask_mni.sum() + tpl_brain.sum()) > 0.9
    import pandas as pd

    motion = pd.read_csv(o["dwi_motion"], sep="\t")
    assert list(motion.columns) == MOTION_COLUMNS and len(motion) == 8 and np.abs(motion.to_numpy()).max() < 1e-6
    np.testing.assert_allclose(np.loadtxt(o["dwi_bvec"]), np.loadtxt(files["bvec"]), atol=1e-6)
    fa = np.asarray(nib.load(o["dwi_fa_mni"]).dataobj)
    inside = (np.asarray(nib.load(o["dwi_md_mni"]).dataobj) > 0) & tpl_brain
    assert 0.0 <= fa.min() and fa.max() <= 1.0 and np.median(fa[inside]) > 0.7  # the planted tensor's FA is 0.8
    conf = pd.read_csv(o["func_confounds"], sep="\t")
    assert len(conf) == 40 and list(conf.columns[:6]) == MOTION_COLUMNS
    assert nib.load(o["func_preproc"]).shape[3] == 40
    tools = [c[0] for c in calls]
    assert tools == ["bet", "flirt", "flirt", "fslmaths", "eddy_correct", "bet", "dtifit", "flirt", *["flirt"] * 4,
                     "fslroi", "mcflirt", "fslmaths", "bet", "flirt", "flirt", "flirt"]
    assert not any("my data" in arg for c in calls for arg in c)  # FSL sees copies in a space-free work folder


# ------------------------------------------------------------------------------------------------ the contract
@pytest.fixture(scope="module")
def fsl_run(tmp_path_factory) -> tuple[dict[str, str], Path]:
    """All three FSL stages on one synthetic subject, in folders whose names contain spaces."""
    from neuromoe.inputs.synth import make_cohort

    root = tmp_path_factory.mktemp("fsl") / "my data"
    bids = make_cohort(root / "bids dir", 1, seed=3)
    out = root / "out put"
    cfg = {"preprocessing": {"backend": "fsl", "anat": {"registration": "affine"},
                             "dwi": {"b0_threshold": 50, "fit_method": "WLS"},
                             "func": {"dummy_scans": 4, "band_hz": [0.01, 0.08], "nuisance": ["motion", "wm", "csf"]},
                             "fsl": {"bet_frac": 0.5, "bet_gradient": 0.0, "bet_robust": True,
                                     "dwi_correction": "eddy_correct"}}}
    o = {k: paths.derivative(out, "01", k) for k in paths.OUTPUTS}
    run_stage("anat", {"t1w": paths.raw(bids, "01", "T1w")}, {k: v for k, v in o.items() if "anat" in k}, "01", cfg)
    anat_in = {k: o[k] for k in ("anat_brain", "anat_mask", "anat_xfm")}
    run_stage("dwi", {**{k: paths.raw(bids, "01", k) for k in ("dwi", "bval", "bvec")}, **anat_in},
              {k: v for k, v in o.items() if "dwi" in k}, "01", cfg)
    run_stage("func", {"bold": paths.raw(bids, "01", "bold"), "bold_json": paths.raw(bids, "01", "bold_json"),
                       **anat_in}, {k: v for k, v in o.items() if "func" in k}, "01", cfg)
    return o, bids


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.fsl
@pytest.mark.skipif(bool(FSL_MISSING), reason=FSL_REASON or "FSL present")
def test_fsl_backend_contract(fsl_run):
    """The python backend's checks (tests/test_anat.py, test_dwi.py, test_func.py), on the FSL backend's outputs."""
    import pandas as pd

    from neuromoe.inputs.synth import read_truth
    from neuromoe.preproc.anat import mni_template

    o, bids = fsl_run
    tpl, tpl_mask = mni_template()
    for key, path in o.items():
        assert Path(path).is_file() and Path(path).stat().st_size > 0, key
        assert Path(path).name == Path(paths.derivative("x", "01", key)).name  # the python backend's names
    for key in [k for k in o if k.endswith("_mni")]:
        img = nib.load(o[key])
        assert img.shape == (99, 117, 95), key
        np.testing.assert_allclose(img.affine, tpl.affine, atol=1e-4)
        assert img.get_data_dtype() == (np.uint8 if "mask" in key else np.float32), key
    for key in ("anat_mask", "dwi_mask", "func_mask"):
        assert nib.load(o[key]).get_data_dtype() == np.uint8
    assert isinstance(reg.read_transform(o["anat_xfm"]), sitk.AffineTransform)
    for key in ("dwi_xfm", "func_xfm"):
        assert isinstance(reg.read_transform(o[key]), sitk.Euler3DTransform)
    truth = read_truth(bids, "01")
    mask = np.asarray(nib.load(o["anat_mask"]).dataobj) > 0
    d_native = _dice(mask, np.asarray(nib.load(str(truth["mask"])).dataobj) > 0)
    d_mni = _dice(np.asarray(nib.load(o["anat_mask_mni"]).dataobj) > 0, np.asarray(tpl_mask.dataobj) > 0)
    brain_xyz = nib.affines.apply_affine(tpl_mask.affine, np.argwhere(np.asarray(tpl_mask.dataobj) > 0)[::25])
    err = np.linalg.norm(nib.affines.apply_affine(reg.transform_to_ras(reg.read_transform(o["anat_xfm"])), brain_xyz)
                         - nib.affines.apply_affine(truth["pose"], brain_xyz), axis=1)
    print(f"\nFSL anat: Dice {d_native:.3f} (native), {d_mni:.3f} (MNI); anat_xfm vs pose {err.mean():.2f} mm")
    assert d_native > 0.85 and d_mni > 0.85 and err.mean() < 3.0
    n = len(np.loadtxt(paths.raw(bids, "01", "bval")))
    assert np.loadtxt(o["dwi_bvec"]).shape == (3, n)
    motion = pd.read_csv(o["dwi_motion"], sep="\t")
    assert list(motion.columns) == MOTION_COLUMNS and len(motion) == n
    conf = pd.read_csv(o["func_confounds"], sep="\t")
    assert list(conf.columns[:6]) == MOTION_COLUMNS and "framewise_displacement" in conf.columns
    fa = np.asarray(nib.load(o["dwi_fa_mni"]).dataobj)
    assert 0 <= fa.min() and fa.max() <= 1 and (fa > 0.2).sum() > 100


@pytest.mark.fsl
@pytest.mark.skipif(bool(FSL_MISSING), reason=FSL_REASON or "FSL present")
def test_par_matches_mcflirt_matrices(tmp_path):
    """With FSL: the .par conversion (FSL's Euler construction about the reference's centre of gravity) gives the
    matrices mcflirt itself writes with -mats."""
    from neuromoe.inputs.synth import SynthParams, make_cohort

    bids = make_cohort(tmp_path / "bids", 1, seed=5, params=SynthParams(n_bold=60))
    bold = nib.load(paths.raw(bids, "01", "bold"))
    iface = T.mcflirt_interface(paths.raw(bids, "01", "bold"), tmp_path / "mc.nii.gz", ref_vol=bold.shape[3] // 2)
    iface.inputs.save_mats = True
    T.run_interface(iface, tmp_path, subject="01", stage="func", step="mcflirt")
    par = X.read_par(next(p for p in (tmp_path / "mc.nii.gz.par", tmp_path / "mc.par") if p.exists()))
    mats_dir = next(p for p in (tmp_path / "mc.nii.gz.mat", tmp_path / "mc.mat") if p.is_dir())
    mats = np.stack([np.loadtxt(mats_dir / f"MAT_{k:04d}") for k in range(bold.shape[3])])
    ref = np.asarray(bold.dataobj[..., bold.shape[3] // 2], np.float32)
    ours = X.par_to_flirt(par, X.mcflirt_centre(ref, bold))
    np.testing.assert_allclose(ours, mats, atol=2e-3)


# Last in the module: the plans started with the module have had the other tests' time to finish.
def test_both_backends_plan_the_same_outputs(plans):
    python, fsl = _planned(plans["python"]), _planned(plans["fsl"])
    stage_files = {f for f, rule in python if rule in ("anat", "dwi", "func")}
    keys = [k for k in paths.OUTPUTS if k not in paths.SERIES]  # the 4D series: preprocessing.keep_series only
    expected = {paths.derivative("results", s, k) for s in ("01", "02", "03") for k in keys}
    assert stage_files == expected  # every other neuromoe.paths output of every subject, nothing else
    assert fsl == python


def test_fsl_backend_without_fsl_fails_at_start_up(plans):
    res = plans["fsl_absent"]
    assert res.returncode != 0, "the workflow started with backend fsl although FSL is absent"
    assert "--use-conda" in res.stdout and "FSL" in res.stdout
