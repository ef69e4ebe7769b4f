"""Image registration and resampling with SimpleITK (python backend).

Conventions
-----------
- Transforms are ``SimpleITK.Transform`` objects in ITK's convention: they act on physical points in
  LPS+ mm and map a point of the *fixed* (reference) space to the corresponding point of the *moving*
  space. ``resample(moving, reference, transform)`` therefore pulls ``moving`` onto ``reference``'s
  grid with the transform ``register(fixed=reference, moving=moving)`` returned.
- ``compose(a, b)`` maps a point through ``a`` first, then ``b``: with ``a = register(MNI, T1w)``
  (MNI -> T1w points) and ``b = register(T1w, dwi)`` (T1w -> dwi points), ``compose(a, b)`` maps MNI
  points to dwi points and resamples a dwi map straight onto the MNI grid (one interpolation).
- Transforms are stored as ITK text files (``.txt``), readable by ANTs, ITK-SNAP and SimpleITK, a nonlinear
  one as the composite [affine, displacement field]: the field on fixed-grid voxels 4 mm apart (every other
  voxel of the 2 mm template; trilinear between them), cropped to the fixed mask, tapered to zero at its
  edge, values rounded to 1/128 mm, so the text stays short (about 2.5 MB for the MNI brain).
  ``transform_to_ras`` / ``ras_to_transform`` convert linear ones to 4x4 RAS matrices (nibabel world).

Speed: every registration runs a multi-resolution pyramid (shrink factors, smoothing in mm) with the
metric evaluated on a random sample of voxels drawn with a fixed seed, so a 2 mm head-to-template affine
takes a few seconds on one core and reruns give the same numbers. The nonlinear stage (demons, below) has no
random part. The thread count comes from the
``threads`` argument, else the ``NEUROMOE_THREADS`` environment variable (rules set it from Snakemake's
``threads``), else 1.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from neuromoe.inputs.imageio import affine_to_itk, from_sitk, new_image, to_sitk

__all__ = ["to_sitk", "from_sitk", "register", "resample", "write_transform", "read_transform", "compose",
           "transform_to_ras", "ras_to_transform", "flatten_linear", "resolve_threads", "dense_warp"]

_RAS2LPS = np.diag([-1.0, -1.0, 1.0])
_INTERP = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
KINDS = ("rigid", "affine", "nonlinear", "bspline")
METRICS = ("mi", "corr")
SEED = 20240611  # fixed sampling seed: identical inputs give identical transforms
DEMONS_ITERATIONS = (100, 60, 60)  # demons iterations per pyramid level (shrink 4, 2, 1 of the fixed grid)
DEMONS_REFINE_ITERATIONS = 40  # each later round: this many at the finest level, from the previous round's field
DEMONS_SIGMA_VOXELS = 1.0  # Gaussian smoothing of the displacement field, in voxels of each level
DEMONS_STEP_MM = 0.5  # largest update per iteration
BIAS_ORDER = 3  # polynomial order of the residual intensity bias fitted against the fixed image
FIELD_SPACING_MM = 4.0  # the field is stored on every k-th voxel of the fixed grid, k = this / its voxel size
FIELD_QUANTUM_MM = 1.0 / 128  # stored displacements are multiples of this (short, exact decimal text)
FIELD_MARGIN_MM = 12.0  # the stored field reaches this far beyond the fixed mask, tapering to 0 at its edge
JACOBIAN_MIN = 0.05  # the stored map is smoothed locally wherever its Jacobian determinant is below this


def resolve_threads(threads: int | None = None) -> int:
    """Threads to use: the argument, else $NEUROMOE_THREADS, else 1 (shared machines, many jobs)."""
    if threads is None:
        env = os.environ.get("NEUROMOE_THREADS", "").strip()
        threads = int(env) if env.isdigit() else 1
    return max(1, int(threads))


@contextlib.contextmanager
def itk_threads(threads: int | None = None) -> Iterator[int]:
    """Context in which new SimpleITK filters use ``resolve_threads(threads)`` threads."""
    n = resolve_threads(threads)
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield n
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


# ---------------------------------------------------------------- transforms <-> RAS matrices

def flatten_linear(tf: sitk.Transform) -> sitk.AffineTransform:
    """One AffineTransform equal to a linear transform (or chain of them), centre at the origin.

    Read off by mapping the origin and the unit vectors, exact for any linear transform.
    """
    o = np.asarray(tf.TransformPoint((0.0, 0.0, 0.0)))
    mat = np.stack([np.asarray(tf.TransformPoint(tuple(e))) - o for e in np.eye(3)], axis=1)
    out = sitk.AffineTransform(3)
    out.SetMatrix(tuple(mat.ravel().tolist()))
    out.SetTranslation(tuple(o.tolist()))
    return out


def transform_to_ras(tf: sitk.Transform) -> np.ndarray:
    """4x4 matrix mapping fixed-space RAS mm points to moving-space RAS mm points (linear ``tf`` only)."""
    a = flatten_linear(tf)
    m = np.asarray(a.GetMatrix()).reshape(3, 3)
    t = np.asarray(a.GetTranslation())
    out = np.eye(4)
    out[:3, :3] = _RAS2LPS @ m @ _RAS2LPS
    out[:3, 3] = _RAS2LPS @ t
    return out


def ras_to_transform(mat: np.ndarray) -> sitk.AffineTransform:
    """ITK AffineTransform (LPS) equal to a 4x4 RAS -> RAS matrix (the inverse of ``transform_to_ras``)."""
    mat = np.asarray(mat, dtype=float)
    out = sitk.AffineTransform(3)
    out.SetMatrix(tuple((_RAS2LPS @ mat[:3, :3] @ _RAS2LPS).ravel().tolist()))
    out.SetTranslation(tuple((_RAS2LPS @ mat[:3, 3]).tolist()))
    return out


def compose(first: sitk.Transform, second: sitk.Transform) -> sitk.Transform:
    """Transform mapping a point through ``first``, then through ``second``.

    Two linear transforms give one AffineTransform; otherwise an ITK CompositeTransform (which applies
    its components last-added-first, hence the order below).
    """
    if _is_linear(first) and _is_linear(second):
        return flatten_linear(sitk.CompositeTransform([second, first]))
    return sitk.CompositeTransform([second, first])


def _is_linear(tf: sitk.Transform) -> bool:
    tf = _downcast(tf)
    if isinstance(tf, sitk.CompositeTransform):
        return all(_is_linear(tf.GetNthTransform(i)) for i in range(tf.GetNumberOfTransforms()))
    return bool(tf.IsLinear())


def _downcast(tf: sitk.Transform) -> sitk.Transform:
    return tf.Downcast() if hasattr(tf, "Downcast") else tf


def write_transform(tf: sitk.Transform, path: str | Path) -> str:
    """Write ``tf`` as an ITK text transform file (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(tf, str(path))
    return str(path)


def read_transform(path: str | Path) -> sitk.Transform:
    """Read an ITK transform file written by ``write_transform`` (or ANTs / ITK-SNAP)."""
    tf = _downcast(sitk.ReadTransform(str(path)))
    # A one-component composite is how ITK stores some single transforms; unwrap it.
    if isinstance(tf, sitk.CompositeTransform) and tf.GetNumberOfTransforms() == 1:
        tf = _downcast(tf.GetNthTransform(0))
    return tf


# ---------------------------------------------------------------- resampling

def resample(moving: nib.Nifti1Image, reference: nib.Nifti1Image, transform: sitk.Transform | None = None,
             interp: str = "linear", default: float = 0.0, threads: int | None = None) -> nib.Nifti1Image:
    """``moving`` resampled onto ``reference``'s grid (its shape[:3] and affine; its data are not used).

    ``transform`` maps reference-space points to moving-space points (None: identity, i.e. a pure change
    of grid in world space). 4D ``moving``: every volume is resampled, output (X, Y, Z, T) on the
    reference grid. Output float32 (``nearest`` keeps integer dtypes, for label images and masks);
    points outside ``moving`` get ``default``.
    """
    if interp not in _INTERP:
        raise ValueError(f"interp must be one of {sorted(_INTERP)}, got {interp!r}")
    tf = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    ref = _grid(reference)
    src_dtype = np.asarray(moving.dataobj[(0,) * moving.ndim]).dtype
    keep_int = interp == "nearest" and np.issubdtype(src_dtype, np.integer)
    dtype = src_dtype if keep_int else np.float32
    pixel = sitk.sitkFloat32 if not keep_int else None
    with itk_threads(threads):
        f = sitk.ResampleImageFilter()
        f.SetReferenceImage(ref)
        f.SetTransform(tf)
        f.SetInterpolator(_INTERP[interp])
        f.SetDefaultPixelValue(float(default))
        if pixel is not None:
            f.SetOutputPixelType(pixel)
        if moving.ndim == 3:
            out = sitk.GetArrayFromImage(f.Execute(to_sitk(moving, dtype=dtype))).T
        elif moving.ndim == 4:
            vols = [sitk.GetArrayFromImage(f.Execute(to_sitk(moving, volume=i, dtype=dtype))).T
                    for i in range(moving.shape[3])]
            out = np.stack(vols, axis=-1)
        else:
            raise ValueError(f"resample: moving must be 3D or 4D, got shape {moving.shape}")
    img = new_image(out, reference.affine, like=moving if moving.ndim == out.ndim else None, dtype=dtype)
    return img


def _grid(img: nib.Nifti1Image) -> sitk.Image:
    """An empty ITK image with the geometry of the first three axes of ``img`` (no voxel data copied)."""
    spacing, origin, direction = affine_to_itk(img.affine)
    g = sitk.Image([int(s) for s in img.shape[:3]], sitk.sitkUInt8)
    g.SetSpacing(spacing)
    g.SetOrigin(origin)
    g.SetDirection(direction)
    return g


# ---------------------------------------------------------------- registration

def register(fixed: nib.Nifti1Image, moving: nib.Nifti1Image, kind: str = "affine", metric: str = "mi",
             fixed_mask: nib.Nifti1Image | None = None, moving_mask: nib.Nifti1Image | None = None, *,
             initial: sitk.Transform | None = None, init: str = "moments",
             shrink: Sequence[int] = (4, 2, 1), smooth_mm: Sequence[float] | None = None,
             iterations: int = 100, samples: int = 20000, bspline_spacing_mm: float = 40.0,
             bspline_iterations: int = 30, bspline_samples: int = 6000,
             demons_iterations: Sequence[int] = DEMONS_ITERATIONS, demons_sigma: float = DEMONS_SIGMA_VOXELS,
             bias_order: int = BIAS_ORDER, seed: int = SEED, threads: int | None = None) -> sitk.Transform:
    """Transform mapping ``fixed`` physical points (LPS mm) onto the matching ``moving`` points.

    kind: ``rigid`` (6 dof), ``affine`` (12 dof: a rigid stage, then affine), ``nonlinear`` (affine, then
    a dense displacement field: ``dense_warp``; a CompositeTransform [affine, DisplacementFieldTransform])
    or ``bspline`` (affine, then a cubic B-spline free-form deformation with control points
    ``bspline_spacing_mm`` apart, optimised on the metric; a CompositeTransform [affine, BSplineTransform]:
    the former ``nonlinear``, far less accurate, kept for comparison).
    metric: ``mi`` (Mattes mutual information, any contrasts) or ``corr`` (normalised correlation,
    same contrast), for the linear (and B-spline) stages; the ``nonlinear`` field assumes that both images
    have the same contrast up to a monotone intensity map and a smooth bias (a T1w to a T1 template).
    Masks (binary images on their image's grid) restrict where the metric is sampled.
    Start: ``initial`` (a transform fixed -> moving) if given, else ``init``: ``moments`` (align the
    intensity centres of mass), ``geometry`` (align the image centres) or ``none`` (identity).
    Pyramid: ``shrink`` factors with Gaussian smoothing ``smooth_mm`` (default: half the shrunk voxel
    size, in mm) per level; ``samples`` voxels (of the masked fixed image) are drawn per iteration at
    every level, so fine levels cost no more per iteration than coarse ones (``bspline_samples`` and
    ``bspline_iterations`` per level for the B-spline stage, run on the two finest levels with shrink > 1).
    The ``nonlinear`` field runs ``demons_iterations`` per level of the same shrink factors (the fixed
    grid's), its smoothing ``demons_sigma`` voxels of each level, after a polynomial bias of order
    ``bias_order`` (see ``dense_warp``).
    3D images only (for a 4D series, register one volume: ``nib.four_to_three``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if init not in ("moments", "geometry", "none"):
        raise ValueError(f"init must be moments, geometry or none, got {init!r}")
    for name, im in (("fixed", fixed), ("moving", moving)):
        if im.ndim != 3:
            raise ValueError(f"register: {name} must be 3D, got shape {im.shape}")
    with itk_threads(threads):
        f_im, m_im = to_sitk(fixed), to_sitk(moving)
        f_mask = to_sitk(fixed_mask, dtype=np.uint8) if fixed_mask is not None else None
        m_mask = to_sitk(moving_mask, dtype=np.uint8) if moving_mask is not None else None
        spacing = float(np.mean(f_im.GetSpacing()))
        shrink = [int(s) for s in shrink]
        smooth = list(smooth_mm) if smooth_mm is not None else [0.5 * s * spacing if s > 1 else 0.0
                                                                  for s in shrink]
        if len(smooth) != len(shrink):
            raise ValueError("smooth_mm needs one value per shrink level")

        start = _initial_transform(f_im, m_im, initial, init, f_mask, m_mask)
        # Rigid stage on the coarse levels first: it finds the pose without letting scale/shear
        # absorb a misalignment, and it is cheap there.
        coarse = [i for i, s in enumerate(shrink) if s >= 2] or [0]
        rigid_levels = shrink if kind == "rigid" else [shrink[i] for i in coarse]
        rigid_smooth = smooth if kind == "rigid" else [smooth[i] for i in coarse]
        centre = _centre(f_im, f_mask)
        if _is_rigid(start):
            rig = sitk.Euler3DTransform()
            rig.SetCenter(centre)
            _set_linear(rig, flatten_linear(start))
            linear: sitk.Transform = _run(f_im, m_im, rig, metric, f_mask, m_mask, rigid_levels, rigid_smooth,
                                          iterations, samples, seed, moving_initial=None)
        elif kind == "rigid":  # a non-rigid start: optimise a rigid correction applied before it
            rig = sitk.Euler3DTransform()
            rig.SetCenter(centre)
            rig = _run(f_im, m_im, rig, metric, f_mask, m_mask, rigid_levels, rigid_smooth, iterations,
                       samples, seed, moving_initial=start)
            linear = compose(rig, start)
        else:  # an affine start (e.g. from an earlier registration) is refined directly by the affine stage
            linear = start
        if kind == "rigid":
            return linear
        aff = sitk.AffineTransform(3)
        aff.SetCenter(centre)
        _set_linear(aff, flatten_linear(linear))
        aff = _run(f_im, m_im, aff, metric, f_mask, m_mask, shrink, smooth, iterations, samples, seed,
                   moving_initial=None)
        if kind == "affine":
            return aff
        if kind == "nonlinear":
            field = dense_warp(f_im, m_im, aff, f_mask, shrink=shrink, smooth_mm=smooth,
                               iterations=demons_iterations, sigma=demons_sigma, bias_order=bias_order,
                               threads=threads)
            return sitk.CompositeTransform([aff, field])
        # B-spline on top of the affine (the affine stays fixed as the moving-initial).
        phys = np.asarray(f_im.GetSize()) * np.asarray(f_im.GetSpacing())
        mesh = [max(1, int(round(p / bspline_spacing_mm))) for p in phys]
        bs = sitk.BSplineTransformInitializer(f_im, mesh, order=3)
        # ITK's metrics treat a B-spline as a global transform (a dense Jacobian per sample), so the
        # cost per iteration is samples x parameters: fewer samples, coarse levels, 40 mm mesh.
        bs_levels = [s for s in shrink if s > 1][-2:] or shrink[-1:]
        bs_smooth = [smooth[shrink.index(s)] for s in bs_levels]
        bs = _run(f_im, m_im, bs, metric, f_mask, m_mask, bs_levels, bs_smooth, bspline_iterations,
                  bspline_samples, seed, moving_initial=aff, optimizer="lbfgsb")
        return sitk.CompositeTransform([aff, bs])


# ---------------------------------------------------------------- dense nonlinear stage

def dense_warp(f_im: sitk.Image, m_im: sitk.Image, linear: sitk.Transform, f_mask: sitk.Image | None = None, *,
               shrink: Sequence[int] = (4, 2, 1), smooth_mm: Sequence[float] | None = None,
               iterations: Sequence[int] = DEMONS_ITERATIONS, sigma: float = DEMONS_SIGMA_VOXELS,
               step_mm: float = DEMONS_STEP_MM, bias_order: int = BIAS_ORDER, rounds: int = 2,
               refine_iterations: int = DEMONS_REFINE_ITERATIONS,
               threads: int | None = None) -> sitk.DisplacementFieldTransform:
    """Displacement field d on the fixed grid with ``fixed(x) ~ moving(linear(x + d(x)))`` (LPS mm).

    ``moving`` is pulled onto the fixed grid through ``linear`` once; its intensities are matched to the
    fixed image's (histogram matching, then a smooth multiplicative bias: a robust least-squares fit of a
    polynomial of order ``bias_order`` to the log ratio of the two where both hold tissue, inside ``f_mask``).
    Fast symmetric-forces demons (Thirion's forces from both images' gradients) then register the *fixed*
    image onto the pulled moving one, over the pyramid ``shrink`` (Gaussian pre-smoothing ``smooth_mm``,
    default half the shrunk voxel, none at full size), ``iterations`` per level, the field smoothed by
    ``sigma`` voxels of each level after every update (elastic regularisation: 8 mm at 8 mm voxels, 2 mm
    at 2 mm), and that field is inverted (``sitk.InvertDisplacementField``). Registering that way round
    and inverting is what measured best: the clean template is the image interpolated, the noisy subject
    the one compared (1.04 against 1.12 mm mean error, bench/registration.py's first three subjects).
    ``rounds`` passes: each after the first re-fits the bias against the fixed image warped by the previous
    field (misalignment no longer reads as bias) and runs ``refine_iterations`` more demons iterations at the
    finest level from that field (measured on four benchmark subjects: 0.01-0.02 mm less error and 6 CPU s
    less than restarting the whole pyramid). Deterministic (no sampling). All of it
    runs on ``f_mask``'s box plus ``FIELD_MARGIN_MM`` only, the part of the grid that is stored (for the MNI
    brain about half the grid: 30 instead of 44 CPU s at 1 mm, the same error).

    The field is returned cropped to ``f_mask``'s box (whole grid if None) plus ``FIELD_MARGIN_MM``, on the
    fixed grid's voxels ``FIELD_SPACING_MM`` apart (the field is smooth at that scale: 0.01 mm mean difference
    from the full 2 mm field), tapered to 0 at
    its edge (a DisplacementFieldTransform is the identity beyond its grid), smoothed locally where the map
    would fold or nearly (Jacobian determinant < ``JACOBIAN_MIN``; a planted atrophy can cause that) and
    rounded to ``FIELD_QUANTUM_MM``.

    Assumes one contrast (a T1w to a T1 template): demons compare intensities directly.
    """
    shrink = [int(v) for v in shrink]
    iterations = [int(v) for v in iterations]
    if len(iterations) != len(shrink):
        raise ValueError(f"dense_warp: {len(iterations)} iteration counts for {len(shrink)} shrink levels")
    spacing = float(np.mean(f_im.GetSpacing()))
    smooth = list(smooth_mm) if smooth_mm is not None else [0.5 * v * spacing if v > 1 else 0.0 for v in shrink]
    with itk_threads(threads):
        if f_mask is not None:  # only the stored box is computed (_storable keeps no more): ~half the grid
            box = _box(f_mask)
            f_im, f_mask = f_im[box], f_mask[box]
        fixed = sitk.Cast(f_im, sitk.sitkFloat32)
        moved = sitk.Resample(m_im, fixed, linear, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        moved = sitk.HistogramMatching(moved, fixed, numberOfHistogramLevels=256, numberOfMatchPoints=15,
                                       thresholdAtMeanIntensity=True)
        fa = sitk.GetArrayFromImage(fixed)  # (Z, Y, X)
        region = np.ones(fa.shape, bool) if f_mask is None else sitk.GetArrayViewFromImage(f_mask) > 0
        corrected = sitk.GetArrayFromImage(moved)
        back: sitk.Image | None = None  # pulled-moving points -> fixed points
        for _ in range(max(1, int(rounds))):
            warped = fa if back is None else sitk.GetArrayFromImage(
                sitk.Resample(fixed, fixed, _field_transform(back), sitk.sitkLinear, 0.0))
            if bias_order >= 0:
                corrected = corrected * np.exp(-_log_bias(warped, corrected, region, bias_order)).astype(np.float32)
            if back is None:
                back = _demons(_as_image(corrected, fixed), fixed, shrink, smooth, iterations, sigma, step_mm)
            else:  # a refinement: the finest level only, from the previous field
                back = _demons(_as_image(corrected, fixed), fixed, shrink[-1:], smooth[-1:], [refine_iterations],
                               sigma, step_mm, start=back)
        assert back is not None
        field = sitk.InvertDisplacementField(back, maximumNumberOfIterations=50, maxErrorToleranceThreshold=0.01,
                                             meanErrorToleranceThreshold=0.001, enforceBoundaryCondition=True)
        return _field_transform(_storable(field, f_mask if f_mask is not None else fixed > 0))


def _as_image(a: np.ndarray, like: sitk.Image) -> sitk.Image:
    im = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))
    im.CopyInformation(like)
    return im


def _field_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A DisplacementFieldTransform of a copy of ``field`` (the transform takes its image over)."""
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def _log_bias(fixed: np.ndarray, moving: np.ndarray, region: np.ndarray, order: int) -> np.ndarray:
    """Smooth log(moving / fixed) over the grid: a polynomial of ``order`` in the voxel coordinates (scaled
    to [-1, 1]) fitted where both images hold tissue (> 5 % of the fixed image's 99th percentile) in
    ``region``, by least squares reweighted three times (Huber weights: voxels whose intensities differ
    by anatomy, not bias, count less)."""
    lo = 0.05 * float(np.percentile(fixed[region], 99)) if region.any() else 0.0
    fit = region & (fixed > lo) & (moving > lo)
    if fit.sum() < 1000:
        return np.zeros(fixed.shape, np.float32)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in fixed.shape]
    powers = [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i) for k in range(order + 1 - i - j)]
    idx = np.nonzero(fit)
    x = np.stack([axes[0][idx[0]] ** i * axes[1][idx[1]] ** j * axes[2][idx[2]] ** k for i, j, k in powers], 1)
    r = np.log(moving[fit] / fixed[fit]).astype(np.float32)
    w = np.ones_like(r)
    for _ in range(3):
        coef = np.linalg.lstsq(x * w[:, None], r * w, rcond=None)[0]
        res = np.abs(r - x @ coef)
        scale = max(1.4826 * float(np.median(res)), 1e-6)
        w = 1.0 / np.maximum(1.0, res / (2.0 * scale))
    out = np.zeros(fixed.shape, np.float32)
    for c, (i, j, k) in zip(coef, powers, strict=True):
        out += np.float32(c) * axes[0][:, None, None] ** i * axes[1][None, :, None] ** j * axes[2][None, None, :] ** k
    return out


