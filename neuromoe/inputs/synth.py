"""The bundled synthetic BIDS cohort: heads built from the MNI152 template, with planted group effects.

No public cohort can be downloaded at run time, so the demo writes one. It is SYNTHETIC: its accuracy
shows that the pipeline works, not anything about Parkinson's disease.

Three modules, one concept each: ``synth_plan`` (``SynthParams``, the cohort design ``CohortDesign``, the
subject plans: diagnosis, latent profile, planted effects, clinical values, pose), ``synth_images`` (the
head model and the T1w, DWI and BOLD images formed from a plan) and this one, which writes the cohort
(images, sidecars, participants table, dataset README, ground truth and design under
``derivatives/synth-truth``) and reads them back. The public names of all three are importable from
here. The generative model is written into every cohort's README (``_README_MODEL`` below); the design's
history, cohort designs, longitudinal (``sessions=N``) cohorts and anatomical shape (``SynthParams.shape_mm``,
``synth_shape``: each subject's anatomy a warp of the template, the warp in the truth) are in
docs/synthetic_cohort.md.

Determinism: subject k depends only on ``(seed, k)`` and the design seed, not on ``n_subjects``, the
omitted modalities or ``n_jobs``; files are gzip'ed with mtime 0, so the same seeds give the same bytes.

Example::

    from neuromoe.inputs.synth import SynthParams, make_cohort, read_design
    bids = make_cohort("data/demo_bids", n_subjects=180, seed=42)
    other = make_cohort("/tmp/design3", n_subjects=60, seed=7, params=SynthParams(design_seed=3))
    read_design(other).effect_rois("dwi")      # where that cohort's PD and iRBD show in the DWI
    long = make_cohort("/tmp/long", n_subjects=9, seed=7, sessions=2)   # sub-01/ses-1, sub-01/ses-2, ...
    read_truth(long, "01", session="2")["effects"]                      # the planted effects at visit 2
    shaped = make_cohort("/tmp/shape", 9, seed=7, params=SynthParams(shape_mm=3.0))   # anatomy varies
    ShapeWarp.from_nifti(read_truth(shaped, "01")["warp"], read_truth(shaped, "01")["warp_inverse"])
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import shutil
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from neuromoe import MNI_SPACE, __version__
from neuromoe.errors import InputError
from neuromoe.inputs.synth_images import build_head_model, make_bold, make_dwi, make_t1
from neuromoe.inputs.synth_plan import (
    DIAGNOSES,
    DISEASE_ROLE,
    MARKERS,
    MODALITIES,
    SESSION_COLUMNS,
    SESSION_INTERVAL_YEARS,
    SESSION_PROGRESSION,
    CohortDesign,
    SubjectPlan,
    SynthParams,
    progression_factor,
    rigid_matrix,
    session_plans,
    subject_id,
    subject_plan,
)
from neuromoe.inputs.synth_shape import SHAPE_GRID_MM, VENTRICLE_REFERENCE_AGE, ShapeWarp, subject_warp

__all__ = ["DESIGN_FILE", "DIAGNOSES", "DISEASE_ROLE", "MARKERS", "MODALITIES", "MOTION_COLUMNS",
           "SESSION_COLUMNS", "SESSION_INTERVAL_YEARS", "SESSION_PROGRESSION", "TRUTH_DIR", "CohortDesign",
           "ShapeWarp", "SubjectPlan", "SynthParams", "make_cohort", "progression_factor", "read_design",
           "read_truth", "rigid_matrix", "session_plans", "subject_id", "subject_plan", "write_subject"]

TRUTH_DIR = Path("derivatives") / "synth-truth"
DESIGN_FILE = TRUTH_DIR / "design.json"
MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]

# The generative model as every cohort's README states it (``Header`` lines over indented text; _readme
# renders it as Markdown). It is part of the cohort's bytes: an edit changes the README of every fresh
# cohort, so it is kept verbatim, history included (its ``bench/fusion_study.py`` is now
# studies/fusion/fusion_study.py; docs/synthetic_cohort.md has the design history).
_README_MODEL = """Anatomy
    The template nilearn ships is brain-only, so a head is built around it: the intracranial volume
    (the brain mask, closed), then CSF, the inner table of the skull, diploe, the outer table, muscle,
    fat and skin, as layers at fixed distances (mm) from the intracranial surface. Each subject's head
    gets a random rigid pose (rotations up to ``max_rotation_deg`` about each axis, translations up to
    ``max_translation_mm``) baked into the voxel data; the images are scanner-aligned (diagonal affine,
    stored LAS like dcm2niix output, so FSL and dipy read the b-vectors the same way). Fields of view are
    cropped to the head (DWI and BOLD: a slab over the brain), and air more than 4 mm from the skin is
    written as 0, as vendor reconstructions that mask background noise do (``zero_air``; keeps files
    small); the head and the air next to it carry Rician noise.

T1w (2 mm)
    Template intensities in the brain, layer intensities outside, a smooth multiplicative bias field,
    Rician noise, int16.
