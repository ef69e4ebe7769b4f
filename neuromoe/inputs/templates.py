"""The MNI152 template, its tissue maps and the named regions where the synthetic cohort plants effects.

Everything comes from the files nilearn ships (no download): the ICBM 2009a nonlinear symmetric T1
template at 2 mm (99 x 117 x 95 voxels, RAS, origin at the anterior commissure; space label
``neuromoe.MNI_SPACE``), its brain mask, and its grey- and white-matter probability maps and masks.
The shipped T1 is brain-only (skull-stripped, zero outside the brain mask), so the head around it
(skull, scalp) is built by :mod:`neuromoe.inputs.synth_images`.

Loaders are cached (one load per process; on disk across processes, ``nilearn_image``) and return images
whose arrays are read-only, so one caller cannot change what the next one sees.

Regions (``Roi``) are bilateral spheres in MNI mm, each tied to one modality (``anat``, ``dwi``,
``func``), one role (``A``: the Parkinson's disease region, ``B``: the isolated REM sleep behaviour
disorder region) and one tissue (``gm`` or ``wm``). Radius 14 mm so that a region still covers a few
voxels of a 32^3 model grid (about 5 mm voxels) after resampling. ``ROIS`` are the demo cohort's six;
other cohort designs draw their own (``neuromoe.inputs.synth_plan.CohortDesign``). :func:`roi_mask` puts a
region (a ``Roi``, or the name of a demo region) on any grid: an MNI-space grid, or a subject's native grid
when given the native-world -> MNI transform.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from neuromoe import MNI_SPACE

__all__ = ["MNI_SPACE", "ROIS", "Roi", "brain_mask", "csf_probability", "effect_rois", "gm_mask",
           "gm_probability", "mni_t1", "nilearn_image", "roi_mask", "roi_weight", "sphere_weight",
           "template_cache_dir", "tissue_on_grid", "wm_mask", "wm_probability"]

TEMPLATE_VOXEL_MM = 2.0


def _frozen(img: nib.Nifti1Image, dtype: type) -> nib.Nifti1Image:
    data = np.asarray(img.get_fdata(dtype=np.float32), dtype=dtype)
    data.setflags(write=False)
    out = nib.Nifti1Image(data, img.affine.copy())
    out.header.set_xyzt_units("mm")
    return out


def template_cache_dir() -> Path:
    """Where the 2 mm template copies live: ``$NEUROMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/neuromoe``, else
    ``~/.cache/neuromoe``; one folder per nilearn version under ``templates/``."""
    import nilearn  # the package's top level only (milliseconds), for its version

    root = os.environ.get("NEUROMOE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                        "neuromoe")
    return Path(root) / "templates" / f"nilearn-{nilearn.__version__}"


def nilearn_image(loader: str) -> nib.Nifti1Image:
    """``nilearn.datasets.<loader>(resolution=2)`` (e.g. ``load_mni152_template``), from a copy on disk.

    Importing nilearn.datasets and resampling its 1 mm files costs 2-3 s, once in every Snakemake job that
    needs a template; the copy (``template_cache_dir()``: the array as .npy, affine and dtype in a JSON; no
    pickle) is read in milliseconds. It is written on first use, atomically, per nilearn version; one that
    does not match its JSON is rewritten, and an unwritable cache folder only costs the time.
    """
    try:
        folder = template_cache_dir()
    except (RuntimeError, KeyError, OSError):  # no home folder to resolve: no copy, the image from nilearn
        folder = None
    if folder is not None:
        try:
            meta = json.loads((folder / f"{loader}.json").read_text())
            data = np.load(folder / f"{loader}.npy", allow_pickle=False)
            if list(data.shape) == meta["shape"] and str(data.dtype) == meta["dtype"]:
                return nib.Nifti1Image(data, np.asarray(meta["affine"], dtype=np.float64))
        except (OSError, ValueError, KeyError):
            pass  # absent or damaged: computed again below
    from nilearn import datasets  # about a second to import; most of the package never needs it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn warns about future keyword changes; not ours to fix
        img = getattr(datasets, loader)(resolution=2)
    data, affine = np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
    if folder is not None:
        meta = {"loader": loader, "resolution_mm": 2, "shape": list(data.shape), "dtype": str(data.dtype),
                "affine": affine.tolist()}
        try:  # the array first, its JSON last: a reader takes the pair only once both are whole
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{loader}.{os.getpid()}.tmp.npy"
            np.save(tmp, data, allow_pickle=False)
            os.replace(tmp, folder / f"{loader}.npy")
            tmp = folder / f".{loader}.{os.getpid()}.tmp.json"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, folder / f"{loader}.json")
        except OSError:
            pass  # a read-only cache folder: no copy, the same image
    return nib.Nifti1Image(data, affine)


@lru_cache(maxsize=1)
def mni_t1() -> nib.Nifti1Image:
    """MNI152 2009a symmetric T1 template, brain-only, 2 mm, (99, 117, 95) float32 in [0, 1] (WM about 0.87)."""
    return _frozen(nilearn_image("load_mni152_template"), np.float32)


@lru_cache(maxsize=1)
def brain_mask() -> nib.Nifti1Image:
    """Brain mask of the template (uint8 0/1), same 2 mm grid; includes the CSF just around the brain."""
    return _frozen(nilearn_image("load_mni152_brain_mask"), np.uint8)


@lru_cache(maxsize=1)
def gm_probability() -> nib.Nifti1Image:
    """Grey-matter probability in [0, 1] (float32), 2 mm template grid; zero outside the brain mask."""
    img = nilearn_image("load_mni152_gm_template")
    data = np.clip(img.get_fdata(dtype=np.float32), 0, 1) * (brain_mask().get_fdata(dtype=np.float32) > 0)
    return _frozen(nib.Nifti1Image(data, img.affine), np.float32)


@lru_cache(maxsize=1)
def wm_probability() -> nib.Nifti1Image:
    """White-matter probability in [0, 1] (float32), 2 mm template grid; zero outside the brain mask."""
    img = nilearn_image("load_mni152_wm_template")
    data = np.clip(img.get_fdata(dtype=np.float32), 0, 1) * (brain_mask().get_fdata(dtype=np.float32) > 0)
    return _frozen(nib.Nifti1Image(data, img.affine), np.float32)


@lru_cache(maxsize=1)
def csf_probability() -> nib.Nifti1Image:
    """CSF probability: what the brain mask holds that is neither GM nor WM (1 - GM - WM, clipped), float32."""
    g = gm_probability().get_fdata(dtype=np.float32)
    w = wm_probability().get_fdata(dtype=np.float32)
    m = brain_mask().get_fdata(dtype=np.float32) > 0
    return _frozen(nib.Nifti1Image(np.clip(1.0 - g - w, 0, 1) * m, mni_t1().affine), np.float32)


@lru_cache(maxsize=1)
def gm_mask() -> nib.Nifti1Image:
    """nilearn's grey-matter mask (uint8 0/1) on the 2 mm template grid."""
    return _frozen(nilearn_image("load_mni152_gm_mask"), np.uint8)


