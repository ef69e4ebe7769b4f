"""Tests of the synthetic BIDS cohort (neuromoe.inputs.synth, synth_plan, synth_images) and
neuromoe.inputs.templates (template, tissue maps, regions).

The shared ``synth_cohort`` fixture (tests/conftest.py, 6 subjects at the default parameters) is checked
for BIDS structure, and its planted effects are measured in its images (FA with dipy's TensorModel,
T1w grey/white ratio, low-frequency amplitude fraction of the BOLD) against the truth it records.
Statistical properties of the generator (balance, distractor rate, marker separability, weak clinical
diagnosis) are checked on subject plans, which cost no images. Determinism uses a coarse, short
SynthParams so it runs in seconds. Cohort designs (regions and marker mapping drawn from a design seed)
are checked on the designs themselves, which cost no images, and on one coarse subject.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import coarse_params
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel
from scipy import ndimage as ndi
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from neuromoe import MNI_SPACE, paths
from neuromoe.errors import InputError
from neuromoe.inputs import templates as tpl
from neuromoe.inputs.synth import (
    DESIGN_FILE,
    DIAGNOSES,
    DISEASE_ROLE,
    MARKERS,
    MODALITIES,
    TRUTH_DIR,
    CohortDesign,
    SynthParams,
    make_cohort,
    read_design,
    read_truth,
    subject_id,
    subject_plan,
    write_subject,
)
from neuromoe.inputs.synth_plan import (
    MIN_MODEL_GRID_VOXELS,
    MIN_SEPARATION_MM,
    MIN_TISSUE_VOXELS,
    REGION_TISSUE,
    model_grid_image,
)


def _cohort_info(root: Path) -> tuple[int, int]:
    """(seed, n_subjects) the cohort was made with, from its truth folder."""
    d = json.loads((root / TRUTH_DIR / "synth_params.json").read_text())
    return int(d["seed"]), int(d["n_subjects"])


# Coarse and short: only for tests of bookkeeping (determinism, missing modalities), never of effects.
SMALL = SynthParams(t1_voxel_mm=4.0, dwi_voxel_mm=5.0, bold_voxel_mm=6.0, n_directions=6, n_b0=1, n_dummy=2,
                    n_bold=16)


# --------------------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------------------
def test_template_is_the_shipped_2mm_icbm_grid():
    t1 = tpl.mni_t1()
    assert MNI_SPACE == "MNI152NLin2009aSym"
    assert t1.shape == (99, 117, 95)
    assert np.allclose(np.diag(t1.affine)[:3], 2.0)
    for img in (tpl.brain_mask(), tpl.gm_probability(), tpl.wm_probability(), tpl.csf_probability(),
                tpl.gm_mask(), tpl.wm_mask()):
        assert img.shape == t1.shape and np.allclose(img.affine, t1.affine)
    # Brain-only: nothing outside the brain mask (this is why synth builds skull and scalp).
    mask = tpl.brain_mask().get_fdata() > 0
    assert (t1.get_fdata()[~mask] > 0.05).mean() < 1e-3
    # Tissue maps are probabilities that sum to at most 1 in the brain; the brain is ~1.5-2 L.
    tot = tpl.gm_probability().get_fdata() + tpl.wm_probability().get_fdata() + tpl.csf_probability().get_fdata()
    assert np.all(tot[mask] <= 1.0 + 1e-4)
    assert 1.4 < mask.sum() * 8e-6 < 2.2
    # Cached and read-only: a caller cannot change what the next one sees.
    assert tpl.mni_t1() is t1
    with pytest.raises(ValueError):
        np.asanyarray(t1.dataobj)[0, 0, 0] = 1


def test_template_copies_on_disk_are_nilearns_images_and_spare_the_nilearn_import(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch):
    import subprocess
    import sys

    from nilearn import datasets

    monkeypatch.setenv("NEUROMOE_CACHE_DIR", str(tmp_path))
    names = ["load_mni152_template", "load_mni152_brain_mask", "load_mni152_gm_template", "load_mni152_wm_template"]
    for name in names:
        first, again, theirs = tpl.nilearn_image(name), tpl.nilearn_image(name), getattr(datasets, name)(resolution=2)
        for ours in (first, again):  # computed, then read back from the copy: the same bytes as nilearn's
            assert np.asarray(ours.dataobj).dtype == np.asarray(theirs.dataobj).dtype
            assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
            assert np.array_equal(ours.affine, theirs.affine)
    folder = tpl.template_cache_dir()
    assert folder.parent == tmp_path / "templates" and folder.name.startswith("nilearn-")
    # A damaged copy is not trusted: computed again and rewritten.
    (folder / "load_mni152_template.npy").write_bytes(b"not an array")
    assert np.array_equal(np.asarray(tpl.nilearn_image("load_mni152_template").dataobj),
                          np.asarray(datasets.load_mni152_template(resolution=2).dataobj))
    assert np.load(folder / "load_mni152_template.npy").shape == (99, 117, 95)
    # What the copies are for: a fresh process (a Snakemake job) gets its templates without nilearn.datasets.
    code = ("import sys; from neuromoe.preproc.func import template_tissue_priors; "
            "from neuromoe.cache.grid import model_grid; template_tissue_priors(); model_grid(24); "
            "print('nilearn.datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "NEUROMOE_CACHE_DIR": str(tmp_path)})
    assert out.stdout.strip() == "False"


def test_regions_cover_their_tissue_on_the_model_grid():
    t1 = tpl.mni_t1()
    # A 32^3 grid of 5.5 mm voxels over the brain, as the model cache uses.
    aff = np.diag([5.5, 5.5, 5.5, 1.0])
    aff[:3, 3] = [-85.0, -120.0, -75.0]
    coarse = nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), aff)
    x_mm = (np.indices(t1.shape)[0] * 2.0 + t1.affine[0, 3])
    for modality in MODALITIES:
        rois = tpl.effect_rois(modality)
        fine = {role: tpl.roi_mask(r.name, t1) for role, r in rois.items()}
        assert not np.any(fine["A"] & fine["B"]), f"{modality}: regions A and B overlap"
        for role, roi in rois.items():
            m = fine[role]
            assert m.sum() >= 500, f"{roi.name}: only {m.sum()} {roi.tissue} voxels at 2 mm"
            # Bilateral: both hemispheres hold at least a third of the region.
            assert min((x_mm[m] > 0).mean(), (x_mm[m] < 0).mean()) > 0.33, roi.name
            n = tpl.roi_mask(roi.name, coarse).sum()
            assert n >= 30, f"{roi.name}: {n} voxels on the 32^3 model grid; it would not survive resampling"
            prob = tpl.tissue_on_grid(roi.tissue, t1, within=m)[m]
            assert prob.mean() > 0.7, f"{roi.name}: mean {roi.tissue} probability {prob.mean():.2f}"
    with pytest.raises(KeyError):
        tpl.roi_mask("hippocampus", t1)


# --------------------------------------------------------------------------------------------------------
# plans: balance, effect logic, clinical markers (no images)
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plans():
    return [subject_plan(i, 42) for i in range(1, 1201)]


def test_subject_ids_and_params_validation():
    assert [subject_id(i) for i in (1, 9, 10, 99, 100)] == ["01", "09", "10", "99", "100"]
    with pytest.raises(ValueError, match="p_distractor"):
        SynthParams(p_distractor=1.5)
    with pytest.raises(ValueError, match="n_directions"):
        SynthParams(n_directions=80)


def test_diagnosis_and_profile_balanced(plans):
    diag = [p.diagnosis for p in plans]
    for b in range(0, len(diag), 3):        # every block of three holds one of each group
        assert sorted(diag[b:b + 3]) == sorted(DIAGNOSES)
    # Every block of nine holds each (diagnosis, profile) pair once, so the cells of any cohort of 9n
    # are equal and profile is independent of diagnosis.
    for b in range(0, len(plans) - 8, 9):
        pairs = sorted((p.diagnosis, p.profile) for p in plans[b:b + 9])
        assert pairs == sorted((d, m) for d in DIAGNOSES for m in MODALITIES), pairs
    # ...and the order within a block is not fixed: across blocks, their first subject takes every profile.
    firsts = pd.Series([p.profile for p in plans[::9]])
    assert set(firsts) == set(MODALITIES)


def test_effects_follow_profile_and_distractor_rate(plans):
    distractor_draws, hits = 0, 0
    for p in plans:
        for m in MODALITIES:
            for role in ("A", "B"):
                cause, strength = p.causes[m][role], p.effects[m][role]
                assert (cause is None) == (strength == 0.0)
                if m == p.profile:
                    # The disease region, and only it, changes in the profile modality (nothing in a control).
                    disease = p.diagnosis != "HC" and role == DISEASE_ROLE[p.diagnosis]
                    assert cause == ("disease" if disease else None)
                else:
                    assert cause in (None, "distractor")
                    distractor_draws += 1
                    hits += cause == "distractor"
    rate = hits / distractor_draws
    assert abs(rate - 1 / 3) < 0.03, f"distractor rate {rate:.3f}, expected 1/3"


def test_first_design_distracts_controls_profile_modality():
    """``control_profile_distractors=True`` (the first design; experimental, kept for studies/fusion): a
    control's profile modality gets distractors at the usual rate; patients' profile modality still shows
    only the disease. The demo cohort never sets it."""
    first = SynthParams(control_profile_distractors=True)
    draws = hits = 0
    for i in range(1, 1201):
        p = subject_plan(i, 42, first)
        if p.diagnosis == "HC":
            causes = p.causes[p.profile].values()
            draws += 2
            hits += sum(c == "distractor" for c in causes)
            assert set(causes) <= {None, "distractor"}
        else:
            assert p.causes[p.profile][DISEASE_ROLE[p.diagnosis]] == "disease"
            assert "distractor" not in p.causes[p.profile].values()
    assert abs(hits / draws - 1 / 3) < 0.04, f"control profile-modality distractor rate {hits / draws:.3f}"


def _clinical_frame(plans) -> pd.DataFrame:
    df = pd.DataFrame([{**p.clinical, "diagnosis": p.diagnosis, "profile": p.profile} for p in plans])
    df["sex"] = (df["sex"] == "M").astype(float)
    return df


def test_profile_readable_from_markers_diagnosis_only_weakly_from_clinic(plans):
    df = _clinical_frame(plans).dropna()
    assert len(df) > 0.8 * len(plans)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    x = np.column_stack([df["moca"], np.log(df["serum_nfl"]), np.log(df["serum_asyn"])])
    acc_profile = cross_val_score(clf, x, df["profile"], cv=5).mean()
    # marker_separation 4 SD: a gate reading the three markers can route almost every subject.
    assert acc_profile >= 0.97, f"profile recovered {acc_profile:.3f} of the time from the markers"
    # Markers do not carry the diagnosis...
    acc_markers_dx = cross_val_score(clf, x, df["diagnosis"], cv=5).mean()
    assert acc_markers_dx < 0.42, f"markers alone predict the diagnosis {acc_markers_dx:.3f}"
    # ...and the whole clinical table only weakly (3 classes, chance 1/3).
    cols = ["age", "sex", "updrs3", "moca", "rbdsq", "serum_nfl", "serum_asyn"]
    acc_dx = cross_val_score(clf, df[cols], df["diagnosis"], cv=5).mean()
    assert 0.42 <= acc_dx <= 0.62, f"clinical-only diagnosis accuracy {acc_dx:.3f}"
    g = df.groupby("diagnosis")
    assert g["rbdsq"].mean()["HC"] < min(g["rbdsq"].mean()["PD"], g["rbdsq"].mean()["iRBD"])
    assert g["updrs3"].mean()["PD"] > max(g["updrs3"].mean()["HC"], g["updrs3"].mean()["iRBD"])


def test_clinical_values_in_plausible_ranges(plans):
    df = _clinical_frame(plans)
    bounds = {"age": (45, 85), "updrs3": (0, 132), "moca": (0, 30), "rbdsq": (0, 13),
              "serum_nfl": (2, 200), "serum_asyn": (100, 30000)}
    for col, (lo, hi) in bounds.items():
        v = df[col].dropna()
        assert v.between(lo, hi).all(), col
    missing = df[["updrs3", "moca", "rbdsq", "serum_nfl", "serum_asyn"]].isna().mean().mean()
    assert 0.01 < missing < 0.06


# --------------------------------------------------------------------------------------------------------
# the shared cohort: BIDS structure
# --------------------------------------------------------------------------------------------------------
def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_cohort_is_bids_by_structure(synth_cohort: Path):
    root = synth_cohort
    desc = _json(root / "dataset_description.json")
    assert desc["BIDSVersion"].startswith("1.9") and desc["DatasetType"] == "raw"
    assert "SYNTHETIC" in desc["Name"]
    assert "synthetic" in (root / "README").read_text().lower()
    part = pd.read_csv(root / "participants.tsv", sep="\t", dtype={"participant_id": str}, na_values=["n/a"])
    assert list(part.columns) == ["participant_id", "diagnosis", "age", "sex", "updrs3", "moca", "rbdsq",
                                  "serum_nfl", "serum_asyn"]
    _, n = _cohort_info(root)
    ids = [f"sub-{subject_id(i)}" for i in range(1, n + 1)]
    assert part["participant_id"].tolist() == ids
    assert part["diagnosis"].value_counts().to_dict() == {"HC": 2, "PD": 2, "iRBD": 2}
    assert set(part["sex"]) <= {"M", "F"}
    pj = _json(root / "participants.json")
    for col in part.columns:
        assert "Description" in pj[col], col
    assert set(pj["diagnosis"]["Levels"]) == set(DIAGNOSES) and set(pj["sex"]["Levels"]) == {"M", "F"}
    assert pj["serum_nfl"]["Units"] == "pg/mL" and pj["serum_asyn"]["Units"] == "pg/mL"
    assert sorted(d.name for d in root.glob("sub-*")) == ids

    for pid in ids:
        s = pid.removeprefix("sub-")
        t1 = nib.load(paths.raw(root, s, "T1w"))
        dwi = nib.load(paths.raw(root, s, "dwi"))
        bold = nib.load(paths.raw(root, s, "bold"))
        for img, ndim, vox in ((t1, 3, 2.0), (dwi, 4, 3.0), (bold, 4, 4.0)):
            assert img.ndim == ndim and img.get_data_dtype() == np.int16
            a = img.affine
            # Scanner-aligned: diagonal affine (stored LAS, det < 0), qform = sform.
            assert np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3]))) and np.linalg.det(a[:3, :3]) < 0
            assert np.allclose(np.abs(np.diag(a)[:3]), vox)
            assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
            assert np.allclose(img.header.get_best_affine(), a)
        # DWI gradients: one b-value and one unit b-vector per volume, >= 2 b=0 and >= 30 at b~1000.
        bvals = np.loadtxt(paths.raw(root, s, "bval"))
        bvecs = np.loadtxt(paths.raw(root, s, "bvec"))
        n = dwi.shape[3]
        assert bvals.shape == (n,) and bvecs.shape == (3, n)
        assert (bvals <= 50).sum() >= 2 and (np.abs(bvals - 1000) < 30).sum() >= 30
        norms = np.linalg.norm(bvecs[:, bvals > 50], axis=0)
        assert np.allclose(norms, 1.0, atol=1e-4)
        assert len({tuple(np.round(v, 3)) for v in bvecs[:, bvals > 50].T}) >= 30
        dj = _json(Path(paths.raw(root, s, "dwi_json")))
        assert dj["EchoTime"] > 0
        bj = _json(Path(paths.raw(root, s, "bold_json")))
        assert bj["RepetitionTime"] == 2.0 and bj["TaskName"] == "rest"
        assert np.isclose(bold.header.get_zooms()[3], 2.0)
        assert bold.shape[3] >= 4 + 100
        # Ground truth next to it.
        truth = read_truth(root, s)
        mask = nib.load(truth["mask"])
        assert mask.shape == t1.shape and np.allclose(mask.affine, t1.affine)
        assert 1.4 < (mask.get_fdata() > 0).sum() * 8e-6 < 2.2          # litres of brain
        assert len(truth["dwi_motion"]) == n and len(truth["func_motion"]) == bold.shape[3]
        assert list(truth["func_motion"].columns) == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
        pose = truth["pose"]
        r = pose[:3, :3]
        assert np.allclose(r @ r.T, np.eye(3), atol=1e-6) and np.isclose(np.linalg.det(r), 1.0)
        angle = np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
        assert 0 < angle <= 8 * np.sqrt(3) and np.all(np.abs(pose[:3, 3]) <= 8.0)
        dm = truth["dwi_motion"].to_numpy()
        assert np.all(np.abs(dm[:, :3]) <= 1.0) and np.all(np.abs(dm[:, 3:]) <= np.radians(1.0))
        assert np.allclose(dm[0], 0) and np.abs(dm[1:]).max() > 0.05
        assert truth["participant_id"] == pid and truth["profile"] in MODALITIES


# --------------------------------------------------------------------------------------------------------
# the shared cohort: images look like heads, BOLD like BOLD
# --------------------------------------------------------------------------------------------------------
def test_t1w_has_skull_and_scalp(synth_cohort: Path):
    """Outside the truth brain mask: dark CSF/skull first, then bright scalp fat, then air."""
    s = "01"
    t1 = nib.load(paths.raw(synth_cohort, s, "T1w"))
    img = t1.get_fdata()
    truth = read_truth(synth_cohort, s)
    mask = nib.load(truth["mask"]).get_fdata() > 0
    wm = tpl.tissue_on_grid("wm", t1, np.linalg.inv(truth["pose"])) > 0.95
    wm_level = np.median(img[wm & mask])
    dist = ndi.distance_transform_edt(~mask, sampling=2.0)
    top = np.zeros_like(mask)
    top[..., img.shape[2] // 3:] = True              # above the skull base, where the layers are clean

    def ring(lo: float, hi: float) -> float:
        return float(np.mean(img[(dist > lo) & (dist <= hi) & top]) / wm_level)

    skull, scalp, air = ring(0, 4), ring(10, 12), ring(18, 30)
    assert skull < 0.35, f"CSF/skull ring at {skull:.2f} of WM"
    assert scalp > 0.6, f"scalp fat at {scalp:.2f} of WM"
    assert air < 0.05


def test_bold_dummies_and_shared_low_frequency_fluctuations(synth_cohort: Path):
    s = "02"
    bold = nib.load(paths.raw(synth_cohort, s, "bold"))
    data = bold.get_fdata(dtype=np.float32)
    pose = read_truth(synth_cohort, s)["pose"]
    brain = data[..., 10] > 0.5 * np.percentile(data[..., 10], 99)
    m = data[brain].mean(0)
    steady, early = m[4:].mean(), m[4:8].mean()
    # T1 saturation: the first volumes brighter than the next ones (CSF, with the longest T1, recovers
    # over several TRs), then steady state: only the slow drift (~1 %) is left.
    assert m[0] > 1.1 * early and m[1] > early and m[0] > m[1] > m[3]
    assert np.abs(m[4:] / steady - 1).max() < 0.04
    # Band-passed (0.01-0.08 Hz) series of neighbouring grey-matter voxels correlate (what ReHo measures).
    gm = tpl.tissue_on_grid("gm", bold, np.linalg.inv(pose)) > 0.6
    x = data[..., 4:] - data[..., 4:].mean(-1, keepdims=True)
    f = np.fft.rfftfreq(x.shape[-1], 2.0)
    spec = np.fft.rfft(x, axis=-1)
    spec[..., (f < 0.01) | (f > 0.08)] = 0
    y = np.fft.irfft(spec, n=x.shape[-1], axis=-1)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        a = a - a.mean(-1, keepdims=True)
        b = b - b.mean(-1, keepdims=True)
        return float(np.mean((a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1) + 1e-9)))

    i, j, k = np.nonzero(gm[:-1] & gm[1:])
    near = corr(y[i, j, k], y[i + 1, j, k])
    i, j, k = np.nonzero(gm[:-8] & gm[8:])
    far = corr(y[i, j, k], y[i + 8, j, k])
    assert near > 0.4 and near > far + 0.2, f"adjacent {near:.2f}, 32 mm apart {far:.2f}"


# --------------------------------------------------------------------------------------------------------
# the shared cohort: planted effects, measured in the images
# --------------------------------------------------------------------------------------------------------
def _t1_ratio(root: Path, s: str, roi: tpl.Roi, w2m: np.ndarray) -> float:
    """Mean T1w of the region's grey matter over the median of white matter within 30 mm (bias-robust)."""
    img = nib.load(paths.raw(root, s, "T1w"))
    data = img.get_fdata(dtype=np.float32)
    region = tpl.roi_mask(roi, img, world_to_mni=w2m)
    near = tpl.sphere_weight(roi.centres_mm, 30.0, img.affine, img.shape, 0.0, w2m) > 0
    wm = tpl.tissue_on_grid("wm", img, w2m, within=near) > 0.9
    return float(data[region].mean() / np.median(data[wm]))


