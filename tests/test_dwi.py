"""Diffusion stage (neuromoe.preproc.dwi): tensor fit against references, b=0 mask, the whole stage.

References: dipy's TensorModel (WLS, OLS) on dipy's bundled real DWI (shipped inside the dipy package,
no download); MRtrix3's dwi2tensor/tensor2metric when on PATH; exact recovery of a synthetic tensor
field. The stage test runs ``run_dwi`` on a small phantom built from the MNI template nilearn ships
(tensor field with known FA, head motion, noise) and checks every output.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from neuromoe import paths
from neuromoe.config import DwiConfig
from neuromoe.errors import StageError
from neuromoe.preproc.dwi import b0_mask, fit_tensor, median_otsu_mask, run_dwi, tensor_scalars
from neuromoe.preproc.motion import MOTION_COLUMNS, bvec_frame, rotation_matrix


def _dipy_file(name: str) -> tuple[str, str, str]:
    """(nii, bval, bvec) of a DWI bundled with dipy; fails (rather than downloads) if it is not bundled."""
    import dipy
    from dipy.data import get_fnames

    files = tuple(str(f) for f in get_fnames(name=name))
    pkg = str(Path(dipy.__file__).parent)
    assert all(f.startswith(pkg) and Path(f).exists() for f in files), f"{name} is not bundled: {files}"
    return files


def _load_real(name: str):
    from dipy.io.gradients import read_bvals_bvecs

    nii, bval, bvec = _dipy_file(name)
    img = nib.load(nii)
    data = img.get_fdata()
    bvals, bvecs = read_bvals_bvecs(bval, bvec)
    mask = data[..., bvals <= 50].mean(-1) > 0
    return img, data, bvals, bvecs.T, mask, (nii, bval, bvec)


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


# ----------------------------------------------------------------------------------------------- tensor fit
@pytest.mark.parametrize("name", ["small_101D", "small_64D"])
@pytest.mark.parametrize("method", ["WLS", "OLS"])
def test_fit_matches_dipy_on_real_dwi(name, method):
    """Same estimator as dipy's TensorModel: FA and MD correlations >= 0.9999 inside the mask (the issue
    asks >= 0.99 FA, >= 0.95 MD) and FA within 1e-3 everywhere."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    img, data, bvals, bvecs, mask, _ = _load_real(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = TensorModel(gradient_table(bvals, bvecs=np.nan_to_num(bvecs.T)), fit_method=method).fit(data, mask)
    mine = fit_tensor(data, bvals, bvecs, mask, method=method)
    r_fa, r_md = _corr(ref.fa[mask], mine["FA"][mask]), _corr(ref.md[mask], mine["MD"][mask])
    print(f"\n{name} {method}: r(FA) {r_fa:.6f}  r(MD) {r_md:.6f}")
    assert r_fa >= 0.9999 and r_md >= 0.9999
    assert np.abs(ref.fa[mask] - mine["FA"][mask]).max() < 1e-3
    assert np.allclose(mine["MD"][mask], ref.md[mask], rtol=1e-3, atol=1e-7)
    assert (mine["FA"][~mask] == 0).all()


def test_fit_matches_mrtrix3():
    """Second, independent reference: MRtrix3 dwi2tensor (iterated WLS) + tensor2metric on small_101D.
    Thresholds of the issue: r(FA) >= 0.99, r(MD) >= 0.95 (dipy WLS vs MRtrix3 gives ~0.995 / 0.977)."""
    if shutil.which("dwi2tensor") is None or shutil.which("tensor2metric") is None:
        print("SKIP reason: MRtrix3 (dwi2tensor, tensor2metric) not on PATH; apt-get install mrtrix3")
        pytest.skip("MRtrix3 not on PATH")
    img, data, bvals, bvecs, mask, (nii, bval, bvec) = _load_real("small_101D")
    tmp = Path(__import__("tempfile").mkdtemp())
    try:
        subprocess.run(["dwi2tensor", "-quiet", "-force", "-fslgrad", bvec, bval, nii, str(tmp / "dt.mif")],
                       check=True, timeout=60)
        subprocess.run(["tensor2metric", "-quiet", "-force", "-fa", str(tmp / "fa.nii"), "-adc",
                        str(tmp / "md.nii"), str(tmp / "dt.mif")], check=True, timeout=60)
        fa_ref = nib.load(tmp / "fa.nii").get_fdata()
        md_ref = nib.load(tmp / "md.nii").get_fdata()
    finally:
        shutil.rmtree(tmp)
    mine = fit_tensor(data, bvals, bvecs, mask, method="WLS")
    r_fa, r_md = _corr(fa_ref[mask], mine["FA"][mask]), _corr(md_ref[mask], mine["MD"][mask])
    print(f"\nMRtrix3 vs ours (WLS) on small_101D: r(FA) {r_fa:.4f}  r(MD) {r_md:.4f}")
    assert r_fa >= 0.99 and r_md >= 0.95


