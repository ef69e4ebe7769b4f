"""The synthetic cohort's anatomical shape: a smooth, invertible warp of the template per subject.

With ``SynthParams.shape_mm`` > 0 a subject is no longer the MNI152 template under a rigid pose: its
anatomy is the template pushed through a diffeomorphism ``phi = exp(v)``, a stationary velocity field
``v`` on a coarse MNI-aligned grid (``SHAPE_GRID_MM``) integrated by scaling and squaring. ``v`` is

- a random smooth field drawn from the subject's own stream (``SeedSequence([seed, k], spawn_key=(6,))``,
  a child of the subject's sequence that nothing else uses): a broad component (Gaussian-smoothed noise,
  ``LARGE_SCALE_MM``) everywhere in the head plus a local one (``LOCAL_SCALE_MM``) weighted towards the
  cortex and the lateral ventricles, scaled so that the displacement of ``exp(v)`` has RMS ``shape_mm``
  over the template's brain; the same at every session (the same person);
- plus a radial expansion of the lateral ventricles (the outward gradient of the smoothed ventricle
  mask, scaled to 1 mm at their wall) times ``ventricle_mm_per_decade * (age - 45) / 10``: the template's
  ventricles are taken as a 45-year-old's, the cohort's youngest, so they enlarge with the age of the
  subject at the session.

``ShapeWarp.forward`` (``u``) maps a template point ``m`` (MNI mm, RAS) to the subject's anatomical point
``m + u(m)`` (before the head pose, which then maps it to scanner mm); ``inverse`` (``w = exp(-v)``) maps
an anatomical point ``y`` back to the template, ``y + w(y)``: what image formation samples
(``neuromoe.inputs.synth_images``). Both are trilinear on the grid, zero beyond it. docs/synthetic_cohort.md
has the construction and the truth file's convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from neuromoe.inputs import templates as tpl
from neuromoe.inputs.synth_plan import SubjectPlan, SynthParams

__all__ = ["LARGE_SCALE_MM", "LOCAL_SCALE_MM", "SHAPE_GRID_MM", "SHAPE_SQUARINGS", "VENTRICLE_REFERENCE_AGE",
           "ShapeWarp", "apply_affine", "build_shape_model", "subject_warp", "ventricle_mask"]

SHAPE_GRID_MM = 4.0             # spacing of the velocity and displacement grids
SHAPE_MARGIN_MM = 24.0          # the grid reaches this far beyond the template box; v tapers to 0 there
LARGE_SCALE_MM = 16.0           # Gaussian sigma of the broad random component (head and brain shape)
LOCAL_SCALE_MM = 6.0            # Gaussian sigma of the local component (near the cortex and the ventricles)
VENTRICLE_SIGMA_MM = 5.0        # smoothing of the ventricle mask whose outward gradient enlarges them
VENTRICLE_REFERENCE_AGE = 45    # age at which the template's ventricles are taken to be a subject's
SHAPE_SQUARINGS = 6             # scaling and squaring steps: exp(v) = (id + v / 2^6) composed 2^6 times
_SHAPE_SPAWN_KEY = 6            # synth_plan uses children 0-4 of SeedSequence([seed, k]), sessions child 5


@dataclass(frozen=True)
class _Basis:
    """What every subject's velocity field is built from, on the warp grid (MNI-aligned, RAS)."""

    affine: np.ndarray          # 4x4 grid voxel -> MNI mm
    shape: tuple[int, int, int]
    brain: np.ndarray           # (X, Y, Z) bool: the template's brain (where shape_mm is measured)
    ventricles: np.ndarray      # (X, Y, Z) float32: fraction of the voxel in the lateral ventricles
    local: np.ndarray           # (X, Y, Z) float32 in [0, 1]: weight of the local component
    taper: np.ndarray           # (X, Y, Z) float32 in [0, 1]: 0 at the grid's edge
    expand: np.ndarray          # (3, X, Y, Z) float32: outward ventricular field, 1 mm at the wall