def _fa(root: Path, s: str, roi: tpl.Roi, w2m: np.ndarray) -> float:
    """Median FA (dipy TensorModel, WLS) over the region's white matter in the raw DWI."""
    img = nib.load(paths.raw(root, s, "dwi"))
    region = tpl.roi_mask(roi, img, world_to_mni=w2m, threshold=0.8)
    gtab = gradient_table(np.loadtxt(paths.raw(root, s, "bval")), bvecs=np.loadtxt(paths.raw(root, s, "bvec")).T)
    fit = TensorModel(gtab, fit_method="WLS").fit(img.get_fdata(dtype=np.float32)[region])
    return float(np.median(fit.fa))


def _lf_fraction(root: Path, s: str, roi: tpl.Roi, w2m: np.ndarray) -> float:
    """Median fALFF-like ratio over the region's grey matter: amplitude in 0.01-0.08 Hz over all
    amplitude (above 0 Hz), after dropping the 4 dummy scans and a linear trend."""
    img = nib.load(paths.raw(root, s, "bold"))
    region = tpl.roi_mask(roi, img, world_to_mni=w2m)
    x = img.get_fdata(dtype=np.float32)[region][:, 4:]
    t = np.arange(x.shape[1]) - (x.shape[1] - 1) / 2
    x = x - x.mean(1, keepdims=True)
    x = x - np.outer((x @ t) / (t @ t), t)
    amp = np.abs(np.fft.rfft(x, axis=1))[:, 1:]
    f = np.fft.rfftfreq(x.shape[1], 2.0)[1:]
    band = (f >= 0.01) & (f <= 0.08)
    return float(np.median(amp[:, band].sum(1) / amp.sum(1)))


