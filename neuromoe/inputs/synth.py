"""The bundled synthetic BIDS cohort: heads built from the MNI152 template, with planted group effects.

No public cohort can be downloaded at run time, so the demo writes one. It is SYNTHETIC: its accuracy
shows that the pipeline works, not anything about Parkinson's disease.

Anatomy
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

Example::

    from neuromoe.inputs.synth import make_cohort
    bids = make_cohort("data/demo_bids", n_subjects=180, seed=42)
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import math
import shutil
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from neuromoe import MNI_SPACE, __version__
from neuromoe.errors import InputError
from neuromoe.inputs import templates as tpl

__all__ = ["DIAGNOSES", "MODALITIES", "SubjectPlan", "SynthParams", "make_cohort", "read_truth",
           "rigid_matrix", "subject_id", "subject_plan", "write_subject"]

MODALITIES = ("anat", "dwi", "func")
DIAGNOSES = ("HC", "PD", "iRBD")
DISEASE_ROLE = {"PD": "A", "iRBD": "B"}
TRUTH_DIR = Path("derivatives") / "synth-truth"
MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]

# --- tissue properties (relative units unless stated) -------------------------------------------------
T1W = {"wm": 1.0, "gm": 0.74, "csf": 0.32}          # T1w MPRAGE-like contrast, WM = 1
DWI_S0 = {"wm": 1.0, "gm": 1.35, "csf": 3.0}        # b=0 (T2-weighted, TE ~80 ms), WM = 1
WM_EIG = (1.35e-3, 0.375e-3)                        # mm^2/s, axial / radial: FA 0.67, MD 0.70e-3
GM_EIG = (0.85e-3, 0.625e-3)                        # FA 0.18, MD 0.70e-3
CSF_D = 3.0e-3                                       # isotropic, body-temperature water
OTHER_D = 1.0e-3                                     # extracranial soft tissue (fat is suppressed)
EPI = {"wm": 0.78, "gm": 1.0, "csf": 1.35}          # T2*-weighted EPI, GM = 1
T1_RELAX_S = {"wm": 0.85, "gm": 1.35, "csf": 4.0, "other": 1.0}   # longitudinal relaxation at 3 T
# Intensity profile outside the intracranial volume, by distance (mm) from its surface:
# CSF, inner table, diploe, outer table, galea/muscle, fat, skin, air. One row per modality.
_LAYER_D = np.array([0.0, 1.0, 2.0, 3.5, 4.5, 6.0, 7.0, 8.5, 9.5, 10.5, 12.0, 13.0, 14.5, 15.5])
_LAYER_T1 = np.array([.32, .30, .08, .06, .50, .50, .08, .06, .45, .95, .95, .60, .55, 0.0])
_LAYER_EPI = np.array([1.3, 1.0, .05, .05, .20, .20, .05, .05, .30, .12, .12, .30, .30, 0.0])
_LAYER_S0 = np.array([2.8, 2.2, .05, .05, .25, .25, .05, .05, .35, .08, .08, .30, .30, 0.0])
HEAD_MM = float(_LAYER_D[-1])
AIR_MARGIN_MM = 4.0


@dataclass(frozen=True)
class SynthParams:
    """Every knob of the generator. Defaults make the demo cohort (about 2.5 s of one core and 11 MB per
    subject: T1w 0.7 MB, DWI 4 MB, BOLD 6 MB)."""

    # sizes
    t1_voxel_mm: float = 2.0
    dwi_voxel_mm: float = 3.0
    bold_voxel_mm: float = 4.0
    n_b0: int = 2
    n_directions: int = 30           # taken from dipy's small_64D table (64 directions)
    n_dummy: int = 4                 # bright volumes at the start (config: preprocessing.func.dummy_scans)
    n_bold: int = 100                # volumes after the dummies
    tr_s: float = 2.0
    # pose and motion
    max_rotation_deg: float = 8.0
    max_translation_mm: float = 8.0
    dwi_motion_mm: float = 1.0       # per-volume motion bound (each translation), mm
    dwi_motion_deg: float = 1.0      # per-volume motion bound (each rotation), degrees
    bold_walk_mm: float = 0.03       # random-walk step per volume (translations mm, rotations deg)
    bold_spikes: int = 3             # one-volume jerks
    bold_spike_mm: float = 0.8       # their size (mm; the same number in degrees for the rotation part)
    # image quality
    t1_scale: float = 500.0          # int16 value of white matter
    t1_snr: float = 30.0             # WM / noise sigma
    dwi_scale: float = 80.0          # int16 value of WM at b=0
    dwi_snr: float = 25.0            # WM b=0 / noise sigma
    bold_scale: float = 100.0        # int16 value of grey matter
    bold_snr: float = 100.0          # GM / thermal noise sigma
    t1_bias: float = 0.12            # standard deviation of the log bias field over the field of view
    epi_bias: float = 0.08
    # BOLD signal (fractions of the tissue baseline)
    lf_amplitude: float = 0.015      # GM band-limited fluctuation (std)
    wm_lf_fraction: float = 0.25     # WM fluctuation relative to GM
    lf_fwhm_mm: float = 8.0          # spatial smoothness of the shared fluctuation
    global_amplitude: float = 0.003  # slow signal shared by all tissue
    csf_noise: float = 0.02          # broadband physiological noise in CSF
    drift: float = 0.01              # slow scanner drift (std of its coefficients)
    flip_angle_deg: float = 70.0
    # planted effects (at a region's centre; jittered by +-effect_jitter per subject)
    anat_effect: float = 0.45        # fraction of grey matter replaced by CSF
    dwi_effect: float = 0.5          # fractional loss of the WM tensor's anisotropic part (FA)
    dwi_md_increase: float = 0.25    # fractional MD increase at full effect (scaled by dwi_effect)
    func_effect: float = 0.7         # fractional loss of the GM low-frequency amplitude
    effect_jitter: float = 0.2
    p_distractor: float = 1.0 / 3.0
    control_profile_distractors: bool = False   # True: the first design (also in a control's profile modality)
    # clinical table
    marker_separation: float = 4.0   # profile marker shift, in standard deviations
    clinical_missing: float = 0.03   # probability that one score/marker is n/a
    # output
    zero_air: bool = True            # air beyond 4 mm of the skin is 0 (vendor background masking; small files)
    gzip_level: int = 1

    def __post_init__(self) -> None:
        positive = ["t1_voxel_mm", "dwi_voxel_mm", "bold_voxel_mm", "tr_s", "t1_scale", "t1_snr", "dwi_scale",
                    "dwi_snr", "bold_scale", "bold_snr", "lf_fwhm_mm"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"SynthParams.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ["p_distractor", "clinical_missing", "anat_effect", "dwi_effect", "func_effect",
                     "effect_jitter"]:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SynthParams.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.n_b0 < 1 or not 6 <= self.n_directions <= 64:
            raise ValueError(f"SynthParams needs n_b0 >= 1 and 6 <= n_directions <= 64 (dipy's table), "
                             f"got n_b0={self.n_b0}, n_directions={self.n_directions}")
        if self.n_dummy < 0 or self.n_bold < 16:
            raise ValueError(f"SynthParams needs n_dummy >= 0 and n_bold >= 16, got {self.n_dummy}, {self.n_bold}")
        if not 1 <= self.gzip_level <= 9:
            raise ValueError(f"SynthParams.gzip_level must be in 1..9, got {self.gzip_level}")


# --------------------------------------------------------------------------------------------------------
# Subject plans: everything about a subject except its images (cheap; tests draw hundreds)
# --------------------------------------------------------------------------------------------------------
def subject_id(index: int) -> str:
    """BIDS label of subject ``index`` (1-based): ``01`` ... ``99``, then ``100`` ..."""
    if index < 1:
        raise ValueError(f"subject index must be >= 1, got {index}")
    return f"{index:02d}"


def rigid_matrix(rotation_rad: Iterable[float], translation_mm: Iterable[float]) -> np.ndarray:
    """4x4 rigid transform x' = R x + t, R = Rz @ Ry @ Rx (angles in radians about the world origin)."""
    rx, ry, rz = (float(a) for a in rotation_rad)
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = r_z @ r_y @ r_x
    m[:3, 3] = list(translation_mm)
    return m


