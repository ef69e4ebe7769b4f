"""The model grid, and MNI-space maps resampled onto it and normalised per subject.

Spaces and axes: the model grid is an isotropic RAS grid in MNI152NLin2009aSym mm. Array axes ``(D, H, W)``
are the NIfTI voxel axes ``(i, j, k)`` of that grid: left->right, posterior->anterior, inferior->superior.
``ModelGrid.affine`` maps ``(i, j, k, 1)`` to MNI mm. Each size must be a multiple of the model's patch size
(``check_grid``; config ``model.patch_size``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from neuromoe.config import grid_problems

ZSCORE_CLIP = 6.0  # robust z-scores are clipped to [-6, 6]
MAD_TO_SD = 1.4826  # MAD of a normal distribution times this is its standard deviation
MIN_SUPPORT = 0.25  # grid voxels with less valid source weight than this are treated as missing
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


class ModelGrid(NamedTuple):
    """The isotropic grid the model sees: ``affine`` (4, 4) voxel -> MNI mm, ``shape`` (D, H, W)."""

    affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def voxel_mm(self) -> float:
        """Edge length of one (isotropic) voxel in mm."""
        return float(self.affine[0, 0])


def grid_shape(grid: int | Sequence[int]) -> tuple[int, int, int]:
    """A grid spec (an int for a cube, or three ints) as ``(D, H, W)``; ValueError naming a bad value."""
    dims = (int(grid),) * 3 if isinstance(grid, (int, np.integer)) else tuple(int(g) for g in grid)
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise ValueError(f"cache grid must be three positive ints (D, H, W), got {grid!r}")
    return dims  # type: ignore[return-value]


def check_grid(grid: int | Sequence[int], patch: int) -> tuple[int, int, int]:
    """``grid_shape``, and each size divisible by the model's ``patch`` (config ``model.patch_size``)."""
    dims = grid_shape(grid)
    problems = grid_problems(dims, patch)
    if problems:
        raise ValueError(problems[0])
    return dims


@lru_cache(maxsize=1)
def _mni_mask() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 brain mask nilearn ships (2 mm, 99 x 117 x 95): (bool mask, affine). No download."""
    from neuromoe.inputs.templates import nilearn_image

    img = nilearn_image("load_mni152_brain_mask")
    mask = np.asarray(img.dataobj) > 0
    mask.setflags(write=False)
    return mask, np.asarray(img.affine, dtype=np.float64)


def _voxel_box_mm(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) corners in mm of the box that holds every True voxel, voxel extents included."""
    ijk = np.argwhere(mask)
    lo, hi = ijk.min(0) - 0.5, ijk.max(0) + 0.5
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                        for c in (lo[2], hi[2])])
    mm = (affine @ corners.T).T[:, :3]
    return mm.min(0), mm.max(0)


def model_grid(grid: int | Sequence[int]) -> ModelGrid:
    """The model grid: isotropic voxels covering the MNI brain's bounding box, centred on it.

    The voxel size is the smallest that fits the box of the MNI152 brain mask (2 mm) on every axis:
    32^3 -> 5.625 mm, 64^3 -> 2.8125 mm (the box is 146 x 180 x 156 mm).
    """
    shape = grid_shape(grid)
    lo, hi = _voxel_box_mm(*_mni_mask())
    voxel = float(np.max((hi - lo) / np.array(shape)))
    centre = (lo + hi) / 2.0
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = centre - voxel * (np.array(shape) - 1) / 2.0
    return ModelGrid(affine, shape)