@lru_cache(maxsize=1)
def ventricle_mask() -> nib.Nifti1Image:
    """The template's lateral ventricles (uint8, 2 mm template grid): the connected piece of CSF
    (probability > 0.5, more than 12 mm inside the brain mask) with most voxels in |x| 6-30, y -40-20,
    z 5-28 mm (about 17.5 mL: bodies, frontal horns and atria; the temporal horns are too thin)."""
    img = tpl.brain_mask()
    aff = img.affine
    brain = img.get_fdata(dtype=np.float32) > 0
    deep = ndi.distance_transform_edt(brain, sampling=tpl.TEMPLATE_VOXEL_MM) > 12.0
    csf = (tpl.csf_probability().get_fdata(dtype=np.float32) > 0.5) & deep
    lab, n = ndi.label(csf)
    xyz = np.stack(np.indices(brain.shape), -1) * np.diag(aff)[:3] + aff[:3, 3]
    box = ((np.abs(xyz[..., 0]) >= 6) & (np.abs(xyz[..., 0]) <= 30) & (xyz[..., 1] >= -40) & (xyz[..., 1] <= 20)
           & (xyz[..., 2] >= 5) & (xyz[..., 2] <= 28))
    counts = ndi.sum(box, lab, range(1, n + 1))
    return nib.Nifti1Image((lab == int(np.argmax(counts)) + 1).astype(np.uint8), aff)


def _onto(a: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape: tuple[int, ...],
          voxel: float) -> np.ndarray:
    """A 2 mm template map on a coarser MNI grid, blurred first so each voxel holds its mean (float32)."""
    sigma = math.sqrt(max(voxel**2 - tpl.TEMPLATE_VOXEL_MM**2, 0.0)) / 2.3548 / tpl.TEMPLATE_VOXEL_MM
    m = np.linalg.inv(src_affine) @ dst_affine
    return ndi.affine_transform(ndi.gaussian_filter(np.asarray(a, np.float32), sigma), m[:3, :3], m[:3, 3],
                                output_shape=shape, order=1, prefilter=False).astype(np.float32)


@lru_cache(maxsize=1)
def _basis() -> _Basis:
    t1 = tpl.mni_t1()
    src = t1.affine
    h = SHAPE_GRID_MM
    lo = src[:3, 3] - SHAPE_MARGIN_MM
    hi = src[:3, 3] + (np.array(t1.shape) - 1) * tpl.TEMPLATE_VOXEL_MM + SHAPE_MARGIN_MM
    shape = tuple(int(s) for s in np.ceil((hi - lo) / h).astype(int) + 1)
    aff = np.diag([h, h, h, 1.0])
    aff[:3, 3] = lo
    brain = _onto(tpl.brain_mask().get_fdata(dtype=np.float32), src, aff, shape, h) > 0.5
    vent2 = ventricle_mask().get_fdata(dtype=np.float32)
    ventricles = _onto(vent2, src, aff, shape, h)
    gm = tpl.gm_probability().get_fdata(dtype=np.float32)
    near = 1.5 * ndi.gaussian_filter(gm, 2.0) + 2.0 * ndi.gaussian_filter(vent2, 3.0)
    local = np.clip(_onto(near, src, aff, shape, h), 0, 1)
    # Taper: 1 inside the template box, a smooth step down to 0 at the grid's edge (so exp(v) is the
    # identity there and beyond, where the warp is 0).
    ramp = [np.clip(np.minimum(np.arange(n), n - 1 - np.arange(n)) * h / SHAPE_MARGIN_MM, 0, 1) for n in shape]
    ramp = [r * r * (3 - 2 * r) for r in ramp]
    taper = (ramp[0][:, None, None] * ramp[1][None, :, None] * ramp[2][None, None, :]).astype(np.float32)
    # Ventricular enlargement: -grad of the smoothed mask points outwards, scaled to 1 mm at the wall.
    pot = ndi.gaussian_filter(vent2, VENTRICLE_SIGMA_MM / tpl.TEMPLATE_VOXEL_MM)
    grad = np.stack(np.gradient(pot, tpl.TEMPLATE_VOXEL_MM))
    wall = (vent2 > 0) & ~ndi.binary_erosion(vent2 > 0)
    scale = float(np.median(np.linalg.norm(grad[:, wall], axis=0)))
    expand = np.stack([_onto(-g / scale, src, aff, shape, tpl.TEMPLATE_VOXEL_MM) for g in grad])
    for a in (brain, ventricles, local, taper, expand):
        a.setflags(write=False)
    return _Basis(aff, shape, brain, ventricles, local, taper, expand)  # type: ignore[arg-type]


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The 4x4 affine ``m`` applied to ``points`` (3, N), in their dtype, row by row (numpy's matmul of a
    3x3 by a 3xN goes to a threaded BLAS, several times slower on a busy machine)."""
    m = np.asarray(m, dtype=points.dtype)
    out = np.empty_like(points)
    for r in range(3):
        np.multiply(points[0], m[r, 0], out=out[r])
        out[r] += m[r, 1] * points[1]
        out[r] += m[r, 2] * points[2]
        out[r] += m[r, 3]
    return out


def _at(f: np.ndarray, affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear value of the vector field ``f`` (3, X, Y, Z) at ``points`` (3, N) mm, 0 beyond the grid."""
    c = apply_affine(np.linalg.inv(affine), points)
    return np.stack([ndi.map_coordinates(f[i], c, order=1, prefilter=False, cval=0.0) for i in range(3)])