@dataclass(frozen=True)
class SubjectPlan:
    """A subject's latent truth and clinical values. ``effects[m][role]`` is the planted strength (0: none)
    and ``causes[m][role]`` is ``"disease"``, ``"distractor"`` or None."""

    index: int
    seed: int
    diagnosis: str
    profile: str
    effects: dict[str, dict[str, float]]
    causes: dict[str, dict[str, str | None]]
    clinical: dict[str, float | str | None]
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]

    @property
    def subject(self) -> str:
        return subject_id(self.index)

    @property
    def pose(self) -> np.ndarray:
        """4x4 MNI mm -> scanner mm rigid transform of the head (the same for all three modalities)."""
        return rigid_matrix(np.deg2rad(self.rotation_deg), self.translation_mm)

    def streams(self) -> dict[str, np.random.Generator]:
        """Independent generators for the images: anat, dwi, func."""
        kids = np.random.SeedSequence([self.seed, self.index]).spawn(5)
        return {m: np.random.default_rng(k) for m, k in zip(MODALITIES, kids[2:], strict=True)}


def _diagnosis(index: int, seed: int) -> str:
    # Balanced within each block of three consecutive subjects, so any cohort of 3n is exactly balanced
    # and subject k's label does not depend on how many subjects are made.
    block = (index - 1) // 3
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0, block])).permutation(3)
    return DIAGNOSES[int(perm[(index - 1) % 3])]


def _profile(index: int, seed: int, diagnosis: str) -> str:
    # Balanced within each diagnosis in blocks of nine consecutive subjects (three blocks of three): the
    # three subjects of a diagnosis in a block get the three profiles in a random order. So profile and
    # diagnosis are independent, every (diagnosis, profile) cell of a cohort of 9n holds n subjects, and a
    # small cohort cannot, by chance, hold one profile twice as often as another.
    block, third = (index - 1) // 9, ((index - 1) % 9) // 3
    perm = np.random.default_rng(np.random.SeedSequence([seed, 1, block, DIAGNOSES.index(diagnosis)])).permutation(3)
    return MODALITIES[int(perm[third])]


def subject_plan(index: int, seed: int, params: SynthParams | None = None) -> SubjectPlan:
    """Diagnosis, latent profile, planted effects, clinical values and head pose of subject ``index``."""
    p = params or SynthParams()
    kids = np.random.SeedSequence([seed, index]).spawn(5)
    rng, crng = np.random.default_rng(kids[0]), np.random.default_rng(kids[1])
    diagnosis = _diagnosis(index, seed)
    rng.integers(3)                     # the first design's profile draw, kept so the later draws do not move
    profile = _profile(index, seed, diagnosis)
    draws = rng.random((3, 2))          # always drawn, so the stream does not depend on the branch taken
    jitter = rng.uniform(1 - p.effect_jitter, 1 + p.effect_jitter, size=(3, 2))
    effects: dict[str, dict[str, float]] = {}
    causes: dict[str, dict[str, str | None]] = {}
    for i, m in enumerate(MODALITIES):
        size = {"anat": p.anat_effect, "dwi": p.dwi_effect, "func": p.func_effect}[m]
        effects[m], causes[m] = {}, {}
        for j, role in enumerate(("A", "B")):
            if m == profile and (diagnosis != "HC" or not p.control_profile_distractors):
                cause = "disease" if diagnosis != "HC" and DISEASE_ROLE[diagnosis] == role else None
            else:
                cause = "distractor" if draws[i, j] < p.p_distractor else None
            causes[m][role] = cause
            effects[m][role] = float(min(1.0, size * jitter[i, j])) if cause else 0.0
    rot = tuple(float(a) for a in rng.uniform(-p.max_rotation_deg, p.max_rotation_deg, 3))
    trans = tuple(float(a) for a in rng.uniform(-p.max_translation_mm, p.max_translation_mm, 3))
    return SubjectPlan(index, seed, diagnosis, profile, effects, causes, _clinical(crng, diagnosis, profile, p),
                       rot, trans)  # type: ignore[arg-type]


def _clinical(rng: np.random.Generator, diagnosis: str, profile: str, p: SynthParams) -> dict:
    """Clinical scores and serum markers. Diagnosis moves rbdsq, updrs3 (and slightly sex); the latent
    profile moves moca (anat), serum_nfl (dwi) and serum_asyn (func), independently of diagnosis."""
    z = rng.standard_normal(8)
    u = rng.random(6)
    age = int(np.clip(round(66 + 7 * z[0]), 45, 85))
    sex = "M" if u[0] < {"HC": 0.5, "PD": 0.58, "iRBD": 0.65}[diagnosis] else "F"
    up_mu, up_sd = {"HC": (5.5, 4.0), "PD": (9.5, 6.0), "iRBD": (6.5, 4.5)}[diagnosis]
    rb_mu, rb_sd = {"HC": (3.5, 2.3), "PD": (5.0, 2.5), "iRBD": (5.8, 2.5)}[diagnosis]
    s = p.marker_separation
    moca_sd, log_sd = 1.6, 0.3
    values: dict[str, float | str | None] = {
        "age": age,
        "sex": sex,
        "updrs3": int(np.clip(round(up_mu + up_sd * z[1]), 0, 132)),
        "moca": int(np.clip(round(27.5 - 0.08 * (age - 66) + moca_sd * (z[2] - s * (profile == "anat"))), 0, 30)),
        "rbdsq": int(np.clip(round(rb_mu + rb_sd * z[3]), 0, 13)),
        # NfL rises ~2 %/year of age; plasma/serum NfL of older adults is ~10-20 pg/mL.
        "serum_nfl": round(float(np.exp(np.log(14.0) + 0.02 * (age - 66)
                                        + log_sd * (z[4] + s * (profile == "dwi")))), 1),
        "serum_asyn": int(round(float(np.exp(np.log(1500.0) + log_sd * (z[5] + s * (profile == "func")))))),
    }
    for k, col in enumerate(["updrs3", "moca", "rbdsq", "serum_nfl", "serum_asyn"]):
        if u[1 + k] < p.clinical_missing:
            values[col] = None
    return values


