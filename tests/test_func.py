"""Tests of neuromoe.preproc.func: closed forms on synthetic series, errors, and one small end-to-end run.

Thresholds are stated next to each assertion with the reason for them.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from neuromoe.config import FuncConfig
from neuromoe.errors import StageError
from neuromoe.preproc import func as F
from neuromoe.preproc import series as S

TR = 2.0


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------- inputs

def _sidecar(tmp_path, meta):
    p = tmp_path / "sub-07_task-rest_bold.json"
    p.write_text(json.dumps(meta))
    return p


def test_repetition_time_reads_sidecar(tmp_path):
    assert F.repetition_time(_sidecar(tmp_path, {"RepetitionTime": 2.5, "TaskName": "rest"}), "07") == 2.5


@pytest.mark.parametrize("meta", [{"TaskName": "rest"}, {"RepetitionTime": 0}, {"RepetitionTime": -2.0},
                                  {"RepetitionTime": "2"}, {"RepetitionTime": 2000}])
def test_repetition_time_bad_or_missing_is_stage_error(tmp_path, meta):
    path = _sidecar(tmp_path, meta)
    with pytest.raises(StageError) as err:
        F.repetition_time(path, "07")
    msg = str(err.value)
    assert "sub-07" in msg and path.name in msg and "RepetitionTime" in msg
    assert err.value.fix and ("RepetitionTime" in err.value.fix or "write" in err.value.fix)


def test_repetition_time_missing_file(tmp_path):
    with pytest.raises(StageError, match="sub-07"):
        F.repetition_time(tmp_path / "nope.json", "07")


def _bold(n_vols: int, shape=(4, 4, 4), tr=TR) -> nib.Nifti1Image:
    data = np.arange(np.prod(shape) * n_vols, dtype=np.float32).reshape(*shape, n_vols)
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_zooms((3.0, 3.0, 3.0, tr))
    return img


def test_drop_dummy_scans_keeps_the_tail():
    img = _bold(60)
    out = F.drop_dummy_scans(img, 4, TR, subject="07")
    assert out.shape == (4, 4, 4, 56)
    np.testing.assert_array_equal(out.get_fdata()[..., 0], img.get_fdata()[..., 4])
    np.testing.assert_array_equal(out.affine, img.affine)
    assert out.header.get_zooms()[3] == TR


def test_drop_dummy_scans_too_few_volumes():
    # 52 - 4 = 48 volumes * 2 s = 96 s < 100 s = 1 / 0.01 Hz: one period of the lowest band frequency is not
    # seen.
    assert F.min_volumes(TR, 0.01) == 50
    with pytest.raises(StageError) as err:
        F.drop_dummy_scans(_bold(52), 4, TR, subject="07")
    msg = str(err.value)
    assert "sub-07" in msg and "func" in msg
    assert "48 volumes" in msg and "50 volumes" in msg and "0.01 Hz" in msg
    # exactly at the limit is accepted
    assert F.drop_dummy_scans(_bold(54), 4, TR, subject="07").shape[3] == 50


# ---------------------------------------------------------------------------------------------- confounds

def test_framewise_displacement_hand_value():
    params = pd.DataFrame(
        [[0, 0, 0, 0, 0, 0],
         [1.0, -0.5, 0.0, 0.01, 0.0, -0.02],
         [1.0, 0.0, 0.2, 0.01, 0.005, -0.02]],
        columns=F.MOTION_COLUMNS)
    # row 1: 1 + 0.5 + 0 + 50 * (0.01 + 0 + 0.02) = 3.0; row 2: 0 + 0.5 + 0.2 + 50 * 0.005 = 0.95
    np.testing.assert_allclose(F.framewise_displacement(params), [0.0, 3.0, 0.95], atol=1e-12)


def test_dvars_spike_and_standardised_null():
    rng = _rng(1)
    n_v, n_t = 4000, 100
    # white noise around 1000: DVARS ~ sqrt(2) sigma, std_dvars ~ 1 (AR1 ~ 0, robust sigma ~ sigma)
    x = 1000.0 + 10.0 * rng.standard_normal((n_v, n_t))
    dv, std = F.dvars(x)
    assert np.isnan(dv[0]) and np.isnan(std[0]) and dv.shape == (n_t,)
    assert abs(np.nanmean(std) - 1.0) < 0.05  # 4000 voxels: sampling error of the mean well under 0.01
    assert abs(np.nanmean(dv) - np.sqrt(2) * 10.0) < 0.3  # scale factor 1000 / median mean ~ 1 +- 1e-3
    # a global +50 step on frame 40 only: DVARS at 40 and 41 jump to ~50, the rest stay ~14
    y = x.copy()
    y[:, 40] += 50.0
    dv2, _ = F.dvars(y)
    assert dv2[40] > 45 and dv2[41] > 45 and np.nanmax(np.delete(dv2, [40, 41])) < 20
    # 4D + mask gives the same as (V, T)
    vol = np.zeros((20, 20, 10, n_t))
    mask = np.zeros((20, 20, 10), bool)
    mask[:, :, :] = True
    vol[mask] = x
    np.testing.assert_allclose(F.dvars(vol, mask)[0][1:], dv[1:])


def test_confounds_table_columns():
    n = 10
    params = np.zeros((n, 6))
    fd = F.framewise_displacement(params)
    dv, std = np.r_[np.nan, np.ones(n - 1)], np.r_[np.nan, np.ones(n - 1)]
    df = F.confounds_table(params, fd, dv, np.arange(n), np.arange(n), std_dvars=std)
    assert list(df.columns) == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                                "framewise_displacement", "dvars", "std_dvars", "white_matter", "csf"]
    assert len(df) == n
    with pytest.raises(ValueError, match="white_matter"):
        F.confounds_table(params, fd, dv, np.arange(n - 1), np.arange(n))


# ---------------------------------------------------------------------------------------------- regression

def test_regress_nuisance_removes_regressors_and_trend():
    rng = _rng(2)
    n_v, n_t = 500, 120
    reg = rng.standard_normal((n_t, 3))
    signal = rng.standard_normal((n_v, n_t))
    beta = rng.uniform(-5, 5, (n_v, 3))
    trend = np.outer(rng.uniform(-3, 3, n_v), np.arange(n_t) / n_t)
    mean = rng.uniform(100, 1000, (n_v, 1))
    y = mean + signal + beta @ reg.T + trend
    res = S.regress_nuisance(y, reg, detrend=True, keep_mean=True).astype(np.float64)
    # OLS residuals are orthogonal to every centred regressor and the trend (float32 output: 1e-3 relative)
    design = np.column_stack([reg - reg.mean(0), np.arange(n_t) - (n_t - 1) / 2])
    proj = (res - res.mean(1, keepdims=True)) @ design / np.linalg.norm(design, axis=0)
    assert np.abs(proj).max() < 1e-2
    np.testing.assert_allclose(res.mean(1), y.mean(1), rtol=1e-5)  # temporal mean kept
    # what is left is the signal minus its own projection: correlation with the truth > 0.95 for K=5, T=120
    r = [np.corrcoef(res[i], signal[i])[0, 1] for i in range(n_v)]
    assert np.median(r) > 0.95
    assert np.abs(S.regress_nuisance(y, reg, keep_mean=False).mean(1)).max() < 1e-3
    with pytest.raises(ValueError, match="NaN"):
        S.regress_nuisance(y, np.r_[np.nan, np.ones(n_t - 1)])


# ---------------------------------------------------------------------------------------------- fALFF

def test_falff_sine_in_band_is_near_one():
    # 0.05 Hz at TR 2 s over 200 volumes = exactly 20 cycles: all amplitude on one in-band bin, apart from the
    # small broadband leak of the linear detrend (measured 0.92), hence >= 0.9.
    t = np.arange(200) * TR
    x = 3.0 * np.sin(2 * np.pi * 0.05 * t)[None] + 500.0
    assert S.falff(x, TR)[0] >= 0.9
    # out of band (0.2 Hz) -> near 0
    assert S.falff(np.sin(2 * np.pi * 0.2 * t)[None], TR)[0] < 0.1
    # ALFF of that in-band sine recovers ~ its amplitude spread over the band's bins
    a = S.alff(x, TR)[0]
    n_bins = np.sum((np.fft.rfftfreq(200, TR) >= 0.01) & (np.fft.rfftfreq(200, TR) <= 0.08))
    assert abs(a * n_bins - 3.0) < 0.3


def test_falff_white_noise_is_band_share():
    # Flat expected amplitude spectrum: fALFF ~ fraction of bins in band = 29/100 at T=200, TR=2
    # (~ 0.07 / 0.25 = 0.28 in continuous frequency). Averaged over 2000 voxels, within 0.05 of 0.28.
    x = _rng(3).standard_normal((2000, 200))
    f = S.falff(x, TR)
    assert abs(f.mean() - 0.07 / (1 / (2 * TR))) < 0.05
    assert np.all((f >= 0) & (f <= 1))
    assert S.falff(np.ones((3, 200)), TR).tolist() == [0.0, 0.0, 0.0]  # constant: no spectrum, 0


def test_bandpass_keeps_band_only():
    t = np.arange(200) * TR
    low, high = np.sin(2 * np.pi * 0.05 * t), np.sin(2 * np.pi * 0.2 * t)
    out = S.bandpass((low + high + 10)[None], TR)[0]
    np.testing.assert_allclose(out - 10, low, atol=0.05)


# ---------------------------------------------------------------------------------------------- ReHo

def _cube_mask(n=12):
    m = np.zeros((n, n, n), bool)
    m[1:-1, 1:-1, 1:-1] = True
    return m


def test_reho_identical_neighbours_is_one():
    rng = _rng(4)
    n_t = 60
    ts = rng.standard_normal(n_t)
    data = np.broadcast_to(ts, (10, 10, 10, n_t)).copy()
    data *= rng.uniform(1, 3, (10, 10, 10, 1))  # monotone (positive) scaling keeps ranks: still W = 1
    mask = _cube_mask(10)
    w = S.reho(data, mask)
    np.testing.assert_allclose(w[mask], 1.0, atol=1e-6)
    assert np.all(w[~mask] == 0)


def test_reho_matches_direct_kendall_w():
    rng = _rng(5)
    n_t = 40
    data = rng.standard_normal((8, 8, 8, n_t))
    mask = _cube_mask(8)
    w = S.reho(data, mask)
    # direct W at an interior voxel and at a mask corner (K = 8: only in-mask neighbours count)
    for v, sl in [((4, 4, 4), np.s_[3:6, 3:6, 3:6]), ((1, 1, 1), np.s_[1:3, 1:3, 1:3])]:
        blk = data[sl].reshape(-1, n_t)
        k = blk.shape[0]
        r = stats.rankdata(blk, axis=1).sum(0)
        s = np.sum((r - r.mean()) ** 2)
        assert abs(w[v] - 12 * s / (k**2 * (n_t**3 - n_t))) < 1e-6


def test_reho_independent_noise_is_near_null():
    # For K independent series E[W] = 1/K exactly (mean pairwise Spearman rho = (K W - 1)/(K - 1) has mean 0).
    # Interior voxels: K = 27, null 0.0370; measured mean over 512 interior voxels ~0.038 (sd of the mean
    # ~1e-3, but neighbouring W's share voxels), so within 0.005. Over the whole mask the null is mean(1/K).
    rng = _rng(6)
    n_t = 100
    data = rng.standard_normal((12, 12, 12, n_t))
    mask = _cube_mask(12)
    w = S.reho(data, mask)
    assert abs(w[3:9, 3:9, 3:9].mean() - 1 / 27) < 0.005
    null = S.null_reho(mask)
    assert abs(w[mask].mean() - null[mask].mean()) < 0.005
    for nb in (7, 19):
        assert abs(S.reho(data, mask, nb)[mask].mean() - S.null_reho(mask, nb)[mask].mean()) < 0.01


# ---------------------------------------------------------------------------------------------- tissue masks

def test_priors_to_native_is_block_mean_through_forward_transform():
    from neuromoe.preproc import registration as reg

    rng = _rng(7)
    # template 2 mm, 20^3; native 4 mm whose voxel j covers template voxels 2j, 2j+1 on each axis
    t_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    t_aff[:3, 3] = -20.0
    n_aff = np.diag([4.0, 4.0, 4.0, 1.0])
    n_aff[:3, 3] = -19.0
    template = nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), t_aff)
    native = nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), n_aff)
    prior = rng.uniform(0, 1, (20, 20, 20))
    block = prior.reshape(10, 2, 10, 2, 10, 2).mean(axis=(1, 3, 5))
    out = F.priors_to_native(native, None, {"p": prior}, template)["p"]
    np.testing.assert_allclose(out, block, atol=1e-9)  # exact 2x2x2 means
    # a forward map MNI -> native shifting by one native voxel (+4 mm in x) moves the result by one voxel
    shift = np.eye(4)
    shift[0, 3] = 4.0
    out = F.priors_to_native(native, reg.ras_to_transform(shift), {"p": prior}, template)["p"]
    np.testing.assert_allclose(out[1:], block[:-1], atol=1e-9)
    assert np.all(out[0] == 0)  # nothing lands there


def test_tissue_mask_erodes_and_falls_back():
    prob = np.zeros((12, 12, 12))
    prob[2:10, 2:10, 2:10] = 0.95
    brain = np.ones(prob.shape, bool)
    m = F.tissue_mask(prob, brain, 0.9)
    assert m.sum() == 6**3  # 8^3 block eroded by one voxel
    small = np.zeros(prob.shape)
    small[5:7, 5:7, 5:7] = 0.8  # 8 voxels: erosion would empty it, and fewer than 10 pass the threshold
    small[3, 3, 3] = 0.5
    small[8, 8, 8] = 0.4
    m = F.tissue_mask(small, brain, 0.9, min_voxels=10)
    assert m.sum() == 10 and m[5:7, 5:7, 5:7].all() and m[3, 3, 3] and m[8, 8, 8]


# ---------------------------------------------------------------------------------------------- end to end

def _rigid_ras(angle_deg: float, axis: int, shift_mm) -> np.ndarray:
    """4x4 RAS rigid: rotation about one world axis, then a translation (mm)."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(4)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    m[:3, 3] = shift_mm
    return m