@lru_cache(maxsize=1)
def wm_mask() -> nib.Nifti1Image:
    """nilearn's white-matter mask (uint8 0/1) on the 2 mm template grid."""
    return _frozen(nilearn_image("load_mni152_wm_mask"), np.uint8)


@dataclass(frozen=True)
class Roi:
    """A bilateral spherical region in MNI mm, restricted to one tissue.

    ``centres_mm`` holds the right-hemisphere centre and its mirror image (x negated).
    """

    name: str
    modality: str          # anat | dwi | func: the modality in which the synthetic cohort changes it
    role: str              # A (PD region) | B (iRBD region)
    centre_mm: tuple[float, float, float]
    radius_mm: float
    tissue: str            # gm | wm
    description: str

    @property
    def centres_mm(self) -> np.ndarray:
        """(2, 3) centres in MNI mm: right and left."""
        c = np.asarray(self.centre_mm, dtype=float)
        return np.stack([c, c * np.array([-1.0, 1.0, 1.0])])


_R = 14.0
# The demo design's regions (CohortDesign.default()); a drawn design has its own.
ROIS: dict[str, Roi] = {r.name: r for r in [
    Roi("insula", "anat", "A", (38.0, 4.0, 2.0), _R, "gm",
        "anterior insular cortex (synthetic PD atrophy: grey matter partly replaced by CSF)"),
    Roi("lateral_occipital", "anat", "B", (34.0, -84.0, 4.0), _R, "gm",
        "lateral occipital cortex (synthetic iRBD atrophy)"),
    Roi("corona_radiata", "dwi", "A", (26.0, -12.0, 30.0), _R, "wm",
        "superior corona radiata / corticospinal fibres (synthetic PD loss of anisotropy)"),
    Roi("optic_radiation", "dwi", "B", (32.0, -62.0, 6.0), _R, "wm",
        "posterior thalamic / optic radiation (synthetic iRBD loss of anisotropy)"),
    Roi("putamen", "func", "A", (25.0, 3.0, 2.0), _R, "gm",
        "putamen (synthetic PD loss of low-frequency BOLD amplitude)"),
    Roi("posterior_cingulate", "func", "B", (6.0, -50.0, 30.0), _R, "gm",
        "posterior cingulate / precuneus (synthetic iRBD loss of low-frequency BOLD amplitude)"),
]}