MEASURES = {"anat": _t1_ratio, "dwi": _fa, "func": _lf_fraction}


@functools.cache
def _measure(root: Path, modality: str, s: str, role: str) -> float:
    """The modality's measure in region ``role`` of subject ``s``, on the subject's native grid."""
    roi = tpl.effect_rois(modality)[role]
    return MEASURES[modality](root, s, roi, np.linalg.inv(read_truth(root, s)["pose"]))
# Smallest drop (unchanged mean - changed mean) that counts as the planted effect being there. The
# default effects give about 0.13 (T1w GM/WM ratio), 0.25 (FA) and 0.1 (low-frequency fraction).
MIN_DROP = {"anat": 0.06, "dwi": 0.12, "func": 0.04}


@pytest.mark.parametrize("modality", MODALITIES)
def test_planted_effects_are_measurable(synth_cohort: Path, modality: str):
    seed, n = _cohort_info(synth_cohort)
    ids = [subject_id(i) for i in range(1, n + 1)]
    truths = {s: read_truth(synth_cohort, s) for s in ids}
    # The fixture's seed was chosen for this: a patient of each profile, and controls to compare with.
    patients = [s for s in ids if truths[s]["diagnosis"] != "HC" and truths[s]["profile"] == modality]
    assert patients, f"the fixture's seed {seed} gives no patient with profile {modality} (see conftest.py)"
    for role, roi in tpl.effect_rois(modality).items():
        values = {s: _measure(synth_cohort, modality, s, role) for s in ids}
        changed = [s for s in ids if truths[s]["affected"][modality][role]]
        same = [s for s in ids if not truths[s]["affected"][modality][role]]
        assert same, f"no subject without a change in {roi.name}"
        if not changed:
            continue
        lo_same = min(values[s] for s in same)
        report = {s: (round(values[s], 3), truths[s]["effects"][modality][role]["cause"]) for s in ids}
        # Every changed subject (disease or distractor) is below every unchanged one, by a clear margin.
        assert max(values[s] for s in changed) < lo_same, report
        drop = np.mean([values[s] for s in same]) - np.mean([values[s] for s in changed])
        assert drop > MIN_DROP[modality], report
    # The disease in particular: each patient of this profile vs. the controls without that change.
    for s in patients:
        role = DISEASE_ROLE[truths[s]["diagnosis"]]
        assert truths[s]["effects"][modality][role]["cause"] == "disease"
        controls = [c for c in ids if truths[c]["diagnosis"] == "HC" and not truths[c]["affected"][modality][role]]
        assert controls, "no control without a distractor in this region"
        w = {c: _measure(synth_cohort, modality, c, role) for c in controls + [s]}
        assert all(w[s] < w[c] - MIN_DROP[modality] / 2 for c in controls), w