def _demons(fixed: sitk.Image, moving: sitk.Image, shrink: Sequence[int], smooth: Sequence[float],
            iterations: Sequence[int], sigma: float, step_mm: float, start: sitk.Image | None = None) -> sitk.Image:
    """Fast symmetric-forces demons over a pyramid; the field (vector image) on ``fixed``'s grid. ``start``:
    a field to begin from (any grid: it is resampled onto the first level's)."""
    field: sitk.Image | None = start
    for s, sm, n in zip(shrink, smooth, iterations, strict=True):
        f_l, m_l = ((sitk.SmoothingRecursiveGaussian(im, sm) if sm > 0 else im) for im in (fixed, moving))
        if s > 1:
            f_l, m_l = sitk.Shrink(f_l, [s] * 3), sitk.Shrink(m_l, [s] * 3)
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(n)
        demons.SetStandardDeviations(float(sigma))
        demons.SetMaximumUpdateStepLength(float(step_mm))
        demons.SetUseImageSpacing(True)
        if field is None:
            field = demons.Execute(f_l, m_l)
        else:  # the coarser level's field, interpolated onto this level's grid, is where this one starts
            start = sitk.TransformToDisplacementField(_field_transform(field), sitk.sitkVectorFloat64, f_l.GetSize(),
                                                      f_l.GetOrigin(), f_l.GetSpacing(), f_l.GetDirection())
            field = demons.Execute(f_l, m_l, start)
    if field.GetSize() != fixed.GetSize():  # a pyramid ending above full size
        field = sitk.TransformToDisplacementField(_field_transform(field), sitk.sitkVectorFloat64, fixed.GetSize(),
                                                  fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
    return field


def _box(mask: sitk.Image) -> tuple[slice, slice, slice]:
    """The (X, Y, Z) slices of ``mask``'s bounding box plus ``FIELD_MARGIN_MM``, within its grid (all of it if
    the mask is empty)."""
    m = sitk.GetArrayViewFromImage(mask) > 0  # (Z, Y, X)
    size = np.asarray(mask.GetSize())  # (X, Y, Z)
    if not m.any():
        return slice(0, int(size[0])), slice(0, int(size[1])), slice(0, int(size[2]))
    pad = np.ceil(FIELD_MARGIN_MM / np.asarray(mask.GetSpacing())).astype(int)
    nz = np.nonzero(m)
    lo = np.maximum(np.array([nz[2].min(), nz[1].min(), nz[0].min()]) - pad, 0)
    hi = np.minimum(np.array([nz[2].max(), nz[1].max(), nz[0].max()]) + pad + 1, size)
    return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])), slice(int(lo[2]), int(hi[2]))