def _grid(voxel_mm: float, template: nib.Nifti1Image) -> nib.Nifti1Image:
    """An empty image covering the template's field of view at ``voxel_mm`` (diagonal, RAS)."""
    extent = np.array(template.shape[:3]) * np.abs(np.diag(template.affine)[:3])
    shape = tuple(int(np.ceil(e / voxel_mm)) for e in extent)
    aff = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    aff[:3, 3] = template.affine[:3, 3]
    return nib.Nifti1Image(np.zeros(shape, np.float32), aff)


def make_func_inputs(tmp_path, voxel_mm: float = 6.0, n_vols: int = 64, n_dummy: int = 4, seed: int = 0):
    """A small synthetic subject: T1w brain (3 mm) + anat_xfm, and a BOLD with known geometry and signals.

    Geometry (RAS rigid maps, known): T1w points -> MNI points ``A``; BOLD (head frame) points -> MNI ``B``.
    BOLD contrast: EPI-like (CSF > GM > WM) from the template priors; a 0.05 Hz oscillation (5 % of the
    signal, sign alternating between 36 mm blocks) in the left-hemisphere grey matter (MNI x < -10 mm) only;
    white noise (~1.2 %); head motion: a random walk plus a 0 -> 1.2 mm drift along y and one 0.8 mm jump;
    dummy volumes 40 % brighter (not yet at steady state).
    Returns (inputs, truth) where truth holds the planted maps and transforms.
    """
    from nilearn import datasets
    from scipy import ndimage

    from neuromoe.preproc import registration as reg

    rng = _rng(seed)
    tpl = datasets.load_mni152_template(resolution=2)
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata()
    brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata() > 0
    csf = np.clip(1 - wm - gm, 0, 1) * brain
    epi = (0.55 * wm + 0.8 * gm + 1.2 * csf) * brain
    xyz = nib.affines.apply_affine(tpl.affine, np.indices(tpl.shape).reshape(3, -1).T).reshape(*tpl.shape, 3)
    left_gm = (gm > 0.5) & (xyz[..., 0] < -10) & brain
    right_gm = (gm > 0.5) & (xyz[..., 0] > 10) & brain

    a_ras = _rigid_ras(4.0, 2, (5.0, -3.0, 4.0))  # T1w -> MNI
    b_ras = _rigid_ras(-3.0, 0, (-4.0, 6.0, 2.0))  # BOLD -> MNI
    t1_grid, bold_grid = _grid(3.0, tpl), _grid(voxel_mm, tpl)
    tpl_brain = nib.Nifti1Image(tpl.get_fdata() * brain, tpl.affine)
    t1 = reg.resample(tpl_brain, t1_grid, reg.ras_to_transform(a_ras))
    t1_mask = nib.Nifti1Image((t1.get_fdata() > 0.05).astype(np.uint8), t1.affine)
    b_tf = reg.ras_to_transform(b_ras)
    base = reg.resample(nib.Nifti1Image(1000 * epi, tpl.affine), bold_grid, b_tf).get_fdata()
    # the oscillation's sign alternates between 36 mm blocks (a 3D checkerboard), as local fluctuations do:
    # the planted signal then averages out over WM / CSF masks and over the rigid-motion directions, instead
    # of leaking (whole) into the WM regressor and the motion estimates and being regressed out with them
    block = np.floor(xyz / 36.0).sum(axis=-1) % 2 * 2 - 1
    osc_w = reg.resample(nib.Nifti1Image((left_gm * block).astype(np.float32), tpl.affine), bold_grid,
                         b_tf).get_fdata()

    t = np.arange(n_vols) * TR
    # Head motion per volume, world (RAS mm) rigid maps head frame -> volume: y = R (x - c) + c + t. Planted:
    # a 0 -> 1.2 mm drift along y and a 0.8 mm jump at volume 40, on top of a random walk on all six
    # parameters (0.03 mm, 0.0007 rad per volume) as real heads have; without it the x/z/rotation estimates
    # would be pure estimation noise, which the oscillation biases, and regressing them would remove the
    # signal.
    drift = np.clip((t - t[n_dummy]) / (t[-1] - t[n_dummy]), 0, 1) * 1.2 + (np.arange(n_vols) >= 40) * 0.8
    walk = np.cumsum(rng.normal(0, 1, (n_vols, 6)) * [0.03, 0.03, 0.03, 0.0007, 0.0007, 0.0007], axis=0)
    centre = nib.affines.apply_affine(bold_grid.affine, (np.array(base.shape) - 1) / 2)
    head_moves = []
    for k in range(n_vols):
        rot = _rigid_ras(np.rad2deg(walk[k, 5]), 2, 0) @ _rigid_ras(np.rad2deg(walk[k, 4]), 1, 0) \
            @ _rigid_ras(np.rad2deg(walk[k, 3]), 0, 0)
        m = rot.copy()
        m[:3, 3] = centre - rot[:3, :3] @ centre + walk[k, :3] + [0, drift[k], 0]
        head_moves.append(m)
    vols = np.empty(base.shape + (n_vols,), np.float32)
    for k in range(n_vols):
        clean = base * (1 + 0.05 * osc_w * np.sin(2 * np.pi * 0.05 * t[k]))
        # volume voxel o shows the head-frame point M^-1 (affine o): pull with the voxel-space inverse
        pull = np.linalg.inv(bold_grid.affine) @ np.linalg.inv(head_moves[k]) @ bold_grid.affine
        moved = ndimage.affine_transform(clean, pull[:3, :3], pull[:3, 3], order=1)
        gain = 1.4 if k < n_dummy else 1.0
        vols[..., k] = gain * moved + rng.normal(0, 10.0, base.shape) * (base > 0)
    bold = nib.Nifti1Image(vols, bold_grid.affine)
    bold.header.set_zooms((voxel_mm,) * 3 + (TR,))
    bold.header.set_xyzt_units("mm", "sec")

    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    inputs = {"bold": str(d / "sub-01_task-rest_bold.nii.gz"),
              "bold_json": str(d / "sub-01_task-rest_bold.json"),
              "anat_brain": str(d / "sub-01_desc-brain_T1w.nii.gz"),
              "anat_mask": str(d / "sub-01_desc-brain_mask.nii.gz"), "anat_xfm": str(d / "sub-01_xfm.txt")}
    nib.save(bold, inputs["bold"])
    (d / "sub-01_task-rest_bold.json").write_text(json.dumps({"RepetitionTime": TR, "TaskName": "rest"}))
    nib.save(t1, inputs["anat_brain"])
    nib.save(t1_mask, inputs["anat_mask"])
    reg.write_transform(reg.ras_to_transform(np.linalg.inv(a_ras)), inputs["anat_xfm"])  # MNI -> T1w points
    truth = {"a_ras": a_ras, "b_ras": b_ras, "moves": head_moves[n_dummy:], "left_gm": left_gm,
             "right_gm": right_gm, "template": tpl}
    return inputs, truth


