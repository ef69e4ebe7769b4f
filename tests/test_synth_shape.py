"""Tests of the synthetic cohort's anatomical shape (neuromoe.inputs.synth_shape; SynthParams.shape_mm).

Off by default, and then nothing changes: no warp file, nothing recorded (the demo cohort's bytes are
checked against a reference elsewhere). On, the warp is checked as written (invertible, the size asked,
its inverse consistent), per session (the same person, ventricles growing with age), deterministic, and
against the image: the T1w shows the ventricles where the truth warp and the pose put them. Coarse, short
parameters and one or two subjects keep every test to seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from neuromoe import MNI_SPACE
from neuromoe.inputs import templates as tpl
from neuromoe.inputs.synth import (
    MODALITIES,
    SESSION_INTERVAL_YEARS,
    TRUTH_DIR,
    ShapeWarp,
    SynthParams,
    make_cohort,
    read_truth,
    session_plans,
    subject_plan,
    write_subject,
)
from neuromoe.inputs.synth_shape import subject_warp, ventricle_mask

SMALL = SynthParams(t1_voxel_mm=4.0, dwi_voxel_mm=5.0, bold_voxel_mm=6.0, n_directions=6, n_b0=1, n_dummy=2,
                    n_bold=16)
SHAPED = dataclasses.replace(SMALL, shape_mm=3.0)
WARP = f"_from-{MNI_SPACE}_to-anat_desc-truth_xfm.nii.gz"


def _hashes(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One coarse subject with shape (3 mm RMS), seed 3."""
    return make_cohort(tmp_path_factory.mktemp("shaped"), 1, seed=3, params=SHAPED)


def _template_points(mask: np.ndarray) -> np.ndarray:
    """MNI mm (N, 3) of the 2 mm template voxels of ``mask``."""
    aff = tpl.mni_t1().affine
    return np.argwhere(mask) * np.diag(aff)[:3] + aff[:3, 3]


