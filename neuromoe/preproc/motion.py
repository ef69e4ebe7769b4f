"""Rigid realignment of a 4D series (BOLD or DWI) to one reference volume, and b-vector rotation.

Every volume is registered rigidly (6 parameters) to a reference: correlation for same-contrast series
(BOLD), Mattes mutual information for DWI volumes against a b=0 reference (the contrast of a b=1000
volume differs from the b=0). Each registration starts from the previous volume's solution, because
head motion is smooth in time, which makes convergence fast and keeps large drifts in the capture range.
Each volume is then resampled exactly once, with its final transform, onto the reference grid (no
double interpolation).

Conventions (world = scanner RAS mm, the NIfTI affine's space):

* A volume's motion is the rigid map ``y = R (x - c) + c + t`` that takes a point ``x`` of the head as
  seen in the reference to where it is in that volume (ITK's "fixed -> moving" map with the reference
  as fixed image). ``c`` is the rotation centre (the centroid of the reference's brain mask, mm RAS),
  so ``t`` is the displacement of the brain centre, which is what framewise displacement assumes.
* ``R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)`` (rotations about the RAS x, y, z axes, radians).
* Columns are fMRIPrep's: ``trans_x trans_y trans_z`` (mm) ``rot_x rot_y rot_z`` (radians).

SimpleITK works in LPS physical space; nibabel in RAS. The two differ by ``F = diag(-1, -1, 1)``:
``x_lps = F x_ras``, so a rigid map ``(R, t)`` in LPS is ``(F R F, F t)`` in RAS.
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from neuromoe.errors import StageError
from neuromoe.preproc.masks import largest_component, otsu_threshold

_MARGIN_MM = 20.0  # largest head displacement from the reference that the cropped moving image keeps
# Metric samples per registration (drawn in the cropped box). Mattes MI estimates a joint histogram and
# needs more points than a correlation for the same precision (0.2 vs 0.3 degree worst case on DWI).
_SAMPLES = {"corr": 12000, "mi": 20000}
MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
_F = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)


# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------
def _to_sitk(vol: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """3D array (X, Y, Z) in voxel order + NIfTI affine (voxel -> RAS mm) -> float32 SimpleITK image (LPS)."""
    lin = _F @ affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    im = sitk.GetImageFromArray(np.ascontiguousarray(vol.T, dtype=np.float32))  # sitk arrays are (Z, Y, X)
    im.SetSpacing(spacing.tolist())
    im.SetDirection((lin / spacing).ravel().tolist())  # row-major; column j = direction of voxel axis j
    im.SetOrigin((_F @ affine[:3, 3]).tolist())
    return im


def _from_sitk(im: sitk.Image) -> np.ndarray:
    """SimpleITK image -> array in voxel order (X, Y, Z)."""
    return sitk.GetArrayFromImage(im).T


def rotation_matrix(rot_x: float, rot_y: float, rot_z: float) -> np.ndarray:
    """Rotation ``Rz @ Ry @ Rx`` (3, 3) from angles in radians about the RAS x, y, z axes."""
    cx, sx, cy, sy, cz, sz = np.cos(rot_x), np.sin(rot_x), np.cos(rot_y), np.sin(rot_y), np.cos(rot_z), np.sin(rot_z)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def euler_angles(rot: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`rotation_matrix`: (rot_x, rot_y, rot_z) radians with ``rot = Rz Ry Rx``."""
    rot_y = -np.arcsin(np.clip(rot[2, 0], -1.0, 1.0))
    rot_x = np.arctan2(rot[2, 1], rot[2, 2])
    rot_z = np.arctan2(rot[1, 0], rot[0, 0])
    return float(rot_x), float(rot_y), float(rot_z)


def rotations_from_params(params: pd.DataFrame) -> np.ndarray:
    """Per-volume rotations (N, 3, 3), RAS world, from a motion table with ``rot_x rot_y rot_z`` (radians)."""
    return np.stack([rotation_matrix(*row) for row in params[["rot_x", "rot_y", "rot_z"]].to_numpy()])


