"""The synthetic cohort's design: every knob of the generator (``SynthParams``), the cohort design
(``CohortDesign``: where each disease shows, which marker signals which profile) and each subject's plan.

A cohort design is the six effect regions (one per modality and role, in that modality's tissue) and the
marker-to-profile mapping. ``CohortDesign.default()`` is the demo's (``neuromoe.inputs.templates.ROIS``,
MoCA <- anat, serum NfL <- dwi, serum alpha-synuclein <- func); ``CohortDesign.draw(seed)`` draws another
from its design seed alone, so results can be checked on layouts other than the demo's.

A subject plan is everything about a subject except its images: diagnosis, latent expression profile,
planted effects (region, cause, strength), clinical scores and serum markers, head pose. Plans are cheap
(tests draw hundreds); ``neuromoe.inputs.synth_images`` turns a plan into images and
``neuromoe.inputs.synth`` writes the cohort. The design and its reasons: docs/synthetic_cohort.md.

Subject k's numbers come from its own ``np.random.SeedSequence([seed, k])``, split into independent
streams for the plan, the clinical table and each modality, so subject k is the same whatever
``n_subjects`` and whichever modalities are omitted.

Longitudinal cohorts (``session_plans``): session 1 is the subject's plan as above; session s > 1 is a
later visit, ``SESSION_INTERVAL_YEARS`` after the one before, with its own pose, motion and noise (from
``SeedSequence([seed, k], spawn_key=(5, s))``, a child nothing else uses), the disease effect of a patient
multiplied by ``progression_factor`` and the clinical values progressed (``_progress_clinical``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache

import nibabel as nib
import numpy as np

from neuromoe.inputs import templates as tpl

__all__ = ["DIAGNOSES", "DISEASE_ROLE", "MARKERS", "MIN_MODEL_GRID_VOXELS", "MIN_SEPARATION_MM",
           "MIN_TISSUE_VOXELS", "MODALITIES", "REGION_TISSUE", "SESSION_COLUMNS", "SESSION_INTERVAL_YEARS",
           "SESSION_PROGRESSION", "CohortDesign", "SubjectPlan", "SynthParams", "model_grid_image",
           "progression_factor", "rigid_matrix", "session_plans", "subject_id", "subject_plan"]

MODALITIES = ("anat", "dwi", "func")
DIAGNOSES = ("HC", "PD", "iRBD")
DISEASE_ROLE = {"PD": "A", "iRBD": "B"}
ROLES = ("A", "B")
# The clinical markers that signal the latent profile (the demo design maps them to MODALITIES in order).
MARKERS = ("moca", "serum_nfl", "serum_asyn")
REGION_TISSUE = {"anat": "gm", "dwi": "wm", "func": "gm"}
REGION_RADIUS_MM = 14.0
# Drawn designs: no two regions overlap, soft edges included (tpl.sphere_weight's 4 mm taper), mirrors
# included; each holds at least 70 % of the tissue of the smallest demo region (lateral_occipital: 1,122
# voxels of 2 mm grey matter; the demo's others hold 1,343-2,634) and, like every demo region, at least 30
# voxels of its tissue on a 32^3 grid of 5.5 mm (the model's default grid size), so it survives resampling.
MIN_SEPARATION_MM = 2 * REGION_RADIUS_MM + 4.0
MIN_TISSUE_VOXELS = 785
MIN_MODEL_GRID_VOXELS = 30
# Longitudinal cohorts: a patient's disease effect at session s is its session-1 strength times
# 1 + SESSION_PROGRESSION * (s - 1) (capped at 1); visits are SESSION_INTERVAL_YEARS apart; the clinical
# columns that change between visits (sub-<id>_sessions.tsv).
SESSION_PROGRESSION = 0.25
SESSION_INTERVAL_YEARS = 2
SESSION_COLUMNS = ("age", "updrs3", "moca", "serum_nfl", "serum_asyn")
_SESSION_SPAWN_KEY = 5   # subject_plan spawns children 0-4 of SeedSequence([seed, k]); sessions use child 5


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
    # EXPERIMENTAL, study-only (studies/fusion): True brings back the first design, whose distractors also
    # hit a control's profile modality. Not a supported setting of the demo cohort.
    control_profile_distractors: bool = False
    # clinical table
    marker_separation: float = 4.0   # profile marker shift, in standard deviations
    clinical_missing: float = 0.03   # probability that one score/marker is n/a
    # output
    zero_air: bool = True            # air beyond 4 mm of the skin is 0 (vendor background masking; small files)
    gzip_level: int = 1
    # cohort design (regions, marker mapping): None is the demo design; an int draws one (CohortDesign.draw).
    # Left out of synth_params.json and the README when None, so demo cohorts keep their bytes.
    design_seed: int | None = None
    # anatomical shape (neuromoe.inputs.synth_shape): 0 is off, every subject the template under its pose.
    # Both left out of synth_params.json and the README when shape_mm is 0, so those cohorts keep their bytes.
    shape_mm: float = 0.0                # RMS displacement of a subject's anatomy from the template in its brain
    ventricle_mm_per_decade: float = 1.0  # ventricular wall displacement per decade of age above 45 (shape on)

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
        if self.design_seed is not None and (isinstance(self.design_seed, bool)
                                             or not isinstance(self.design_seed, (int, np.integer))
                                             or self.design_seed < 0):
            raise ValueError(f"SynthParams.design_seed must be None or an integer >= 0, got {self.design_seed!r}")
        if not 0 <= self.shape_mm <= 8:
            raise ValueError(f"SynthParams.shape_mm must be in [0, 8] mm, got {self.shape_mm!r}")
        if not 0 <= self.ventricle_mm_per_decade <= 3:
            raise ValueError(f"SynthParams.ventricle_mm_per_decade must be in [0, 3] mm, "
                             f"got {self.ventricle_mm_per_decade!r}")

    @property
    def has_shape(self) -> bool:
        """Whether subjects differ from the template in shape (``shape_mm`` > 0; synth_shape)."""
        return self.shape_mm > 0

    @property
    def design(self) -> CohortDesign:
        """The cohort design: the demo's when ``design_seed`` is None, else ``CohortDesign.draw(design_seed)``."""
        return CohortDesign.default() if self.design_seed is None else CohortDesign.draw(int(self.design_seed))