def effect_rois(modality: str) -> dict[str, Roi]:
    """The two effect regions of one modality in the demo design: ``{"A": Roi, "B": Roi}``."""
    out = {r.role: r for r in ROIS.values() if r.modality == modality}
    if set(out) != {"A", "B"}:
        raise ValueError(f"unknown modality {modality!r}; known: anat, dwi, func")
    return out


def _grid_mm(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World (mm) coordinates of every voxel centre, (X, Y, Z, 3) float32."""
    ijk = np.indices(shape[:3], dtype=np.float32)
    a = affine.astype(np.float32)
    return np.einsum("ij,j...->...i", a[:3, :3], ijk) + a[:3, 3]


def sphere_weight(centres_mm: np.ndarray, radius_mm: float, affine: np.ndarray, shape: tuple[int, ...],
                  taper_mm: float = 4.0, world_to_mni: np.ndarray | None = None) -> np.ndarray:
    """Soft union of spheres (centres (K, 3) in MNI mm) on a grid, (X, Y, Z) float32 in [0, 1].

    1 within ``radius - taper/2`` mm of a centre, 0 beyond ``radius + taper/2``, linear in between (a soft
    edge, so a region planted on one grid does not alias when resampled to another); ``taper_mm=0``
    gives the hard sphere. ``affine`` maps voxels to world mm; ``world_to_mni`` (4x4) maps that world to
    MNI mm (identity when the grid is already in MNI space).
    """
    xyz = _grid_mm(affine, shape)
    if world_to_mni is not None:
        t = np.asarray(world_to_mni, dtype=np.float32)
        xyz = xyz @ t[:3, :3].T + t[:3, 3]
    centres = np.atleast_2d(np.asarray(centres_mm, dtype=np.float32))
    d = np.min([np.linalg.norm(xyz - c, axis=-1) for c in centres], axis=0)
    if taper_mm <= 0:
        return (d <= radius_mm).astype(np.float32)
    return np.clip((radius_mm + taper_mm / 2 - d) / taper_mm, 0, 1).astype(np.float32)


def roi_weight(region: str | Roi, affine: np.ndarray, shape: tuple[int, ...], taper_mm: float = 4.0,
               world_to_mni: np.ndarray | None = None) -> np.ndarray:
    """Soft bilateral sphere of ``region`` (a ``Roi``, or a demo region's name) on a grid, (X, Y, Z)
    float32 in [0, 1], no tissue restriction (see :func:`sphere_weight`)."""
    roi = _get(region)
    return sphere_weight(roi.centres_mm, roi.radius_mm, affine, shape, taper_mm, world_to_mni)


def _get(name: str | Roi) -> Roi:
    if isinstance(name, Roi):
        return name
    if name not in ROIS:
        raise KeyError(f"unknown region {name!r}; known: {sorted(ROIS)}")
    return ROIS[name]


def tissue_on_grid(tissue: str, like_img: nib.Nifti1Image, world_to_mni: np.ndarray | None = None,
                   within: np.ndarray | None = None) -> np.ndarray:
    """Template tissue probability (``gm``, ``wm`` or ``csf``) on the grid of ``like_img``, (X, Y, Z) float32.

    Sampled at the voxel centres after blurring the 2 mm map to the grid's voxel size (so a 5 mm voxel
    gets the mean probability over its volume, not one 2 mm sample). ``world_to_mni`` as in
    :func:`roi_mask` (for a native grid of a synthetic subject: the inverse of its truth pose).
    ``within`` (bool, X, Y, Z): sample only there (0 elsewhere), much faster for a small region.
    """
    if within is None:
        return _tissue_on_grid(tissue, like_img.affine, like_img.shape[:3], world_to_mni)
    out = np.zeros(like_img.shape[:3], np.float32)
    ijk = np.argwhere(within)
    out[tuple(ijk.T)] = _tissue_at(tissue, like_img.affine, ijk.astype(np.float32), world_to_mni)
    return out


@lru_cache(maxsize=8)
def _blurred(tissue: str, voxel_mm: float) -> np.ndarray:
    """Tissue probability on the 2 mm grid, blurred to a coarser voxel (cached per rounded voxel size)."""
    loaders = {"gm": gm_probability, "wm": wm_probability, "csf": csf_probability}
    if tissue not in loaders:
        raise ValueError(f"unknown tissue {tissue!r}; known: gm, wm, csf")
    prob = loaders[tissue]().get_fdata(dtype=np.float32)
    if voxel_mm > TEMPLATE_VOXEL_MM * 1.2:
        # Gaussian whose FWHM is the extra width of the coarse voxel, in template voxels.
        sigma = np.sqrt(voxel_mm**2 - TEMPLATE_VOXEL_MM**2) / 2.3548 / TEMPLATE_VOXEL_MM
        prob = ndi.gaussian_filter(prob, sigma)
    prob.setflags(write=False)
    return prob


def _tissue_at(tissue: str, affine: np.ndarray, ijk: np.ndarray, world_to_mni: np.ndarray | None) -> np.ndarray:
    """Tissue probability at voxel indices ``ijk`` (N, 3) of a grid with ``affine``, (N,) float32."""
    vox = float(np.mean(np.linalg.norm(affine[:3, :3], axis=0)))
    prob = _blurred(tissue, round(vox, 1))
    m = np.linalg.inv(mni_t1().affine)
    if world_to_mni is not None:
        m = m @ np.asarray(world_to_mni, dtype=float)
    m = m @ affine
    c = ijk @ m[:3, :3].T + m[:3, 3]
    return ndi.map_coordinates(prob, c.T, order=1, cval=0.0, prefilter=False).astype(np.float32)


def _tissue_on_grid(tissue: str, affine: np.ndarray, shape: tuple[int, ...],
                    world_to_mni: np.ndarray | None) -> np.ndarray:
    ijk = np.indices(shape[:3], dtype=np.float32).reshape(3, -1).T
    return _tissue_at(tissue, affine, ijk, world_to_mni).reshape(shape[:3])


def roi_mask(region: str | Roi, like_img: nib.Nifti1Image, tissue: bool = True, threshold: float = 0.5,
             world_to_mni: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask (X, Y, Z) of ``region`` (a ``Roi``, or a demo region's name) on the grid of ``like_img``
    (3D or 4D).

    Voxels whose centre lies inside the region's sphere (hard edge, radius in mm) and, when ``tissue`` is
    true, whose tissue probability (GM or WM as the region says, averaged over the voxel's size) is at
    least ``threshold``. ``like_img`` is in MNI space unless ``world_to_mni`` (4x4, its world mm -> MNI
    mm; for a synthetic subject, the inverse of the truth pose) is given.
    """
    roi = _get(region)
    shape = like_img.shape[:3]
    inside = roi_weight(roi, like_img.affine, shape, taper_mm=0.0, world_to_mni=world_to_mni) > 0
    if tissue:
        ijk = np.argwhere(inside)                     # sample the tissue map only inside the sphere
        keep = _tissue_at(roi.tissue, like_img.affine, ijk.astype(np.float32), world_to_mni) >= threshold
        inside[tuple(ijk[~keep].T)] = False
    return inside