def test_dwi_orientation_and_tensor_values(tmp_path: Path):
    """The b-vectors are in the image's voxel frame (FSL/BIDS): with the head turned 30 degrees about z,
    fitted fibre directions, taken back through the pose, match anatomy (corpus callosum left-right,
    corticospinal tract superior-inferior). A sign error in x would leave |cos| = 0.5 in the callosum.
    Tensor values match the tissue: FA and MD in WM, GM and ventricular CSF."""
    plan = dataclasses.replace(subject_plan(1, 11), rotation_deg=(0.0, 0.0, 30.0), translation_mm=(3.0, -2.0, 1.0))
    write_subject(tmp_path, plan, SynthParams(), modalities=["dwi"])
    img = nib.load(paths.raw(tmp_path, "01", "dwi"))
    data = img.get_fdata(dtype=np.float32)
    gtab = gradient_table(np.loadtxt(paths.raw(tmp_path, "01", "bval")),
                          bvecs=np.loadtxt(paths.raw(tmp_path, "01", "bvec")).T)
    model = TensorModel(gtab, fit_method="WLS")
    pose = read_truth(tmp_path, "01")["pose"]
    vox_to_world = img.affine[:3, :3] / np.abs(np.diag(img.affine)[:3])      # +-1 per axis (LAS)
    inv = np.linalg.inv(img.affine)
    for name, mni, expected in [("corpus callosum", (0.0, -10.0, 24.0), (1.0, 0.0, 0.0)),
                                ("right corticospinal tract", (23.0, -14.0, 12.0), (0.0, 0.0, 1.0)),
                                ("left corticospinal tract", (-23.0, -14.0, 12.0), (0.0, 0.0, 1.0))]:
        c = np.rint(inv[:3, :3] @ (pose[:3, :3] @ mni + pose[:3, 3]) + inv[:3, 3]).astype(int)
        block = data[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 2].reshape(-1, data.shape[3])
        fit = model.fit(block)
        best = np.argsort(fit.fa)[-9:]                                       # the 9 most anisotropic of 27
        dirs = fit.evecs[best, :, 0] @ vox_to_world.T @ pose[:3, :3]          # voxel -> world -> MNI
        cos = np.abs(dirs @ np.array(expected))
        assert np.median(cos) > 0.85, f"{name}: |cos| to the expected direction {np.round(cos, 2)}"
    # Tensor values by tissue, over the whole brain.
    w2m = np.linalg.inv(pose)
    prob = {t: tpl.tissue_on_grid(t, img, w2m) for t in ("wm", "gm", "csf")}
    for tissue, thr, fa_range, md_range in [("wm", 0.95, (0.45, 0.75), (0.6e-3, 0.85e-3)),
                                            ("gm", 0.85, (0.05, 0.30), (0.6e-3, 1.0e-3)),
                                            ("csf", 0.95, (0.0, 0.25), (2.3e-3, 3.5e-3))]:
        fit = model.fit(data[prob[tissue] > thr])
        fa, md = np.median(fit.fa), np.median(fit.md)
        assert fa_range[0] < fa < fa_range[1], f"{tissue} FA {fa:.2f}"
        assert md_range[0] < md < md_range[1], f"{tissue} MD {md:.2e}"