# --------------------------------------------------------------------------------------------------------
# Cohort designs: the six effect regions and the marker-to-profile mapping
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CohortDesign:
    """Where each disease shows and which marker signals which profile.

    ``rois``: six ``templates.Roi``, one per (modality, role) in the order anat A, anat B, dwi A, dwi B,
    func A, func B (role A: PD, B: iRBD). ``markers``: ``(marker, profile)`` pairs in ``MARKERS`` order;
    the profile's subjects have that marker shifted (MoCA down, the serum markers up). ``seed``: the design
    seed it was drawn from (None: the demo design). Hashable, so image grids can cache on it.
    """

    seed: int | None
    rois: tuple[tpl.Roi, ...]
    markers: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        slots = [(r.modality, r.role) for r in self.rois]
        if slots != [(m, role) for m in MODALITIES for role in ROLES]:
            raise ValueError(f"CohortDesign needs one region per (modality, role) in the order anat A, anat B, "
                             f"dwi A, dwi B, func A, func B; got {slots}")
        if len({r.name for r in self.rois}) != len(self.rois):
            raise ValueError(f"CohortDesign region names must be unique, got {[r.name for r in self.rois]}")
        if [m for m, _ in self.markers] != list(MARKERS) or sorted(p for _, p in self.markers) != sorted(MODALITIES):
            raise ValueError(f"CohortDesign.markers must map {list(MARKERS)} (in that order) one-to-one onto "
                             f"{list(MODALITIES)}, got {self.markers}")

    @classmethod
    def default(cls) -> CohortDesign:
        """The demo design: ``templates.ROIS`` and MoCA <- anat, serum NfL <- dwi, serum alpha-synuclein <- func."""
        return _default_design()

    @classmethod
    def draw(cls, seed: int) -> CohortDesign:
        """A design drawn from ``seed`` alone (``numpy.random.default_rng(seed)``; cached per process).

        Each region: a right-hemisphere centre on a template voxel of its tissue (``REGION_TISSUE``) and its
        mirror image, radius 14 mm, at least ``MIN_TISSUE_VOXELS`` 2 mm voxels of that tissue (and
        ``MIN_MODEL_GRID_VOXELS`` on ``model_grid_image()``), every centre
        at least ``MIN_SEPARATION_MM`` from every centre of every other region. Regions are placed in a
        random order (so which of a modality's two is A or B is random), the marker mapping is a random
        permutation. Regions are named ``<modality>_<role>``.
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"a design seed is an integer >= 0, got {seed!r}")
        return _drawn_design(int(seed))

    @property
    def regions(self) -> dict[str, tpl.Roi]:
        """The six regions by name."""
        return {r.name: r for r in self.rois}

    def effect_rois(self, modality: str) -> dict[str, tpl.Roi]:
        """The two effect regions of one modality: ``{"A": Roi, "B": Roi}``."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
        return {r.role: r for r in self.rois if r.modality == modality}

    def marker_profile(self, marker: str) -> str:
        """The latent profile whose subjects have ``marker`` shifted."""
        return dict(self.markers)[marker]

    def profile_marker(self, profile: str) -> str:
        """The marker that signals ``profile``."""
        return {p: m for m, p in self.markers}[profile]

    def to_json(self) -> dict:
        """The design as ``design.json`` holds it, with each region's tissue volume on the 2 mm template."""
        t1 = tpl.mni_t1()
        regions = []
        for r in self.rois:
            n = int(tpl.roi_mask(r, t1).sum())
            regions.append({"name": r.name, "modality": r.modality, "role": r.role,
                            "centre_mm": list(r.centre_mm), "centres_mm": r.centres_mm.tolist(),
                            "radius_mm": r.radius_mm, "tissue": r.tissue, "tissue_voxels_2mm": n,
                            "tissue_ml": round(n * 8e-3, 2),
                            "model_grid_voxels": int(tpl.roi_mask(r, model_grid_image()).sum()),
                            "description": r.description})
        return {"design_seed": self.seed,
                "Description": "Cohort design of this synthetic cohort (neuromoe.inputs.synth_plan.CohortDesign): "
                               "the effect region of each (modality, role) (role A: PD, B: iRBD; bilateral "
                               "spheres in MNI mm, right centre and its mirror, restricted to the tissue named; "
                               "tissue volume counted on the 2 mm MNI152 template) and which clinical marker "
                               "signals which latent profile. design_seed null: the demo design.",
                "regions": regions, "markers": dict(self.markers),
                "min_tissue_voxels_2mm": MIN_TISSUE_VOXELS, "min_model_grid_voxels": MIN_MODEL_GRID_VOXELS,
                "min_separation_mm": MIN_SEPARATION_MM}

    @classmethod
    def from_json(cls, d: dict) -> CohortDesign:
        """The design a ``to_json`` dict records (its values as written, not drawn again)."""
        rois = tuple(tpl.Roi(r["name"], r["modality"], r["role"], tuple(float(v) for v in r["centre_mm"]),
                             float(r["radius_mm"]), r["tissue"], r["description"]) for r in d["regions"])
        return cls(d["design_seed"], rois, tuple((m, d["markers"][m]) for m in MARKERS))  # type: ignore[arg-type]