def params_to_affines(params: pd.DataFrame, center: np.ndarray) -> np.ndarray:
    """Per-volume 4x4 maps (N, 4, 4), reference RAS mm -> volume RAS mm: ``y = R (x - c) + c + t``."""
    rots = rotations_from_params(params)
    trans = params[["trans_x", "trans_y", "trans_z"]].to_numpy()
    out = np.tile(np.eye(4), (len(params), 1, 1))
    out[:, :3, :3] = rots
    out[:, :3, 3] = trans + center - np.einsum("nij,j->ni", rots, center)
    return out


def head_mask(vol: np.ndarray) -> np.ndarray:
    """Rough head/brain mask (X, Y, Z) bool of one volume: Otsu threshold, largest component, holes filled.

    Only used to choose where the registration metric is sampled, so it need not be a precise brain mask.
    """
    finite = np.isfinite(vol)
    pos = vol[finite & (vol > 0)]
    if pos.size == 0:
        return np.zeros(vol.shape, bool)
    fg = finite & (vol > otsu_threshold(pos, nbins=128))
    return ndimage.binary_fill_holes(largest_component(fg))


# ----------------------------------------------------------------------------------------------
# realignment
# ----------------------------------------------------------------------------------------------
def _registration(metric: str, radius_mm: float, n_voxels: int, threads: int) -> sitk.ImageRegistrationMethod:
    """One configured rigid registration, reused for every volume of a series."""
    reg = sitk.ImageRegistrationMethod()
    if metric == "corr":
        reg.SetMetricAsCorrelation()
    else:
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    # A fixed random sample (same seed) keeps the objective deterministic and smooth between iterations.
    # The sample COUNT, not a fraction, sets accuracy and cost: ~10^4 points (0.05 mm / 0.05 degree on
    # 3-4 mm phantoms, correlation) whatever the grid size. (ITK draws the fraction over the fixed image's bounding
    # box, jittered within voxels; points outside the mask are then dropped.)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel([min(1.0, _SAMPLES[metric] / n_voxels)], seed=1)
    # Gradients by finite differences at the sample points only: the default gradient filters smooth the
    # whole image at every level of every call, which cost more than the optimisation itself.
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    # One level at full resolution, no smoothing: at 3-4 mm the head is already smooth, and each volume
    # starts from its predecessor's pose. A shrink-2 level in front cost 30% more time for no accuracy,
    # and the single level still converged from independent jumps of 15 mm / 10 degrees in tests.
    reg.SetShrinkFactorsPerLevel([1])
    reg.SetSmoothingSigmasPerLevel([0.0])
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=2e-3, numberOfIterations=100, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8)
    # Scales make one unit step of any parameter move the brain ~1 mm: a rotation of 1 rad moves points at
    # the radius r by r mm (ITK scales are squared shifts). Fixed scales skip ITK's per-call estimator.
    reg.SetOptimizerScales([radius_mm**2] * 3 + [1.0] * 3)
    reg.SetNumberOfThreads(max(1, int(threads)))
    return reg