def test_run_func_end_to_end(tmp_path):
    pytest.importorskip("neuromoe.preproc.qc")
    from neuromoe import paths
    from neuromoe.preproc import registration as reg

    inputs, truth = make_func_inputs(tmp_path)
    # (the JSON sidecars are run_stage's, not the stage function's)
    keys = [k for k in paths.OUTPUTS if k.startswith(("func_", "qc_func_")) and not k.endswith("_json")]
    outputs = {k: paths.derivative(tmp_path / "out", "01", k) for k in keys}
    config = FuncConfig.of({"dummy_scans": 4, "band_hz": [0.01, 0.08], "nuisance": ["motion", "wm", "csf"]})
    F.run_func(inputs, outputs, "01", config, threads=1)
    for k in keys:
        assert (tmp_path / outputs[k]).exists(), k

    bold = nib.load(inputs["bold"])
    pre = nib.load(outputs["func_preproc"])
    assert pre.shape == bold.shape[:3] + (60,)  # 64 volumes - 4 dummies
    np.testing.assert_allclose(pre.affine, bold.affine)
    assert pre.header.get_zooms()[3] == pytest.approx(TR)
    mask = nib.load(outputs["func_mask"])
    assert mask.shape == bold.shape[:3] and mask.get_data_dtype() == np.uint8
    for stat in ("falff", "reho"):
        native = nib.load(outputs[f"func_{stat}"])
        assert native.shape == bold.shape[:3]
        np.testing.assert_allclose(native.affine, bold.affine)
        mni = nib.load(outputs[f"func_{stat}_mni"])
        assert mni.shape == (99, 117, 95)
        np.testing.assert_allclose(mni.affine, truth["template"].affine)
        v = mni.get_fdata()
        assert v.min() >= -1e-6 and v.max() <= 1 + 1e-6  # both statistics are in [0, 1]

    conf = pd.read_csv(outputs["func_confounds"], sep="\t", na_values="n/a")
    assert list(conf.columns) == F.CONFOUND_COLUMNS and len(conf) == 60
    assert conf["framewise_displacement"].iloc[0] == 0 and np.isnan(conf["dvars"].iloc[0])
    assert conf.drop(columns=["dvars", "std_dvars"]).notna().all().all()
    # realignment sees the planted y drift + jump: |corr| > 0.9 with the truth (the reference is the middle
    # volume, so only the shape, not the offset, is comparable)
    true_y = [m[1, 3] for m in truth["moves"]]
    assert abs(np.corrcoef(conf["trans_y"], true_y)[0, 1]) > 0.9
    # the jump (0.8 mm) is the largest FD
    assert int(conf["framewise_displacement"].idxmax()) == 40 - 4

    # func_xfm (T1w points -> BOLD points) = M B^-1 A, M the head's pose in the reference (middle) volume:
    # measured 0.34 mm at brain corners; asserted within 1.5 mm (a quarter of a 6 mm BOLD voxel)
    tf = reg.read_transform(outputs["func_xfm"])
    expected = truth["moves"][len(truth["moves"]) // 2] @ np.linalg.inv(truth["b_ras"]) @ truth["a_ras"]
    got = reg.transform_to_ras(tf)
    pts = np.array([[x, y, z, 1.0] for x in (-50, 50) for y in (-70, 30) for z in (-20, 50)])
    err = np.linalg.norm((pts @ got.T - pts @ expected.T)[:, :3], axis=1)
    assert err.max() < 1.5, err

    # the planted in-band oscillation (left GM only) is found at the right MNI place. Measured: fALFF 0.41 in
    # left GM vs 0.23 in right GM (white noise after regression; partial volume at 6 mm and the mask edge
    # dilute the left value), so a margin of 0.1; ReHo 0.27 vs 0.06 (null 1/27 ~ 0.04), so a factor 2.
    f = nib.load(outputs["func_falff_mni"]).get_fdata()
    left, right = f[truth["left_gm"]].mean(), f[truth["right_gm"]].mean()
    assert left > right + 0.1, (left, right)
    r = nib.load(outputs["func_reho_mni"]).get_fdata()
    assert r[truth["left_gm"]].mean() > 2 * r[truth["right_gm"]].mean()


def test_detrend_and_ranks_match_scipy() -> None:
    """The stage's own linear detrend and tie-averaged ranks (it no longer imports scipy.signal / stats, a
    second per job) give scipy's values."""
    from scipy import signal

    rng = np.random.default_rng(7)
    y = rng.normal(size=(200, 64)) + np.linspace(0.0, 5.0, 64)
    np.testing.assert_allclose(S.detrend(y), signal.detrend(y, axis=1, type="linear"), atol=1e-12)
    ties = rng.integers(0, 4, size=(50, 30)).astype(np.float32)
    ties[0] = 2.0  # a constant series: every rank (T + 1) / 2
    for a in (ties, y.astype(np.float32)):
        np.testing.assert_array_equal(S.rank_rows(a), stats.rankdata(a, axis=1))


def test_voxel_blocks_give_the_whole_series_values(monkeypatch) -> None:
    """The voxel-wise maps work through the series a block of rows (and ReHo's neighbour sums a block of time
    points) at a time, to bound their memory; blocks of a few voxels give the values of one block of all: ReHo,
    ranks and the confounds exactly, the float64 regression and spectra to rounding."""
    rng = np.random.default_rng(11)
    shape, n_t = (9, 10, 8), 90
    mask = np.zeros(shape, bool)
    mask[1:8, 2:9, 1:7] = True
    mask[4, 5, 3] = False  # a hole: rows of the series are not a box
    series = (100 + rng.normal(size=(int(mask.sum()), n_t)).cumsum(axis=1)).astype(np.float32)
    motion = rng.normal(scale=0.1, size=(n_t, 6))

    def everything() -> dict[str, np.ndarray]:
        clean = S.regress_nuisance(series, motion)
        return {"clean": clean, "band": S.bandpass(clean, TR), "falff": S.falff(clean, TR), "alff": S.alff(clean, TR),
                "reho": S.reho_series(clean, mask, prefilter=lambda rows: S.bandpass(rows, TR)),
                "reho7": S.reho_series(clean, mask, 7),
                "dvars": np.stack(F.dvars(series))}

    whole = everything()
    monkeypatch.setattr(S, "BLOCK_BYTES", 5 * n_t * 8)  # 5 voxels a block; 1 time point for the neighbour sums
    assert len(list(S.row_blocks(*series.shape))) == -(-series.shape[0] // 5)
    blocked = everything()
    for k in ("reho", "reho7"):
        np.testing.assert_array_equal(blocked[k], whole[k])
    for k in ("clean", "band", "falff", "alff", "dvars"):
        np.testing.assert_allclose(blocked[k], whole[k], rtol=1e-6, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(S.reho_series(series, mask), S.reho(_volume(series, mask), mask))
    np.testing.assert_array_equal(whole["reho"], S.reho_series(whole["band"], mask))  # filtered in blocks = whole


def _volume(series: np.ndarray, mask: np.ndarray) -> np.ndarray:
    vol = np.zeros(mask.shape + (series.shape[1],), series.dtype)
    vol[mask] = series
    return vol


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_epi_mask_matches_nilearn(seed) -> None:
    """The func stage's own EPI mask is nilearn's compute_epi_mask (same steps, same mask) on EPI-like means:
    a bright ellipsoid head of uneven intensity, a dark background with noise, and a detached bright blob
    (the largest-component step must drop it)."""
    from nilearn.masking import compute_epi_mask

    from neuromoe.preproc.masks import epi_mask

    rng = np.random.default_rng(seed)
    shape = (40, 48, 36)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt(((g / np.array([0.7, 0.8, 0.75])[:, None, None, None]) ** 2).sum(0))
    mean = np.where(r < 1, 500 + 150 * g[0] + rng.normal(0, 40, shape), rng.gamma(2.0, 10.0, shape))
    mean[2:5, 2:5, 2:5] = 800  # a bright blob away from the head
    mean = mean.astype(np.float32)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    ours = epi_mask(mean)
    theirs = np.asarray(compute_epi_mask(nib.Nifti1Image(mean, affine)).dataobj) > 0
    assert ours.dtype == bool and ours.shape == shape
    assert 0.2 < ours.mean() < 0.6  # a head, not nothing or everything
    assert not ours[2:5, 2:5, 2:5].any()
    np.testing.assert_array_equal(ours, theirs)


def test_run_func_computes_only_the_maps_it_is_asked_for(tmp_path):
    """cache.func_maps without ReHo (the BIDS App's --skip reho): the stage neither computes nor writes it."""
    from neuromoe import paths

    inputs, _ = make_func_inputs(tmp_path)
    keys = [k for k in paths.stage_outputs("func_", func_maps=["fALFF"]) if not k.endswith("_json")]  # run_stage's
    keys += ["qc_func_maps"]
    outputs = {k: paths.derivative(tmp_path / "out", "01", k) for k in keys}
    assert F.wanted_maps(outputs) == ("fALFF",)
    config = FuncConfig.of({"dummy_scans": 4, "band_hz": [0.01, 0.08], "nuisance": ["motion", "wm", "csf"]})
    F.run_func(inputs, outputs, "01", config, threads=1)
    assert all((tmp_path / p).exists() for p in outputs.values())
    written = {p.name for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert any("stat-falff" in n for n in written) and not any("reho" in n.lower() for n in written)