# --------------------------------------------------------------------------------------------------------
# Template-level head model (built once per process)
# --------------------------------------------------------------------------------------------------------
@dataclass
class _Grid:
    """Channels of the head model on an MNI-aligned grid (RAS, voxel size ``voxel``)."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    ch: dict[str, np.ndarray] = field(default_factory=dict)


_PAD_SLICES = 10      # the template ends at z = -72 mm (medulla); the neck continues below the field of view


@lru_cache(maxsize=1)
def _head2mm() -> _Grid:
    """The head on the 2 mm template grid extended 20 mm downwards: T1w intensity, tissue fractions,
    distance outside the intracranial volume, and the WM structure tensor."""
    brain_img = tpl.brain_mask()
    aff = brain_img.affine.copy()
    aff[2, 3] -= _PAD_SLICES * 2.0

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(np.asarray(a, dtype=np.float32), ((0, 0), (0, 0), (_PAD_SLICES, 0)), mode="edge")

    brain = pad(brain_img.get_fdata(dtype=np.float32)) > 0
    t1 = pad(tpl.mni_t1().get_fdata(dtype=np.float32))
    gm = pad(tpl.gm_probability().get_fdata(dtype=np.float32))
    wm = pad(tpl.wm_probability().get_fdata(dtype=np.float32))
    # Intracranial volume: the brain mask with its gaps closed (the skull does not follow sulci).
    icv = ndi.binary_fill_holes(brain | (ndi.gaussian_filter(brain.astype(np.float32), 2.0) > 0.5))
    tot = gm + wm
    scale = np.where(tot > 1, 1 / np.maximum(tot, 1e-6), 1).astype(np.float32)
    gm, wm = gm * scale * icv, wm * scale * icv
    csf = np.clip(1 - gm - wm, 0, 1) * icv
    dist = ndi.distance_transform_edt(~icv, sampling=2.0).astype(np.float32)
    outside = ~icv

    def layers(values: np.ndarray) -> np.ndarray:
        # Smoothed by half a voxel: the 1-2 mm layers would alias on a 2 mm grid.
        return ndi.gaussian_filter(np.interp(dist, _LAYER_D, values).astype(np.float32) * outside, 0.5)

    wm_ref = float(np.median(t1[(wm > 0.9) & brain]))
    t1_brain = np.where(brain, t1 / wm_ref, T1W["csf"])   # template scaled so WM = 1; CSF in the closed gaps
    ch = {
        "t1": np.where(icv, t1_brain, layers(_LAYER_T1)).astype(np.float32),
        # T1w change per unit of grey matter replaced by CSF (negative): partial volume towards CSF.
        "t1_atrophy": (gm * (T1W["csf"] - T1W["gm"])).astype(np.float32),
        "brain": brain.astype(np.float32),
        "icv": icv.astype(np.float32),
        "head": (dist < HEAD_MM).astype(np.float32),
        # Where the scanner keeps noise: the head and the air within AIR_MARGIN_MM of the skin.
        "support": (dist < HEAD_MM + AIR_MARGIN_MM).astype(np.float32),
        "gm": gm.astype(np.float32), "wm": wm.astype(np.float32), "csf": csf.astype(np.float32),
        "epi_other": layers(_LAYER_EPI), "s0_other": layers(_LAYER_S0),
    }
    # Structure tensor of the smoothed WM map (gradient outer products, smoothed): see _fibre_direction.
    g = np.gradient(ndi.gaussian_filter(wm, 1.0))
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    for n, (a, b) in enumerate(pairs):
        ch[f"J{n}"] = ndi.gaussian_filter(g[a] * g[b], 2.0).astype(np.float32)
    return _Grid(aff, brain.shape, ch)


def _to_grid(src: _Grid, voxel: float, names: Iterable[str]) -> _Grid:
    """Resample channels of the 2 mm head onto an MNI-aligned grid of ``voxel`` mm covering the head,
    blurring first so each coarse voxel holds the mean over its volume (partial volume)."""
    head = src.ch["head"] > 0
    ijk = np.argwhere(head)
    lo = ijk.min(0) * 2.0 + src.affine[:3, 3] - voxel
    hi = ijk.max(0) * 2.0 + src.affine[:3, 3] + voxel
    shape = tuple(int(s) for s in np.ceil((hi - lo) / voxel).astype(int) + 1)
    aff = np.diag([voxel, voxel, voxel, 1.0])
    aff[:3, 3] = lo
    m = np.linalg.inv(src.affine) @ aff
    sigma = math.sqrt(max(voxel**2 - 4.0, 0.0)) / 2.3548 / 2.0
    out = _Grid(aff, shape)  # type: ignore[arg-type]
    for n in names:
        a = ndi.gaussian_filter(src.ch[n], sigma) if sigma > 0.1 else src.ch[n]
        out.ch[n] = ndi.affine_transform(a, m[:3, :3], m[:3, 3], output_shape=shape, order=1,
                                         prefilter=False).astype(np.float32)
    return out


def _tensor(e: np.ndarray, eig: tuple[float, float]) -> np.ndarray:
    """Axially symmetric tensors lam_perp I + (lam_par - lam_perp) e e^T as (N, 6): xx yy zz xy xz yz."""
    par, perp = eig
    d = (par - perp) * np.einsum("ni,nj->nij", e, e)
    d[:, [0, 1, 2], [0, 1, 2]] += perp
    return np.stack([d[:, 0, 0], d[:, 1, 1], d[:, 2, 2], d[:, 0, 1], d[:, 0, 2], d[:, 1, 2]], 1).astype(np.float32)


def _fibre_direction(val: np.ndarray, vec: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """WM fibre direction (N, 3) from the structure tensor of the WM map (eigenvalues ``val`` (N, 3)
    ascending, eigenvectors ``vec`` (N, 3, 3) in columns) at MNI points ``xyz`` (N, 3).

    In a tube of WM (two large eigenvalues) the fibres run along the tube: the smallest eigenvector. In a
    sheet (one large eigenvalue) or uniform WM the structure tensor cannot tell the direction within the
    sheet, so an anatomical prior picks it: left-right near the midline above the thalamus (corpus
    callosum), otherwise radiating from the internal capsule (corona radiata, thalamic radiations),
    projected onto the sheet.
    """
    mu = np.maximum(val, 0)
    scale = np.percentile(mu[:, 2], 90) + 1e-12
    mu1 = mu[:, 2] + 0.05 * scale                       # floor: uniform WM behaves like a "sheet" of any plane
    tube = np.clip((mu[:, 1] - mu[:, 0]) / mu1, 0, 1)   # 1: tube, 0: sheet or uniform
    flat = np.clip(1 - mu[:, 2] / (0.05 * scale + mu[:, 2]) * 2, 0, 1)   # 1 where the WM map is uniform
    x, z = xyz[:, 0], xyz[:, 2]
    callosal = np.exp(-((x / 10.0) ** 2)) / (1 + np.exp(-(z - 2.0) / 3.0))
    capsule = np.stack([np.sign(x) * 20.0, np.full_like(x, -10.0), np.zeros_like(x)], 1)
    radial = xyz - capsule
    radial /= np.linalg.norm(radial, axis=1, keepdims=True) + 1e-6
    prior = callosal[:, None] * np.array([1.0, 0.0, 0.0]) + (1 - callosal[:, None]) * radial
    e3, e2, e1 = vec[:, :, 0], vec[:, :, 1], vec[:, :, 2]
    # Project the prior onto span(e3, e2), weighting e2 down in tubes; in uniform WM also onto e1.
    w2 = (1 - tube) + tube * flat
    d = (np.einsum("ni,ni->n", prior, e3)[:, None] * e3
         + (w2 * np.einsum("ni,ni->n", prior, e2))[:, None] * e2
         + (flat * np.einsum("ni,ni->n", prior, e1))[:, None] * e1)
    n = np.linalg.norm(d, axis=1, keepdims=True)
    # Where the prior is (nearly) normal to the sheet, fall back to the tube direction.
    return np.where(n > 0.3, d / np.maximum(n, 1e-6), e3)


@lru_cache(maxsize=4)
def _dwi_grid(voxel: float) -> _Grid:
    """DWI head model on an MNI grid: fractions, extracranial S0, WM and GM tensors (brain voxels) and the
    soft weights of the dwi regions."""
    src = _head2mm()
    g = _to_grid(src, voxel, ["gm", "wm", "csf", "s0_other", "support"] + [f"J{n}" for n in range(6)])
    tissue = (g.ch["gm"] + g.ch["wm"] + g.ch["csf"]) > 0.01
    idx = np.flatnonzero(tissue)
    j = np.stack([g.ch[f"J{n}"].ravel()[idx] for n in range(6)], 1).astype(np.float64)
    mats = np.empty((len(idx), 3, 3))
    for n, (a, b) in enumerate([(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]):
        mats[:, a, b] = mats[:, b, a] = j[:, n]
    val, vec = np.linalg.eigh(mats)                # ascending eigenvalues
    ijk = np.stack(np.unravel_index(idx, g.shape), 1)
    xyz = ijk * voxel + g.affine[:3, 3]
    g.ch["idx"] = idx
    g.ch["d_wm"] = _tensor(_fibre_direction(val, vec, xyz), WM_EIG)
    g.ch["d_gm"] = _tensor(vec[:, :, 2], GM_EIG)   # across the WM boundary: radial in cortex
    for k in list(g.ch):
        if k.startswith("J"):
            del g.ch[k]
    _add_roi_weights(g, "dwi")
    return g


@lru_cache(maxsize=4)
def _bold_grid(voxel: float) -> _Grid:
    g = _to_grid(_head2mm(), voxel, ["gm", "wm", "csf", "epi_other", "support"])
    _add_roi_weights(g, "func")
    return g


@lru_cache(maxsize=1)
def _t1_grid() -> _Grid:
    src = _head2mm()
    g = _Grid(src.affine, src.shape, {k: src.ch[k] for k in ("t1", "t1_atrophy", "brain", "support")})
    _add_roi_weights(g, "anat")
    return g


def _add_roi_weights(g: _Grid, modality: str) -> None:
    for role, roi in tpl.effect_rois(modality).items():
        g.ch[f"w_{role}"] = tpl.roi_weight(roi.name, g.affine, g.shape)


@lru_cache(maxsize=1)
def _head_points_mm() -> tuple[np.ndarray, np.ndarray]:
    """MNI mm of (a subsample of) head and intracranial voxels, for fields of view; both stop at the
    template's lower edge (z = -72 mm, the medulla), not in the padded neck."""
    src = _head2mm()
    out = []
    for name in ("head", "icv"):
        m = np.zeros(src.shape, bool)
        m[::2, ::2, _PAD_SLICES::2] = src.ch[name][::2, ::2, _PAD_SLICES::2] > 0
        ijk = np.argwhere(m)
        out.append(ijk @ src.affine[:3, :3].T + src.affine[:3, 3])
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------------
def _scanner_grid(pose: np.ndarray, voxel: float, slab: bool) -> tuple[np.ndarray, tuple[int, int, int]]:
    """LAS diagonal affine and shape of a field of view around the posed head. ``slab``: EPI-like, the
    slices cover the intracranial volume (plus 8 mm) rather than the whole head."""
    head, icv = _head_points_mm()
    ph = head @ pose[:3, :3].T + pose[:3, 3]
    pi = icv @ pose[:3, :3].T + pose[:3, 3]
    lo, hi = ph.min(0) - 2.0, ph.max(0) + 2.0
    if slab:
        lo[2], hi[2] = pi[:, 2].min() - 6.0, pi[:, 2].max() + 6.0
    else:
        # The T1w stops 20 mm below the brain: the neck leaves the field of view.
        lo[2] = max(lo[2], pi[:, 2].min() - 20.0)
    shape = tuple(int(s) for s in np.ceil((hi - lo) / voxel).astype(int) + 1)
    aff = np.diag([-voxel, voxel, voxel, 1.0])
    aff[:3, 3] = [hi[0], lo[1], lo[2]]
    return aff, shape  # type: ignore[return-value]