def realign_series(img4d: nib.Nifti1Image, ref_index: int | None = None, reference: np.ndarray | None = None,
                   mask: np.ndarray | None = None, metric: str = "corr", subject: str | None = None,
                   threads: int = 1, inplace: bool = False) -> tuple[nib.Nifti1Image, pd.DataFrame]:
    """Rigidly realign every volume of a 4D series to a reference volume, resampling each once.

    Args:
        img4d: (X, Y, Z, T) image; its affine maps voxels to RAS mm.
        ref_index: volume used as reference when ``reference`` is None (default: the middle volume).
        reference: (X, Y, Z) reference on the same grid (e.g. the mean b=0); overrides ``ref_index``.
        mask: (X, Y, Z) brain mask of the reference; the metric is sampled in it, dilated 2 voxels so that
            the brain edge (most of the alignment signal) is included. Default: Otsu head mask of it.
        metric: ``"corr"`` (same contrast, e.g. BOLD) or ``"mi"`` (Mattes mutual information, e.g. DWI).
        subject: subject id for error messages.
        threads: threads SimpleITK may use.
        inplace: write each corrected volume over its input voxels when ``img4d`` holds a float32 array (which
            then holds the corrected series): one copy of the series less. A series read from a file, or
            converted to float32, is always corrected in the copy read.

    Returns:
        ``(corrected, params)``: corrected (X, Y, Z, T) float32 image on the input grid (voxels mapped from
        outside the field of view are 0), and a DataFrame with one row per volume and columns
        ``trans_x trans_y trans_z`` (mm, RAS) ``rot_x rot_y rot_z`` (radians), see the module docstring.
        ``params.attrs`` holds ``rotations`` (T, 3, 3) RAS, ``center_ras`` (3,) mm, ``metric_values`` (T,),
        ``seconds`` (wall time of the loop) and ``coverage`` (X, Y, Z) bool: voxels whose source lies inside
        the field of view in every volume (elsewhere some corrected volumes hold the 0 fill value, which a
        voxel-wise model must not fit).
    """
    stage = "motion"
    if subject is not None and not subject.startswith("sub-"):
        subject = f"sub-{subject}"
    if metric not in ("corr", "mi"):
        raise ValueError(f"metric must be 'corr' or 'mi', got {metric!r}")
    if img4d.ndim != 4:
        raise StageError(f"expected a 4D series, got an image of shape {img4d.shape}", subject=subject,
                         stage=stage, fix="pass the 4D BOLD or DWI image")
    data = np.asarray(img4d.dataobj, dtype=np.float32)
    n_vol = data.shape[3]
    if not np.isfinite(data).all():
        raise StageError("the series contains NaN or infinite values", subject=subject, stage=stage,
                         fix="check the scanner export; replace non-finite voxels before preprocessing")
    affine = img4d.affine
    if reference is None:
        ref_index = n_vol // 2 if ref_index is None else int(ref_index)
        if not -n_vol <= ref_index < n_vol:
            raise ValueError(f"ref_index {ref_index} out of range for {n_vol} volumes")
        reference = data[..., ref_index]
    reference = np.asarray(reference, dtype=np.float32)
    if reference.shape != data.shape[:3]:
        raise ValueError(f"reference shape {reference.shape} differs from the series grid {data.shape[:3]}")
    brain = head_mask(reference) if mask is None else np.asarray(mask, bool)
    if brain.shape != data.shape[:3] or brain.sum() < 100:
        raise StageError(f"the reference mask is empty or does not match the grid ({int(brain.sum())} voxels)",
                         subject=subject, stage=stage,
                         fix="check that the image contains a head with non-zero intensity")

    # Rotation centre: brain centroid (mm RAS), so translations are displacements of the brain centre.
    centroid_vox = np.array(ndimage.center_of_mass(brain))
    center_ras = affine[:3, :3] @ centroid_vox + affine[:3, 3]
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    # Typical (RMS) distance of the brain from its centre: a rotation moves most points by about this much.
    # (The maximum distance under-weights rotations and left ~0.4 degree errors in tests.)
    radius_mm = float(np.sqrt((((np.argwhere(brain) - centroid_vox) * zooms) ** 2).sum(1).mean()))

    # Fixed image cropped to the dilated mask's bounding box: the metric sampling and ITK's internal copies
    # then touch only the head, not the empty field of view (often half the voxels).
    sample = ndimage.binary_dilation(brain, iterations=2)
    lo = np.maximum(np.argwhere(sample).min(0) - 1, 0)
    hi = np.minimum(np.argwhere(sample).max(0) + 2, data.shape[:3])
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    fixed = _to_sitk(reference[box], crop_affine)
    fixed_mask = sitk.Cast(_to_sitk(sample[box].astype(np.float32), crop_affine), sitk.sitkUInt8)
    ref_full = _to_sitk(reference, affine)
    # The moving volume is cropped too, with a margin of _MARGIN_MM for the motion itself, so the
    # per-call conversion and the registration's internal copies of it stay small.
    margin = np.ceil(_MARGIN_MM / zooms).astype(int)
    mlo = np.maximum(lo - margin, 0)
    mhi = np.minimum(hi + margin, data.shape[:3])
    mbox = tuple(slice(a, b) for a, b in zip(mlo, mhi, strict=True))
    mov_affine = affine.copy()
    mov_affine[:3, 3] = affine[:3, :3] @ mlo + affine[:3, 3]

    reg = _registration(metric, radius_mm, int(np.prod(hi - lo)), threads)
    reg.SetMetricFixedMask(fixed_mask)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(ref_full)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetNumberOfThreads(max(1, int(threads)))

    # Volume k's input voxels are read (copied into ITK) before its corrected volume is written, and never again.
    owned = not (isinstance(img4d.dataobj, np.ndarray) and np.may_share_memory(data, img4d.dataobj))
    corrected = data if inplace or owned else np.empty_like(data)
    ijk = np.indices(data.shape[:3], dtype=np.float32).reshape(3, -1)
    coverage = np.ones(ijk.shape[1], bool)
    params = np.zeros((n_vol, 6))
    rotations = np.zeros((n_vol, 3, 3))
    metric_values = np.zeros(n_vol)
    current = sitk.Euler3DTransform()
    current.SetCenter((_F @ center_ras).tolist())
    # ITK filters inside the registration (image copies, masks) follow the global thread default, which is every
    # core: a Snakemake job given 1 thread must not oversubscribe the machine. Restored afterwards.
    saved_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))
    t0 = time.perf_counter()
    try:
        for k in range(n_vol):
            tx = sitk.Euler3DTransform(current)  # start from the previous volume's solution
            reg.SetInitialTransform(tx, inPlace=True)
            try:
                reg.Execute(fixed, _to_sitk(data[mbox + (k,)], mov_affine))
            except RuntimeError as exc:  # e.g. every sample mapped outside the moving image
                raise StageError(f"rigid registration of volume {k} failed: {exc}", subject=subject,
                                 stage=stage, fix="check the volume for gross artefacts or a head outside "
                                 "the field of view") from exc
            current = tx
            metric_values[k] = reg.GetMetricValue()
            resampler.SetTransform(tx)
            # The one interpolation of this volume: its raw voxels, through its final transform.
            corrected[..., k] = _from_sitk(resampler.Execute(_to_sitk(data[..., k], affine)))
            rot_ras = _F @ np.array(tx.GetMatrix()).reshape(3, 3) @ _F
            rotations[k] = rot_ras
            params[k, :3] = _F @ np.array(tx.GetTranslation())
            params[k, 3:] = euler_angles(rot_ras)
            coverage &= _inside(rot_ras, params[k, :3], center_ras, affine, ijk, data.shape[:3])
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved_threads)
    seconds = time.perf_counter() - t0

    header = img4d.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)  # the values are the array's; an int16 input's scaling must not carry over
    out = nib.Nifti1Image(corrected, affine, header)
    table = pd.DataFrame(params, columns=MOTION_COLUMNS)
    table.attrs.update(rotations=rotations, center_ras=center_ras, metric_values=metric_values, seconds=seconds,
                       coverage=coverage.reshape(data.shape[:3]))
    return out, table