def _storable(field: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """``field`` cropped to ``mask``'s bounding box plus ``FIELD_MARGIN_MM``, on voxels ``FIELD_SPACING_MM`` apart,
    tapered to 0 across that margin (smoothstep; inside the box it is unchanged), smoothed where it folds
    (``_unfold``) and rounded to ``FIELD_QUANTUM_MM``."""
    pad = np.ceil(FIELD_MARGIN_MM / np.asarray(field.GetSpacing())).astype(int)
    k = max(1, int(round(FIELD_SPACING_MM / float(min(field.GetSpacing())))))
    crop = field[tuple(slice(b.start, b.stop, k) for b in _box(mask))]
    d = sitk.GetArrayFromImage(crop)  # (Z, Y, X, 3)
    ramps = []
    for ax, n in enumerate(d.shape[:3]):
        width = max(float(pad[2 - ax]) / k, 1.0)  # the margin in stored voxels
        i = np.arange(n, dtype=float)
        r = np.clip(np.minimum(i, n - 1 - i) / width, 0.0, 1.0)
        ramps.append(r * r * (3 - 2 * r))
    taper = ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]
    d = _unfold(d * taper[..., None], crop, k)
    out = sitk.GetImageFromArray(np.round(d / FIELD_QUANTUM_MM) * FIELD_QUANTUM_MM, isVector=True)
    out.CopyInformation(crop)
    return out


