"""FSL's transform and motion files <-> the python backend's conventions (ITK transforms, motion tables).

FLIRT matrices <-> ITK linear transforms, a FNIRT warp <-> an ITK [affine, B-spline] composite, and the motion
files of mcflirt (``.par``), eddy_correct (``.ecclog``) and eddy (``.eddy_parameters``) -> the python backend's
motion table. The derivations (coordinate systems, Euler conventions, centres of rotation) are in
docs/preprocessing.md; tests/test_fsl.py checks each one against matrices built from FSL's definitions.
World = RAS mm (the NIfTI affine's space); ITK physical points are LPS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pandas as pd

if TYPE_CHECKING:  # SimpleITK costs ~1 s to import; loaded where used
    import SimpleITK as sitk

NONLINEAR_MESH_MM = 10.0  # control-point spacing of the ITK B-spline that stores the fnirt warp (fnirt's knots: 10 mm)
_F = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS


# ----------------------------------------------------------------------------------------------------------------
# FLIRT / FNIRT <-> ITK
# ----------------------------------------------------------------------------------------------------------------
def fsl_image(img: nib.Nifti1Image | str | Path) -> Any:
    from fsl.data.image import Image

    return Image(img if isinstance(img, nib.Nifti1Image) else nib.load(str(img)))


def read_flirt(path: str | Path) -> np.ndarray:
    """A FLIRT matrix file (4 rows of 4 numbers) as a (4, 4) array."""
    mat = np.loadtxt(str(path), dtype=float)
    if mat.shape != (4, 4):
        raise ValueError(f"{path}: a FLIRT matrix has 4 x 4 numbers, got shape {mat.shape}")
    return mat


def write_flirt(mat: np.ndarray, path: str | Path) -> str:
    np.savetxt(str(path), np.asarray(mat, dtype=float), fmt="%.10f")
    return str(path)


def flirt_to_world(mat: np.ndarray, src: nib.Nifti1Image, ref: nib.Nifti1Image) -> np.ndarray:
    """(4, 4) world (RAS mm) map src -> ref equal to a FLIRT matrix computed with ``-in src -ref ref``."""
    from fsl.transform.flirt import fromFlirt

    return fromFlirt(np.asarray(mat, float), fsl_image(src), fsl_image(ref), from_="world", to="world")


def world_to_flirt(world: np.ndarray, src: nib.Nifti1Image, ref: nib.Nifti1Image) -> np.ndarray:
    """The FLIRT matrix (``-in src -ref ref``) of a world (RAS mm) map src -> ref."""
    from fsl.transform.flirt import toFlirt

    return toFlirt(np.asarray(world, float), fsl_image(src), fsl_image(ref), from_="world", to="world")


def flirt_to_itk(mat: np.ndarray, src: nib.Nifti1Image, ref: nib.Nifti1Image, rigid: bool = False) -> sitk.Transform:
    """ITK transform (LPS, fixed = FLIRT's -ref, moving = -in) equal to a FLIRT matrix: it maps ``ref`` points to
    ``src`` points. ``rigid``: an Euler3DTransform (rotation projected onto SO(3): FLIRT prints 6 digits), else an
    AffineTransform."""
    import SimpleITK as sitk

    from neuromoe.preproc import registration as reg

    ref_to_src = np.linalg.inv(flirt_to_world(mat, src, ref))
    if not rigid:
        return reg.ras_to_transform(ref_to_src)
    lps = np.eye(4)
    lps[:3, :3] = _F @ ref_to_src[:3, :3] @ _F
    lps[:3, 3] = _F @ ref_to_src[:3, 3]
    u, _, vt = np.linalg.svd(lps[:3, :3])
    rot = u @ vt
    if np.linalg.det(rot) < 0:
        raise ValueError("flirt_to_itk: the FLIRT matrix is a reflection, not a rigid transform")
    out = sitk.Euler3DTransform()
    out.SetMatrix(tuple(rot.ravel().tolist()))
    out.SetTranslation(tuple(lps[:3, 3].tolist()))
    return out


def itk_to_flirt(tf: sitk.Transform, src: nib.Nifti1Image, ref: nib.Nifti1Image) -> np.ndarray:
    """FLIRT matrix (``-in src -ref ref``) of a linear ITK transform mapping ``ref`` points to ``src`` points
    (the inverse of ``flirt_to_itk``)."""
    from neuromoe.preproc import registration as reg

    return world_to_flirt(np.linalg.inv(reg.transform_to_ras(tf)), src, ref)


def grid_lps(img: nib.Nifti1Image) -> np.ndarray:
    """(X, Y, Z, 3) LPS mm of every voxel centre of ``img``."""
    ijk = np.indices(img.shape[:3], dtype=np.float64)
    ras = np.einsum("ij,j...->...i", img.affine[:3, :3], ijk) + img.affine[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def _bspline_basis(u: np.ndarray, n: int) -> np.ndarray:
    """(len(u), n) cubic B-spline weights beta3(u - j), j = 0..n-1 (ITK's BSplineTransform kernel)."""
    t = np.abs(u[:, None] - np.arange(n)[None, :])
    return np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def fit_bspline(displacement_lps: np.ndarray, grid: nib.Nifti1Image, spacing_mm: float = NONLINEAR_MESH_MM
                ) -> sitk.BSplineTransform:
    """ITK cubic B-spline transform whose displacement best fits (least squares) ``displacement_lps``.

    ``displacement_lps`` is (X, Y, Z, 3) mm (LPS) at the voxel centres of ``grid``; control points are about
    ``spacing_mm`` apart over ``grid``'s field of view, on axes aligned with its voxel axes, so the fit separates
    into one small pseudo-inverse per axis.
    """
    import SimpleITK as sitk

    from neuromoe.inputs.imageio import affine_to_itk

    shape = grid.shape[:3]
    spacing, origin, direction = affine_to_itk(grid.affine)
    ref = sitk.Image([int(s) for s in shape], sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    ref.SetDirection(direction)
    mesh = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(shape, spacing, strict=True)]
    bs = sitk.BSplineTransformInitializer(ref, mesh, order=3)
    fixed = np.asarray(bs.GetFixedParameters())
    size, g_origin, g_spacing = fixed[0:3].astype(int), fixed[3:6], fixed[6:9]
    g_dir = fixed[9:18].reshape(3, 3)
    # Continuous control-grid index of grid voxel k along each axis: u = G^-1 (p0 + D s k - o) / g_spacing.
    rel = np.linalg.solve(g_dir, np.asarray(direction).reshape(3, 3) @ np.diag(spacing))
    if np.abs(rel - np.diag(np.diag(rel))).max() > 1e-6:
        raise ValueError("fit_bspline: control grid not aligned with the voxel axes")
    start = np.linalg.solve(g_dir, np.asarray(origin) - g_origin)
    pinvs = []
    for d in range(3):
        u = (start[d] + rel[d, d] * np.arange(shape[d])) / g_spacing[d]
        pinvs.append(np.linalg.pinv(_bspline_basis(u, int(size[d]))))  # (m_d, n_d)
    params = []
    for c in range(3):
        coef = np.einsum("ai,ijk->ajk", pinvs[0], displacement_lps[..., c])
        coef = np.einsum("bj,ajk->abk", pinvs[1], coef)
        coef = np.einsum("ck,abk->abc", pinvs[2], coef)
        params.append(coef.ravel(order="F"))  # ITK coefficient images: x fastest
    bs.SetParameters(tuple(np.concatenate(params).tolist()))
    return bs


def nonlinear_to_itk(field: Any, linear: sitk.Transform, template: nib.Nifti1Image,
                     spacing_mm: float = NONLINEAR_MESH_MM) -> sitk.CompositeTransform:
    """ITK composite [affine, B-spline] equal (on ``template``'s grid) to an fslpy nonlinear transform.

    ``field``: fslpy NonLinearTransform (``fsl.transform.fnirt.readFnirt`` of a fnirt coefficient or field file,
    reference = the template, source = the T1w) whose ``transform(x, "world", "world")`` maps MNI points to T1w
    points, its affine part included. ``linear``: the ITK affine (MNI points -> T1w points) of the same
    registration (``flirt_to_itk`` of fnirt's ``--aff``). The B-spline holds b(x) = A^-1(y(x)) - x, applied before
    A, as in the python backend's nonlinear ``anat_xfm``.
    """
    import SimpleITK as sitk

    from neuromoe.preproc import registration as reg

    x_lps = grid_lps(template)
    x_ras = x_lps * np.array([-1.0, -1.0, 1.0])
    y_ras = np.asarray(field.transform(x_ras.reshape(-1, 3), from_="world", to="world"), float).reshape(x_ras.shape)
    a_inv = np.linalg.inv(reg.transform_to_ras(linear))
    back = y_ras @ a_inv[:3, :3].T + a_inv[:3, 3]
    disp = (back - x_ras) * np.array([-1.0, -1.0, 1.0])
    disp[~np.isfinite(disp)] = 0.0  # outside the field: the affine alone
    bs = fit_bspline(disp, template, spacing_mm)
    return sitk.CompositeTransform([reg.flatten_linear(linear), bs])


def itk_to_fnirt_warp(tf: sitk.Transform, src: nib.Nifti1Image, ref: nib.Nifti1Image, path: str | Path) -> str:
    """Write an ITK transform (``ref`` points -> ``src`` points, any kind) as a FNIRT relative displacement field on
    ``ref``'s grid, for ``applywarp --ref ref --warp path --rel`` of images in ``src``'s space."""
    import SimpleITK as sitk
    from fsl.transform import fnirt, nonlinear

    from neuromoe.inputs.imageio import affine_to_itk

    spacing, origin, direction = affine_to_itk(ref.affine)
    dfield = sitk.TransformToDisplacementField(tf, sitk.sitkVectorFloat64, [int(s) for s in ref.shape[:3]],
                                               origin, spacing, direction)
    disp_lps = np.transpose(sitk.GetArrayFromImage(dfield), (2, 1, 0, 3))  # (X, Y, Z, 3)
    absolute_ras = (grid_lps(ref) + disp_lps) * np.array([-1.0, -1.0, 1.0])
    field = nonlinear.DeformationField(nib.Nifti1Image(absolute_ras.astype(np.float32), ref.affine),
                                       src=fsl_image(src), ref=fsl_image(ref), srcSpace="world", refSpace="world",
                                       defType="absolute")
    fnirt.toFnirt(field).save(str(path))
    return str(path)



# ----------------------------------------------------------------------------------------------------------------
# Motion parameters
# ----------------------------------------------------------------------------------------------------------------
def _fsl_make_rot(angles: np.ndarray) -> np.ndarray:
    """MISCMATHS::make_rot: rotation by |angles| about the axis angles / |angles|, built as FSL builds it (a basis
    with the axis last and a 2D rotation [[c, s], [-s, c]] in the first two: it turns the frame, so for a
    coordinate axis it is the point rotation by -theta)."""
    angles = np.asarray(angles, float)
    theta = float(np.linalg.norm(angles))
    if theta < 1e-8:
        return np.eye(3)
    x1 = angles / theta
    x2 = np.array([-x1[1], x1[0], 0.0])
    if np.linalg.norm(x2) <= 0.0:
        x2 = np.array([1.0, 0.0, 0.0])
    x2 /= np.linalg.norm(x2)
    x3 = np.cross(x1, x2)
    x3 /= np.linalg.norm(x3)
    basis = np.column_stack([x2, x3, x1])
    core = np.eye(3)
    core[0, 0] = core[1, 1] = np.cos(theta)
    core[0, 1], core[1, 0] = np.sin(theta), -np.sin(theta)
    return basis @ core @ basis.T


def fsl_euler_matrix(rotations: Sequence[float], translations: Sequence[float], centre: Sequence[float]) -> np.ndarray:
    """FSL's ``construct_rotmat_euler``: (4, 4) = make_rot(x) make_rot(y) make_rot(z) about ``centre``, then the
    translation; angles in radians, mm in FSL coordinates."""
    rot = np.eye(3)
    for axis in range(3):
        angles = np.zeros(3)
        angles[axis] = rotations[axis]
        rot = rot @ _fsl_make_rot(angles)
    out = np.eye(4)
    out[:3, :3] = rot
    c = np.asarray(centre, float)
    out[:3, 3] = c - rot @ c + np.asarray(translations, float)
    return out


def read_par(path: str | Path) -> np.ndarray:
    """mcflirt's ``.par``: (T, 6) rows of rx ry rz (radians) tx ty tz (mm)."""
    par = np.atleast_2d(np.loadtxt(str(path), dtype=float))
    if par.shape[1] != 6:
        raise ValueError(f"{path}: a .par file has 6 columns, got {par.shape[1]}")
    return par


def mcflirt_centre(volume: np.ndarray, img: nib.Nifti1Image) -> np.ndarray:
    """mcflirt's rotation centre for the ``.par``: the centre of gravity of the reference volume (minimum
    subtracted), in FSL coordinates (mm)."""
    w = np.asarray(volume, np.float64)
    w = w - w.min()
    if w.sum() <= 1e-5:
        cog = np.zeros(3)
    else:
        cog = np.array([np.sum(w * g) for g in np.indices(w.shape, sparse=True)]) / w.sum()
    vox_to_fsl = fsl_image(first_volume(img)).getAffine("voxel", "fsl")
    return vox_to_fsl[:3, :3] @ cog + vox_to_fsl[:3, 3]


def par_to_flirt(par: np.ndarray, centre_fsl: Sequence[float]) -> np.ndarray:
    """(T, 4, 4) FLIRT matrices volume -> reference from mcflirt ``.par`` rows (``fsl_euler_matrix``)."""
    return np.stack([fsl_euler_matrix(row[:3], row[3:], centre_fsl) for row in np.asarray(par, float)])


def read_ecclog(path: str | Path) -> np.ndarray:
    """(N, 4, 4) FLIRT matrices volume -> reference from eddy_correct's ``.ecclog`` (one per "Final result:")."""
    lines = Path(path).read_text().splitlines()
    mats = []
    for i, line in enumerate(lines):
        if line.strip().startswith("Final result"):
            rows = [ln.split() for ln in lines[i + 1:] if ln.strip()][:4]
            mats.append(np.array(rows, dtype=float))
    if not mats or any(m.shape != (4, 4) for m in mats):
        raise ValueError(f"{path}: no 4 x 4 'Final result:' matrices found")
    return np.stack(mats)


def eddy_params_to_matrices(params: np.ndarray, img: nib.Nifti1Image) -> np.ndarray:
    """(N, 4, 4) reference -> volume matrices in FSL coordinates from ``.eddy_parameters`` (first 6 columns:
    tx ty tz (mm) rx ry rz (radians)): TOPUP::MovePar2Matrix, Euler construction about the field-of-view centre."""
    shape = np.asarray(img.shape[:3], float)
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    centre = (shape - 1) * zooms / 2.0
    p = np.atleast_2d(np.asarray(params, float))
    return np.stack([fsl_euler_matrix(row[3:6], row[0:3], centre) for row in p])


def motion_from_affines(ref_to_vol: np.ndarray, centre_ras: Sequence[float]) -> pd.DataFrame:
    """The python backend's motion table from (T, 4, 4) world maps reference -> volume.

    Each map is read as y = R (x - c) + c + t: R the closest rotation to its linear part (exact for rigid maps),
    t the displacement of the centre c (mm, RAS), angles from R = Rz Ry Rx. Columns ``MOTION_COLUMNS``;
    ``attrs``: ``rotations`` (T, 3, 3), ``center_ras``, ``affines``.
    """
    from neuromoe.preproc.motion import MOTION_COLUMNS, euler_angles

    c = np.asarray(centre_ras, float)
    rows, rots = [], []
    for m in np.asarray(ref_to_vol, float):
        u, _, vt = np.linalg.svd(m[:3, :3])
        rot = u @ vt
        t = m[:3, :3] @ c + m[:3, 3] - c
        rows.append([*t, *euler_angles(rot)])
        rots.append(rot)
    table = pd.DataFrame(rows, columns=MOTION_COLUMNS)
    table.attrs.update(rotations=np.stack(rots), center_ras=c, affines=np.asarray(ref_to_vol, float))
    return table


def flirt_motion(vol_to_ref: np.ndarray, img: nib.Nifti1Image, centre_ras: Sequence[float]) -> pd.DataFrame:
    """Motion table from FLIRT matrices volume -> reference (mcflirt, eddy_correct) of a series ``img``."""
    fimg = fsl_image(first_volume(img))
    world = [np.linalg.inv(_flirt_to_world_same(m, fimg)) for m in np.asarray(vol_to_ref, float)]
    return motion_from_affines(np.stack(world), centre_ras)


def eddy_motion(ref_to_vol_fsl: np.ndarray, img: nib.Nifti1Image, centre_ras: Sequence[float]) -> pd.DataFrame:
    """Motion table from (N, 4, 4) reference -> volume matrices in FSL coordinates (``eddy_params_to_matrices``)
    of a series ``img``."""
    fimg = fsl_image(first_volume(img))
    return motion_from_affines(np.stack([_flirt_to_world_same(m, fimg) for m in ref_to_vol_fsl]), centre_ras)


def par_to_motion(par: np.ndarray, img: nib.Nifti1Image, reference: np.ndarray, centre_ras: Sequence[float]
                  ) -> pd.DataFrame:
    """Motion table (python backend conventions) from mcflirt ``.par`` rows of series ``img`` whose reference
    volume is ``reference`` (X, Y, Z)."""
    return flirt_motion(par_to_flirt(par, mcflirt_centre(reference, img)), img, centre_ras)


def _flirt_to_world_same(mat: np.ndarray, fimg: Any) -> np.ndarray:
    from fsl.transform.flirt import fromFlirt

    return fromFlirt(mat, fimg, fimg, from_="world", to="world")


def first_volume(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """A header-only 3D stand-in with ``img``'s grid (fslpy needs only the geometry)."""
    hdr = img.header.copy()
    hdr.set_data_shape(img.shape[:3])
    return nib.Nifti1Image(np.zeros(img.shape[:3], np.uint8), img.affine, hdr)