def _inside(rot: np.ndarray, trans: np.ndarray, center: np.ndarray, affine: np.ndarray, ijk: np.ndarray,
            shape: tuple[int, ...]) -> np.ndarray:
    """(V,) bool: reference voxels ``ijk`` (3, V) whose motion-mapped position falls inside the volume.

    ITK's linear interpolator treats continuous indices in [-0.5, n - 0.5] as inside; beyond, the
    resampler writes its fill value.
    """
    motion = np.eye(4)
    motion[:3, :3] = rot
    motion[:3, 3] = trans + center - rot @ center
    vox = np.linalg.inv(affine) @ motion @ affine  # reference voxel -> volume voxel
    mapped = vox[:3, :3].astype(np.float32) @ ijk + vox[:3, 3:].astype(np.float32)
    upper = np.asarray(shape, np.float32)[:, None] - 0.5
    return ((mapped >= -0.5) & (mapped <= upper)).all(axis=0)


# ----------------------------------------------------------------------------------------------
# b-vectors
# ----------------------------------------------------------------------------------------------
def bvec_frame(affine: np.ndarray) -> np.ndarray:
    """(3, 3) matrix taking a BIDS/FSL b-vector to a unit direction in RAS world: ``g_ras = M @ bvec``.

    BIDS b-vectors follow FSL: they are given along the image's voxel axes (so they need no change when
    the image is resliced along its own axes), but FSL's voxel frame is always radiological. For an
    image whose affine has a positive determinant (neurological storage, e.g. the usual RAS-like NIfTI),
    FSL reads the voxel x axis in reverse, so the b-vector's x component is negated relative to the
    voxel i axis. MRtrix3 applies the same rule when it reads ``-fslgrad`` (tests compare with its
    scanner-frame export for RAS, LAS, oblique and permuted storage). Hence
    ``M = Q @ diag(s, 1, 1)`` with ``Q`` the affine's direction cosines (voxel axes -> RAS) and
    ``s = -1`` if ``det(affine) > 0`` else ``+1``.
    """
    lin = np.asarray(affine, float)[:3, :3]
    q = lin / np.linalg.norm(lin, axis=0)
    flip = np.diag([-1.0 if np.linalg.det(lin) > 0 else 1.0, 1.0, 1.0])
    return q @ flip