def test_participants_match_plans(synth_cohort: Path):
    part = pd.read_csv(synth_cohort / "participants.tsv", sep="\t", dtype={"participant_id": str},
                       na_values=["n/a"])
    seed, n = _cohort_info(synth_cohort)
    for i in range(1, n + 1):
        plan = subject_plan(i, seed)
        row = part.iloc[i - 1]
        assert row["diagnosis"] == plan.diagnosis
        for col, v in plan.clinical.items():
            assert (pd.isna(row[col]) and v is None) or row[col] == v, (i, col)
        truth = read_truth(synth_cohort, subject_id(i))
        assert truth["profile"] == plan.profile
        assert np.allclose(truth["pose"], plan.pose, atol=1e-7)


# --------------------------------------------------------------------------------------------------------
# determinism, missing modalities, output folder
# --------------------------------------------------------------------------------------------------------
def _arrays_digest(root: Path, s: str) -> dict[str, str]:
    out = {}
    for kind in ("T1w", "dwi", "bold"):
        a = np.asanyarray(nib.load(paths.raw(root, s, kind)).dataobj)
        out[kind] = hashlib.sha256(a.tobytes()).hexdigest()
    return out


def test_deterministic_per_subject_and_seed(tmp_path: Path):
    a = make_cohort(tmp_path / "a", 1, seed=5, params=SMALL)
    b = make_cohort(tmp_path / "b", 2, seed=5, params=SMALL, n_jobs=2)
    c = make_cohort(tmp_path / "c", 1, seed=6, params=SMALL)
    # Same seed: identical arrays (and files), whatever the cohort size or the number of processes.
    assert _arrays_digest(a, "01") == _arrays_digest(b, "01")
    assert Path(paths.raw(a, "01", "bold")).read_bytes() == Path(paths.raw(b, "01", "bold")).read_bytes()
    # ... and its participants row: a cohort's first n subjects are the cohort of n (bench/generality.py
    # runs the 60-subject pieces on the first 60 subjects of the 180-subject cohort)
    pa, pb = (pd.read_csv(x / "participants.tsv", sep="\t", dtype=str) for x in (a, b))
    pd.testing.assert_frame_equal(pa, pb.iloc[:1])
    # Another seed or another subject: different images.
    da, dc, db2 = _arrays_digest(a, "01"), _arrays_digest(c, "01"), _arrays_digest(b, "02")
    assert all(da[k] != dc[k] and da[k] != db2[k] for k in da)