DWI (3 mm)
    ``n_b0`` b=0 volumes and ``n_directions`` directions at b~1000 s/mm^2 taken from dipy's real
    ``small_64D`` gradient table. Signal S = sum over compartments (WM, GM, CSF, extracranial) of
    f S0 exp(-b g^T D g). WM tensors have FA ~0.67 and MD 0.7e-3 mm^2/s (measured FA ~0.6 in deep WM,
    partial volume included), oriented by the structure tensor of the smoothed WM map: along tubes of WM,
    and within sheets of WM along an anatomical prior (left-right in the corpus callosum, radiating from
    the internal capsule elsewhere: corticospinal tract superior-inferior, optic radiation
    anterior-posterior). GM tensors FA ~0.18 oriented radially; CSF isotropic 3e-3. Each volume has its own
    small rigid head motion (written to the truth folder) and the gradient is applied in the moved head's
    frame, as in a scanner (so motion correction must rotate the b-vectors).
BOLD (4 mm, TR 2 s)
    T2*-like contrast (CSF > GM > WM), the first volumes brighter as T1 saturation approaches steady
    state (flip 70 deg; these are the ``dummy_scans`` the config discards), spatially smooth band-limited
    (0.01-0.08 Hz) fluctuations in grey matter shared by neighbouring voxels (so ReHo is meaningful), a
    global slow signal in all tissue and broadband physiological noise in CSF (what WM/CSF nuisance
    regression removes), a slow scanner drift, head motion (random walk plus a few spikes), Rician noise.

The fusion problem (deliberate)
    Each subject has a latent expression profile p in {anat, dwi, func}, independent of diagnosis
    (balanced: each block of nine subjects holds every (diagnosis, profile) pair once), and readable
    from the clinical markers: the anat profile lowers MoCA, the dwi profile
    raises serum NfL, the func profile raises serum alpha-synuclein (``marker_separation`` standard
    deviations). A patient's disease shows only in the modality of their profile: PD in that modality's
    region A, iRBD in its region B (see ``neuromoe.inputs.templates.ROIS``): anat, grey matter partly replaced
    by CSF (lower T1 intensity); dwi, a more isotropic WM tensor (lower FA, slightly higher MD); func,
    lower low-frequency amplitude in grey matter (lower fALFF and ReHo). Distractors (non-specific changes
    such as ageing): in every modality other than the subject's profile modality (controls included), each
    of that modality's regions A and B independently shows the same kind of change with probability
    ``p_distractor``. The profile modality itself is clean except for the disease: in a patient it shows
    the disease region only, in a control nothing. So each modality is reliable only for the subjects
    whose profile points to it, and a gate reading the clinical markers has something to learn. Clinical
    scores are only weakly diagnostic (RBDSQ higher in patients, UPDRS-III higher in PD, overlapping).

    Why this design: in the first one, controls had distractors in their profile modality too (so a routed
    control looked like a patient half the time), markers were 2.4 SD apart and profiles were drawn
    independently per subject (60 subjects of seed 42: 27 anat, 19 dwi, 14 func). Even a classifier
    handed the true region read-outs gains nothing from routing at the demo's size under the first
    distractor rule and markers (``bench/fusion_study.py oracle``, 60 subjects, profiles balanced as now,
    5 folds x 2 seeds: gated 50.8 %, uniform weights 52.5 %); with this design it gains 22 points
    (81.7 % vs 59.2 %, single modalities 34-49 %). ``control_profile_distractors=True`` and
    ``marker_separation=2.4`` bring the first rule and markers back.

Determinism
    Subject k's numbers come from its own ``np.random.SeedSequence([seed, k])``, split into independent
    streams for the plan, the clinical table and each modality: subject k is the same whatever
    ``n_subjects`` and whichever modalities are omitted. Diagnoses are balanced within consecutive
    blocks of three subjects, profiles within each diagnosis in blocks of nine. Files are gzip'ed with
    mtime 0, so the same seed gives the same bytes.