def rotate_bvecs(bvecs: np.ndarray, rotations: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Rotate each volume's b-vector by that volume's head rotation, in the BIDS/FSL b-vector frame.

    Args:
        bvecs: (3, N) BIDS/FSL b-vectors (see :func:`bvec_frame`); zero columns (b=0) stay zero.
        rotations: (N, 3, 3) RAS rotations from :func:`realign_series` (reference -> volume head motion).
        affine: the image's 4x4 affine (voxel -> RAS mm).

    Returns:
        (3, N) unit b-vectors, same frame, valid for the realigned volumes.

    A volume acquired with the head rotated by ``R`` probed, in the head's reference frame, the direction
    ``R^T g`` (``g`` the scanner-frame gradient). After realignment the volume is in the reference frame,
    so its gradient is ``R^T g``: in the b-vector frame ``bvec' = M^-1 R^T M bvec`` with ``M`` from
    :func:`bvec_frame`.
    """
    bvecs = np.asarray(bvecs, float)
    rotations = np.asarray(rotations, float)
    if bvecs.ndim != 2 or bvecs.shape[0] != 3:
        raise ValueError(f"bvecs must be (3, N), got {bvecs.shape}")
    if rotations.shape != (bvecs.shape[1], 3, 3):
        raise ValueError(f"rotations must be ({bvecs.shape[1]}, 3, 3), got {rotations.shape}")
    bvecs = np.nan_to_num(bvecs, nan=0.0, posinf=0.0, neginf=0.0)  # NaN b=0 vectors (some exports)
    m = bvec_frame(affine)
    world = m @ bvecs                                     # (3, N) RAS
    rotated = np.einsum("nji,jn->in", rotations, world)   # R_n^T g_n
    out = np.linalg.solve(m, rotated)                     # back to the b-vector frame
    norm = np.linalg.norm(out, axis=0)
    nonzero = np.linalg.norm(bvecs, axis=0) > 1e-8
    out[:, nonzero] /= norm[nonzero]
    out[:, ~nonzero] = 0.0
    return out