def test_missing_modality_and_output_folder(tmp_path: Path):
    out = make_cohort(tmp_path / "bids", 3, seed=1, params=SMALL, missing={"sub-02": ["dwi"], "03": ["anat", "func"]})
    assert not (out / "sub-02" / "dwi").exists() and (out / "sub-02" / "func").exists()
    assert not (out / "sub-03" / "anat").exists() and (out / "sub-03" / "dwi").exists()
    assert read_truth(out, "02")["modalities_written"] == ["anat", "func"]
    assert "dwi_motion" not in read_truth(out, "02")
    # Rewriting with fewer subjects removes the extra ones, so participants.tsv and folders agree.
    make_cohort(out, 2, seed=1, params=SMALL)
    assert sorted(d.name for d in out.glob("sub-*")) == ["sub-01", "sub-02"]
    assert (out / "sub-02" / "dwi").exists()
    # Never writes into a folder that is not a synthetic cohort.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a synthetic cohort"):
        make_cohort(other, 1, seed=1, params=SMALL)
    with pytest.raises(ValueError, match="unknown modalities"):
        make_cohort(tmp_path / "x", 1, seed=1, params=SMALL, missing={"01": ["pet"]})


def test_write_subject_accepts_edited_plans(tmp_path: Path):
    plan = subject_plan(1, 9, SMALL)
    forced = dataclasses.replace(plan, diagnosis="PD", profile="func",
                                 effects={m: {"A": 0.0, "B": 0.0} for m in MODALITIES} | {"func": {"A": 0.7, "B": 0.0}},
                                 causes={m: {"A": None, "B": None} for m in MODALITIES}
                                 | {"func": {"A": "disease", "B": None}})
    write_subject(tmp_path, forced, SMALL, modalities=["func"])
    truth = read_truth(tmp_path, "01")
    assert truth["diagnosis"] == "PD" and truth["affected"]["func"] == {"A": True, "B": False}
    assert Path(paths.raw(tmp_path, "01", "bold")).exists() and not Path(paths.raw(tmp_path, "01", "dwi")).exists()