def _resample(vol: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, ...],
              world: np.ndarray, out: np.ndarray | None = None,
              boxes: list[tuple[slice, slice, slice]] | None = None) -> np.ndarray:
    """Trilinear resampling of ``vol`` (source grid) onto a destination grid; ``world`` (4x4) maps
    destination world mm to source world mm. Returns dst_shape float32 (0 outside the source), written
    into ``out`` when given. With ``boxes`` only those sub-boxes are computed (the rest is 0)."""
    m = np.linalg.inv(src_affine) @ world @ dst_affine
    if out is None:
        out = np.empty(dst_shape, np.float32)
    if boxes is None:
        ndi.affine_transform(vol, m[:3, :3], m[:3, 3], output_shape=dst_shape, order=1, prefilter=False,
                             cval=0.0, output=out)
        return out
    out[...] = 0
    for box in boxes:
        view = out[box]
        start = np.array([b.start for b in box], dtype=float)
        ndi.affine_transform(vol, m[:3, :3], m[:3, 3] + m[:3, :3] @ start, output_shape=view.shape, order=1,
                             prefilter=False, cval=0.0, output=view)
    return out


def _boxes(support: np.ndarray | None, slab: int = 3) -> list[tuple[slice, slice, slice]] | None:
    """Bounding boxes of ``support`` in slabs of ``slab`` slices: resampling only these skips ~25 % of a
    field of view that is air (zeroed anyway)."""
    if support is None:
        return None
    out = []
    for z0 in range(0, support.shape[2], slab):
        s = support[:, :, z0:z0 + slab]
        if not s.any():
            continue
        xi, yi = np.flatnonzero(s.any((1, 2))), np.flatnonzero(s.any((0, 2)))
        out.append((slice(int(xi[0]), int(xi[-1]) + 1), slice(int(yi[0]), int(yi[-1]) + 1),
                    slice(z0, z0 + s.shape[2])))
    return out


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(sum of 2nd-order Legendre products) with log-std ``strength``."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape[:3]]
    polys = [[np.ones_like(a), a, 1.5 * a * a - 0.5] for a in axes]
    log = np.zeros(shape[:3], np.float32)
    for i in range(3):
        for j in range(3 - i):
            for k in range(3 - i - j):
                if i + j + k == 0:
                    continue
                c = np.float32(rng.standard_normal())
                log += c * polys[0][i][:, None, None] * polys[1][j][None, :, None] * polys[2][k][None, None, :]
    sd = float(log.std())
    log *= np.float32(strength / sd if sd > 0 else 0.0)
    return np.exp(log - log.mean())


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator, support: np.ndarray | None) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise (what a magnitude MR image holds), (X, Y, Z[, T]).

    ``support`` (X, Y, Z bool): where the reconstruction keeps noise; elsewhere (air far from the head)
    the image is 0, as vendor reconstructions that mask the background write it. None: everywhere.
    """
    if support is None:
        re = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
        im = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
        return np.sqrt(re * re + im * im)
    if signal.ndim == 3:
        out = np.zeros_like(signal)
        out[support] = _rician(signal[support], sigma, rng, None)
        return out
    for t in range(signal.shape[3]):     # in place, one volume at a time: a (X, Y, Z) F-ordered block
        v = signal[..., t]
        v[support] = _rician(v[support], sigma, rng, None)
        v[~support] = 0
    return signal


def _support(g: _Grid, p: SynthParams, aff: np.ndarray, shape: tuple[int, ...], pose: np.ndarray
             ) -> np.ndarray | None:
    if not p.zero_air:
        return None
    return _resample(g.ch["support"], g.affine, aff, shape, np.linalg.inv(pose)) > 0.5


def _to_int16(a: np.ndarray) -> np.ndarray:
    """Round and clip in place (``a`` is a scratch float array), then int16 in the same memory order."""
    np.rint(a, out=a)
    np.clip(a, 0, 32767, out=a)
    return a.astype(np.int16)


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, level: int, tr: float | None = None) -> None:
    img = nib.Nifti1Image(data, affine)
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


# --------------------------------------------------------------------------------------------------------
# Modalities
# --------------------------------------------------------------------------------------------------------
def _loss(g: _Grid, strengths: Mapping[str, float]) -> np.ndarray | None:
    """Combined fractional change 1 - prod(1 - s_r w_r) over the affected regions, or None."""
    keep = 1.0
    any_effect = False
    for role, s in strengths.items():
        if s > 0:
            keep = keep * (1 - np.float32(s) * g.ch[f"w_{role}"])
            any_effect = True
    return (1 - keep).astype(np.float32) if any_effect else None


def _make_t1(plan: SubjectPlan, p: SynthParams, rng: np.random.Generator) -> tuple[nib.Nifti1Image, np.ndarray]:
    """T1w image (int16, LAS, ``t1_voxel_mm``) and the truth brain mask on its grid (uint8)."""
    g = _t1_grid()
    t1 = g.ch["t1"]
    loss = _loss(g, plan.effects["anat"])
    if loss is not None:
        t1 = t1 + loss * g.ch["t1_atrophy"]
    pose = plan.pose
    aff, shape = _scanner_grid(pose, p.t1_voxel_mm, slab=False)
    inv_pose = np.linalg.inv(pose)
    img = _resample(t1, g.affine, aff, shape, inv_pose)
    mask = (_resample(g.ch["brain"], g.affine, aff, shape, inv_pose) >= 0.5).astype(np.uint8)
    img *= _bias_field(shape, rng, p.t1_bias) * np.float32(p.t1_scale)
    img = _rician(img, p.t1_scale / p.t1_snr, rng, _support(g, p, aff, shape, pose))
    return nib.Nifti1Image(_to_int16(img), aff), mask


@lru_cache(maxsize=1)
def _gradient_table(n_b0: int, n_dirs: int) -> tuple[np.ndarray, np.ndarray]:
    """b-values (N,) and unit directions (N, 3) in scanner RAS: ``n_dirs`` well-spread directions of dipy's
    ``small_64D`` table with their measured b-values, b=0 volumes spread through the series."""
    from dipy.data import get_fnames

    _, fbval, fbvec = get_fnames(name="small_64D")
    bvals, bvecs = np.loadtxt(fbval), np.loadtxt(fbvec)
    if bvecs.shape[0] == 3:
        bvecs = bvecs.T
    dw = np.flatnonzero(bvals > 50)
    vec = bvecs[dw] / np.linalg.norm(bvecs[dw], axis=1, keepdims=True)
    # Greedy farthest-point choice (antipodal directions count as the same), deterministic.
    chosen = [0]
    while len(chosen) < n_dirs:
        cos = np.abs(vec @ vec[chosen].T).max(1)
        cos[chosen] = np.inf
        chosen.append(int(np.argmin(cos)))
    dirs, b = vec[chosen], np.rint(bvals[dw][chosen])
    # b=0 at the start and evenly through the series, as scanners interleave them.
    n = n_b0 + n_dirs
    b0_at = {int(round(k * n / n_b0)) for k in range(n_b0)}
    out_b, out_g, k = np.zeros(n), np.zeros((n, 3)), 0
    for i in range(n):
        if i not in b0_at:
            out_b[i], out_g[i] = b[k], dirs[k]
            k += 1
    return out_b, out_g


def _random_walk_motion(rng: np.random.Generator, n: int, step_mm: float, step_deg: float, ref: int,
                        bound_mm: float | None = None, bound_deg: float | None = None) -> np.ndarray:
    """(n, 6) motion parameters (mm, rad): a random walk, zero at volume ``ref``; with bounds, squashed
    smoothly (b tanh(x / b)) so that every value stays strictly inside them without flat clipped runs."""
    steps = rng.standard_normal((n, 6)) * np.array([step_mm] * 3 + [step_deg] * 3)
    walk = np.cumsum(steps, axis=0)
    walk -= walk[ref]
    if bound_mm is not None:
        walk[:, :3] = bound_mm * np.tanh(walk[:, :3] / bound_mm)
    if bound_deg is not None:
        walk[:, 3:] = bound_deg * np.tanh(walk[:, 3:] / bound_deg)
    walk[:, 3:] = np.deg2rad(walk[:, 3:])
    return walk


def _make_dwi(plan: SubjectPlan, p: SynthParams, rng: np.random.Generator
              ) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, np.ndarray]:
    """DWI (int16 4D, LAS), bvals (N,), bvecs in voxel axes (3, N), motion (N, 6)."""
    g = _dwi_grid(p.dwi_voxel_mm)
    bvals, gdirs = _gradient_table(p.n_b0, p.n_directions)
    n = len(bvals)
    idx = g.ch["idx"]
    d_wm = g.ch["d_wm"]
    loss = _loss(g, plan.effects["dwi"])
    if loss is not None:
        e = loss.ravel()[idx][:, None]
        md = d_wm[:, :3].mean(1, keepdims=True)
        iso = np.zeros_like(d_wm)
        iso[:, :3] = md * (1 + p.dwi_md_increase * e)
        # Shrink the anisotropic (deviatoric) part, raise the mean: lower FA, slightly higher MD.
        d_wm = iso + (1 - e) * (d_wm - np.concatenate([md, md, md, 0 * md, 0 * md, 0 * md], 1))
    pose = plan.pose
    motion = _random_walk_motion(rng, n, 0.2, 0.2, ref=0, bound_mm=p.dwi_motion_mm, bound_deg=p.dwi_motion_deg)
    rot_pose = pose[:3, :3]
    # Gradient of volume k in the template frame: the scanner direction seen by the moved, posed head.
    q = np.empty((6, n), np.float32)
    for k in range(n):
        rk = rigid_matrix(motion[k, 3:], motion[k, :3])[:3, :3]
        gm_ = (rk @ rot_pose).T @ gdirs[k]
        q[:, k] = [gm_[0] ** 2, gm_[1] ** 2, gm_[2] ** 2, 2 * gm_[0] * gm_[1], 2 * gm_[0] * gm_[2],
                   2 * gm_[1] * gm_[2]]
    b = bvals.astype(np.float32)[None, :]
    fr = {t: g.ch[t].ravel()[idx][:, None] for t in ("wm", "gm", "csf")}
    sig = (fr["wm"] * DWI_S0["wm"] * np.exp(-b * (d_wm @ q))
           + fr["gm"] * DWI_S0["gm"] * np.exp(-b * (g.ch["d_gm"] @ q))
           + fr["csf"] * DWI_S0["csf"] * np.exp(-b * np.float32(CSF_D)))      # (N_brain, n)
    other = g.ch["s0_other"] * (1 - np.clip(g.ch["gm"] + g.ch["wm"] + g.ch["csf"], 0, 1))
    aff, shape = _scanner_grid(pose, p.dwi_voxel_mm, slab=True)
    support = _support(g, p, aff, shape, pose)
    boxes = _boxes(support)
    vol = np.empty(g.shape, np.float32)
    out = np.empty((*shape, n), np.float32, order="F")     # NIfTI order: each volume one contiguous block
    sig = np.ascontiguousarray(sig.T)
    for k in range(n):
        vol[...] = other * np.float32(math.exp(-bvals[k] * OTHER_D))
        vol.ravel()[idx] += sig[k]
        world = np.linalg.inv(pose) @ np.linalg.inv(rigid_matrix(motion[k, 3:], motion[k, :3]))
        _resample(vol, g.affine, aff, shape, world, out=out[..., k], boxes=boxes)
    out *= _bias_field(shape, rng, p.epi_bias)[..., None] * np.float32(p.dwi_scale)
    out = _rician(out, p.dwi_scale / p.dwi_snr, rng, support)
    # FSL/BIDS b-vectors are in voxel axes; the image is stored LAS (det < 0), so FSL and dipy agree:
    # voxel axis i points to world -x.
    bvecs = (gdirs * np.array([-1.0, 1.0, 1.0])).T
    return nib.Nifti1Image(_to_int16(out), aff), bvals, bvecs, motion


def _band_limited(rng: np.random.Generator, shape: tuple[int, ...], n_t: int, tr: float,
                  band: tuple[float, float]) -> np.ndarray:
    """Random series (shape..., n_t) with power only in ``band`` (Hz), unit variance on average."""
    freqs = np.fft.rfftfreq(n_t, tr)
    sel = np.flatnonzero((freqs >= band[0]) & (freqs <= band[1]))
    spec = np.zeros(shape + (len(freqs),), np.complex64)
    spec[..., sel] = (rng.standard_normal(shape + (len(sel),), dtype=np.float32)
                      + 1j * rng.standard_normal(shape + (len(sel),), dtype=np.float32))
    x = np.fft.irfft(spec, n=n_t, axis=-1).astype(np.float32)
    return x / np.float32(x.std() + 1e-12)


def _make_bold(plan: SubjectPlan, p: SynthParams, rng: np.random.Generator
               ) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Resting-state BOLD (int16 4D, LAS, ``bold_voxel_mm``, TR ``tr_s``) and its motion (N, 6)."""
    g = _bold_grid(p.bold_voxel_mm)
    n_t = p.n_dummy + p.n_bold
    band = (0.01, 0.08)
    brain = (g.ch["gm"] + g.ch["wm"] + g.ch["csf"]) > 0.01
    # Shared fluctuation: band-limited white noise smoothed in space, in the brain's bounding box.
    bb = ndi.find_objects(brain.astype(np.int8))[0]
    box_shape = tuple(s.stop - s.start for s in bb)
    field_ = _band_limited(rng, box_shape, n_t, p.tr_s, band)
    sigma = p.lf_fwhm_mm / 2.3548 / p.bold_voxel_mm
    field_ = ndi.gaussian_filter(field_, (sigma, sigma, sigma, 0))
    field_ /= np.float32(field_.std() + 1e-12)
    idx = np.flatnonzero(brain)
    box_idx = np.ravel_multi_index(tuple(np.unravel_index(idx, g.shape)[a] - bb[a].start for a in range(3)),
                                   box_shape)
    f = field_.reshape(-1, n_t)[box_idx]                                             # (N_brain, T)
    glob = _band_limited(rng, (), n_t, p.tr_s, (0.01, 0.1))                         # (T,)
    amp = np.full(len(idx), p.lf_amplitude, np.float32)
    loss = _loss(g, plan.effects["func"])
    if loss is not None:
        amp *= 1 - loss.ravel()[idx]
    fr = {t: g.ch[t].ravel()[idx][:, None] for t in ("gm", "wm", "csf")}
    # T1 saturation: signal relative to steady state, M_k/M_ss = 1 + (M0/M_ss - 1) (cos a E1)^k.
    k = np.arange(n_t)
    ca = math.cos(math.radians(p.flip_angle_deg))

    def dummy(tissue: str) -> np.ndarray:
        e1 = math.exp(-p.tr_s / T1_RELAX_S[tissue])
        r = ca * e1
        return (1 + ((1 - r) / (1 - e1) - 1) * r**k).astype(np.float32)

    physio = rng.standard_normal((len(idx), n_t), dtype=np.float32)
    gl = p.global_amplitude * glob[None, :]
    sig = (fr["gm"] * EPI["gm"] * dummy("gm") * (1 + amp[:, None] * f + gl)
           + fr["wm"] * EPI["wm"] * dummy("wm") * (1 + p.wm_lf_fraction * p.lf_amplitude * f + gl)
           + fr["csf"] * EPI["csf"] * dummy("csf") * (1 + gl + p.csf_noise * physio))
    other = g.ch["epi_other"] * (1 - np.clip(g.ch["gm"] + g.ch["wm"] + g.ch["csf"], 0, 1))
    dummy_other = dummy("other")
    tt = np.linspace(-1, 1, n_t)
    c = rng.standard_normal(2) * p.drift
    drift = (1 + c[0] * tt + c[1] * (1.5 * tt**2 - 0.5)).astype(np.float32)
    # Motion: a slow random walk and a few one-volume jerks, zero at the first volume kept.
    motion = _random_walk_motion(rng, n_t, p.bold_walk_mm, p.bold_walk_mm, ref=min(p.n_dummy, n_t - 1))
    cand = np.arange(p.n_dummy + 1, n_t)
    for s in rng.choice(cand, size=min(p.bold_spikes, len(cand)), replace=False):
        d = rng.standard_normal(6)
        d /= np.linalg.norm(d)
        jerk = d * rng.uniform(0.5, 1.0) * p.bold_spike_mm
        motion[s, :3] += jerk[:3]
        motion[s, 3:] += np.deg2rad(jerk[3:])
    pose = plan.pose
    aff, shape = _scanner_grid(pose, p.bold_voxel_mm, slab=True)
    support = _support(g, p, aff, shape, pose)
    boxes = _boxes(support)
    vol = np.empty(g.shape, np.float32)
    out = np.empty((*shape, n_t), np.float32, order="F")   # NIfTI order: each volume one contiguous block
    sig = np.ascontiguousarray(sig.T)
    for t in range(n_t):
        vol[...] = other * dummy_other[t]
        vol.ravel()[idx] += sig[t]
        world = np.linalg.inv(pose) @ np.linalg.inv(rigid_matrix(motion[t, 3:], motion[t, :3]))
        _resample(vol, g.affine, aff, shape, world, out=out[..., t], boxes=boxes)
        out[..., t] *= drift[t]
    out *= _bias_field(shape, rng, p.epi_bias)[..., None] * np.float32(p.bold_scale)
    out = _rician(out, p.bold_scale / p.bold_snr, rng, support)
    return nib.Nifti1Image(_to_int16(out), aff), motion


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def write_subject(bids_dir: str | Path, plan: SubjectPlan, params: SynthParams | None = None,
                  modalities: Iterable[str] = MODALITIES) -> dict[str, float]:
    """Write one subject's images, sidecars and truth files; returns seconds spent per modality.

    ``plan`` may be edited with ``dataclasses.replace`` (e.g. tests force a diagnosis and effects).
    """
    p = params or SynthParams()
    mods = list(modalities)
    bad = sorted(set(mods) - set(MODALITIES))
    if bad:
        raise ValueError(f"unknown modalities {bad}; known: {list(MODALITIES)}")
    bids = Path(bids_dir)
    s = plan.subject
    sub = bids / f"sub-{s}"
    truth = bids / TRUTH_DIR / f"sub-{s}"
    truth.mkdir(parents=True, exist_ok=True)
    rngs = plan.streams()
    seconds: dict[str, float] = {}
    lvl = p.gzip_level

    t0 = time.perf_counter()
    # The T1w grid and truth mask are written even when the T1w is omitted: the truth is about the subject.
    t1, mask = _make_t1(plan, p, rngs["anat"])
    _save_nifti(mask, t1.affine, truth / f"sub-{s}_desc-truth_mask.nii.gz", lvl)
    if "anat" in mods:
        (sub / "anat").mkdir(parents=True, exist_ok=True)
        _save_nifti(np.asanyarray(t1.dataobj), t1.affine, sub / "anat" / f"sub-{s}_T1w.nii.gz", lvl)
    seconds["anat"] = time.perf_counter() - t0

    if "dwi" in mods:
        t0 = time.perf_counter()
        d = sub / "dwi"
        d.mkdir(parents=True, exist_ok=True)
        img, bvals, bvecs, motion = _make_dwi(plan, p, rngs["dwi"])
        _save_nifti(np.asanyarray(img.dataobj), img.affine, d / f"sub-{s}_dwi.nii.gz", lvl, tr=7.0)
        (d / f"sub-{s}_dwi.bval").write_text(" ".join(f"{int(b)}" for b in bvals) + "\n")
        (d / f"sub-{s}_dwi.bvec").write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs) + "\n")
        _write_json({"EchoTime": 0.08, "RepetitionTime": 7.0, "MagneticFieldStrength": 3,
                     "Manufacturer": "synthetic (neuromoe.synth)",
                     "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION"]},
                    d / f"sub-{s}_dwi.json")
        _motion_frame(motion).to_csv(truth / f"sub-{s}_dwi_motion.tsv", sep="\t", index=False, float_format="%.6f")
        _write_json(_MOTION_DOC, truth / f"sub-{s}_dwi_motion.json")
        seconds["dwi"] = time.perf_counter() - t0

    if "func" in mods:
        t0 = time.perf_counter()
        d = sub / "func"
        d.mkdir(parents=True, exist_ok=True)
        img, motion = _make_bold(plan, p, rngs["func"])
        _save_nifti(np.asanyarray(img.dataobj), img.affine, d / f"sub-{s}_task-rest_bold.nii.gz", lvl, tr=p.tr_s)
        _write_json({"TaskName": "rest", "RepetitionTime": p.tr_s, "EchoTime": 0.03,
                     "FlipAngle": p.flip_angle_deg, "MagneticFieldStrength": 3,
                     "Manufacturer": "synthetic (neuromoe.synth)",
                     "TaskDescription": "eyes-open rest; the first volumes are not yet at T1 steady state"},
                    d / f"sub-{s}_task-rest_bold.json")
        _motion_frame(motion).to_csv(truth / f"sub-{s}_task-rest_motion.tsv", sep="\t", index=False,
                                     float_format="%.6f")
        _write_json(_MOTION_DOC, truth / f"sub-{s}_task-rest_motion.json")
        seconds["func"] = time.perf_counter() - t0

    _write_json({"matrix": plan.pose.round(8).tolist(), "from": MNI_SPACE, "to": "scanner",
                 "rotation_deg": list(plan.rotation_deg), "translation_mm": list(plan.translation_mm),
                 "Description": "Rigid pose of the head, the same for T1w, DWI and BOLD: x_scanner = R x_mni + t "
                                "(mm), R = Rz @ Ry @ Rx about the world origin. Its inverse maps a native world "
                                "point to the template (neuromoe.inputs.templates.roi_mask(..., world_to_mni=...))."},
                truth / f"sub-{s}_pose.json")
    _write_json(_profile_json(plan, mods), truth / f"sub-{s}_profile.json")
    return seconds


