"""NIfTI load/save helpers shared by every stage, and SimpleITK <-> nibabel conversion.

Conventions (see docs/architecture.md):

- Arrays are (X, Y, Z[, T]) in voxel order; the NIfTI affine maps voxel indices to RAS+ world mm.
- Maps are written float32, masks uint8, both gzip-compressed at nibabel's default level (1: the
  outputs are read once downstream, so faster writes matter more than a few % of disk).
- SimpleITK images live in ITK's LPS+ world. ``to_sitk`` / ``from_sitk`` do the RAS <-> LPS flip
  (negate the first two world axes) and the (X, Y, Z) <-> (Z, Y, X) array transpose, so a point has
  the same physical position on both sides.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from neuromoe.errors import InputError
from neuromoe.paths import subject_label

# Diagonal that flips RAS+ <-> LPS+ world coordinates (its own inverse).
_RAS2LPS = np.diag([-1.0, -1.0, 1.0])


def load_image(path: str | Path, *, subject: str | None = None, ndim: int | None = None) -> nib.Nifti1Image:
    """Read a NIfTI file as an in-memory float32 image with the file's affine and header.

    ``ndim`` (3 or 4), if given, is checked; a 4D image whose last axis has length 1 counts as 3D and
    is squeezed. Raises ``InputError`` naming the subject and file when the file is missing,
    unreadable or has the wrong number of dimensions.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file not found.", subject=subject_label(subject), path=path,
                         fix="check the BIDS dataset or rerun the stage that writes it.")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"cannot be read as NIfTI ({exc}).", subject=subject_label(subject), path=path,
                         fix="replace the file with a valid NIfTI-1/2 image.") from exc
    if data.ndim == 4 and data.shape[3] == 1 and ndim == 3:
        data = data[..., 0]
    if ndim is not None and data.ndim != ndim:
        raise InputError(f"expected a {ndim}D image, got shape {data.shape}.", subject=subject_label(subject),
                         path=path, fix=f"give a {ndim}D image.")
    return new_image(data, img.affine, like=img)


def new_image(data: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image | None = None,
              dtype: type | np.dtype = np.float32) -> nib.Nifti1Image:
    """A Nifti1Image of ``data`` cast to ``dtype`` with ``affine`` (voxel -> RAS mm) set as sform and qform.

    ``like`` supplies the rest of the header (units, sform/qform codes, TR in pixdim[4]); scaling is
    reset so the stored values are the array values.
    """
    arr = np.asarray(data).astype(dtype, copy=False)
    # Only a NIfTI-1 header carries over as is (NIfTI-2, MGH, ... have other fields).
    nifti1 = like is not None and type(like.header) is nib.Nifti1Header
    header = like.header.copy() if nifti1 else None
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=float), header=header)
    scode = int(like.header["sform_code"]) if nifti1 else 0
    qcode = int(like.header["qform_code"]) if nifti1 else 0
    img.set_sform(affine, code=scode or 1)  # 1 = scanner; 0 would make readers ignore the affine
    img.set_qform(affine, code=qcode or 1)
    img.set_data_dtype(arr.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if like is not None and arr.ndim == 4 and len(like.header.get_zooms()) >= 4:
        img.header.set_zooms(img.header.get_zooms()[:3] + like.header.get_zooms()[3:4])
    return img


def save_map(img: nib.Nifti1Image, path: str | Path) -> str:
    """Write ``img`` as float32 gzip NIfTI (parents created); returns the path as a string."""
    out = new_image(np.asarray(img.dataobj, dtype=np.float32), img.affine, like=img)
    return _save(out, path)


def save_mask(img: nib.Nifti1Image | np.ndarray, path: str | Path, affine: np.ndarray | None = None) -> str:
    """Write a mask (nonzero -> 1) as uint8 gzip NIfTI; accepts an image or an array plus ``affine``."""
    if isinstance(img, nib.Nifti1Image):
        out = new_image(np.asarray(img.dataobj) > 0, img.affine, like=img, dtype=np.uint8)
    else:
        if affine is None:
            raise ValueError("save_mask: an array mask needs its affine.")
        out = new_image(np.asarray(img) > 0, affine, dtype=np.uint8)
    return _save(out, path)


def _save(img: nib.Nifti1Image, path: str | Path) -> str:
    """Write ``img``; a header that states no units (an image made from an array) gets mm (and s for a series),
    as the BIDS validator asks (NIFTI_UNIT)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    space, time_ = img.header.get_xyzt_units()
    if space == "unknown" or (img.ndim == 4 and time_ == "unknown"):
        img.header.set_xyzt_units("mm" if space == "unknown" else space,
                                  ("sec" if time_ == "unknown" else time_) if img.ndim == 4 else time_)
    nib.save(img, str(path))
    return str(path)


# ---------------------------------------------------------------- SimpleITK <-> nibabel (RAS <-> LPS)

def affine_to_itk(affine: np.ndarray, ndim: int = 3) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) of an ITK image with the geometry of the 4x4 voxel -> RAS ``affine``.

    ITK: physical_LPS = direction @ diag(spacing) @ index + origin, with unit-norm direction columns.
    """
    m = _RAS2LPS @ np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"singular affine (zero voxel size): {affine.tolist()}")
    direction = m / spacing
    origin = _RAS2LPS @ np.asarray(affine, dtype=float)[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist())