@lru_cache(maxsize=1)
def _default_design() -> CohortDesign:
    return CohortDesign(None, tuple(tpl.ROIS.values()), tuple(zip(MARKERS, MODALITIES, strict=True)))


@lru_cache(maxsize=2)
def _tissue_voxels(tissue: str) -> np.ndarray:
    """Bool mask of the 2 mm template where the tissue probability is >= 0.5 (as ``tpl.roi_mask`` counts)."""
    prob = {"gm": tpl.gm_probability, "wm": tpl.wm_probability}[tissue]().get_fdata(dtype=np.float32)
    out = prob >= 0.5
    out.setflags(write=False)
    return out


@lru_cache(maxsize=1)
def _ball() -> np.ndarray:
    """(K, 3) voxel offsets within REGION_RADIUS_MM of a 2 mm voxel centre (the hard sphere roi_mask uses)."""
    r = int(REGION_RADIUS_MM // 2)
    off = np.argwhere(np.ones((2 * r + 1,) * 3, bool)) - r
    return off[(off**2).sum(1) * 4 <= REGION_RADIUS_MM**2]


def _region_tissue(tissue: str, ijk: np.ndarray) -> int:
    """Template voxels of ``tissue`` within the region centred on voxel ``ijk`` and its mirror image."""
    mask = _tissue_voxels(tissue)
    mirror = np.array([mask.shape[0] - 1 - ijk[0], ijk[1], ijk[2]])   # the template is centred on x = 0
    pts = np.unique(np.concatenate([ijk + _ball(), mirror + _ball()]), axis=0)
    pts = pts[np.all((pts >= 0) & (pts < mask.shape), axis=1)]
    return int(mask[tuple(pts.T)].sum())


@lru_cache(maxsize=1)
def model_grid_image() -> nib.Nifti1Image:
    """An empty 32^3 MNI grid of 5.5 mm voxels over the brain (origin -85, -120, -75 mm): the coarse grid on
    which a drawn region must keep ``MIN_MODEL_GRID_VOXELS`` of its tissue (``tpl.roi_mask(roi, img)``)."""
    aff = np.diag([5.5, 5.5, 5.5, 1.0])
    aff[:3, 3] = [-85.0, -120.0, -75.0]
    return nib.Nifti1Image(np.zeros((32, 32, 32), np.uint8), aff)


@lru_cache(maxsize=2)
def _candidates(tissue: str) -> np.ndarray:
    """(N, 3) template voxels of ``tissue`` in the right hemisphere, at least 4 mm off the midline."""
    affine = tpl.mni_t1().affine
    cand = np.argwhere(_tissue_voxels(tissue))
    return cand[cand[:, 0] * affine[0, 0] + affine[0, 3] >= 4.0]


def _place(rng: np.random.Generator, tissue: str, taken: list[np.ndarray], tries: int = 4000) -> np.ndarray | None:
    """A right-hemisphere centre (MNI mm) for a region of ``tissue``, clear of the ``taken`` centres (each
    (3,), mirrors implied), or None after ``tries`` draws."""
    affine = tpl.mni_t1().affine
    cand = _candidates(tissue)
    flip = np.array([-1.0, 1.0, 1.0])
    for _ in range(tries):
        ijk = cand[rng.integers(len(cand))]
        c = ijk * np.diag(affine)[:3] + affine[:3, 3]
        if any(min(np.linalg.norm(c - t), np.linalg.norm(c - t * flip)) < MIN_SEPARATION_MM for t in taken):
            continue
        if _region_tissue(tissue, ijk) < MIN_TISSUE_VOXELS:
            continue
        roi = tpl.Roi("candidate", "", "", tuple(float(v) for v in c), REGION_RADIUS_MM, tissue, "")
        if (tpl.roi_mask(roi, tpl.mni_t1()).sum() >= MIN_TISSUE_VOXELS      # the count design.json records
                and tpl.roi_mask(roi, model_grid_image()).sum() >= MIN_MODEL_GRID_VOXELS):
            return c
    return None


@lru_cache(maxsize=64)
def _drawn_design(seed: int) -> CohortDesign:
    rng = np.random.default_rng(seed)
    slots = [(m, role) for m in MODALITIES for role in ROLES]
    while True:          # greedy placement in a random order; a dead end starts again (same stream)
        centres: dict[int, np.ndarray] = {}
        for k in rng.permutation(len(slots)):
            c = _place(rng, REGION_TISSUE[slots[k][0]], list(centres.values()))
            if c is None:
                break
            centres[int(k)] = c
        if len(centres) == len(slots):
            break
    rois = tuple(tpl.Roi(f"{m}_{role}", m, role, tuple(float(v) for v in centres[k]), REGION_RADIUS_MM,
                         REGION_TISSUE[m], f"drawn {REGION_TISSUE[m]} region of the synthetic "
                         f"{'PD' if role == 'A' else 'iRBD'} effect in {m} (design seed {seed})")
                 for k, (m, role) in enumerate(slots))
    profiles = [MODALITIES[int(i)] for i in rng.permutation(len(MODALITIES))]
    return CohortDesign(seed, rois, tuple(zip(MARKERS, profiles, strict=True)))


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
    and ``causes[m][role]`` is ``"disease"``, ``"distractor"`` or None. ``session``: None in a
    single-session cohort (``subject_plan``), else the visit number 1, 2, ... (``session_plans``)."""

    index: int
    seed: int
    diagnosis: str
    profile: str
    effects: dict[str, dict[str, float]]
    causes: dict[str, dict[str, str | None]]
    clinical: dict[str, float | str | None]
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    session: int | None = None

    @property
    def subject(self) -> str:
        return subject_id(self.index)

    @property
    def pose(self) -> np.ndarray:
        """4x4 MNI mm -> scanner mm rigid transform of the head (the same for all three modalities)."""
        return rigid_matrix(np.deg2rad(self.rotation_deg), self.translation_mm)

    def streams(self) -> dict[str, np.random.Generator]:
        """Independent generators for the images: anat, dwi, func (session 1: the single-session ones)."""
        kids = _seed_children(self.index, self.seed, self.session)
        return {m: np.random.default_rng(k) for m, k in zip(MODALITIES, kids[2:], strict=True)}


def _seed_children(index: int, seed: int, session: int | None) -> list[np.random.SeedSequence]:
    """The five seed sequences of a subject (session None or 1) or of its later session: plan, clinical,
    anat, dwi, func."""
    if session is None or session == 1:
        return np.random.SeedSequence([seed, index]).spawn(5)
    return np.random.SeedSequence([seed, index], spawn_key=(_SESSION_SPAWN_KEY, session)).spawn(5)


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
    profile moves one marker each, independently of diagnosis: in the demo design moca (anat), serum_nfl
    (dwi) and serum_asyn (func); in general the design's ``marker_profile``."""
    shifted = {m: profile == p.design.marker_profile(m) for m in MARKERS}
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
        "moca": int(np.clip(round(27.5 - 0.08 * (age - 66) + moca_sd * (z[2] - s * shifted["moca"])), 0, 30)),
        "rbdsq": int(np.clip(round(rb_mu + rb_sd * z[3]), 0, 13)),
        # NfL rises ~2 %/year of age; plasma/serum NfL of older adults is ~10-20 pg/mL.
        "serum_nfl": round(float(np.exp(np.log(14.0) + 0.02 * (age - 66)
                                        + log_sd * (z[4] + s * shifted["serum_nfl"]))), 1),
        "serum_asyn": int(round(float(np.exp(np.log(1500.0) + log_sd * (z[5] + s * shifted["serum_asyn"]))))),
    }
    for k, col in enumerate(["updrs3", "moca", "rbdsq", "serum_nfl", "serum_asyn"]):
        if u[1 + k] < p.clinical_missing:
            values[col] = None
    return values