def _antialias_sigma(src_affine: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Gaussian sigma (source voxels, per axis) whose FWHM is one target voxel, less the source voxel.

    A target voxel averages ``r = target / source`` source voxels along an axis; a Gaussian of FWHM
    ``sqrt(r^2 - 1)`` (the source voxel's own extent subtracted in quadrature) approximates that area
    average and removes the frequencies the coarser grid cannot hold. No smoothing when upsampling.
    """
    src_vox = np.linalg.norm(src_affine[:3, :3], axis=0)
    ratio = voxel_mm / src_vox
    return np.sqrt(np.clip(ratio**2 - 1.0, 0.0, None)) * _FWHM_TO_SIGMA


def _grid_coords(mg: ModelGrid, src_affine: np.ndarray) -> np.ndarray:
    """Source voxel coordinates (3, D*H*W) of the model grid's voxel centres."""
    ijk = np.indices(mg.shape, dtype=np.float64).reshape(3, -1)
    vox2vox = np.linalg.inv(src_affine) @ mg.affine
    return vox2vox[:3, :3] @ ijk + vox2vox[:3, 3:4]


def _smooth_sample(data: np.ndarray, weights: np.ndarray, src_affine: np.ndarray,
                   mg: ModelGrid) -> tuple[np.ndarray, np.ndarray]:
    """Weighted (normalised-convolution) anti-aliased resampling of a 3D array onto the model grid.

    ``data`` and ``weights`` (X, Y, Z) are on the source grid (``src_affine``: voxel -> mm). Returns
    ``(values, support)``, both (D, H, W) float32: ``values = G*(w x) / G*w`` sampled trilinearly, so
    voxels outside the weights (background, NaN) never leak into the brain edge; ``support`` is the
    sampled ``G*w`` (the fraction of the local kernel that had valid data).
    """
    sigma = _antialias_sigma(src_affine, mg.voxel_mm)
    w = weights.astype(np.float32, copy=False)
    num = np.where(w > 0, data, 0.0).astype(np.float32) * w
    if np.any(sigma > 0):
        num = ndimage.gaussian_filter(num, sigma, mode="constant", cval=0.0, truncate=3.0)
        w = ndimage.gaussian_filter(w, sigma, mode="constant", cval=0.0, truncate=3.0)
    coords = _grid_coords(mg, src_affine)
    num_g = ndimage.map_coordinates(num, coords, order=1, mode="constant", cval=0.0)
    den_g = ndimage.map_coordinates(w, coords, order=1, mode="constant", cval=0.0)
    values = np.divide(num_g, den_g, out=np.zeros_like(num_g), where=den_g > 1e-6)
    return values.reshape(mg.shape).astype(np.float32), den_g.reshape(mg.shape).astype(np.float32)


@lru_cache(maxsize=8)
def _grid_mask_cached(shape: tuple[int, int, int]) -> np.ndarray:
    mask, affine = _mni_mask()
    mg = model_grid(shape)
    frac, _ = _smooth_sample(mask.astype(np.float32), np.ones(mask.shape, np.float32), affine, mg)
    out = frac >= 0.5
    out.setflags(write=False)
    return out


def grid_mask(grid: int | Sequence[int]) -> np.ndarray:
    """MNI brain mask on the model grid, (D, H, W) bool: voxels at least half inside the 2 mm mask."""
    return _grid_mask_cached(grid_shape(grid))


def _template_weights(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The MNI brain mask on a source grid (X, Y, Z) float32 (nearest neighbour when grids differ)."""
    mask, m_aff = _mni_mask()
    if tuple(shape) == mask.shape and np.allclose(affine, m_aff, atol=1e-4):
        return mask.astype(np.float32)
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    vox2vox = np.linalg.inv(m_aff) @ affine
    coords = vox2vox[:3, :3] @ ijk + vox2vox[:3, 3:4]
    out = ndimage.map_coordinates(mask.astype(np.float32), coords, order=0, mode="constant", cval=0.0)
    return out.reshape(shape)


def _load_map(img: nib.Nifti1Image | str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(data (X, Y, Z) float32, affine) of a 3D map (a trailing singleton 4th axis is dropped)."""
    if not isinstance(img, nib.spatialimages.SpatialImage):
        img = nib.load(str(img))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D map, got shape {data.shape}")
    return data, np.asarray(img.affine, dtype=np.float64)


def resample_to_grid(img: nib.Nifti1Image | str | Path, grid: int | Sequence[int]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Resample one MNI-space 3D map onto the model grid, inside the MNI brain mask.

    Anti-aliased (Gaussian of one target voxel FWHM, then trilinear) and restricted to source voxels
    inside the MNI brain mask with finite values (normalised convolution). Returns ``(values,
    valid)``: (D, H, W) float32 map in the input's units, zero where not valid, and the (D, H, W) bool
    voxels that are in the grid brain mask with at least ``MIN_SUPPORT`` of valid source weight.
    """
    mg = model_grid(grid)
    data, affine = _load_map(img)
    weights = _template_weights(data.shape, affine) * np.isfinite(data)
    values, support = _smooth_sample(np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0), weights,
                                     affine, mg)
    valid = grid_mask(mg.shape) & (support >= MIN_SUPPORT)
    values[~valid] = 0.0
    return values, valid


def robust_zscore(values: np.ndarray, valid: np.ndarray, clip: float = ZSCORE_CLIP
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """Per-subject robust z-score of one channel: ``(x - median) / (1.4826 * MAD)`` inside ``valid``.

    Statistics come from this map's ``valid`` voxels only (no other subject). Clipped to
    ``[-clip, clip]``, zero outside ``valid``. If the MAD is 0 (over half the voxels equal) the standard
    deviation is used; a constant map gives zeros. Returns ``(z (D, H, W) float32, stats)`` with stats
    ``median``, ``scale`` (input units), ``n_voxels``, ``clipped_fraction``.
    """
    v = values[valid].astype(np.float64)
    if v.size == 0:
        return np.zeros(values.shape, np.float32), {"median": 0.0, "scale": 0.0, "n_voxels": 0,
                                                     "clipped_fraction": 0.0}
    med = float(np.median(v))
    scale = MAD_TO_SD * float(np.median(np.abs(v - med)))
    if not scale > 0:
        scale = float(v.std())
    z = np.zeros(values.shape, np.float32)
    if scale > 0:
        zv = (v - med) / scale
        clipped = float(np.mean(np.abs(zv) > clip))
        z[valid] = np.clip(zv, -clip, clip)
    else:
        clipped = 0.0
    return z, {"median": med, "scale": scale, "n_voxels": int(v.size), "clipped_fraction": clipped}


def normalise_map(img: nib.Nifti1Image | str | Path, grid: int | Sequence[int], clip: float = ZSCORE_CLIP
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """``resample_to_grid`` then ``robust_zscore``: the (D, H, W) float32 channel the cache stores."""
    values, valid = resample_to_grid(img, grid)
    return robust_zscore(values, valid, clip)