def _profile_json(plan: SubjectPlan, modalities: list[str]) -> dict:
    rois = {m: tpl.effect_rois(m) for m in MODALITIES}
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
    }


def read_truth(bids_dir: str | Path, subject: str) -> dict:
    """The truth of one synthetic subject: profile.json's content plus ``pose`` (4x4 array), ``mask`` path
    and the motion tables (DataFrames, absent for an omitted modality). ``subject`` without ``sub-``."""
    s = subject.removeprefix("sub-")
    d = Path(bids_dir) / TRUTH_DIR / f"sub-{s}"
    f = d / f"sub-{s}_profile.json"
    if not f.exists():
        raise InputError("no synthetic ground truth for this subject", subject=f"sub-{s}", path=f,
                         fix="only cohorts written by neuromoe.inputs.synth.make_cohort have a synth-truth folder")
    out = json.loads(f.read_text())
    out["pose"] = np.array(json.loads((d / f"sub-{s}_pose.json").read_text())["matrix"])
    out["mask"] = d / f"sub-{s}_desc-truth_mask.nii.gz"
    for key, name in (("dwi_motion", "dwi"), ("func_motion", "task-rest")):
        m = d / f"sub-{s}_{name}_motion.tsv"
        if m.exists():
            out[key] = pd.read_csv(m, sep="\t")
    return out


