"""QC figures (PNG) for every preprocessing stage, in the spirit of fMRIPrep's reports.

- ``plot_mask_outline``: a brain (or any) mask outlined in red over its image;
- ``plot_registration_edges``: edges (iso-intensity contours) of a template drawn over an image moved
  onto the template's grid, so misalignment shows as edges off the anatomy;
- ``plot_map_slices``: parametric maps (FA/MD, fALFF/ReHo, ...) on a few slices with colour bars;
- ``plot_motion``: realignment parameters (mm, degrees) and framewise displacement over time.

Every function checks its inputs first and raises ``ValueError`` naming the problem (mismatched grids,
empty mask, missing columns) rather than writing an empty or misleading figure; each writes one PNG
(parents created) and returns its path. Slices are shown in RAS orientation (images are reoriented to
the closest canonical axes first): axial and coronal with the subject's right on the image's right
("neurological"), sagittal with anterior to the right.

Slices are drawn as mosaics: the slices of one row are tiled with numpy into one array (blank, NaN, gaps
between tiles) shown by ONE ``imshow`` on ONE axes, outlines/edges by ONE ``contour`` on the tiled mask or
template, and the slice labels as text at the tile positions (``plot_map_slices``, whose rows mix the
three views, places one strip image per view in millimetres on the row's one axes). Rendering cost is
per axes and per artist, not per pixel: with one axes per slice (18 axes, each with image, contour and
ticks) a figure cost 0.29-0.42 CPU s, as mosaics 0.16-0.22 s (data preparation included), and six
figures per subject add up over cohorts of hundreds of subjects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

# Figure objects render with the Agg canvas without pyplot: no display needed on cluster nodes, no
# global backend switch, and no figure registry to leak memory across many subjects.
from matplotlib.figure import Figure
from scipy import ndimage

from neuromoe.preproc.masks import otsu_threshold

if TYPE_CHECKING:  # pandas costs ~0.25 CPU s to import; the anat stage's figures never need it
    import pandas as pd

MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
VIEWS = ("axial", "coronal", "sagittal")
DPI = 100


# ---------------------------------------------------------------- public figures

def plot_mask_outline(t1: nib.Nifti1Image, mask: nib.Nifti1Image, out_png: str | Path, title: str,
                      n_slices: int = 6) -> str:
    """Red outline of ``mask`` over ``t1`` (same grid), ``n_slices`` slices per view in 3 rows."""
    img, msk = _canonical(_as3d(t1, "t1")), _canonical(_as3d(mask, "mask"))
    _same_grid(img, msk, "t1", "mask")
    m = np.asarray(msk.dataobj) > 0
    if not m.any():
        raise ValueError("plot_mask_outline: the mask is empty; nothing to outline.")
    data = np.asarray(img.dataobj, dtype=np.float32)
    vmin, vmax = _robust_range(data[m] if m.sum() > 10 else data)
    zooms = img.header.get_zooms()[:3]
    fig = _contour_rows(data, m.astype(np.float32), [0.5], ["red"], 1.0, m, (vmin, vmax), zooms, n_slices)
    return _save(fig, out_png, title)


def plot_registration_edges(template: nib.Nifti1Image, moved: nib.Nifti1Image, out_png: str | Path,
                            title: str, n_slices: int = 6) -> str:
    """Contours of ``template`` (two intensity levels: brain outline and the grey/white boundary)
    over ``moved`` (already resampled to the template's grid), ``n_slices`` slices per view."""
    tpl, mov = _canonical(_as3d(template, "template")), _canonical(_as3d(moved, "moved"))
    _same_grid(tpl, mov, "template", "moved")
    t = np.asarray(tpl.dataobj, dtype=np.float32)
    d = np.asarray(mov.dataobj, dtype=np.float32)
    if float(np.ptp(t)) <= 0 or float(np.ptp(d)) <= 0:
        raise ValueError("plot_registration_edges: template or moved image is constant; nothing to show.")
    t = ndimage.gaussian_filter(t, 0.7)  # contours of a smooth image, not of voxel noise
    fg = t > 0.1 * float(t.max())
    # Levels: the brain outline (low) and, for T1-like templates, the grey/white boundary: Otsu splits
    # CSF from tissue, a second Otsu on the tissue splits grey from white matter.
    tissue = t[fg][t[fg] > otsu_threshold(t[fg])]
    inner = otsu_threshold(tissue) if tissue.size > 100 else otsu_threshold(t[fg])
    levels = sorted({float(np.percentile(t[fg], 5)), inner})
    vmin, vmax = _robust_range(d[d > 0] if (d > 0).sum() > 10 else d)
    zooms = tpl.header.get_zooms()[:3]
    colors = ["#ff4040", "#40c0ff"][: len(levels)]
    fig = _contour_rows(d, t, levels, colors, 0.8, fg, (vmin, vmax), zooms, n_slices)
    return _save(fig, out_png, title)


def _contour_rows(background: np.ndarray, lines: np.ndarray, levels: list[float], colors: list[str],
                  linewidth: float, where: np.ndarray, vrange: tuple[float, float], zooms: Sequence[float],
                  n_slices: int) -> Figure:
    """One mosaic row per view: ``n_slices`` slices (placed by ``where``) of ``background`` in grey, with the
    ``levels`` contours of ``lines`` over them and each tile labelled."""
    fig = _view_rows_figure(n_slices)
    for r, view in enumerate(VIEWS):
        ks = _slice_positions(where, r, n_slices)
        ax = fig.add_subplot(3, 1, r + 1)
        tiles, x0s = _mosaic([_slice(background, view, k) for k in ks])
        ax.imshow(tiles, cmap="gray", vmin=vrange[0], vmax=vrange[1], origin="lower",
                  aspect=_aspect(view, zooms), interpolation="nearest")
        contour, _ = _mosaic([_slice(lines, view, k) for k in ks])
        if _crosses(contour, levels):
            ax.contour(contour, levels=levels, colors=colors, linewidths=linewidth)
        _label_tiles(ax, view, ks, x0s, 0.0, tiles.shape[1] / len(ks), tiles.shape[0])
    return fig


def plot_map_slices(maps: Mapping[str, nib.Nifti1Image], out_png: str | Path, title: str,
                    mask: nib.Nifti1Image | None = None, n_slices: int = 3) -> str:
    """One row per map: ``n_slices`` axial, coronal and sagittal slices, each row with its colour bar.

    All maps must share one grid. Colour range: 2nd-98th percentile of the map's nonzero voxels (inside
    ``mask`` when given), so one hot voxel does not wash the map out.
    """
    if not maps:
        raise ValueError("plot_map_slices: no maps given.")
    names = list(maps)
    imgs = {n: _canonical(_as3d(maps[n], n)) for n in names}
    first = imgs[names[0]]
    for n in names[1:]:
        _same_grid(first, imgs[n], names[0], n)
    msk = None
    if mask is not None:
        mimg = _canonical(_as3d(mask, "mask"))
        _same_grid(first, mimg, names[0], "mask")
        msk = np.asarray(mimg.dataobj) > 0
    datas = {n: np.asarray(imgs[n].dataobj, dtype=np.float32) for n in names}
    support = msk if msk is not None else np.any([np.abs(d) > 0 for d in datas.values()], axis=0)
    if not support.any():
        raise ValueError("plot_map_slices: every map is zero; nothing to show.")
    zooms = first.header.get_zooms()[:3]
    ncol = 3 * n_slices
    height = 2.0 * len(names) + 0.6
    fig = Figure(figsize=(1.7 * ncol + 1.0, height), dpi=DPI)
    fig.subplots_adjust(left=0.03, right=0.97, bottom=0.02, top=1 - 0.45 / height, hspace=0.08)
    positions = [_slice_positions(support, v, n_slices) for v in range(len(VIEWS))]
    for r, name in enumerate(names):
        d = datas[name]
        vals = d[support & np.isfinite(d)]
        vmin, vmax = _robust_range(vals if vals.size else d[np.isfinite(d)])
        ax = fig.add_subplot(len(names), 1, r + 1)
        # The three views differ in slice shape (and, for anisotropic voxels, in pixel aspect): one strip
        # image per view, placed side by side in millimetres (extent), so one axes holds the whole row.
        strips = [_mosaic([_slice(d, view, k) for k in ks]) for view, ks in zip(VIEWS, positions, strict=True)]
        sizes = [_pixel_mm(view, zooms) for view in VIEWS]
        top = max(tiles.shape[0] * zv for (tiles, _), (_, zv) in zip(strips, sizes, strict=True))
        x, zh, im = 0.0, 1.0, None
        for view, ks, (tiles, x0s), (zh, zv) in zip(VIEWS, positions, strips, sizes, strict=True):
            h, w = tiles.shape[0] * zv, tiles.shape[1] * zh
            y = (top - h) / 2
            im = ax.imshow(tiles, cmap="viridis", vmin=vmin, vmax=vmax, origin="lower",
                           extent=(x, x + w, y, y + h), interpolation="nearest")
            _label_tiles(ax, view, ks, [x + x0 * zh for x0 in x0s], y, w / len(ks), h)
            x += w + 6 * zh
        ax.set_xlim(0, x - 6 * zh)
        ax.set_ylim(0, top)
        ax.set_aspect("equal")
        ax.text(-0.005, 0.5, name, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    return _save(fig, out_png, title)


def plot_motion(params_df: pd.DataFrame, out_png: str | Path, title: str,
                fd: Sequence[float] | np.ndarray | pd.Series | None = None) -> str:
    """Translations (mm), rotations (degrees; the table holds radians) and, if given, framewise
    displacement (mm) against volume index. ``params_df`` has fMRIPrep's columns
    trans_x/y/z (mm) and rot_x/y/z (radians), one row per volume."""
    missing = [c for c in MOTION_COLUMNS if c not in params_df.columns]
    if missing:
        raise ValueError(f"plot_motion: params_df lacks columns {missing}; needs {list(MOTION_COLUMNS)}.")
    if len(params_df) < 2:
        raise ValueError(f"plot_motion: {len(params_df)} row(s); a motion trace needs at least 2 volumes.")
    p = params_df[list(MOTION_COLUMNS)].to_numpy(dtype=float)
    if not np.all(np.isfinite(p)):
        raise ValueError("plot_motion: params_df holds NaN or infinite values.")
    fd_arr = None
    if fd is not None:
        fd_arr = np.asarray(fd, dtype=float)
        if fd_arr.shape != (len(params_df),):
            raise ValueError(f"plot_motion: fd has shape {fd_arr.shape}, expected ({len(params_df)},).")
    x = np.arange(len(params_df))
    nrow = 3 if fd_arr is not None else 2
    fig = Figure(figsize=(9, 2.2 * nrow + 0.5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot(nrow, 1, 1)
    for i, c in enumerate(MOTION_COLUMNS[:3]):
        ax.plot(x, p[:, i], label=c, lw=1.0)
    ax.set_ylabel("translation (mm)")
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    ax = fig.add_subplot(nrow, 1, 2, sharex=ax)
    for i, c in enumerate(MOTION_COLUMNS[3:]):
        ax.plot(x, np.rad2deg(p[:, 3 + i]), label=c, lw=1.0)
    ax.set_ylabel("rotation (deg)")
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    if fd_arr is not None:
        ax = fig.add_subplot(nrow, 1, 3, sharex=ax)
        ax.plot(x, np.nan_to_num(fd_arr), color="k", lw=1.0,
                label=f"FD: mean {np.nanmean(fd_arr):.3f} mm, max {np.nanmax(fd_arr):.3f} mm")
        ax.set_ylabel("FD (mm)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("volume")
    return _save(fig, out_png, title)


# ---------------------------------------------------------------- helpers

def _as3d(img: nib.Nifti1Image, name: str) -> nib.Nifti1Image:
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise ValueError(f"{name}: expected a nibabel image, got {type(img).__name__}.")
    if img.ndim == 4 and img.shape[3] == 1:
        return nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine)
    if img.ndim != 3:
        raise ValueError(f"{name}: expected a 3D image, got shape {img.shape}.")
    return img


def _canonical(img: nib.Nifti1Image) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(img.dataobj), img.affine))


def _same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, na: str, nb: str) -> None:
    if a.shape[:3] != b.shape[:3]:
        raise ValueError(f"{na} has shape {a.shape[:3]} but {nb} has {b.shape[:3]}; resample {nb} onto "
                         f"{na}'s grid first.")
    if not np.allclose(a.affine, b.affine, atol=1e-3):
        raise ValueError(f"{na} and {nb} have the same shape but different affines; they are not on one "
                         "grid (resample first).")


def _slice(data: np.ndarray, view: str, k: int) -> np.ndarray:
    """2D slice for imshow(origin='lower'): rows = vertical screen axis."""
    if view == "axial":
        return data[:, :, k].T  # x right, y (anterior) up
    if view == "coronal":
        return data[:, k, :].T  # x right, z up
    return data[k, :, :].T  # y (anterior) right, z up


def _aspect(view: str, zooms: Sequence[float]) -> float:
    zh, zv = _pixel_mm(view, zooms)
    return zv / zh


def _pixel_mm(view: str, zooms: Sequence[float]) -> tuple[float, float]:
    """(horizontal, vertical) size in mm of one pixel of ``_slice(data, view, k)``."""
    zx, zy, zz = (float(z) for z in zooms)
    return {"axial": (zx, zy), "coronal": (zx, zz), "sagittal": (zy, zz)}[view]


def _mosaic(slices: Sequence[np.ndarray], gap: int = 2) -> tuple[np.ndarray, list[int]]:
    """Slices of one shape side by side in one float array, ``gap`` NaN columns between them (drawn blank
    by imshow, no contour through them); also the first column of each tile."""
    h, w = slices[0].shape
    out = np.full((h, len(slices) * (w + gap) - gap), np.nan, dtype=np.float32)
    x0s = [c * (w + gap) for c in range(len(slices))]
    for x0, sl in zip(x0s, slices, strict=True):
        out[:, x0:x0 + w] = sl
    return out, x0s


def _crosses(values: np.ndarray, levels: Sequence[float]) -> bool:
    """Whether any contour level lies inside the finite range of ``values`` (contour warns otherwise)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return False
    lo, hi = float(finite.min()), float(finite.max())
    return any(lo < lev < hi for lev in levels)


def _view_rows_figure(n_slices: int) -> Figure:
    """Figure for 3 rows (axial, coronal, sagittal), each one mosaic axes of ``n_slices`` tiles."""
    fig = Figure(figsize=(2.0 * n_slices, 6.4), dpi=DPI)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, hspace=0.06)
    return fig


def _slice_positions(support: np.ndarray, view_index: int, n: int) -> list[int]:
    """``n`` slice indices spread over the extent of ``support`` along the view's axis."""
    axis = {0: 2, 1: 1, 2: 0}[view_index]
    other = tuple(a for a in range(3) if a != axis)
    idx = np.flatnonzero(np.any(support, axis=other))
    if idx.size == 0:
        idx = np.arange(support.shape[axis])
    lo, hi = idx[0], idx[-1]
    # Inner positions only: the extreme slices hold a few voxels of partial volume.
    return [int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]]


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [2, 98])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def _label_tiles(ax: object, view: str, ks: Sequence[int], x0s: Sequence[float], y0: float, tile_w: float,
                 tile_h: float) -> None:
    """No axis (ticks are costly to build even when empty); the label ("a 36": view initial and slice
    index) at each tile's lower left."""
    ax.set_axis_off()
    for x0, k in zip(x0s, ks, strict=True):
        ax.text(x0 + 0.02 * tile_w, y0 + 0.02 * tile_h, f"{view[0]} {k}", color="yellow", fontsize=7,
                va="bottom")


def _save(fig: Figure, out_png: str | Path, title: str) -> str:
    out = Path(out_png)
    if out.suffix.lower() != ".png":
        raise ValueError(f"QC figures are PNG; got {out.name}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.suptitle(title, fontsize=11)
    # zlib level 3 instead of 6: a third less encoding time for ~1% larger files.
    fig.savefig(out, dpi=DPI, facecolor="white", pil_kwargs={"compress_level": 3})
    return str(out)