def _exp(v: np.ndarray, h: float, steps: int = SHAPE_SQUARINGS) -> np.ndarray:
    """Displacement (3, X, Y, Z) mm of exp(v), v (3, X, Y, Z) mm on a grid of spacing ``h``: scaling and
    squaring, u <- u + u o (id + u), ``steps`` times from v / 2^steps."""
    u = v / np.float32(2**steps)
    idx = np.indices(v.shape[1:], dtype=np.float32)
    for _ in range(steps):
        c = idx + u / np.float32(h)
        u = u + np.stack([ndi.map_coordinates(u[i], c, order=1, prefilter=False, mode="nearest")
                          for i in range(3)])
    return u.astype(np.float32)


@dataclass(frozen=True, eq=False)
class ShapeWarp:
    """A subject's anatomy relative to the template, on an MNI-aligned grid (RAS mm, ``affine``).

    ``forward`` (3, X, Y, Z) float32 mm: the displacement u; the template point m maps to the subject's
    anatomical point m + u(m) (MNI mm before the pose; ``plan.pose`` then maps it to scanner mm).
    ``inverse`` (3, X, Y, Z) float32 mm: w, the anatomical point y maps back to y + w(y). Trilinear between
    grid points, zero beyond the grid. ``info``: what it was made from (shape_mm, age, ...)."""

    affine: np.ndarray
    forward: np.ndarray
    inverse: np.ndarray
    info: dict = field(default_factory=dict)

    def to_subject(self, points_mm: np.ndarray) -> np.ndarray:
        """Template (MNI mm) points (..., 3) -> the subject's anatomical points (..., 3): m + u(m)."""
        p = np.asarray(points_mm, dtype=float)
        q = p.reshape(-1, 3).T
        return (q + _at(self.forward, self.affine, q)).T.reshape(p.shape)

    def to_template(self, points_mm: np.ndarray) -> np.ndarray:
        """The subject's anatomical points (..., 3) -> template (MNI mm) points (..., 3): y + w(y)."""
        p = np.asarray(points_mm, dtype=float)
        q = p.reshape(-1, 3).T
        return (q + _at(self.inverse, self.affine, q)).T.reshape(p.shape)

    def jacobian_determinant(self) -> np.ndarray:
        """det(I + du/dm) on the grid, (X, Y, Z) float32: the local volume change of the forward map."""
        h = np.sqrt((self.affine[:3, :3] ** 2).sum(0))
        jac = np.stack([np.stack(np.gradient(self.forward[i], *h)) for i in range(3)])   # (3, 3, X, Y, Z)
        jac += np.eye(3, dtype=np.float32)[:, :, None, None, None]
        return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1))).astype(np.float32)

    def to_nifti(self) -> nib.Nifti1Image:
        """The forward displacement as NIfTI: (X, Y, Z, 1, 3) float32, intent vector, RAS mm components
        (ITK/ANTs read the same layout but expect LPS components: negate x and y for them)."""
        img = nib.Nifti1Image(np.moveaxis(self.forward, 0, -1)[:, :, :, None, :], self.affine)
        img.header.set_intent("vector")
        return img

    @classmethod
    def from_nifti(cls, forward: str | Path | nib.Nifti1Image, inverse: str | Path | nib.Nifti1Image
                   ) -> ShapeWarp:
        """The warp two truth files hold (``to_nifti`` of ``forward`` and of ``inverse``, e.g. a subject's
        ``read_truth(...)["warp"]`` and ``["warp_inverse"]``)."""
        fields = []
        for x in (forward, inverse):
            im = nib.load(x) if isinstance(x, (str, Path)) else x
            data = np.asarray(im.dataobj, dtype=np.float32)
            if data.ndim != 5 or data.shape[3:] != (1, 3):
                raise ValueError(f"a displacement field is (X, Y, Z, 1, 3), got {data.shape} ({x})")
            fields.append(np.ascontiguousarray(np.moveaxis(data[:, :, :, 0, :], -1, 0)))
        return cls(im.affine, fields[0], fields[1])

    def inverse_nifti(self) -> nib.Nifti1Image:
        """The inverse displacement w as NIfTI, laid out as ``to_nifti``."""
        return replace(self, forward=self.inverse).to_nifti()