def _random_tensors(rng, n):
    """n random tensors with known eigenvalues (mm^2/s) and orientations."""
    evals = np.sort(rng.uniform(0.1e-3, 2.0e-3, (n, 3)), axis=1)[:, ::-1]
    q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    tensors = np.einsum("nij,nj,nkj->nik", q, evals, q)
    return tensors, evals, q[:, :, 0]


@pytest.mark.parametrize("method", ["WLS", "OLS", "NLLS"])
def test_synthetic_tensor_field_recovered(method):
    """Noise-free signals from known tensors on a real 64-direction scheme: FA to 1e-3, MD/AD/RD to 1e-3
    relative, principal direction to 0.1 degree."""
    _, _, bvals, bvecs, _, _ = _load_real("small_64D")
    g = np.nan_to_num(bvecs)
    rng = np.random.default_rng(0)
    shape = (6, 5, 4)
    tensors, evals, e1 = _random_tensors(rng, int(np.prod(shape)))
    s0 = rng.uniform(500, 2000, len(tensors))
    signal = s0[:, None] * np.exp(-bvals[None] * np.einsum("in,vij,jn->vn", g, tensors, g))
    fit = fit_tensor(signal.reshape(shape + (-1,)), bvals, g, method=method)
    truth = tensor_scalars(evals)
    for k in ("FA", "MD", "AD", "RD"):
        est = fit[k].reshape(-1)
        tol = 1e-3 if k == "FA" else 1e-3 * truth[k]
        assert np.all(np.abs(est - truth[k]) <= tol), k
    dots = np.abs(np.einsum("vi,vi->v", fit["evecs"].reshape(-1, 3, 3)[:, :, 0], e1))
    assert np.rad2deg(np.arccos(np.clip(dots.min(), 0, 1))) < 0.1
    assert np.allclose(fit["S0"].reshape(-1), s0, rtol=1e-3)


# ----------------------------------------------------------------------------------------------- phantom
C0 = np.array([0.0, -18.0, 10.0])  # brain centre (MNI mm), rotation centre of the phantom's poses
WM_EVALS = np.array([1.7e-3, 0.3e-3, 0.3e-3])
GM_D, CSF_D, SCALP_D = 0.8e-3, 3.0e-3, 1.0e-3


def _rigid(p, c=C0):
    m = np.eye(4)
    m[:3, :3] = rotation_matrix(*np.deg2rad(p[3:]))
    m[:3, 3] = np.asarray(p[:3]) + c - m[:3, :3] @ c
    return m


def _e1(x):
    """Smooth WM fibre direction field (unit vectors) at MNI points x (3, V)."""
    a = x[0] / 35.0 + x[2] / 50.0
    v = np.stack([np.cos(a), np.sin(a), 0.4 * np.cos(x[1] / 40.0)])
    return v / np.linalg.norm(v, axis=0)


@pytest.fixture(scope="module")
def tissue():
    """Tissue fractions and S0 on the 2 mm MNI grid (from nilearn's shipped template and priors)."""
    from nilearn import datasets

    brain = datasets.load_mni152_brain_mask(resolution=2)
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata()
    b = brain.get_fdata() > 0
    t1 = datasets.load_mni152_template(resolution=2).get_fdata()
    csf = np.clip(b - wm - gm, 0, 1)
    scalp = ((~b) & (t1 > 0.1)).astype(float)
    maps = np.stack([wm, gm, csf, scalp, t1 * b])  # (5, X, Y, Z)
    # point-spread function of a ~3 mm acquisition (FWHM ~4.7 mm): no aliasing when sampled at 3 mm
    maps = ndimage.gaussian_filter(maps, (0, 1.0, 1.0, 1.0)).astype(np.float32)
    return maps, brain.affine