def _unfold(d: np.ndarray, like: sitk.Image, stride: int, rounds: int = 10) -> np.ndarray:
    """The field ``d`` ((Z, Y, X, 3) on ``like``'s grid) smoothed (Gaussian, one voxel) around wherever the map
    x -> x + d(x), interpolated trilinearly as ITK will, has a Jacobian determinant below ``JACOBIAN_MIN``,
    until it has none (at most ``rounds`` times). The determinant is taken on the grid ``stride`` times finer
    (the one ``d`` was computed on), so a fold inside a cell of the stored grid counts."""
    spacing = np.asarray(like.GetSpacing()) / stride
    size = [(n - 1) * stride + 1 for n in like.GetSize()]
    for _ in range(rounds):
        im = sitk.GetImageFromArray(d, isVector=True)
        im.CopyInformation(like)
        fine = sitk.TransformToDisplacementField(_field_transform(im), sitk.sitkVectorFloat64, size, like.GetOrigin(),
                                                 tuple(spacing.tolist()), like.GetDirection())
        # A copy: a view of the temporary image would outlive its buffer (read after free: the rare rerun
        # that differed in a full test run)
        bad = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(fine)) < JACOBIAN_MIN
        if not bad.any():
            break
        near = np.zeros(d.shape[:3], bool)
        for lo in (0, 1):  # the corners of the stored cells holding each bad point
            idx = np.minimum(np.argwhere(bad) // stride + lo, np.asarray(d.shape[:3]) - 1)
            near[tuple(idx.T)] = True
        w = ndimage.binary_dilation(near, iterations=1)[..., None]
        blurred = np.stack([ndimage.gaussian_filter(d[..., c], 1.0) for c in range(3)], axis=-1)
        d = np.where(w, blurred, d)
    return d


def _run(f_im: sitk.Image, m_im: sitk.Image, tf: sitk.Transform, metric: str, f_mask: sitk.Image | None,
         m_mask: sitk.Image | None, shrink: Sequence[int], smooth: Sequence[float], iterations: int,
         samples: int, seed: int, moving_initial: sitk.Transform | None,
         optimizer: str = "gd") -> sitk.Transform:
    """One ITK registration of ``tf`` (optimised in place) over a shrink/smooth pyramid."""
    r = sitk.ImageRegistrationMethod()
    if metric == "mi":
        r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    else:
        r.SetMetricAsCorrelation()
    r.SetMetricSamplingStrategy(r.RANDOM)
    n_vox = float(np.prod(f_im.GetSize()))
    if f_mask is not None:
        n_vox *= max(float(np.mean(sitk.GetArrayViewFromImage(f_mask) > 0)), 1e-6)
    pct = [min(1.0, samples * s ** 3 / n_vox) for s in shrink]
    r.SetMetricSamplingPercentagePerLevel(pct, int(seed))
    if f_mask is not None:
        r.SetMetricFixedMask(f_mask)
    if m_mask is not None:
        r.SetMetricMovingMask(m_mask)
    r.SetInterpolator(sitk.sitkLinear)
    if optimizer == "lbfgsb":
        r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(iterations),
                               maximumNumberOfCorrections=5,
                               maximumNumberOfFunctionEvaluations=4 * int(iterations),
                               costFunctionConvergenceFactor=1e7)
    else:
        # Step lengths in mm of voxel shift (scales from physical shift), so one setting fits rotations,
        # translations and scales alike.
        r.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-2,
                                                   numberOfIterations=int(iterations),
                                                   relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
        r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    r.SetSmoothingSigmasPerLevel([float(s) for s in smooth])
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if moving_initial is not None:
        r.SetMovingInitialTransform(moving_initial)
    r.SetInitialTransform(tf, inPlace=True)
    r.Execute(f_im, m_im)
    return tf