def _participants(plans: list[SubjectPlan]) -> pd.DataFrame:
    rows = [{"participant_id": f"sub-{pl.subject}", "diagnosis": pl.diagnosis, **pl.clinical} for pl in plans]
    df = pd.DataFrame(rows)
    # Whole-number columns stay whole numbers in the TSV even with n/a among them.
    return df.astype({c: "Int64" for c in ("age", "updrs3", "moca", "rbdsq", "serum_asyn")})


_PARTICIPANTS_JSON = {
    "participant_id": {"Description": "subject label"},
    "diagnosis": {"Description": "clinical group", "Levels": {
        "HC": "healthy control", "PD": "Parkinson's disease",
        "iRBD": "isolated REM sleep behaviour disorder"}},
    "age": {"Description": "age at scan", "Units": "year"},
    "sex": {"Description": "sex, encoded as a string", "Levels": {"M": "male", "F": "female"}},
    "updrs3": {"Description": "MDS-UPDRS part III motor examination score (0-132, higher is worse); "
                              "synthetic: higher in PD, overlapping", "Units": "score"},
    "moca": {"Description": "Montreal Cognitive Assessment (0-30, lower is worse); synthetic: lowered by the "
                            "latent anat profile, not by diagnosis", "Units": "score"},
    "rbdsq": {"Description": "REM Sleep Behavior Disorder Screening Questionnaire (0-13); synthetic: higher in "
                             "PD and iRBD, overlapping", "Units": "score"},
    "serum_nfl": {"Description": "serum neurofilament light chain; synthetic: raised by the latent dwi profile "
                                 "and by age", "Units": "pg/mL"},
    "serum_asyn": {"Description": "serum alpha-synuclein; synthetic: raised by the latent func profile",
                   "Units": "pg/mL"},
}