def build_shape_model() -> None:
    """Build (and cache, per process) what every subject's warp is made from; call before forking."""
    _basis()


def subject_warp(plan: SubjectPlan, p: SynthParams) -> ShapeWarp | None:
    """The warp of ``plan``'s subject at its session (None when ``p.shape_mm`` is 0: the template itself).

    The random part depends only on (seed, subject) and ``shape_mm``; the ventricles' expansion on the age
    in ``plan.clinical`` (missing: no expansion). Cached for the last few subjects, so the T1w, DWI and
    BOLD of one subject share it. Raises ValueError when the field folds (Jacobian determinant <= 0)."""
    if not p.has_shape:
        return None
    age = plan.clinical.get("age")
    years = 0.0 if age is None else max(float(age) - VENTRICLE_REFERENCE_AGE, 0.0)
    return _subject_warp(plan.seed, plan.index, float(p.shape_mm), float(p.ventricle_mm_per_decade) * years / 10)


@lru_cache(maxsize=2)
def _random_velocity(seed: int, index: int, shape_mm: float) -> np.ndarray:
    """The subject's random velocity (3, X, Y, Z) mm: exp of it has RMS displacement ``shape_mm`` in the brain."""
    b = _basis()
    rng = np.random.default_rng(np.random.SeedSequence([seed, index], spawn_key=(_SHAPE_SPAWN_KEY,)))
    parts = []
    for scale in (LARGE_SCALE_MM, LOCAL_SCALE_MM):
        noise = rng.standard_normal((3, *b.shape), dtype=np.float32)
        sm = np.stack([ndi.gaussian_filter(n, scale / SHAPE_GRID_MM) for n in noise])
        parts.append(sm / np.float32(np.sqrt((sm[:, b.brain] ** 2).sum(0).mean())))
    v = b.taper * (parts[0] + b.local * parts[1])
    # Scale v so exp(v), not v, has the asked RMS: two exponentials (the map is nearly linear at these sizes).
    v *= np.float32(shape_mm / _rms(v, b.brain))
    v *= np.float32(shape_mm / _rms(_exp(v, SHAPE_GRID_MM), b.brain))
    v.setflags(write=False)
    return v


def _rms(u: np.ndarray, where: np.ndarray) -> float:
    """RMS length of the vector field u (3, X, Y, Z) over ``where``."""
    return float(np.sqrt((u[:, where] ** 2).sum(0).mean()))


@lru_cache(maxsize=2)
def _subject_warp(seed: int, index: int, shape_mm: float, ventricle_mm: float) -> ShapeWarp:
    b = _basis()
    v = _random_velocity(seed, index, shape_mm) + np.float32(ventricle_mm) * b.expand
    # Quantised to 1/256 mm, so the truth files (float32) compress by half and hold what the images used.
    u, w = (np.round(_exp(x, SHAPE_GRID_MM) * 256) / np.float32(256) for x in (v, -v))
    warp = ShapeWarp(b.affine, u, w)
    det = warp.jacobian_determinant()
    if not det.min() > 0:
        raise ValueError(f"the shape warp of subject {index} (seed {seed}) folds (Jacobian determinant "
                         f"{det.min():.3f}); lower SynthParams.shape_mm ({shape_mm}) or ventricle_mm_per_decade")
    vol = b.ventricles.sum()
    info = {"shape_mm": shape_mm, "ventricle_displacement_mm": round(ventricle_mm, 4),
            "rms_displacement_brain_mm": round(_rms(u, b.brain), 4),
            "max_displacement_brain_mm": round(float(np.sqrt((u[:, b.brain] ** 2).sum(0)).max()), 4),
            "jacobian_min": round(float(det.min()), 4), "jacobian_max": round(float(det.max()), 4),
            "ventricle_volume_ratio": round(float((det * b.ventricles).sum() / vol), 4)}
    for a in (u, w):
        a.setflags(write=False)
    return ShapeWarp(b.affine, u, w, info)