# --------------------------------------------------------------------------------------------------------
# Longitudinal cohorts: later sessions of a subject
# --------------------------------------------------------------------------------------------------------
def progression_factor(diagnosis: str, session: int) -> float:
    """What a subject's disease effect strength is multiplied by at ``session`` (1-based): 1 for controls
    and at session 1, else ``1 + SESSION_PROGRESSION * (session - 1)``."""
    return 1.0 if diagnosis == "HC" else 1.0 + SESSION_PROGRESSION * (session - 1)


def session_plans(index: int, seed: int, params: SynthParams | None = None, sessions: int = 2
                  ) -> list[SubjectPlan]:
    """The plans of subject ``index`` at sessions 1..``sessions``.

    Session 1 is ``subject_plan(index, seed, params)`` (same effects, clinical values, pose, image
    streams) with ``session=1``. Session s > 1 keeps the diagnosis, profile and causes; a patient's disease
    effects are multiplied by ``progression_factor`` (capped at 1; distractors, non-specific changes, and
    every effect of a control stay as they were); the head pose is drawn anew (as in ``subject_plan``) and
    the images get their own streams; the clinical values progress from the previous visit's
    (``_progress_clinical``, ``SESSION_INTERVAL_YEARS`` later).
    """
    if isinstance(sessions, bool) or not isinstance(sessions, (int, np.integer)) or sessions < 1:
        raise ValueError(f"sessions must be an integer >= 1, got {sessions!r}")
    p = params or SynthParams()
    base = subject_plan(index, seed, p)
    out = [replace(base, session=1)]
    # The session-1 values before any was set to n/a: later visits progress from what was measured or not.
    full = _clinical(np.random.default_rng(_seed_children(index, seed, None)[1]), base.diagnosis, base.profile,
                     replace(p, clinical_missing=0.0))
    for s in range(2, int(sessions) + 1):
        kids = _seed_children(index, seed, s)
        rng, crng = np.random.default_rng(kids[0]), np.random.default_rng(kids[1])
        f = progression_factor(base.diagnosis, s)
        effects = {m: {role: float(min(1.0, v * f)) if base.causes[m][role] == "disease" else v
                       for role, v in roles.items()} for m, roles in base.effects.items()}
        rot = tuple(float(a) for a in rng.uniform(-p.max_rotation_deg, p.max_rotation_deg, 3))
        trans = tuple(float(a) for a in rng.uniform(-p.max_translation_mm, p.max_translation_mm, 3))
        full = _progress_clinical(crng, full, base.diagnosis)
        clinical = base.clinical | {c: full[c] for c in SESSION_COLUMNS}   # sex, rbdsq: as at session 1
        for col, u in zip(SESSION_COLUMNS[1:], crng.random(len(SESSION_COLUMNS) - 1), strict=True):
            if u < p.clinical_missing:
                clinical[col] = None
        out.append(replace(base, effects=effects, clinical=clinical, rotation_deg=rot, translation_mm=trans,
                           session=s))
    return out