def _sample(maps, maps_aff, aff, shape, world_to_mni):
    """Maps (C, ...) at the voxels of grid (aff, shape) whose world points map to MNI by world_to_mni."""
    ijk = np.indices(shape).reshape(3, -1).astype(float)
    x = world_to_mni[:3, :3] @ (aff[:3, :3] @ ijk + aff[:3, 3:]) + world_to_mni[:3, 3:]
    vox = np.linalg.solve(maps_aff[:3, :3], x - maps_aff[:3, 3:])
    return np.stack([ndimage.map_coordinates(m, vox, order=1) for m in maps]), x


def _signal(fr, x, q, b):
    """Mixture-tensor signal for unit directions q (3, V) (in the MNI frame) at b (s/mm^2)."""
    wm, gm, csf, scalp = fr[:4]
    tot = np.maximum(wm + gm + csf + scalp, 1e-6)
    s0 = 1000 * (0.7 * wm + 0.9 * gm + 1.6 * csf + 0.15 * scalp) / np.maximum(tot, 1)
    adc_wm = WM_EVALS[1] + (WM_EVALS[0] - WM_EVALS[1]) * np.einsum("iv,iv->v", q, _e1(x)) ** 2
    adc = (wm * adc_wm + gm * GM_D + csf * CSF_D + scalp * SCALP_D) / tot
    return s0 * np.exp(-b * adc)


def _true_fa_mni(tissue):
    maps, aff = tissue
    wm, gm, csf, scalp = maps[:4]
    tot = np.maximum(wm + gm + csf + scalp, 1e-6)
    iso = (wm * WM_EVALS[1] + gm * GM_D + csf * CSF_D + scalp * SCALP_D) / tot
    extra = wm * (WM_EVALS[0] - WM_EVALS[1]) / tot  # one eigenvalue iso + extra, two iso
    return tensor_scalars(np.stack([iso + extra, iso, iso], -1))


def _write_subject(tmp: Path, tissue, subject: str, rng) -> tuple[dict, dict, np.ndarray]:
    """A BIDS-like DWI (oblique LAS grid, 3 mm, 3 b=0 + 12 directions, head motion, Rician noise) and an
    anat stage output (T1w brain, mask, T1w -> MNI transform) for ``run_dwi``."""
    from neuromoe.preproc import registration as reg

    maps, maps_aff = tissue
    pose = _rigid([4.0, -5.0, 6.0, 6.0, -4.0, 8.0])      # MNI point -> subject (T1w) world point
    t1_aff = np.diag([3.0, 3.0, 3.0, 1.0])
    t1_aff[:3, 3] = [-96.0, -132.0, -70.0]
    t1_shape = (66, 78, 63)
    (t1_fr, _) = _sample(maps, maps_aff, t1_aff, t1_shape, np.linalg.inv(pose))
    t1 = t1_fr[4].reshape(t1_shape)
    t1_mask = ndimage.binary_fill_holes(t1 > 0.05)
    d_anat = tmp / "anat"
    d_anat.mkdir()
    nib.save(nib.Nifti1Image(t1.astype(np.float32), t1_aff), d_anat / "brain.nii.gz")
    nib.save(nib.Nifti1Image(t1_mask.astype(np.uint8), t1_aff), d_anat / "mask.nii.gz")
    reg.write_transform(reg.ras_to_transform(pose), d_anat / "xfm.txt")  # MNI points -> T1w points

    # DWI: reference head pose = pose then a small inter-scan shift; per-volume motion on top.
    inter = _rigid([2.0, -1.5, 1.0, 2.0, 1.0, -2.0], c=pose[:3, :3] @ C0 + pose[:3, 3])
    ref_pose = inter @ pose
    lin = rotation_matrix(0.1, 0.05, -0.08) @ np.diag([-3.0, 3.0, 3.0])  # oblique, LAS (det < 0)
    shape = (64, 76, 62)
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = (ref_pose[:3, :3] @ C0 + ref_pose[:3, 3]) - lin @ ((np.array(shape) - 1) / 2)
    bvals = np.r_[0.0, np.full(6, 1000.0), 0.0, np.full(6, 1000.0), 5.0]
    n = len(bvals)
    dirs = rng.normal(size=(3, n))
    dirs /= np.linalg.norm(dirs, axis=0)
    bvecs = np.where(bvals > 50, dirs, 0.0)
    motion = np.zeros((n, 6))
    motion[1:, :3] = rng.uniform(-2.5, 2.5, (n - 1, 3))
    motion[1:, 3:] = rng.uniform(-2.5, 2.5, (n - 1, 3))  # degrees
    c_ref = ref_pose[:3, :3] @ C0 + ref_pose[:3, 3]
    g_world = bvec_frame(aff) @ bvecs
    vols = []
    for k in range(n):
        full = _rigid(motion[k], c=c_ref) @ ref_pose  # MNI -> world at volume k
        fr, x = _sample(maps[:4], maps_aff, aff, shape, np.linalg.inv(full))
        q = full[:3, :3].T @ g_world[:, k:k + 1] * np.ones((1, fr.shape[1]))  # gradient in the MNI frame
        vols.append(_signal(fr, x, q, bvals[k]).reshape(shape))
    data = np.stack(vols, -1)
    sigma = 1000 / 30.0  # SNR 30 on WM-ish b=0
    data = np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2 + rng.normal(0, sigma, data.shape) ** 2)
    d_dwi = tmp / f"sub-{subject}" / "dwi"
    d_dwi.mkdir(parents=True)
    inputs = {k: paths.raw(tmp, subject, k) for k in ("dwi", "bval", "bvec")}
    nib.save(nib.Nifti1Image(data.astype(np.float32), aff), inputs["dwi"])
    np.savetxt(inputs["bval"], bvals[None], fmt="%g")
    np.savetxt(inputs["bvec"], bvecs, fmt="%.6f")
    inputs |= {"anat_brain": str(d_anat / "brain.nii.gz"), "anat_mask": str(d_anat / "mask.nii.gz"),
               "anat_xfm": str(d_anat / "xfm.txt")}
    truth = {"motion": motion, "ref_pose": ref_pose, "c_ref": c_ref, "affine": aff}
    return inputs, truth, bvals