def _dataset_description(n: int, seed: int) -> dict:
    return {
        "Name": "NeuroMoE synthetic demo cohort (SYNTHETIC DATA: no real participants)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["neuromoe.synth"],
        "HowToAcknowledge": "These images and participants are simulated from the MNI152 template; results on "
                            "them validate software, not clinical hypotheses.",
        "GeneratedBy": [{"Name": "neuromoe.synth", "Version": __version__,
                         "Description": f"make_cohort(n_subjects={n}, seed={seed}); see README"}],
        "ReferencesAndLinks": ["Fonov et al. 2011, NeuroImage 54:313 (ICBM 2009a nonlinear symmetric template, "
                               "as shipped with nilearn)", "dipy small_64D gradient table"],
    }


def _readme(n: int, seed: int, p: SynthParams) -> str:
    rows = "\n".join(f"| {r.modality} | {r.role} ({'PD' if r.role == 'A' else 'iRBD'}) | {r.name} | "
                     f"({r.centre_mm[0]:+.0f}/{-r.centre_mm[0]:+.0f}, {r.centre_mm[1]:+.0f}, "
                     f"{r.centre_mm[2]:+.0f}) | {r.radius_mm:.0f} | {r.tissue} |"
                     for r in tpl.ROIS.values())
    params = "\n".join(f"| {f.name} | {getattr(p, f.name)!r} |" for f in dataclasses.fields(p))
    # The module docstring, from its first section on, as Markdown: "Header" lines over indented text.
    doc = (__doc__ or "").split("Example::")[0]
    body_lines = []
    for line in doc[doc.index("\nAnatomy\n") + 1:].rstrip().splitlines():
        body_lines.append(f"\n### {line.strip()}\n" if line and not line.startswith(" ") else line.strip())
    body = "\n".join(body_lines)
    return f"""# NeuroMoE synthetic demo cohort: SYNTHETIC DATA

This dataset was generated by `neuromoe.synth.make_cohort(n_subjects={n}, seed={seed})`. No real person was
scanned: every image is simulated from the MNI152 template that nilearn ships, and every clinical value is
drawn from the distributions below. A classifier's accuracy on it shows that the pipeline works end to end;
it says nothing about Parkinson's disease or REM sleep behaviour disorder.

Layout: BIDS 1.9 raw (`sub-XX/anat`, `dwi`, `func`, `participants.tsv/json`). The ground truth (latent
profile, planted effects, head pose, per-volume motion, brain mask) is under `derivatives/synth-truth/`.

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


def _prepare_out_dir(out: Path, n_subjects: int) -> None:
    """Create ``out``; if it holds an earlier synthetic cohort, remove its subjects beyond ``n_subjects``
    (so participants.tsv and the folders agree). Refuse to write into any other non-empty folder."""
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
    out.mkdir(parents=True, exist_ok=True)


def _write_one(args: tuple[str, int, int, SynthParams, list[str]]) -> tuple[str, float]:
    bids, index, seed, p, mods = args
    t0 = time.perf_counter()
    write_subject(bids, subject_plan(index, seed, p), p, mods)
    return subject_id(index), time.perf_counter() - t0


def make_cohort(out_dir: str | Path, n_subjects: int, seed: int, params: SynthParams | None = None, *,
                missing: Mapping[str, Iterable[str]] | None = None, n_jobs: int = 1) -> Path:
    """Write a synthetic BIDS cohort of ``n_subjects`` to ``out_dir`` and return its path.

    ``missing`` maps subject labels (``"03"`` or ``"sub-03"``) to modalities to omit (``anat``, ``dwi``,
    ``func``). ``n_jobs`` > 1 writes subjects in that many processes (same bytes as one process).
    Files already in ``out_dir`` are overwritten.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    p = params or SynthParams()
    miss = _parse_missing(missing)
    unknown = sorted(set(miss) - {subject_id(i) for i in range(1, n_subjects + 1)})
    if unknown:
        raise ValueError(f"missing names subjects not in the cohort: {unknown}")
    out = Path(out_dir)
    _prepare_out_dir(out, n_subjects)
    plans = [subject_plan(i, seed, p) for i in range(1, n_subjects + 1)]
    jobs = [(str(out), i, seed, p, [m for m in MODALITIES if m not in miss.get(subject_id(i), set())])
            for i in range(1, n_subjects + 1)]
    # Build the template-level model before forking, so workers share it instead of rebuilding it.
    _t1_grid(), _dwi_grid(p.dwi_voxel_mm), _bold_grid(p.bold_voxel_mm), _gradient_table(p.n_b0, p.n_directions)
    if n_jobs > 1 and n_subjects > 1:
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=get_context("fork")) as ex:
            list(ex.map(_write_one, jobs))
    else:
        for j in jobs:
            _write_one(j)
    df = _participants(plans)
    df.to_csv(out / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    _write_json(_PARTICIPANTS_JSON, out / "participants.json")
    _write_json(_dataset_description(n_subjects, seed), out / "dataset_description.json")
    (out / "README").write_text(_readme(n_subjects, seed, p))
    tdir = out / TRUTH_DIR
    _write_json({"Name": "synthetic ground truth", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                 "GeneratedBy": [{"Name": "neuromoe.synth", "Version": __version__}]},
                tdir / "dataset_description.json")
    _write_json({f.name: getattr(p, f.name) for f in dataclasses.fields(p)} | {"seed": seed,
                 "n_subjects": n_subjects}, tdir / "synth_params.json")
    return out
