"""Binary-mask building blocks shared by the stages and the QC figures: Otsu's threshold, the head mask of a
T1w, the largest connected component. numpy/scipy only (no SimpleITK), so importing it is cheap."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (maximises the between-class variance of its ``nbins`` histogram)."""
    h, edges = np.histogram(values, bins=nbins)
    mids = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(h)
    w1 = w0[-1] - w0
    s0 = np.cumsum(h * mids)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    return float(mids[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (bool, same shape); ``mask`` itself when it has <= 1."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def epi_mask(mean: np.ndarray, lower_cutoff: float = 0.2, upper_cutoff: float = 0.85, opening: int = 2
             ) -> np.ndarray:
    """Brain mask (bool, same shape) of a mean EPI volume: nilearn's ``compute_epi_mask`` with its defaults
    (Nichols' histogram method), the same steps in the same order, so the same mask (tested against it).

    The mean is smoothed by a Gaussian of 1 voxel FWHM; the threshold is the midpoint of the largest jump
    between consecutive sorted intensities within the ``lower_cutoff``-``upper_cutoff`` fractions; then an
    erosion of ``opening`` iterations, the largest component, a dilation of ``2 * opening`` and an erosion of
    ``opening``. Here rather than imported from nilearn: ``nilearn.masking`` imports scikit-learn and
    scipy.stats, ~1.4 CPU s of every func job for a few milliseconds of work.
    """
    arr = np.array(mean, dtype=np.result_type(mean.dtype, np.float32))  # a copy; floats keep their precision
    arr[~np.isfinite(arr)] = 0.0
    for axis in range(arr.ndim):
        ndimage.gaussian_filter1d(arr, 1.0 / np.sqrt(8 * np.log(2)), output=arr, axis=axis)
    values = np.sort(arr.ravel())
    lo = int(np.floor(lower_cutoff * len(values)))
    hi = min(int(np.floor(upper_cutoff * len(values))), len(values) - 1)
    jump = int(np.argmax(values[lo + 1:hi + 1] - values[lo:hi]))
    mask = arr >= 0.5 * (values[jump + lo] + values[jump + lo + 1])
    if opening:
        mask = ndimage.binary_erosion(mask, iterations=opening)
    if mask.any():
        mask = largest_component(mask)
    if opening:
        mask = ndimage.binary_erosion(ndimage.binary_dilation(mask, iterations=2 * opening), iterations=opening)
    return mask.astype(bool)


def head_mask(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Boolean (X, Y, Z) mask of the head in a T1w array: everything inside the scalp, background excluded.

    Background threshold = half of Otsu's on the smoothed image (dark skull and CSF stay in), largest component,
    closing, holes filled slice by slice along the axis closest to superior (the skull is a closed ring in each
    axial slice even where the field of view cuts the neck), then in 3D.
    """
    smooth = ndimage.gaussian_filter(data, 1.0)
    thr = 0.5 * otsu_threshold(smooth[smooth > 0]) if np.any(smooth > 0) else 0.0
    fg = smooth > thr
    fg = largest_component(ndimage.binary_opening(fg, iterations=1)) if fg.any() else fg
    # Pad so the closing's erosion does not eat slices where the head touches the field of view.
    fg = ndimage.binary_closing(np.pad(fg, 2), iterations=2)[2:-2, 2:-2, 2:-2]
    # The skull ring is closed in each axial slice even where the neck leaves the field of view.
    zaxis = int(np.argmax(np.abs(affine[2, :3])))
    filled = np.zeros_like(fg)
    for k in range(fg.shape[zaxis]):
        sl = [slice(None)] * 3
        sl[zaxis] = k
        filled[tuple(sl)] = ndimage.binary_fill_holes(fg[tuple(sl)])
    return ndimage.binary_fill_holes(filled)