CONFIG = DwiConfig(b0_threshold=50, fit_method="WLS")


@pytest.fixture(scope="module")
def stage_run(tissue, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dwi")
    rng = np.random.default_rng(7)
    inputs, truth, bvals = _write_subject(tmp, tissue, "01", rng)
    # (the JSON sidecars are run_stage's, not the stage function's)
    keys = [k for k in paths.OUTPUTS if k.startswith(("dwi_", "qc_dwi_")) and not k.endswith("_json")]
    outputs = {k: paths.derivative(tmp / "out", "01", k) for k in keys}
    t0 = time.perf_counter()
    run_dwi(inputs, outputs, "01", CONFIG, threads=1)
    seconds = time.perf_counter() - t0
    print(f"\nrun_dwi on {len(bvals)} volumes (64x76x62, 3 mm): {seconds:.1f} s")
    return inputs, outputs, truth, bvals


def test_run_dwi_writes_every_output(stage_run):
    inputs, outputs, truth, bvals = stage_run
    for k, p in outputs.items():
        assert Path(p).exists() and Path(p).stat().st_size > 0, k
    n = len(bvals)
    assert nib.load(outputs["dwi_preproc"]).shape == nib.load(inputs["dwi"]).shape
    assert np.allclose(np.loadtxt(outputs["dwi_bval"]), bvals)
    assert np.loadtxt(outputs["dwi_bvec"]).shape == (3, n)
    motion = pd.read_csv(outputs["dwi_motion"], sep="\t")
    assert list(motion.columns) == MOTION_COLUMNS and len(motion) == n
    for m in ("fa", "md", "ad", "rd"):
        native = nib.load(outputs[f"dwi_{m}"])
        mni = nib.load(outputs[f"dwi_{m}_mni"])
        assert native.shape == nib.load(inputs["dwi"]).shape[:3] and native.get_data_dtype() == np.float32
        assert mni.shape == (99, 117, 95) and np.allclose(mni.affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    mask = nib.load(outputs["dwi_mask"])
    assert mask.get_data_dtype() == np.uint8


def test_run_dwi_motion_recovered(stage_run):
    """The simulated per-volume motion (up to 2.5 mm / 2.5 degrees) is recovered to 0.5 mm / 0.5 degree.

    The reference is the mean of the b=0 volumes aligned to the first one, i.e. volume 0's pose (which
    has no motion). Rotations are compared directly; translations as the displacement of the brain centre
    (the motion table's rotation centre is the brain centroid; the written mask's centroid is used here,
    within a voxel of it, which adds < 0.15 mm at 2.5 degrees).
    """
    from neuromoe.preproc.motion import params_to_affines

    _, outputs, truth, bvals = stage_run
    est_params = pd.read_csv(outputs["dwi_motion"], sep="\t")
    mask_img = nib.load(outputs["dwi_mask"])
    centre = mask_img.affine[:3, :3] @ np.argwhere(mask_img.get_fdata() > 0).mean(0) + mask_img.affine[:3, 3]
    est = params_to_affines(est_params, centre)
    t_err, r_err = [], []
    for k, p in enumerate(truth["motion"]):
        m = _rigid(p, c=truth["c_ref"])
        d = est[k][:3, :3].T @ m[:3, :3]
        r_err.append(np.rad2deg(np.arccos(np.clip((np.trace(d) - 1) / 2, -1, 1))))
        t_err.append(np.linalg.norm((est[k] @ np.r_[centre, 1] - m @ np.r_[centre, 1])[:3]))
    print(f"\nDWI motion error: max {max(t_err):.3f} mm, {max(r_err):.3f} deg over {len(bvals)} volumes")
    assert max(t_err) < 0.5 and max(r_err) < 0.5


def test_run_dwi_maps_match_truth(stage_run, tissue):
    """FA and MD in MNI space against the phantom's true FA/MD (a registration or frame error, e.g. a
    wrong transform direction or b-vector flip, drops these correlations far below the thresholds)."""
    _, outputs, _, _ = stage_run
    true = _true_fa_mni(tissue)
    maps, _ = tissue
    brain = (maps[0] + maps[1] + maps[2]) > 0.5
    inner = ndimage.binary_erosion(brain, iterations=3)
    fa = nib.load(outputs["dwi_fa_mni"]).get_fdata()
    md = nib.load(outputs["dwi_md_mni"]).get_fdata()
    r_fa = _corr(fa[inner], true["FA"][inner])
    r_md = _corr(md[inner], true["MD"][inner])
    print(f"\nMNI maps vs truth: r(FA) {r_fa:.3f}  r(MD) {r_md:.3f}")
    assert r_fa > 0.8 and r_md > 0.8


def test_run_dwi_principal_direction(stage_run):
    """Round trip through the written files: the corrected DWI and its rotated b-vectors give principal
    directions (in RAS world) matching the phantom's fibre field in white matter (median < 12 degrees)."""
    inputs, outputs, truth, bvals = stage_run
    img = nib.load(outputs["dwi_preproc"])
    mask = nib.load(outputs["dwi_mask"]).get_fdata() > 0
    fit = fit_tensor(img.get_fdata(), np.loadtxt(outputs["dwi_bval"]), np.loadtxt(outputs["dwi_bvec"]), mask)
    wm = (fit["FA"] > 0.45) & mask
    aff = truth["affine"]
    e1_world = bvec_frame(aff) @ fit["evecs"][wm][:, :, 0].T             # (3, V) RAS
    ijk = np.argwhere(wm).T.astype(float)
    world = aff[:3, :3] @ ijk + aff[:3, 3:]
    inv = np.linalg.inv(truth["ref_pose"])
    x_mni = inv[:3, :3] @ world + inv[:3, 3:]
    e1_true = truth["ref_pose"][:3, :3] @ _e1(x_mni)                      # fibre direction in world
    ang = np.rad2deg(np.arccos(np.clip(np.abs(np.einsum("iv,iv->v", e1_world, e1_true)), 0, 1)))
    print(f"\nprincipal direction error in WM ({wm.sum()} voxels): median {np.median(ang):.1f} deg")
    assert wm.sum() > 200 and np.median(ang) < 12


# ----------------------------------------------------------------------------------------------- mask
def _noisy_b0(tissue, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 3 mm b=0 phantom with scalp and Rician-like noise: (b0 float32, affine, true brain WM+GM+CSF > 0.5)."""
    maps, maps_aff = tissue
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    aff[:3, 3] = [-96.0, -132.0, -70.0]
    shape = (66, 78, 63)
    fr, x = _sample(maps, maps_aff, aff, shape, np.eye(4))
    b0 = _signal(fr, x, np.zeros((3, fr.shape[1])), 0.0).reshape(shape)
    b0 = np.abs(b0 + np.random.default_rng(seed).normal(0, 30, shape)).astype(np.float32)
    return b0, aff, ((fr[0] + fr[1] + fr[2]) > 0.5).reshape(shape)


def test_b0_mask_is_the_brain(tissue):
    """On a 3 mm b=0 phantom with scalp and noise: Dice >= 0.9 with the true brain (WM+GM+CSF > 0.5)."""
    b0, aff, truth = _noisy_b0(tissue, 3)
    mask = b0_mask(nib.Nifti1Image(b0[..., None].astype(np.float32), aff), np.array([0.0]), 50)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    print(f"\nb0 mask Dice {dice:.3f}")
    assert dice >= 0.9


@pytest.mark.parametrize("radius", [1, 2])
def test_the_b0_mask_threshold_is_dipys_median_otsu(tissue, radius):
    """``median_otsu_mask`` (imported without dipy's tensor module) is voxel for voxel dipy's median_otsu mask
    on a noisy b=0 phantom, for the radii the stage uses (1 voxel at 3-4 mm, 2 at 2 mm)."""
    from dipy.segment.mask import median_otsu

    b0, _, _ = _noisy_b0(tissue, 5)
    ours = median_otsu_mask(b0, radius, numpass=2)
    _, theirs = median_otsu(b0, median_radius=radius, numpass=2)
    assert ours.dtype == bool and 0.1 < ours.mean() < 0.9
    np.testing.assert_array_equal(ours, theirs)


# ----------------------------------------------------------------------------------------------- errors
def _tiny_subject(tmp: Path, bvals, n_vol=None, bvecs=None):
    n_vol = len(bvals) if n_vol is None else n_vol
    d = tmp / "sub-09" / "dwi"
    d.mkdir(parents=True, exist_ok=True)
    inputs = {k: paths.raw(tmp, "09", k) for k in ("dwi", "bval", "bvec")}
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.uniform(100, 200, (8, 8, 8, n_vol)).astype(np.float32), np.eye(4)),
             inputs["dwi"])
    np.savetxt(inputs["bval"], np.asarray(bvals, float)[None], fmt="%g")
    if bvecs is None:
        bvecs = rng.normal(size=(3, len(bvals)))
    np.savetxt(inputs["bvec"], bvecs, fmt="%.6f")
    inputs |= {"anat_brain": "unused", "anat_mask": "unused", "anat_xfm": "unused"}
    return inputs


def test_no_b0_volume_is_a_stage_error(tmp_path):
    inputs = _tiny_subject(tmp_path, [1000.0] * 8)
    with pytest.raises(StageError) as err:
        run_dwi(inputs, {}, "09", CONFIG)
    msg = str(err.value)
    assert msg.startswith("[sub-09] dwi: ") and "no b=0 volume" in msg and "sub-09_dwi.bval" in msg
    assert "fix:" in msg


def test_count_mismatch_is_a_stage_error(tmp_path):
    inputs = _tiny_subject(tmp_path, [0.0] + [1000.0] * 7, n_vol=9)
    with pytest.raises(StageError, match=r"\[sub-09\] dwi: .*8 b-values but the image has 9 volumes"):
        run_dwi(inputs, {}, "09", CONFIG)


def test_too_few_directions_is_a_stage_error(tmp_path):
    bvecs = np.tile(np.array([[1.0], [0.0], [0.0]]), (1, 8))
    inputs = _tiny_subject(tmp_path, [0.0] + [1000.0] * 7, bvecs=bvecs)
    with pytest.raises(StageError, match=r"\[sub-09\] dwi: .*non-collinear"):
        run_dwi(inputs, {}, "09", CONFIG)


def test_missing_anat_input_fails_before_the_slow_part(tmp_path):
    from neuromoe.errors import InputError

    rng = np.random.default_rng(1)
    inputs = _tiny_subject(tmp_path, [0.0] + [1000.0] * 7, bvecs=rng.normal(size=(3, 8)))
    with pytest.raises(InputError, match=r"\[sub-09\] unused: file not found .*anat stage"):
        run_dwi(inputs, {}, "09", CONFIG)