"""


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, level: int, tr: float | None = None,
                intent: str | None = None) -> None:
    img = nib.Nifti1Image(data, affine)
    if intent is not None:
        img.header.set_intent(intent)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None and data.ndim == 4:
        zooms = list(img.header.get_zooms()[:3]) + [tr]
        img.header.set_zooms(zooms)
    img.header.set_data_offset(352)
    head = io.BytesIO()
    img.header.write_to(head)                # 348-byte header + 4-byte (empty) extension flag
    # The array in one piece, in NIfTI's (Fortran) order: nibabel's writer goes slice by slice, slower.
    # mtime=0: the same data gives the same bytes, whatever the clock says.
    raw = head.getvalue() + np.asarray(data, dtype=img.header.get_data_dtype()).tobytes(order="F")
    path.write_bytes(gzip.compress(raw, compresslevel=level, mtime=0))


def _write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _motion_frame(params: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(params, columns=MOTION_COLUMNS)


_MOTION_DOC = {
    "Description": "True per-volume head motion, one row per volume of the raw image (dummy scans included). "
                   "Row k is the rigid transform x_k = R x + t that moves the head from its reference position "
                   "(sub-<id>_pose.json) to where it was during volume k, in scanner RAS world mm; "
                   "R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x), rotations about the world origin. The reference "
                   "volume (the first DWI volume; the first BOLD volume after the dummy scans) has zero motion.",
    "trans_x": {"Units": "mm"}, "trans_y": {"Units": "mm"}, "trans_z": {"Units": "mm"},
    "rot_x": {"Units": "rad"}, "rot_y": {"Units": "rad"}, "rot_z": {"Units": "rad"},
}


def _motion_doc(plan: SubjectPlan) -> dict:
    if plan.session is None:
        return _MOTION_DOC
    name = "sub-<id>_ses-<session>_pose.json"
    return _MOTION_DOC | {"Description": _MOTION_DOC["Description"].replace("sub-<id>_pose.json", name)}


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def write_subject(bids_dir: str | Path, plan: SubjectPlan, params: SynthParams | None = None,
                  modalities: Iterable[str] = MODALITIES) -> dict[str, float]:
    """Write one subject's images, sidecars and truth files; returns seconds spent per modality.

    ``plan`` may be edited with ``dataclasses.replace`` (e.g. tests force a diagnosis and effects). A plan
    of a session (``plan.session`` not None, ``session_plans``) is written as that session:
    ``sub-<id>/ses-<session>/{anat,dwi,func}/sub-<id>_ses-<session>_...`` and its truth under
    ``derivatives/synth-truth/sub-<id>/ses-<session>/``.
    """
    p = params or SynthParams()
    mods = list(modalities)
    bad = sorted(set(mods) - set(MODALITIES))
    if bad:
        raise ValueError(f"unknown modalities {bad}; known: {list(MODALITIES)}")
    bids = Path(bids_dir)
    s = plan.subject
    # stem: the file names' entities; sub, truth: the subject's (or the session's) raw and truth folders.
    stem, rel = f"sub-{s}", Path(f"sub-{s}")
    if plan.session is not None:
        stem, rel = f"sub-{s}_ses-{plan.session}", rel / f"ses-{plan.session}"
    sub, truth = bids / rel, bids / TRUTH_DIR / rel
    truth.mkdir(parents=True, exist_ok=True)
    rngs = plan.streams()
    seconds: dict[str, float] = {}
    lvl = p.gzip_level

    t0 = time.perf_counter()
    # The T1w grid and truth mask are written even when the T1w is omitted: the truth is about the subject.
    t1, mask = make_t1(plan, p, rngs["anat"])
    _save_nifti(mask, t1.affine, truth / f"{stem}_desc-truth_mask.nii.gz", lvl)
    if "anat" in mods:
        (sub / "anat").mkdir(parents=True, exist_ok=True)
        _save_nifti(np.asanyarray(t1.dataobj), t1.affine, sub / "anat" / f"{stem}_T1w.nii.gz", lvl)
    seconds["anat"] = time.perf_counter() - t0

    if "dwi" in mods:
        t0 = time.perf_counter()
        d = sub / "dwi"
        d.mkdir(parents=True, exist_ok=True)
        img, bvals, bvecs, motion = make_dwi(plan, p, rngs["dwi"])
        _save_nifti(np.asanyarray(img.dataobj), img.affine, d / f"{stem}_dwi.nii.gz", lvl, tr=7.0)
        (d / f"{stem}_dwi.bval").write_text(" ".join(f"{int(b)}" for b in bvals) + "\n")
        (d / f"{stem}_dwi.bvec").write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs) + "\n")
        _write_json({"EchoTime": 0.08, "RepetitionTime": 7.0, "MagneticFieldStrength": 3,
                     "Manufacturer": "synthetic (neuromoe.synth)",
                     "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION"]},
                    d / f"{stem}_dwi.json")
        _motion_frame(motion).to_csv(truth / f"{stem}_dwi_motion.tsv", sep="\t", index=False, float_format="%.6f")
        _write_json(_motion_doc(plan), truth / f"{stem}_dwi_motion.json")
        seconds["dwi"] = time.perf_counter() - t0

    if "func" in mods:
        t0 = time.perf_counter()
        d = sub / "func"
        d.mkdir(parents=True, exist_ok=True)
        img, motion = make_bold(plan, p, rngs["func"])
        _save_nifti(np.asanyarray(img.dataobj), img.affine, d / f"{stem}_task-rest_bold.nii.gz", lvl, tr=p.tr_s)
        _write_json({"TaskName": "rest", "RepetitionTime": p.tr_s, "EchoTime": 0.03,
                     "FlipAngle": p.flip_angle_deg, "MagneticFieldStrength": 3,
                     "Manufacturer": "synthetic (neuromoe.synth)",
                     "TaskDescription": "eyes-open rest; the first volumes are not yet at T1 steady state"},
                    d / f"{stem}_task-rest_bold.json")
        _motion_frame(motion).to_csv(truth / f"{stem}_task-rest_motion.tsv", sep="\t", index=False,
                                     float_format="%.6f")
        _write_json(_motion_doc(plan), truth / f"{stem}_task-rest_motion.json")
        seconds["func"] = time.perf_counter() - t0

    pose_doc = ("Rigid pose of the head, the same for T1w, DWI and BOLD: x_scanner = R x_mni + t "
                "(mm), R = Rz @ Ry @ Rx about the world origin. Its inverse maps a native world "
                "point to the template (neuromoe.inputs.templates.roi_mask(..., world_to_mni=...)).")
    warp = subject_warp(plan, p)
    if warp is not None:
        pose_doc = ("Rigid pose of the head, the same for T1w, DWI and BOLD: x_scanner = R y + t (mm), R = Rz @ Ry "
                    "@ Rx about the world origin, where y is the subject's anatomical point (MNI-aligned mm): this "
                    "subject's anatomy is the template's warped, the template point m is y = m + u(m) "
                    f"({stem}{_WARP_SUFFIX}). The pose's inverse maps a native world point to y; the inverse warp "
                    f"({stem}{_WARP_INVERSE_SUFFIX}) maps y to the template.")
    _write_warp(truth, stem, warp, plan, p)
    _write_json({"matrix": plan.pose.round(8).tolist(), "from": MNI_SPACE, "to": "scanner",
                 "rotation_deg": list(plan.rotation_deg), "translation_mm": list(plan.translation_mm),
                 "Description": pose_doc},
                truth / f"{stem}_pose.json")
    _write_json(_profile_json(plan, mods, p.design), truth / f"{stem}_profile.json")
    return seconds


# The truth warp's files (BIDS-like, after the xfm files of BIDS derivatives): the forward displacement on
# the MNI grid and the inverse, what every image was sampled through.
_WARP_SUFFIX = f"_from-{MNI_SPACE}_to-anat_desc-truth_xfm.nii.gz"
_WARP_INVERSE_SUFFIX = f"_from-anat_to-{MNI_SPACE}_desc-truth_xfm.nii.gz"


def _write_warp(truth: Path, stem: str, warp: ShapeWarp | None, plan: SubjectPlan, p: SynthParams) -> None:
    """The subject's truth warp and its sidecar; without a warp, remove those of an earlier cohort."""
    files = [truth / f"{stem}{suffix}" for suffix in (_WARP_SUFFIX, _WARP_INVERSE_SUFFIX)]
    if warp is None:
        for f in files:
            f.unlink(missing_ok=True)
            f.with_name(f.name.replace(".nii.gz", ".json")).unlink(missing_ok=True)
        return
    docs = [f"Forward displacement field u of the subject's anatomy (the truth of neuromoe.inputs.synth_shape): "
            f"the template point m ({MNI_SPACE}, RAS mm) is the subject's anatomical point y = m + u(m), and "
            f"the rigid pose ({stem}_pose.json) maps y to scanner mm: x = R y + t. Layout (X, Y, Z, 1, 3), "
            f"float32 mm, RAS components (x, y, z) of u at the voxel centres of the MNI-aligned grid the affine "
            f"gives, trilinear between them, zero beyond the grid; the ITK/ANTs layout, but ITK expects LPS "
            f"components (negate x and y for ANTs).",
            f"Inverse displacement field w: the subject's anatomical point y (MNI-aligned mm, before the pose) "
            f"is the template point y + w(y). Every image of the subject was sampled through it: scanner voxel "
            f"-> inverse pose (and motion) -> y -> y + w(y) -> template. Layout as {stem}{_WARP_SUFFIX}."]
    info = warp.info | {"age": plan.clinical.get("age"), "ventricle_mm_per_decade": p.ventricle_mm_per_decade,
                        "ventricle_reference_age": VENTRICLE_REFERENCE_AGE}
    for f, img, doc, (src, dst) in zip(files, (warp.to_nifti(), warp.inverse_nifti()), docs,
                                       ((MNI_SPACE, "anat"), ("anat", MNI_SPACE)), strict=True):
        _save_nifti(np.asanyarray(img.dataobj), img.affine, f, p.gzip_level, intent="vector")
        _write_json({"Description": doc, "FromSpace": src, "ToSpace": dst, "Units": "mm",
                     "Convention": "RAS", "GridSpacing_mm": float(img.header.get_zooms()[0])} | info,
                    f.with_name(f.name.replace(".nii.gz", ".json")))