# --------------------------------------------------------------------------------------------------------
# cohort designs: regions and marker mapping drawn from a design seed
# --------------------------------------------------------------------------------------------------------
# The demo's regions and mapping as they were before designs existed (templates.ROIS at f7f7dd7).
DEMO_REGIONS = [("insula", "anat", "A", (38.0, 4.0, 2.0), "gm"),
                ("lateral_occipital", "anat", "B", (34.0, -84.0, 4.0), "gm"),
                ("corona_radiata", "dwi", "A", (26.0, -12.0, 30.0), "wm"),
                ("optic_radiation", "dwi", "B", (32.0, -62.0, 6.0), "wm"),
                ("putamen", "func", "A", (25.0, 3.0, 2.0), "gm"),
                ("posterior_cingulate", "func", "B", (6.0, -50.0, 30.0), "gm")]
DESIGN_SEEDS = range(20)


def test_default_design_is_the_demo_layout():
    d = CohortDesign.default()
    assert SynthParams().design == d and SynthParams().design_seed is None and d.seed is None
    assert [(r.name, r.modality, r.role, r.centre_mm, r.tissue) for r in d.rois] == DEMO_REGIONS
    assert all(r.radius_mm == 14.0 for r in d.rois) and d.regions == tpl.ROIS
    assert dict(d.markers) == {"moca": "anat", "serum_nfl": "dwi", "serum_asyn": "func"}
    for m in MODALITIES:
        assert d.effect_rois(m) == tpl.effect_rois(m)
        assert d.marker_profile(d.profile_marker(m)) == m
    with pytest.raises(ValueError, match="design_seed"):
        SynthParams(design_seed=-1)
    with pytest.raises(ValueError, match="design seed"):
        CohortDesign.draw(True)


def test_design_json_round_trip_and_default_when_absent(tmp_path: Path):
    assert read_design(tmp_path) == CohortDesign.default()        # no design.json: the demo design
    for d in (CohortDesign.default(), CohortDesign.draw(4)):
        rec = d.to_json()
        assert CohortDesign.from_json(json.loads(json.dumps(rec))) == d
        assert rec["design_seed"] == d.seed and rec["markers"] == dict(d.markers)
        for r, row in zip(d.rois, rec["regions"], strict=True):
            assert row["tissue_voxels_2mm"] == tpl.roi_mask(r, tpl.mni_t1()).sum()
            assert np.allclose(row["centres_mm"], r.centres_mm) and row["tissue"] == r.tissue
    (tmp_path / DESIGN_FILE).parent.mkdir(parents=True)
    (tmp_path / DESIGN_FILE).write_text('{"design_seed": 1}')
    with pytest.raises(InputError, match="unreadable cohort design"):
        read_design(tmp_path)


def _centres(d: CohortDesign) -> list[tuple[str, np.ndarray]]:
    return [(r.name, c) for r in d.rois for c in r.centres_mm]


def test_drawn_designs_hold_their_tissue_and_keep_apart():
    t1, coarse = tpl.mni_t1(), model_grid_image()
    layouts, mappings = set(), set()
    for seed in DESIGN_SEEDS:
        d = CohortDesign.draw(seed)
        assert d.seed == seed and [r.name for r in d.rois] == [f"{m}_{r}" for m in MODALITIES for r in "AB"]
        for r in d.rois:
            assert r.tissue == REGION_TISSUE[r.modality] and r.radius_mm == 14.0 and r.centre_mm[0] >= 4.0
            n = tpl.roi_mask(r, t1).sum()
            assert n >= MIN_TISSUE_VOXELS, f"design {seed}, {r.name} at {r.centre_mm}: {n} {r.tissue} voxels"
            assert tpl.roi_mask(r, coarse).sum() >= MIN_MODEL_GRID_VOXELS, (seed, r.name)
            # bilateral: the centre's mirror is part of the region
            assert np.allclose(r.centres_mm[1], np.array(r.centre_mm) * [-1, 1, 1])
        pts = _centres(d)
        for i, (a, ca) in enumerate(pts):
            for b, cb in pts[i + 1:]:
                if a != b:
                    assert np.linalg.norm(ca - cb) >= MIN_SEPARATION_MM, (seed, a, b)
        # ...so the regions' soft spheres do not touch, on the template grid
        w = [tpl.roi_weight(r, t1.affine, t1.shape) > 0 for r in d.rois]
        assert max((w[i] & w[j]).sum() for i in range(6) for j in range(i + 1, 6)) == 0, seed
        assert sorted(p for _, p in d.markers) == sorted(MODALITIES) and [m for m, _ in d.markers] == list(MARKERS)
        layouts.add(tuple(r.centre_mm for r in d.rois))
        mappings.add(d.markers)
    # Two seeds, two layouts; the mapping is permuted (six permutations, 20 draws).
    assert len(layouts) == len(DESIGN_SEEDS) and len(mappings) >= 4, mappings
    assert CohortDesign.draw(0).markers != CohortDesign.draw(1).markers