# Change per year by diagnosis (HC, PD, iRBD): MDS-UPDRS III points (early PD ~2-3 a year), MoCA points
# beyond ageing (the -0.08 a year of _clinical), log serum NfL beyond ageing (its 2 % a year), log serum
# alpha-synuclein.
_RATES = {"updrs3": (0.1, 2.5, 0.7), "moca": (0.0, -0.25, -0.15), "serum_nfl": (0.0, 0.03, 0.02),
          "serum_asyn": (0.0, 0.03, 0.02)}


def _progress_clinical(rng: np.random.Generator, prev: dict, diagnosis: str) -> dict:
    """The clinical values one visit (``SESSION_INTERVAL_YEARS``) after ``prev`` (complete values): age up
    by the interval; UPDRS-III up by its diagnosis's rate (plus test-retest noise, SD 2 points); MoCA down
    by ageing and the diagnosis's rate (noise SD 1); serum NfL up 2 % a year (ageing) plus the diagnosis's
    rate, serum alpha-synuclein up by the diagnosis's rate (each with 8 % visit-to-visit noise). Sex and
    RBDSQ stay. Four normal draws, in this order."""
    years = SESSION_INTERVAL_YEARS
    r = {k: v[DIAGNOSES.index(diagnosis)] for k, v in _RATES.items()}
    z = rng.standard_normal(4)
    out = dict(prev)
    out["age"] = int(prev["age"]) + years
    out["updrs3"] = int(np.clip(round(prev["updrs3"] + r["updrs3"] * years + 2.0 * z[0]), 0, 132))
    out["moca"] = int(np.clip(round(prev["moca"] + (r["moca"] - 0.08) * years + 1.0 * z[1]), 0, 30))
    out["serum_nfl"] = round(float(prev["serum_nfl"] * np.exp((0.02 + r["serum_nfl"]) * years + 0.08 * z[2])), 1)
    out["serum_asyn"] = int(round(float(prev["serum_asyn"] * np.exp(r["serum_asyn"] * years + 0.08 * z[3]))))
    return out