def test_shape_params_validated_and_off_by_default(tmp_path: Path):
    assert SynthParams().shape_mm == 0.0 and not SynthParams().has_shape
    for bad in ({"shape_mm": -1.0}, {"shape_mm": 9.0}, {"ventricle_mm_per_decade": -0.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SynthParams(**bad)
    # Off: no warp, nothing recorded, the subject's plan and streams untouched by the knob.
    bids = make_cohort(tmp_path / "off", 1, seed=3, params=SMALL)
    assert not list((bids / TRUTH_DIR).rglob("*_xfm.*"))
    assert "warp" not in read_truth(bids, "01")
    rec = json.loads((bids / TRUTH_DIR / "synth_params.json").read_text())
    assert "shape_mm" not in rec and "ventricle_mm_per_decade" not in rec
    assert "shape" not in (bids / "README").read_text().lower().split("## generative model")[0]
    assert subject_plan(1, 3, SHAPED) == subject_plan(1, 3, SMALL)
    assert subject_warp(subject_plan(1, 3), SynthParams()) is None


def test_shape_cohort_deterministic_recorded_and_cleaned(tmp_path: Path, shaped: Path):
    again = make_cohort(tmp_path / "again", 1, seed=3, params=SHAPED)
    assert _hashes(again) == _hashes(shaped)
    rec = json.loads((shaped / TRUTH_DIR / "synth_params.json").read_text())
    assert rec["shape_mm"] == 3.0 and rec["ventricle_mm_per_decade"] == 1.0
    readme = (shaped / "README").read_text()
    assert "## Shape" in readme and "shape_mm=3.0" in readme
    assert "shape_mm=3.0" in (shaped / "dataset_description.json").read_text()
    t = read_truth(shaped, "01")
    assert t["warp"].name == f"sub-01{WARP}" and t["warp_inverse"].exists()
    side = json.loads(t["warp"].with_name(t["warp"].name.replace(".nii.gz", ".json")).read_text())
    assert (side["FromSpace"], side["ToSpace"], side["Units"]) == (MNI_SPACE, "anat", "mm")
    assert side["age"] == subject_plan(1, 3, SHAPED).clinical["age"] and side["shape_mm"] == 3.0
    # Rewritten without shape: the warp files go.
    make_cohort(again, 1, seed=3, params=SMALL)
    assert not list((again / TRUTH_DIR).rglob("*_xfm.*"))


def test_truth_warp_is_invertible_and_of_the_size_asked(shaped: Path):
    t = read_truth(shaped, "01")
    img = nib.load(t["warp"])
    assert img.shape[3:] == (1, 3) and img.header.get_intent()[0] == "vector"
    assert np.allclose(np.diag(img.affine)[:3], 4.0)
    warp = ShapeWarp.from_nifti(t["warp"], t["warp_inverse"])
    u = np.moveaxis(np.asarray(img.dataobj)[:, :, :, 0, :], -1, 0)
    # Jacobian determinant by central differences on the written grid.
    jac = np.stack([np.stack(np.gradient(u[i], 4.0)) for i in range(3)]) + np.eye(3)[:, :, None, None, None]
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    assert det.min() > 0
    # RMS displacement over the template's brain: shape_mm, give or take the age's ventricular growth.
    brain = _template_points(tpl.brain_mask().get_fdata() > 0)
    d = warp.to_subject(brain) - brain
    rms = float(np.sqrt((d**2).sum(1).mean()))
    assert 2.7 < rms < 3.6, rms
    # The inverse undoes the forward map (to a tenth of a millimetre on average).
    back = warp.to_template(warp.to_subject(brain))
    err = np.linalg.norm(back - brain, axis=1)
    assert err.mean() < 0.2 and np.percentile(err, 99) < 0.6, (err.mean(), np.percentile(err, 99))


def test_rms_is_shape_mm_without_ventricle_growth():
    p = SynthParams(shape_mm=2.0, ventricle_mm_per_decade=0.0)
    for k in (1, 2):
        warp = subject_warp(subject_plan(k, 11, p), p)
        assert warp is not None
        assert warp.info["rms_displacement_brain_mm"] == pytest.approx(2.0, rel=0.03)
        assert warp.info["jacobian_min"] > 0 and warp.info["ventricle_volume_ratio"] == pytest.approx(1, abs=0.1)


def test_sessions_keep_the_person_and_enlarge_the_ventricles():
    p = SynthParams(shape_mm=2.0)
    one, two = session_plans(1, 5, p, sessions=2)
    w1, w2 = subject_warp(one, p), subject_warp(two, p)
    single = subject_warp(subject_plan(1, 5, p), p)
    assert np.array_equal(w1.forward, single.forward)             # session 1 is the single-session subject
    assert two.clinical["age"] > one.clinical["age"]
    assert w2.info["ventricle_volume_ratio"] > w1.info["ventricle_volume_ratio"] > 1
    # Far from the ventricles the two visits' anatomy is the same (the same person).
    vent = ndi.distance_transform_edt(ventricle_mask().get_fdata() == 0, sampling=2.0)
    far = _template_points((vent > 40) & (tpl.brain_mask().get_fdata() > 0))
    assert np.abs(w2.to_subject(far) - w1.to_subject(far)).max() < 0.5
    other = subject_warp(subject_plan(2, 5, p), p)                  # and another person is another shape
    assert np.abs(other.to_subject(far) - w1.to_subject(far)).mean() > 1.0


def test_sessioned_cohort_writes_a_warp_per_session(tmp_path: Path):
    bids = make_cohort(tmp_path / "long", 1, seed=5, params=SHAPED, sessions=2, missing={"01": ["dwi", "func"]})
    ages = []
    for s in ("1", "2"):
        t = read_truth(bids, "01", session=s)
        assert t["warp"].name == f"sub-01_ses-{s}{WARP}"
        ages.append(json.loads(t["warp"].with_name(t["warp"].name.replace(".nii.gz", ".json")).read_text())["age"])
    assert ages == [t["clinical"]["age"] - SESSION_INTERVAL_YEARS, t["clinical"]["age"]]
    assert not list((bids / TRUTH_DIR / "sub-01").glob("*_xfm.*"))     # only per session


def test_truth_warp_puts_the_ventricles_where_the_t1w_shows_them(tmp_path: Path):
    """The CSF-weighted centroid of a deep box of the T1w (scanner mm) against the same centroid predicted
    from the template through the written warp and pose (Jacobian-weighted: the warp changes volumes)."""
    p = SynthParams(t1_voxel_mm=2.0, t1_snr=1000.0, t1_bias=0.0, shape_mm=4.0)
    plan = subject_plan(2, 7, p)
    plan = dataclasses.replace(plan, effects={m: {"A": 0.0, "B": 0.0} for m in MODALITIES})
    write_subject(tmp_path, plan, p, modalities=["anat"])
    t = read_truth(tmp_path, "02")
    warp = ShapeWarp.from_nifti(t["warp"], t["warp_inverse"])
    pose = t["pose"]

    def csf(intensity: np.ndarray) -> np.ndarray:   # T1w relative to white matter: CSF 0.32, GM 0.74, WM 1
        return np.clip((0.6 - intensity) / 0.28, 0, 1)

    def in_box(y: np.ndarray) -> np.ndarray:        # deep box around the lateral ventricles (anatomical mm)
        return (np.abs(y[:, 0]) < 28) & (y[:, 1] > -50) & (y[:, 1] < 35) & (y[:, 2] > -2) & (y[:, 2] < 36)

    # Measured: the T1w's voxels whose anatomical point (inverse pose) lies in the box.
    img = nib.load(tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    data = np.asarray(img.dataobj, dtype=float) / p.t1_scale
    x = np.argwhere(data >= 0) @ img.affine[:3, :3].T + img.affine[:3, 3]
    y = (x - pose[:3, 3]) @ pose[:3, :3]
    sel = in_box(y)
    wt = csf(data.ravel()[sel])
    measured = (wt[:, None] * x[sel]).sum(0) / wt.sum()

    # Predicted: template voxels m pushed to m + u(m), weighted by their CSF and the volume they take there.
    brain = tpl.brain_mask().get_fdata() > 0
    t1 = tpl.mni_t1().get_fdata()
    wm_ref = np.median(t1[(tpl.wm_probability().get_fdata() > 0.9) & brain])
    m = _template_points(brain)
    ym = warp.to_subject(m)
    sel_m = in_box(ym)
    jdet = ndi.map_coordinates(warp.jacobian_determinant(), (np.linalg.inv(warp.affine)[:3, :3] @ m[sel_m].T
                                                             + np.linalg.inv(warp.affine)[:3, 3:4]), order=1)
    wt_m = csf(t1[brain][sel_m] / wm_ref) * jdet
    predicted = (wt_m[:, None] * ym[sel_m]).sum(0) / wt_m.sum() @ pose[:3, :3].T + pose[:3, 3]
    sel_r = in_box(m)                                  # what the template alone (no warp) would predict
    wt_r = csf(t1[brain][sel_r] / wm_ref)
    rigid = (wt_r[:, None] * m[sel_r]).sum(0) / wt_r.sum() @ pose[:3, :3].T + pose[:3, 3]

    assert np.linalg.norm(measured - predicted) < 1.0, (measured, predicted, rigid)
    assert np.linalg.norm(measured - rigid) > 2.0, (measured, predicted, rigid)