def itk_to_affine(im: sitk.Image) -> np.ndarray:
    """The 4x4 voxel -> RAS affine of the first three axes of a SimpleITK image."""
    d = im.GetDimension()
    direction = np.asarray(im.GetDirection(), dtype=float).reshape(d, d)[:3, :3]
    spacing = np.asarray(im.GetSpacing()[:3], dtype=float)
    origin = np.asarray(im.GetOrigin()[:3], dtype=float)
    aff = np.eye(4)
    aff[:3, :3] = _RAS2LPS @ direction @ np.diag(spacing)
    aff[:3, 3] = _RAS2LPS @ origin
    return aff


def to_sitk(img: nib.Nifti1Image, volume: int | None = None,
            dtype: type | np.dtype = np.float32) -> sitk.Image:
    """SimpleITK image (LPS world) with the same voxels at the same physical places as ``img``.

    3D images convert as they are. For 4D images, ``volume`` picks one 3D volume; with ``volume=None``
    a 4D ITK image is returned (4th spacing from pixdim[4], identity in the 4th direction).
    """
    data = np.asarray(img.dataobj if volume is None else img.dataobj[..., volume], dtype=dtype)
    if data.ndim == 4 and volume is None:
        pass
    elif data.ndim != 3:
        raise ValueError(f"to_sitk: expected a 3D image or a 4D image with volume=, got shape {data.shape}")
    spacing, origin, direction = affine_to_itk(img.affine)
    # nibabel arrays are (X, Y, Z[, T]); ITK's numpy view is (Z, Y, X) / (T, Z, Y, X).
    im = sitk.GetImageFromArray(np.ascontiguousarray(data.T), isVector=False)
    if data.ndim == 4:
        zooms = img.header.get_zooms()
        tr = float(zooms[3]) if len(zooms) > 3 and zooms[3] > 0 else 1.0
        d4 = np.eye(4)
        d4[:3, :3] = np.asarray(direction).reshape(3, 3)
        im.SetSpacing(spacing + (tr,))
        im.SetOrigin(origin + (0.0,))
        im.SetDirection(tuple(d4.ravel().tolist()))
    else:
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
        im.SetDirection(direction)
    return im


def from_sitk(im: sitk.Image, like: nib.Nifti1Image | None = None,
              dtype: type | np.dtype | None = None) -> nib.Nifti1Image:
    """Nifti1Image of a SimpleITK image: array transposed back to (X, Y, Z[, T]), affine back to RAS.

    ``like`` supplies header fields (codes, units, TR). ``dtype`` defaults to the ITK pixel type.
    """
    arr = sitk.GetArrayFromImage(im)
    if im.GetNumberOfComponentsPerPixel() > 1:  # vector image: (Z, Y, X, C) -> (X, Y, Z, C)
        arr = np.moveaxis(arr, -1, 0)
    arr = arr.T
    return new_image(arr, itk_to_affine(im), like=like, dtype=dtype or arr.dtype)