def _initial_transform(f_im: sitk.Image, m_im: sitk.Image, initial: sitk.Transform | None, init: str,
                       f_mask: sitk.Image | None, m_mask: sitk.Image | None) -> sitk.Transform:
    """A linear fixed -> moving start: ``initial``, or a translation from centres of mass / image centres."""
    if initial is not None:
        if not _is_linear(initial):
            raise ValueError("register: initial must be a linear transform (rigid or affine)")
        return initial
    if init == "none":
        return sitk.Euler3DTransform()
    if init == "geometry":
        cf, cm = _image_centre(f_im), _image_centre(m_im)
    else:  # intensity centre of mass, within the masks when given
        cf, cm = _centre(f_im, f_mask, weighted=True), _centre(m_im, m_mask, weighted=True)
    t = sitk.Euler3DTransform()
    t.SetTranslation(tuple((np.asarray(cm) - np.asarray(cf)).tolist()))
    return t


def _is_rigid(tf: sitk.Transform, tol: float = 1e-4) -> bool:
    m = np.asarray(flatten_linear(tf).GetMatrix()).reshape(3, 3)
    return bool(np.allclose(m.T @ m, np.eye(3), atol=tol) and np.linalg.det(m) > 0)


def _set_linear(tf: sitk.Transform, a: sitk.AffineTransform) -> None:
    """Give ``tf`` (Euler3D or Affine, centre already set) the mapping of ``a``, keeping its centre."""
    m = np.asarray(a.GetMatrix()).reshape(3, 3)
    if isinstance(tf, sitk.Euler3DTransform):  # ITK demands orthonormal to ~1e-10: project onto SO(3)
        u, _, vt = np.linalg.svd(m)
        m = u @ vt
    t = np.asarray(a.GetTranslation())
    c = np.asarray(tf.GetCenter())
    # x -> m (x - c) + c + t'  must equal  m x + t  =>  t' = t + m c - c
    tf.SetMatrix(tuple(m.ravel().tolist()))
    tf.SetTranslation(tuple((t + m @ c - c).tolist()))


def _image_centre(im: sitk.Image) -> tuple[float, float, float]:
    idx = (np.asarray(im.GetSize(), dtype=float) - 1) / 2
    return im.TransformContinuousIndexToPhysicalPoint(tuple(idx.tolist()))


def _centre(im: sitk.Image, mask: sitk.Image | None = None,
            weighted: bool = False) -> tuple[float, float, float]:
    """Physical (LPS mm) centre of mass of ``im`` (intensity-weighted) or of ``mask`` / the image grid."""
    if mask is not None and not weighted:
        arr = sitk.GetArrayViewFromImage(mask) > 0
        w = arr.astype(float)
    else:
        w = np.clip(sitk.GetArrayViewFromImage(im).astype(float), 0, None) if weighted else None
        if w is not None and mask is not None:
            w = w * (sitk.GetArrayViewFromImage(mask) > 0)
    if w is None or w.sum() <= 0:
        return _image_centre(im)
    zyx = [np.sum(w * g) / w.sum() for g in np.indices(w.shape, sparse=True)]
    return im.TransformContinuousIndexToPhysicalPoint((float(zyx[2]), float(zyx[1]), float(zyx[0])))