def _profile_json(plan: SubjectPlan, modalities: list[str], design: CohortDesign) -> dict:
    rois = {m: design.effect_rois(m) for m in MODALITIES}
    return {
        "participant_id": f"sub-{plan.subject}",
        "diagnosis": plan.diagnosis,
        "profile": plan.profile,
        "modalities_written": modalities,
        "effects": {m: {role: {"region": rois[m][role].name, "cause": plan.causes[m][role],
                               "strength": round(plan.effects[m][role], 4)}
                        for role in ("A", "B")} for m in MODALITIES},
        "affected": {m: {role: plan.causes[m][role] is not None for role in ("A", "B")} for m in MODALITIES},
        "seed": [plan.seed, plan.index],
    } | ({} if plan.session is None else {
        "session": f"{plan.session}",
        "progression_factor": progression_factor(plan.diagnosis, plan.session),
        "clinical": {c: plan.clinical[c] for c in SESSION_COLUMNS},
    })


def read_design(bids_dir: str | Path) -> CohortDesign:
    """The cohort design a synthetic cohort was written with, from ``derivatives/synth-truth/design.json``
    (the recorded regions and marker mapping, not drawn again); the demo design when there is no such file
    (cohorts written before designs existed)."""
    f = Path(bids_dir) / DESIGN_FILE
    if not f.exists():
        return CohortDesign.default()
    try:
        return CohortDesign.from_json(json.loads(f.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"unreadable cohort design: {e}", path=f,
                         fix="write the cohort again with neuromoe.inputs.synth.make_cohort") from e


def read_truth(bids_dir: str | Path, subject: str, session: str | None = None) -> dict:
    """The truth of one synthetic subject: profile.json's content plus ``pose`` (4x4 array), ``mask`` path,
    the motion tables (DataFrames, absent for an omitted modality), ``design`` (the cohort's
    ``CohortDesign``, :func:`read_design`) and, in a cohort with shape (``SynthParams.shape_mm`` > 0), the
    paths ``warp`` and ``warp_inverse`` of the truth warp (``ShapeWarp.from_nifti(warp, warp_inverse)``;
    MNI point m -> anatomical point m + u(m) -> ``pose`` -> scanner). ``subject`` without ``sub-``. In a
    cohort written with ``sessions`` > 1 the truth is per session: ``session`` (``"2"`` or ``"ses-2"``) is
    then required, and profile.json adds ``session``, ``progression_factor`` and that visit's ``clinical``
    values."""
    s = subject.removeprefix("sub-")
    d = Path(bids_dir) / TRUTH_DIR / f"sub-{s}"
    stem = f"sub-{s}"
    if session is not None:
        label = str(session).removeprefix("ses-")
        d, stem = d / f"ses-{label}", f"sub-{s}_ses-{label}"
    f = d / f"{stem}_profile.json"
    if not f.exists():
        found = sorted(x.name for x in d.glob("ses-*")) if session is None else []
        fix = (f"this cohort has sessions ({', '.join(found)}): pass session=" if found else
               "only cohorts written by neuromoe.inputs.synth.make_cohort have a synth-truth folder")
        raise InputError("no synthetic ground truth for this subject" + (" and session" if session else ""),
                         subject=f"sub-{s}", path=f, fix=fix)
    out = json.loads(f.read_text())
    out["pose"] = np.array(json.loads((d / f"{stem}_pose.json").read_text())["matrix"])
    out["mask"] = d / f"{stem}_desc-truth_mask.nii.gz"
    for key, suffix in (("warp", _WARP_SUFFIX), ("warp_inverse", _WARP_INVERSE_SUFFIX)):
        if (d / f"{stem}{suffix}").exists():
            out[key] = d / f"{stem}{suffix}"
    for key, name in (("dwi_motion", "dwi"), ("func_motion", "task-rest")):
        m = d / f"{stem}_{name}_motion.tsv"
        if m.exists():
            out[key] = pd.read_csv(m, sep="\t")
    out["design"] = read_design(bids_dir)
    return out


def _participants(plans: list[SubjectPlan]) -> pd.DataFrame:
    rows = [{"participant_id": f"sub-{pl.subject}", "diagnosis": pl.diagnosis, **pl.clinical} for pl in plans]
    df = pd.DataFrame(rows)
    # Whole-number columns stay whole numbers in the TSV even with n/a among them.
    return df.astype({c: "Int64" for c in ("age", "updrs3", "moca", "rbdsq", "serum_asyn")})


_PARTICIPANTS_DEMO = {
    "participant_id": {"Description": "subject label"},
    "diagnosis": {"Description": "clinical group", "Levels": {
        "HC": "healthy control", "PD": "Parkinson's disease",
        "iRBD": "isolated REM sleep behaviour disorder"}},
    "age": {"Description": "age at scan", "Units": "year"},
    "sex": {"Description": "sex, encoded as a string", "Levels": {"M": "male", "F": "female"}},
    "updrs3": {"Description": "MDS-UPDRS part III motor examination score (0-132, higher is worse); "
                              "synthetic: higher in PD, overlapping", "Units": "score"},
    "moca": {"Description": "Montreal Cognitive Assessment (0-30, lower is worse); synthetic: lowered by the "
                            "latent {moca} profile, not by diagnosis", "Units": "score"},
    "rbdsq": {"Description": "REM Sleep Behavior Disorder Screening Questionnaire (0-13); synthetic: higher in "
                             "PD and iRBD, overlapping", "Units": "score"},
    "serum_nfl": {"Description": "serum neurofilament light chain; synthetic: raised by the latent {serum_nfl} "
                                 "profile and by age", "Units": "pg/mL"},
    "serum_asyn": {"Description": "serum alpha-synuclein; synthetic: raised by the latent {serum_asyn} profile",
                   "Units": "pg/mL"},
}


def _sessions_table(plans: list[SubjectPlan]) -> pd.DataFrame:
    """sub-<id>_sessions.tsv of one subject: session_id and the clinical columns that change, per session."""
    df = pd.DataFrame([{"session_id": f"ses-{pl.session}", **{c: pl.clinical[c] for c in SESSION_COLUMNS}}
                       for pl in plans])
    return df.astype({c: "Int64" for c in ("age", "updrs3", "moca", "serum_asyn")})


def _sessions_json(design: CohortDesign) -> dict:
    """sub-<id>_sessions.json: the columns of the sessions table, as participants.json describes them."""
    cols = _participants_json(design)
    return {"session_id": {"Description": f"session label; visits {SESSION_INTERVAL_YEARS} years apart, "
                                          "ses-1 the first (its values are participants.tsv's)"},
            **{c: cols[c] for c in SESSION_COLUMNS},
            "age": cols["age"] | {"Description": "age at the session's scan"}}


def _participants_json(design: CohortDesign) -> dict:
    """participants.json; the marker descriptions name the profile each marker signals in ``design``."""
    names = {m: design.marker_profile(m) for m in MARKERS}
    return {col: {k: v.format(**names) if k == "Description" else v for k, v in d.items()}
            for col, d in _PARTICIPANTS_DEMO.items()}


def _call(n: int, seed: int, p: SynthParams, sessions: int = 1) -> str:
    """The make_cohort call that wrote the cohort, as its README and description name it."""
    named = ([] if p.design_seed is None else [f"design_seed={p.design_seed}"]) + (
        [f"shape_mm={p.shape_mm}", f"ventricle_mm_per_decade={p.ventricle_mm_per_decade}"] if p.has_shape else [])
    design = f", params=SynthParams({', '.join(named)}, ...)" if named else ""
    visits = "" if sessions == 1 else f", sessions={sessions}"
    return f"make_cohort(n_subjects={n}, seed={seed}{design}{visits})"


def _param_items(p: SynthParams) -> dict:
    """SynthParams as recorded: every field, less ``design_seed`` when None and the shape fields when
    ``shape_mm`` is 0 (demo cohorts keep their bytes)."""
    out = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    if p.design_seed is None:
        del out["design_seed"]
    if not p.has_shape:
        del out["shape_mm"], out["ventricle_mm_per_decade"]
    return out


def _dataset_description(n: int, seed: int, p: SynthParams, sessions: int = 1) -> dict:
    return {
        "Name": "NeuroMoE synthetic demo cohort (SYNTHETIC DATA: no real participants)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["neuromoe.synth"],
        "HowToAcknowledge": "These images and participants are simulated from the MNI152 template; results on "
                            "them validate software, not clinical hypotheses.",
        "GeneratedBy": [{"Name": "neuromoe.synth", "Version": __version__,
                         "Description": f"{_call(n, seed, p, sessions)}; see README" if sessions == 1 else
                                        f"{_call(n, seed, p, sessions)}; {sessions} sessions per subject (ses-1 "
                                        f"to ses-{sessions}, sub-<id>_sessions.tsv); see README"}],
        "ReferencesAndLinks": ["Fonov et al. 2011, NeuroImage 54:313 (ICBM 2009a nonlinear symmetric template, "
                               "as shipped with nilearn)", "dipy small_64D gradient table"],
    }


def _design_section(p: SynthParams) -> str:
    """The README's section on a drawn design ("" for the demo design, whose README keeps its bytes)."""
    d = p.design
    if d.seed is None:
        return ""
    return f"""
## Cohort design (design seed {d.seed})

This cohort does not use the demo design that the generative model below names: its six effect regions
were drawn from design seed {d.seed} (`SynthParams(design_seed={d.seed})`, `CohortDesign.draw`; table under
Regions) and so was the marker mapping: MoCA is lowered by the latent {d.marker_profile("moca")} profile,
serum NfL raised by the {d.marker_profile("serum_nfl")} profile, serum alpha-synuclein raised by the
{d.marker_profile("serum_asyn")} profile. Everything else is as described. The design, with each region's
tissue volume, is in `derivatives/synth-truth/design.json` (`neuromoe.inputs.synth.read_design`).
"""


def _shape_section(p: SynthParams) -> str:
    """The README's section on anatomical shape ("" when off: those cohorts keep their bytes)."""
    if not p.has_shape:
        return ""
    return f"""
## Shape (every subject's anatomy differs from the template)

The Anatomy paragraph below poses the template itself; in this cohort each subject's anatomy is, before
the pose, the template pushed through its own smooth invertible warp (`neuromoe.inputs.synth_shape`):
the exponential of a stationary velocity field on a {SHAPE_GRID_MM:g} mm grid. That field is a random smooth
field drawn per subject (broad everywhere in the head, local near the cortex and the ventricles), scaled
to an RMS displacement of `shape_mm` = {p.shape_mm} mm over the brain, plus an enlargement of the
lateral ventricles: `ventricle_mm_per_decade` = {p.ventricle_mm_per_decade} mm of wall displacement per
decade of age above {VENTRICLE_REFERENCE_AGE}. The random part is the same at every session (the same
person); the ventricles follow the age at the scan. Every image, and the truth mask, is sampled from the
template through the warp's inverse and the pose (and motion): one interpolation. The diffusion tensors
are not reoriented by the warp's local rotation. The planted effect regions move with the anatomy.

Truth, per subject (and session) in `derivatives/synth-truth/`:
`sub-XX_from-{MNI_SPACE}_to-anat_desc-truth_xfm.nii.gz` holds the displacement u (x, y, z, 1, 3;
RAS mm, on an MNI-aligned grid) that takes the MNI point m to the anatomical point m + u(m), which
the pose (`sub-XX_pose.json`) takes to the scanner; its inverse, what the images were sampled through,
is `sub-XX_from-anat_to-{MNI_SPACE}_desc-truth_xfm.nii.gz`. Their JSON sidecars state the convention
and the subject's numbers (age, RMS displacement, Jacobian range, ventricular volume ratio).
"""


def _sessions_section(sessions: int) -> str:
    """The README's section on a longitudinal cohort ("" for one session, whose README keeps its bytes)."""
    if sessions == 1:
        return ""
    return f"""
## Sessions ({sessions} visits per subject)

Every subject was scanned at {sessions} sessions, {SESSION_INTERVAL_YEARS} years apart, so the layout is
`sub-XX/ses-K/anat`, `dwi`, `func` (K = 1 to {sessions}), every file name with its `ses-K` entity.
Diagnosis and latent profile are the same at every session, and so are omitted modalities. Session 1 is
the subject of the single-session cohort of the same call, image for image. At session K a patient's
disease effect is its session-1 strength times 1 + {SESSION_PROGRESSION} (K - 1), at most 1
(`neuromoe.inputs.synth.progression_factor`); distractors, and every effect of a control, stay as they
were. Each session has its own head pose, motion and noise.
The clinical values progress from visit to visit (age by the interval; MDS-UPDRS III up, MoCA down,
serum NfL and alpha-synuclein up, faster in PD than in iRBD, with visit-to-visit noise; sex and RBDSQ
stay): `sub-XX/sub-XX_sessions.tsv` holds them per session (`sub-XX_sessions.json` describes the
columns), `participants.tsv` holds session 1's. The truth is per session, under
`derivatives/synth-truth/sub-XX/ses-K/` (`read_truth(bids_dir, subject, session="K")`).
"""


def _readme(n: int, seed: int, p: SynthParams, sessions: int = 1) -> str:
    rows = "\n".join(f"| {r.modality} | {r.role} ({'PD' if r.role == 'A' else 'iRBD'}) | {r.name} | "
                     f"({r.centre_mm[0]:+.0f}/{-r.centre_mm[0]:+.0f}, {r.centre_mm[1]:+.0f}, "
                     f"{r.centre_mm[2]:+.0f}) | {r.radius_mm:.0f} | {r.tissue} |"
                     for r in p.design.rois)
    params = "\n".join(f"| {k} | {v!r} |" for k, v in _param_items(p).items())
    # _README_MODEL as Markdown: "Header" lines over indented text.
    body_lines = []
    for line in _README_MODEL.rstrip().splitlines():
        body_lines.append(f"\n### {line.strip()}\n" if line and not line.startswith(" ") else line.strip())
    body = "\n".join(body_lines)
    return f"""# NeuroMoE synthetic demo cohort: SYNTHETIC DATA

This dataset was generated by `neuromoe.synth.{_call(n, seed, p, sessions)}`. No real person was
scanned: every image is simulated from the MNI152 template that nilearn ships, and every clinical value is
drawn from the distributions below. A classifier's accuracy on it shows that the pipeline works end to end;
it says nothing about Parkinson's disease or REM sleep behaviour disorder.

Layout: BIDS 1.9 raw (`sub-XX/anat`, `dwi`, `func`, `participants.tsv/json`). The ground truth (latent
profile, planted effects, head pose, per-volume motion, brain mask) is under `derivatives/synth-truth/`.
{_design_section(p)}{_shape_section(p)}{_sessions_section(sessions)}
## Generative model

{body}

## Regions (MNI mm; bilateral spheres, restricted to the tissue named)

| modality | role | region | centre x, y, z | radius mm | tissue |
|---|---|---|---|---|---|
{rows}

## What a perfect reader could reach (default parameters)

Simulated on 12,000 subject plans with every region read without error (gradient-boosted trees, 3-fold
cross-validation, 3 balanced classes, chance 33 %):

| inputs | accuracy |
|---|---|
| clinical table only | ~49 % |
| one modality's two regions + clinical table | ~65 % |
| all six regions, no clinical table | ~66 % |
| all six regions + clinical table (the gate can read the profile) | ~99 % |
| all six regions + the true profile | 100 % |

With the true profile the profile modality's regions give the diagnosis exactly (PD: region A, iRBD:
region B, control: neither). The latent profile is recovered from (moca, serum_nfl, serum_asyn) about
99 % of the time (logistic regression). Real images add noise and blur and a cohort has few subjects
(`bench/fusion_study.py oracle` measures the ceiling at a given size), so a trained model lands below
these numbers.

## Parameters

| SynthParams field | value |
|---|---|
{params}
"""


def _parse_missing(missing: Mapping[str, Iterable[str]] | None) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for key, mods in (missing or {}).items():
        s = str(key).removeprefix("sub-")
        ms = set(mods)
        bad = sorted(ms - set(MODALITIES))
        if bad:
            raise ValueError(f"missing[{key!r}] names unknown modalities {bad}; known: {list(MODALITIES)}")
        out[s] = ms
    return out


def _prepare_out_dir(out: Path, n_subjects: int, sessions: int = 1) -> None:
    """Create ``out``; if it holds an earlier synthetic cohort, remove its subjects beyond ``n_subjects``
    (so participants.tsv and the folders agree) and what does not fit ``sessions`` (session folders and
    tables of a cohort with more sessions, or single-session folders of a sessioned one). Refuse to write
    into any other non-empty folder."""
    if out.exists() and any(out.iterdir()):
        desc = out / "dataset_description.json"
        try:
            ours = json.loads(desc.read_text())["GeneratedBy"][0]["Name"] == "neuromoe.synth"
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            ours = False
        if not ours:
            raise InputError("the folder is not empty and is not a synthetic cohort; nothing was written",
                             path=out, fix="give an empty or new folder (the synthetic cohort never "
                                           "overwrites other data)")
        keep = {f"sub-{subject_id(i)}" for i in range(1, n_subjects + 1)}
        for parent in (out, out / TRUTH_DIR):
            for d in parent.glob("sub-*"):
                if d.is_dir() and d.name not in keep:
                    shutil.rmtree(d)
                elif d.is_dir():
                    for x in [x for x in d.iterdir() if _stale(x, sessions, parent != out)]:
                        shutil.rmtree(x) if x.is_dir() else x.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _stale(x: Path, sessions: int, truth: bool) -> bool:
    """Whether ``x``, in a subject folder (raw, or the truth's when ``truth``) of an earlier cohort, does
    not belong to a cohort of ``sessions`` sessions."""
    label = x.name.removeprefix("ses-") if x.is_dir() and x.name.startswith("ses-") else None
    if sessions == 1:
        return label is not None or x.name.endswith(("_sessions.tsv", "_sessions.json"))
    if label is not None:
        return not (label.isdigit() and 1 <= int(label) <= sessions)
    return (x.is_dir() and x.name in MODALITIES) or (truth and x.is_file())


def _plans(index: int, seed: int, p: SynthParams, sessions: int) -> list[SubjectPlan]:
    """The plans a subject is written from: its plan, or one per session."""
    return [subject_plan(index, seed, p)] if sessions == 1 else session_plans(index, seed, p, sessions)


def _write_one(args: tuple[str, int, int, SynthParams, list[str], int]) -> tuple[str, float]:
    bids, index, seed, p, mods, sessions = args
    t0 = time.perf_counter()
    for plan in _plans(index, seed, p, sessions):
        write_subject(bids, plan, p, mods)
    return subject_id(index), time.perf_counter() - t0


def make_cohort(out_dir: str | Path, n_subjects: int, seed: int, params: SynthParams | None = None, *,
                missing: Mapping[str, Iterable[str]] | None = None, n_jobs: int = 1, sessions: int = 1) -> Path:
    """Write a synthetic BIDS cohort of ``n_subjects`` to ``out_dir`` and return its path.

    ``missing`` maps subject labels (``"03"`` or ``"sub-03"``) to modalities to omit (``anat``, ``dwi``,
    ``func``; in every session). ``n_jobs`` > 1 writes subjects in that many processes (same bytes as one
    process). ``sessions`` > 1 writes a longitudinal cohort: ``sub-<id>/ses-1`` ... ``ses-<sessions>``
    (``session_plans``: session 1 is the single-session subject, later visits progress), a
    ``sub-<id>_sessions.tsv`` per subject and the truth per session. Files already in ``out_dir`` are
    overwritten.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    if isinstance(sessions, bool) or not isinstance(sessions, (int, np.integer)) or sessions < 1:
        raise ValueError(f"sessions must be an integer >= 1, got {sessions!r}")
    sessions = int(sessions)
    p = params or SynthParams()
    miss = _parse_missing(missing)
    unknown = sorted(set(miss) - {subject_id(i) for i in range(1, n_subjects + 1)})
    if unknown:
        raise ValueError(f"missing names subjects not in the cohort: {unknown}")
    out = Path(out_dir)
    _prepare_out_dir(out, n_subjects, sessions)
    plans = [subject_plan(i, seed, p) for i in range(1, n_subjects + 1)]
    jobs = [(str(out), i, seed, p, [m for m in MODALITIES if m not in miss.get(subject_id(i), set())], sessions)
            for i in range(1, n_subjects + 1)]
    # Build the template-level model before forking, so workers share it instead of rebuilding it.
    build_head_model(p)
    if n_jobs > 1 and n_subjects > 1:
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=get_context("fork")) as ex:
            list(ex.map(_write_one, jobs))
    else:
        for j in jobs:
            _write_one(j)
    df = _participants(plans)
    df.to_csv(out / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    pj = _participants_json(p.design)
    if sessions > 1:     # participants.tsv holds session 1's values
        pj = {c: d | {"Description": f"{d['Description']}; at session 1 (every session: sub-<id>_sessions.tsv)"}
              if c in SESSION_COLUMNS else d for c, d in pj.items()}
    _write_json(pj, out / "participants.json")
    if sessions > 1:
        for i in range(1, n_subjects + 1):
            stem = out / f"sub-{subject_id(i)}" / f"sub-{subject_id(i)}_sessions"
            _sessions_table(_plans(i, seed, p, sessions)).to_csv(stem.with_suffix(".tsv"), sep="\t", index=False,
                                                                 na_rep="n/a")
            _write_json(_sessions_json(p.design), stem.with_suffix(".json"))
    _write_json(_dataset_description(n_subjects, seed, p, sessions), out / "dataset_description.json")
    (out / "README").write_text(_readme(n_subjects, seed, p, sessions))
    tdir = out / TRUTH_DIR
    _write_json({"Name": "synthetic ground truth", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                 "GeneratedBy": [{"Name": "neuromoe.synth", "Version": __version__}]},
                tdir / "dataset_description.json")
    visits = {} if sessions == 1 else {"sessions": sessions, "session_progression": SESSION_PROGRESSION,
                                       "session_interval_years": SESSION_INTERVAL_YEARS}
    _write_json(_param_items(p) | {"seed": seed, "n_subjects": n_subjects} | visits, tdir / "synth_params.json")
    _write_json(p.design.to_json() | ({} if sessions == 1 else {"sessions": sessions}), out / DESIGN_FILE)
    return out