def test_design_seed_gives_the_same_design_in_a_fresh_process():
    import subprocess
    import sys

    code = ("import json; from neuromoe.inputs.synth import CohortDesign; "
            "print(json.dumps(CohortDesign.draw(7).to_json(), sort_keys=True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == json.loads(json.dumps(CohortDesign.draw(7).to_json(), sort_keys=True))


def test_drawn_design_cohort_deterministic_and_recorded(tmp_path: Path):
    p = dataclasses.replace(SMALL, design_seed=3)
    a = make_cohort(tmp_path / "a", 1, seed=5, params=p)
    b = make_cohort(tmp_path / "b", 1, seed=5, params=p)
    files = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(b) for f in b.rglob("*") if f.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    # The design comes from the design seed alone: another cohort seed, the same design.
    c = make_cohort(tmp_path / "c", 1, seed=6, params=p)
    assert read_design(a) == read_design(c) == CohortDesign.draw(3) == p.design
    truth = read_truth(a, "01")
    assert truth["design"] == CohortDesign.draw(3)
    for m in MODALITIES:
        assert {role: e["region"] for role, e in truth["effects"][m].items()} == {"A": f"{m}_A", "B": f"{m}_B"}
    rec = json.loads((a / TRUTH_DIR / "synth_params.json").read_text())
    assert rec["design_seed"] == 3
    assert "design_seed" not in json.loads((make_cohort(tmp_path / "d", 1, seed=5, params=SMALL) / TRUTH_DIR
                                            / "synth_params.json").read_text())
    readme = (a / "README").read_text()
    assert "## Cohort design (design seed 3)" in readme and "| anat | A (PD) | anat_A |" in readme
    pj = json.loads((a / "participants.json").read_text())
    d = CohortDesign.draw(3)
    assert f"latent {d.marker_profile('moca')} profile" in pj["moca"]["Description"]


def test_drawn_design_routes_markers(tmp_path: Path):
    """The marker each profile moves follows the design's mapping, with the demo's separation."""
    d = CohortDesign.draw(0)
    assert dict(d.markers) != {"moca": "anat", "serum_nfl": "dwi", "serum_asyn": "func"}
    p = SynthParams(design_seed=0)
    df = _clinical_frame([subject_plan(i, 42, p) for i in range(1, 361)]).dropna()
    z = {"moca": -df["moca"], "serum_nfl": np.log(df["serum_nfl"]), "serum_asyn": np.log(df["serum_asyn"])}
    for marker, profile in d.markers:
        v = (z[marker] - z[marker].mean()) / z[marker].std()
        shifted, rest = v[df["profile"] == profile].mean(), v[df["profile"] != profile].mean()
        assert shifted - rest > 1.5, (marker, profile, shifted, rest)
    # Everything but the clinical markers is the demo design's plan: the same diagnosis, profile, effects.
    for i in (1, 2, 3):
        a, b = subject_plan(i, 42), subject_plan(i, 42, p)
        assert (a.diagnosis, a.profile, a.effects, a.rotation_deg) == (b.diagnosis, b.profile, b.effects,
                                                                       b.rotation_deg)


def test_planted_effect_lands_in_the_drawn_region(tmp_path: Path):
    """One coarse subject of design 5, written twice from the same plan and noise: with region A's effect in
    every modality, and without. The images differ only around the drawn region A (its soft sphere, plus
    one voxel of resampling and the head motion), and the measured drop is there, not in region B."""
    p = dataclasses.replace(coarse_params(), design_seed=5)
    d = p.design
    plan = subject_plan(1, 9, p)
    size = {"anat": p.anat_effect, "dwi": p.dwi_effect, "func": p.func_effect}
    hit = dataclasses.replace(plan, effects={m: {"A": size[m], "B": 0.0} for m in MODALITIES},
                              causes={m: {"A": "disease", "B": None} for m in MODALITIES})
    clean = dataclasses.replace(plan, effects={m: {"A": 0.0, "B": 0.0} for m in MODALITIES},
                                causes={m: {"A": None, "B": None} for m in MODALITIES})
    write_subject(tmp_path / "hit", hit, p)
    write_subject(tmp_path / "clean", clean, p)
    w2m = np.linalg.inv(plan.pose)
    for m, kind in (("anat", "T1w"), ("dwi", "dwi"), ("func", "bold")):
        img = nib.load(paths.raw(tmp_path / "hit", "01", kind))
        before = nib.load(paths.raw(tmp_path / "clean", "01", kind))
        diff = np.asanyarray(img.dataobj) != np.asanyarray(before.dataobj)
        changed = np.argwhere(diff.any(-1) if diff.ndim == 4 else diff)
        mni = (changed @ img.affine[:3, :3].T + img.affine[:3, 3]) @ w2m[:3, :3].T + w2m[:3, 3]
        roi, other = d.effect_rois(m)["A"], d.effect_rois(m)["B"]
        dist = np.min([np.linalg.norm(mni - c, axis=1) for c in roi.centres_mm], axis=0)
        reach = roi.radius_mm + 2 + np.abs(img.affine[0, 0]) * np.sqrt(3) + 3     # soft edge, a voxel, motion
        assert len(changed) > 20 and dist.max() < reach and np.median(dist) < roi.radius_mm + 2, (m, dist.max())
        measure = {k: [MEASURES[m](tmp_path / k, "01", r, w2m) for r in (roi, other)] for k in ("clean", "hit")}
        drop_a = measure["clean"][0] - measure["hit"][0]
        drop_b = measure["clean"][1] - measure["hit"][1]
        assert drop_a > MIN_DROP[m], f"{m}: drop {drop_a:.3f} in {roi.name} at {roi.centre_mm}"
        assert abs(drop_b) < MIN_DROP[m] / 4, f"{m}: region B ({other.name}) moved by {drop_b:.3f}"
    assert read_truth(tmp_path / "hit", "01")["effects"]["dwi"]["A"]["region"] == "dwi_A"
