"""The synthetic cohort's images: a head built around the MNI152 template, and T1w, DWI and BOLD formed from it.

The template nilearn ships is brain-only, so the head is built around it (intracranial volume, CSF, skull
tables, diploe, muscle, fat, skin as layers at fixed mm from the intracranial surface) once per process
on MNI-aligned grids (``build_head_model``). ``make_t1``, ``make_dwi`` and ``make_bold`` then form one
subject's images from its plan (``neuromoe.inputs.synth_plan.SubjectPlan``): the head posed in the
scanner, the plan's effects planted in the regions of the cohort design (``SynthParams.design``), bias
fields, motion, Rician noise; int16 images in LAS scanner-aligned grids. With shape
(``SynthParams.shape_mm`` > 0) each image is sampled through the subject's warp as well
(``neuromoe.inputs.synth_shape``: scanner voxel -> inverse pose and motion -> anatomical point y ->
template point y + w(y), one trilinear interpolation; ``_pull_grid``), else through the pose alone, as
before shape existed (``_resample``). Each draws only from the generator it is given, in a fixed order.
The physics and numbers of each modality are in the cohort README (``neuromoe.inputs.synth``) and
docs/synthetic_cohort.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from neuromoe.inputs import templates as tpl
from neuromoe.inputs.synth_plan import CohortDesign, SubjectPlan, SynthParams, rigid_matrix
from neuromoe.inputs.synth_shape import ShapeWarp, apply_affine, build_shape_model, subject_warp

__all__ = ["build_head_model", "make_bold", "make_dwi", "make_t1"]

# --- tissue properties (relative units unless stated) -------------------------------------------------
T1W = {"wm": 1.0, "gm": 0.74, "csf": 0.32}          # T1w MPRAGE-like contrast, WM = 1
DWI_S0 = {"wm": 1.0, "gm": 1.35, "csf": 3.0}        # b=0 (T2-weighted, TE ~80 ms), WM = 1
WM_EIG = (1.35e-3, 0.375e-3)                        # mm^2/s, axial / radial: FA 0.67, MD 0.70e-3
GM_EIG = (0.85e-3, 0.625e-3)                        # FA 0.18, MD 0.70e-3
CSF_D = 3.0e-3                                       # isotropic, body-temperature water
OTHER_D = 1.0e-3                                     # extracranial soft tissue (fat is suppressed)
EPI = {"wm": 0.78, "gm": 1.0, "csf": 1.35}          # T2*-weighted EPI, GM = 1
T1_RELAX_S = {"wm": 0.85, "gm": 1.35, "csf": 4.0, "other": 1.0}   # longitudinal relaxation at 3 T
# Intensity profile outside the intracranial volume, by distance (mm) from its surface:
# CSF, inner table, diploe, outer table, galea/muscle, fat, skin, air. One row per modality.
_LAYER_D = np.array([0.0, 1.0, 2.0, 3.5, 4.5, 6.0, 7.0, 8.5, 9.5, 10.5, 12.0, 13.0, 14.5, 15.5])
_LAYER_T1 = np.array([.32, .30, .08, .06, .50, .50, .08, .06, .45, .95, .95, .60, .55, 0.0])
_LAYER_EPI = np.array([1.3, 1.0, .05, .05, .20, .20, .05, .05, .30, .12, .12, .30, .30, 0.0])
_LAYER_S0 = np.array([2.8, 2.2, .05, .05, .25, .25, .05, .05, .35, .08, .08, .30, .30, 0.0])
HEAD_MM = float(_LAYER_D[-1])
AIR_MARGIN_MM = 4.0


# --------------------------------------------------------------------------------------------------------
# Template-level head model (built once per process)
# --------------------------------------------------------------------------------------------------------
@dataclass
class _Grid:
    """Channels of the head model on an MNI-aligned grid (RAS, voxel size ``voxel``)."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    ch: dict[str, np.ndarray] = field(default_factory=dict)


_PAD_SLICES = 10      # the template ends at z = -72 mm (medulla); the neck continues below the field of view


@lru_cache(maxsize=1)
def _head2mm() -> _Grid:
    """The head on the 2 mm template grid extended 20 mm downwards: T1w intensity, tissue fractions,
    distance outside the intracranial volume, and the WM structure tensor."""
    brain_img = tpl.brain_mask()
    aff = brain_img.affine.copy()
    aff[2, 3] -= _PAD_SLICES * 2.0

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(np.asarray(a, dtype=np.float32), ((0, 0), (0, 0), (_PAD_SLICES, 0)), mode="edge")

    brain = pad(brain_img.get_fdata(dtype=np.float32)) > 0
    t1 = pad(tpl.mni_t1().get_fdata(dtype=np.float32))
    gm = pad(tpl.gm_probability().get_fdata(dtype=np.float32))
    wm = pad(tpl.wm_probability().get_fdata(dtype=np.float32))
    # Intracranial volume: the brain mask with its gaps closed (the skull does not follow sulci).
    icv = ndi.binary_fill_holes(brain | (ndi.gaussian_filter(brain.astype(np.float32), 2.0) > 0.5))
    tot = gm + wm
    scale = np.where(tot > 1, 1 / np.maximum(tot, 1e-6), 1).astype(np.float32)
    gm, wm = gm * scale * icv, wm * scale * icv
    csf = np.clip(1 - gm - wm, 0, 1) * icv
    dist = ndi.distance_transform_edt(~icv, sampling=2.0).astype(np.float32)
    outside = ~icv

    def layers(values: np.ndarray) -> np.ndarray:
        # Smoothed by half a voxel: the 1-2 mm layers would alias on a 2 mm grid.
        return ndi.gaussian_filter(np.interp(dist, _LAYER_D, values).astype(np.float32) * outside, 0.5)

    wm_ref = float(np.median(t1[(wm > 0.9) & brain]))
    t1_brain = np.where(brain, t1 / wm_ref, T1W["csf"])   # template scaled so WM = 1; CSF in the closed gaps
    ch = {
        "t1": np.where(icv, t1_brain, layers(_LAYER_T1)).astype(np.float32),
        # T1w change per unit of grey matter replaced by CSF (negative): partial volume towards CSF.
        "t1_atrophy": (gm * (T1W["csf"] - T1W["gm"])).astype(np.float32),
        "brain": brain.astype(np.float32),
        "icv": icv.astype(np.float32),
        "head": (dist < HEAD_MM).astype(np.float32),
        # Where the scanner keeps noise: the head and the air within AIR_MARGIN_MM of the skin.
        "support": (dist < HEAD_MM + AIR_MARGIN_MM).astype(np.float32),
        "gm": gm.astype(np.float32), "wm": wm.astype(np.float32), "csf": csf.astype(np.float32),
        "epi_other": layers(_LAYER_EPI), "s0_other": layers(_LAYER_S0),
    }
    # Structure tensor of the smoothed WM map (gradient outer products, smoothed): see _fibre_direction.
    g = np.gradient(ndi.gaussian_filter(wm, 1.0))
    pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    for n, (a, b) in enumerate(pairs):
        ch[f"J{n}"] = ndi.gaussian_filter(g[a] * g[b], 2.0).astype(np.float32)
    return _Grid(aff, brain.shape, ch)


def _to_grid(src: _Grid, voxel: float, names: Iterable[str]) -> _Grid:
    """Resample channels of the 2 mm head onto an MNI-aligned grid of ``voxel`` mm covering the head,
    blurring first so each coarse voxel holds the mean over its volume (partial volume)."""
    head = src.ch["head"] > 0
    ijk = np.argwhere(head)
    lo = ijk.min(0) * 2.0 + src.affine[:3, 3] - voxel
    hi = ijk.max(0) * 2.0 + src.affine[:3, 3] + voxel
    shape = tuple(int(s) for s in np.ceil((hi - lo) / voxel).astype(int) + 1)
    aff = np.diag([voxel, voxel, voxel, 1.0])
    aff[:3, 3] = lo
    m = np.linalg.inv(src.affine) @ aff
    sigma = math.sqrt(max(voxel**2 - 4.0, 0.0)) / 2.3548 / 2.0
    out = _Grid(aff, shape)  # type: ignore[arg-type]
    for n in names:
        a = ndi.gaussian_filter(src.ch[n], sigma) if sigma > 0.1 else src.ch[n]
        out.ch[n] = ndi.affine_transform(a, m[:3, :3], m[:3, 3], output_shape=shape, order=1,
                                         prefilter=False).astype(np.float32)
    return out


def _tensor(e: np.ndarray, eig: tuple[float, float]) -> np.ndarray:
    """Axially symmetric tensors lam_perp I + (lam_par - lam_perp) e e^T as (N, 6): xx yy zz xy xz yz."""
    par, perp = eig
    d = (par - perp) * np.einsum("ni,nj->nij", e, e)
    d[:, [0, 1, 2], [0, 1, 2]] += perp
    return np.stack([d[:, 0, 0], d[:, 1, 1], d[:, 2, 2], d[:, 0, 1], d[:, 0, 2], d[:, 1, 2]], 1).astype(np.float32)


def _fibre_direction(val: np.ndarray, vec: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """WM fibre direction (N, 3) from the structure tensor of the WM map (eigenvalues ``val`` (N, 3)
    ascending, eigenvectors ``vec`` (N, 3, 3) in columns) at MNI points ``xyz`` (N, 3).

    In a tube of WM (two large eigenvalues) the fibres run along the tube: the smallest eigenvector. In a
    sheet (one large eigenvalue) or uniform WM the structure tensor cannot tell the direction within the
    sheet, so an anatomical prior picks it: left-right near the midline above the thalamus (corpus
    callosum), otherwise radiating from the internal capsule (corona radiata, thalamic radiations),
    projected onto the sheet.
    """
    mu = np.maximum(val, 0)
    scale = np.percentile(mu[:, 2], 90) + 1e-12
    mu1 = mu[:, 2] + 0.05 * scale                       # floor: uniform WM behaves like a "sheet" of any plane
    tube = np.clip((mu[:, 1] - mu[:, 0]) / mu1, 0, 1)   # 1: tube, 0: sheet or uniform
    flat = np.clip(1 - mu[:, 2] / (0.05 * scale + mu[:, 2]) * 2, 0, 1)   # 1 where the WM map is uniform
    x, z = xyz[:, 0], xyz[:, 2]
    callosal = np.exp(-((x / 10.0) ** 2)) / (1 + np.exp(-(z - 2.0) / 3.0))
    capsule = np.stack([np.sign(x) * 20.0, np.full_like(x, -10.0), np.zeros_like(x)], 1)
    radial = xyz - capsule
    radial /= np.linalg.norm(radial, axis=1, keepdims=True) + 1e-6
    prior = callosal[:, None] * np.array([1.0, 0.0, 0.0]) + (1 - callosal[:, None]) * radial
    e3, e2, e1 = vec[:, :, 0], vec[:, :, 1], vec[:, :, 2]
    # Project the prior onto span(e3, e2), weighting e2 down in tubes; in uniform WM also onto e1.
    w2 = (1 - tube) + tube * flat
    d = (np.einsum("ni,ni->n", prior, e3)[:, None] * e3
         + (w2 * np.einsum("ni,ni->n", prior, e2))[:, None] * e2
         + (flat * np.einsum("ni,ni->n", prior, e1))[:, None] * e1)
    n = np.linalg.norm(d, axis=1, keepdims=True)
    # Where the prior is (nearly) normal to the sheet, fall back to the tube direction.
    return np.where(n > 0.3, d / np.maximum(n, 1e-6), e3)


@lru_cache(maxsize=4)
def _dwi_grid(voxel: float) -> _Grid:
    """DWI head model on an MNI grid: fractions, extracranial S0, WM and GM tensors (brain voxels)."""
    src = _head2mm()
    g = _to_grid(src, voxel, ["gm", "wm", "csf", "s0_other", "support"] + [f"J{n}" for n in range(6)])
    tissue = (g.ch["gm"] + g.ch["wm"] + g.ch["csf"]) > 0.01
    idx = np.flatnonzero(tissue)
    j = np.stack([g.ch[f"J{n}"].ravel()[idx] for n in range(6)], 1).astype(np.float64)
    mats = np.empty((len(idx), 3, 3))
    for n, (a, b) in enumerate([(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]):
        mats[:, a, b] = mats[:, b, a] = j[:, n]
    val, vec = np.linalg.eigh(mats)                # ascending eigenvalues
    ijk = np.stack(np.unravel_index(idx, g.shape), 1)
    xyz = ijk * voxel + g.affine[:3, 3]
    g.ch["idx"] = idx
    g.ch["d_wm"] = _tensor(_fibre_direction(val, vec, xyz), WM_EIG)
    g.ch["d_gm"] = _tensor(vec[:, :, 2], GM_EIG)   # across the WM boundary: radial in cortex
    for k in list(g.ch):
        if k.startswith("J"):
            del g.ch[k]
    return g


@lru_cache(maxsize=4)
def _bold_grid(voxel: float) -> _Grid:
    return _to_grid(_head2mm(), voxel, ["gm", "wm", "csf", "epi_other", "support"])


@lru_cache(maxsize=1)
def _t1_grid() -> _Grid:
    src = _head2mm()
    return _Grid(src.affine, src.shape, {k: src.ch[k] for k in ("t1", "t1_atrophy", "brain", "support")})


@lru_cache(maxsize=24)
def _region_weights(modality: str, voxel: float, design: CohortDesign) -> dict[str, np.ndarray]:
    """Soft weights (X, Y, Z float32 in [0, 1]) of the design's two regions of ``modality`` on that
    modality's MNI grid (``voxel``: the DWI or BOLD voxel size; ignored for the 2 mm anat grid), by role."""
    g = _t1_grid() if modality == "anat" else _dwi_grid(voxel) if modality == "dwi" else _bold_grid(voxel)
    return {role: tpl.roi_weight(roi, g.affine, g.shape) for role, roi in design.effect_rois(modality).items()}


@lru_cache(maxsize=1)
def _head_points_mm() -> tuple[np.ndarray, np.ndarray]:
    """MNI mm of (a subsample of) head and intracranial voxels, for fields of view; both stop at the
    template's lower edge (z = -72 mm, the medulla), not in the padded neck."""
    src = _head2mm()
    out = []
    for name in ("head", "icv"):
        m = np.zeros(src.shape, bool)
        m[::2, ::2, _PAD_SLICES::2] = src.ch[name][::2, ::2, _PAD_SLICES::2] > 0
        ijk = np.argwhere(m)
        out.append(ijk @ src.affine[:3, :3].T + src.affine[:3, 3])
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------------
def _scanner_grid(pose: np.ndarray, voxel: float, slab: bool, warp: ShapeWarp | None = None
                  ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """LAS diagonal affine and shape of a field of view around the posed head (its anatomy ``warp``ed from
    the template's when given). ``slab``: EPI-like, the slices cover the intracranial volume (plus 8 mm)
    rather than the whole head."""
    head, icv = _head_points_mm()
    if warp is not None:
        head, icv = warp.to_subject(head), warp.to_subject(icv)
    ph = head @ pose[:3, :3].T + pose[:3, 3]
    pi = icv @ pose[:3, :3].T + pose[:3, 3]
    lo, hi = ph.min(0) - 2.0, ph.max(0) + 2.0
    if slab:
        lo[2], hi[2] = pi[:, 2].min() - 6.0, pi[:, 2].max() + 6.0
    else:
        # The T1w stops 20 mm below the brain: the neck leaves the field of view.
        lo[2] = max(lo[2], pi[:, 2].min() - 20.0)
    shape = tuple(int(s) for s in np.ceil((hi - lo) / voxel).astype(int) + 1)
    aff = np.diag([-voxel, voxel, voxel, 1.0])
    aff[:3, 3] = [hi[0], lo[1], lo[2]]
    return aff, shape  # type: ignore[return-value]


def _resample(vol: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, ...],
              world: np.ndarray, out: np.ndarray | None = None,
              boxes: list[tuple[slice, slice, slice]] | None = None) -> np.ndarray:
    """Trilinear resampling of ``vol`` (source grid) onto a destination grid; ``world`` (4x4) maps
    destination world mm to source world mm. Returns dst_shape float32 (0 outside the source), written
    into ``out`` when given. With ``boxes`` only those sub-boxes are computed (the rest is 0)."""
    m = np.linalg.inv(src_affine) @ world @ dst_affine
    if out is None:
        out = np.empty(dst_shape, np.float32)
    if boxes is None:
        ndi.affine_transform(vol, m[:3, :3], m[:3, 3], output_shape=dst_shape, order=1, prefilter=False,
                             cval=0.0, output=out)
        return out
    out[...] = 0
    for box in boxes:
        view = out[box]
        start = np.array([b.start for b in box], dtype=float)
        ndi.affine_transform(vol, m[:3, :3], m[:3, 3] + m[:3, :3] @ start, output_shape=view.shape, order=1,
                             prefilter=False, cval=0.0, output=view)
    return out


_CHUNK = 1 << 20    # destination voxels per pass of _pull_grid (bounds the coordinate arrays: ~50 MB)


def _template_coords(src_affine: np.ndarray, dst_affine: np.ndarray, world: np.ndarray, warp: ShapeWarp,
                     ijk: np.ndarray) -> np.ndarray:
    """(3, N) float32 voxel coordinates on the source (template) grid of destination voxels ``ijk`` (3, N
    float32): ``world`` (4x4) maps destination mm to the subject's anatomy y (MNI-aligned mm, before the
    pose), the warp's inverse maps that to the template, y + w(y) (trilinear in w, exact)."""
    a = world @ dst_affine                                  # destination voxel -> anatomical mm
    s = np.linalg.inv(src_affine)
    cw = apply_affine(np.linalg.inv(warp.affine) @ a, ijk)  # the anatomical points on the warp's grid
    c = apply_affine(s @ a, ijk)                            # their template voxels, were there no warp
    for i in range(3):
        w_i = ndi.map_coordinates(warp.inverse[i], cw, order=1, prefilter=False, cval=0.0, output=np.float32)
        c += s[:3, i:i + 1].astype(np.float32) * w_i
    return c


def _sample(vol: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Trilinear values (N,) float32 of ``vol`` at voxel coordinates (3, N), 0 outside (as _resample)."""
    return ndi.map_coordinates(vol, coords, order=1, prefilter=False, cval=0.0, output=np.float32)


def _pull_grid(vols: list[np.ndarray], src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, ...],
               world: np.ndarray, warp: ShapeWarp, gate: np.ndarray | None = None
               ) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """``_resample`` of ``vols`` (on one source grid) through the subject's warp: destination voxel ->
    ``world`` -> anatomical point y -> template point y + w(y), one trilinear interpolation. With ``gate``
    (a channel on the same source grid) only voxels where it resamples to > 0.5 are computed (the rest is
    0) and that mask is returned first (else None). In slabs of at most ``_CHUNK`` voxels."""
    outs = [np.zeros(dst_shape, np.float32) for _ in vols]
    keep = None if gate is None else np.zeros(dst_shape, bool)
    per = max(1, _CHUNK // (dst_shape[0] * dst_shape[1]))
    for z0 in range(0, dst_shape[2], per):
        zs = slice(z0, min(z0 + per, dst_shape[2]))
        ijk = np.indices((dst_shape[0], dst_shape[1], zs.stop - z0), dtype=np.float32).reshape(3, -1)
        ijk[2] += z0
        c = _template_coords(src_affine, dst_affine, world, warp, ijk)
        if keep is not None:
            sel = (_sample(gate, c) > 0.5).reshape(dst_shape[0], dst_shape[1], -1)
            keep[:, :, zs] = sel
            c = c[:, sel.ravel()]
            for o, v in zip(outs, vols, strict=True):
                o[:, :, zs][sel] = _sample(v, c)
        else:
            for o, v in zip(outs, vols, strict=True):
                o[:, :, zs] = _sample(v, c).reshape(dst_shape[0], dst_shape[1], -1)
    return keep, outs


def _boxes(support: np.ndarray | None, slab: int = 3) -> list[tuple[slice, slice, slice]] | None:
    """Bounding boxes of ``support`` in slabs of ``slab`` slices: resampling only these skips ~25 % of a
    field of view that is air (zeroed anyway)."""
    if support is None:
        return None
    out = []
    for z0 in range(0, support.shape[2], slab):
        s = support[:, :, z0:z0 + slab]
        if not s.any():
            continue
        xi, yi = np.flatnonzero(s.any((1, 2))), np.flatnonzero(s.any((0, 2)))
        out.append((slice(int(xi[0]), int(xi[-1]) + 1), slice(int(yi[0]), int(yi[-1]) + 1),
                    slice(z0, z0 + s.shape[2])))
    return out


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(sum of 2nd-order Legendre products) with log-std ``strength``."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape[:3]]
    polys = [[np.ones_like(a), a, 1.5 * a * a - 0.5] for a in axes]
    log = np.zeros(shape[:3], np.float32)
    for i in range(3):
        for j in range(3 - i):
            for k in range(3 - i - j):
                if i + j + k == 0:
                    continue
                c = np.float32(rng.standard_normal())
                log += c * polys[0][i][:, None, None] * polys[1][j][None, :, None] * polys[2][k][None, None, :]
    sd = float(log.std())
    log *= np.float32(strength / sd if sd > 0 else 0.0)
    return np.exp(log - log.mean())


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator, support: np.ndarray | None) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise (what a magnitude MR image holds), (X, Y, Z[, T]).

    ``support`` (X, Y, Z bool): where the reconstruction keeps noise; elsewhere (air far from the head)
    the image is 0, as vendor reconstructions that mask the background write it. None: everywhere.
    """
    if support is None:
        re = signal + np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
        im = np.float32(sigma) * rng.standard_normal(signal.shape, dtype=np.float32)
        return np.sqrt(re * re + im * im)
    if signal.ndim == 3:
        out = np.zeros_like(signal)
        out[support] = _rician(signal[support], sigma, rng, None)
        return out
    for t in range(signal.shape[3]):     # in place, one volume at a time: a (X, Y, Z) F-ordered block
        v = signal[..., t]
        v[support] = _rician(v[support], sigma, rng, None)
        v[~support] = 0
    return signal


def _support(g: _Grid, p: SynthParams, aff: np.ndarray, shape: tuple[int, ...], pose: np.ndarray,
             warp: ShapeWarp | None = None) -> np.ndarray | None:
    if not p.zero_air:
        return None
    if warp is not None:
        return _pull_grid([], g.affine, aff, shape, np.linalg.inv(pose), warp, gate=g.ch["support"])[0]
    return _resample(g.ch["support"], g.affine, aff, shape, np.linalg.inv(pose)) > 0.5


def _pull_volume(vol: np.ndarray, g: _Grid, aff: np.ndarray, world: np.ndarray, warp: ShapeWarp,
                 ijk: np.ndarray, where: np.ndarray | None, out: np.ndarray) -> None:
    """One volume of a 4D series through the warp into ``out`` (X, Y, Z): the voxels ``ijk`` (3, N), those
    of ``where`` (C order) or all of them (``where`` None)."""
    values = _sample(vol, _template_coords(g.affine, aff, world, warp, ijk))
    if where is None:
        out[...] = values.reshape(out.shape)
    else:
        out[...] = 0
        out[where] = values


def _voxels(where: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """(3, N) float32 indices of the voxels of ``where`` (C order), or of the whole grid when None."""
    if where is None:
        return np.indices(shape[:3], dtype=np.float32).reshape(3, -1)
    return np.stack(np.nonzero(where)).astype(np.float32)


def _to_int16(a: np.ndarray) -> np.ndarray:
    """Round and clip in place (``a`` is a scratch float array), then int16 in the same memory order."""
    np.rint(a, out=a)
    np.clip(a, 0, 32767, out=a)
    return a.astype(np.int16)



# --------------------------------------------------------------------------------------------------------
# Modalities
# --------------------------------------------------------------------------------------------------------
def _loss(weights: Mapping[str, np.ndarray], strengths: Mapping[str, float]) -> np.ndarray | None:
    """Combined fractional change 1 - prod(1 - s_r w_r) over the affected regions (``weights`` by role, from
    ``_region_weights``), or None."""
    keep = 1.0
    any_effect = False
    for role, s in strengths.items():
        if s > 0:
            keep = keep * (1 - np.float32(s) * weights[role])
            any_effect = True
    return (1 - keep).astype(np.float32) if any_effect else None


def make_t1(plan: SubjectPlan, p: SynthParams, rng: np.random.Generator) -> tuple[nib.Nifti1Image, np.ndarray]:
    """T1w image (int16, LAS, ``t1_voxel_mm``) and the truth brain mask on its grid (uint8)."""
    g = _t1_grid()
    t1 = g.ch["t1"]
    loss = _loss(_region_weights("anat", 2.0, p.design), plan.effects["anat"])
    if loss is not None:
        t1 = t1 + loss * g.ch["t1_atrophy"]
    pose = plan.pose
    warp = subject_warp(plan, p)
    aff, shape = _scanner_grid(pose, p.t1_voxel_mm, slab=False, warp=warp)
    inv_pose = np.linalg.inv(pose)
    if warp is None:
        img = _resample(t1, g.affine, aff, shape, inv_pose)
        mask = (_resample(g.ch["brain"], g.affine, aff, shape, inv_pose) >= 0.5).astype(np.uint8)
        support = _support(g, p, aff, shape, pose)
    else:   # one pass: the support, then the image and the mask only there (the brain lies inside it)
        support, (img, brain) = _pull_grid([t1, g.ch["brain"]], g.affine, aff, shape, inv_pose, warp,
                                           gate=g.ch["support"] if p.zero_air else None)
        mask = (brain >= 0.5).astype(np.uint8)
    img *= _bias_field(shape, rng, p.t1_bias) * np.float32(p.t1_scale)
    img = _rician(img, p.t1_scale / p.t1_snr, rng, support)
    return nib.Nifti1Image(_to_int16(img), aff), mask


@lru_cache(maxsize=1)
def _gradient_table(n_b0: int, n_dirs: int) -> tuple[np.ndarray, np.ndarray]:
    """b-values (N,) and unit directions (N, 3) in scanner RAS: ``n_dirs`` well-spread directions of dipy's
    ``small_64D`` table with their measured b-values, b=0 volumes spread through the series."""
    from dipy.data import get_fnames

    _, fbval, fbvec = get_fnames(name="small_64D")
    bvals, bvecs = np.loadtxt(fbval), np.loadtxt(fbvec)
    if bvecs.shape[0] == 3:
        bvecs = bvecs.T
    dw = np.flatnonzero(bvals > 50)
    vec = bvecs[dw] / np.linalg.norm(bvecs[dw], axis=1, keepdims=True)
    # Greedy farthest-point choice (antipodal directions count as the same), deterministic.
    chosen = [0]
    while len(chosen) < n_dirs:
        cos = np.abs(vec @ vec[chosen].T).max(1)
        cos[chosen] = np.inf
        chosen.append(int(np.argmin(cos)))
    dirs, b = vec[chosen], np.rint(bvals[dw][chosen])
    # b=0 at the start and evenly through the series, as scanners interleave them.
    n = n_b0 + n_dirs
    b0_at = {int(round(k * n / n_b0)) for k in range(n_b0)}
    out_b, out_g, k = np.zeros(n), np.zeros((n, 3)), 0
    for i in range(n):
        if i not in b0_at:
            out_b[i], out_g[i] = b[k], dirs[k]
            k += 1
    return out_b, out_g


def _random_walk_motion(rng: np.random.Generator, n: int, step_mm: float, step_deg: float, ref: int,
                        bound_mm: float | None = None, bound_deg: float | None = None) -> np.ndarray:
    """(n, 6) motion parameters (mm, rad): a random walk, zero at volume ``ref``; with bounds, squashed
    smoothly (b tanh(x / b)) so that every value stays strictly inside them without flat clipped runs."""
    steps = rng.standard_normal((n, 6)) * np.array([step_mm] * 3 + [step_deg] * 3)
    walk = np.cumsum(steps, axis=0)
    walk -= walk[ref]
    if bound_mm is not None:
        walk[:, :3] = bound_mm * np.tanh(walk[:, :3] / bound_mm)
    if bound_deg is not None:
        walk[:, 3:] = bound_deg * np.tanh(walk[:, 3:] / bound_deg)
    walk[:, 3:] = np.deg2rad(walk[:, 3:])
    return walk


def make_dwi(plan: SubjectPlan, p: SynthParams, rng: np.random.Generator
              ) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, np.ndarray]:
    """DWI (int16 4D, LAS), bvals (N,), bvecs in voxel axes (3, N), motion (N, 6)."""
    g = _dwi_grid(p.dwi_voxel_mm)
    bvals, gdirs = _gradient_table(p.n_b0, p.n_directions)
    n = len(bvals)
    idx = g.ch["idx"]
    d_wm = g.ch["d_wm"]
    loss = _loss(_region_weights("dwi", p.dwi_voxel_mm, p.design), plan.effects["dwi"])
    if loss is not None:
        e = loss.ravel()[idx][:, None]
        md = d_wm[:, :3].mean(1, keepdims=True)
        iso = np.zeros_like(d_wm)
        iso[:, :3] = md * (1 + p.dwi_md_increase * e)
        # Shrink the anisotropic (deviatoric) part, raise the mean: lower FA, slightly higher MD.
        d_wm = iso + (1 - e) * (d_wm - np.concatenate([md, md, md, 0 * md, 0 * md, 0 * md], 1))
    pose = plan.pose
    motion = _random_walk_motion(rng, n, 0.2, 0.2, ref=0, bound_mm=p.dwi_motion_mm, bound_deg=p.dwi_motion_deg)
    rot_pose = pose[:3, :3]
    # Gradient of volume k in the template frame: the scanner direction seen by the moved, posed head.
    q = np.empty((6, n), np.float32)
    for k in range(n):
        rk = rigid_matrix(motion[k, 3:], motion[k, :3])[:3, :3]
        gm_ = (rk @ rot_pose).T @ gdirs[k]
        q[:, k] = [gm_[0] ** 2, gm_[1] ** 2, gm_[2] ** 2, 2 * gm_[0] * gm_[1], 2 * gm_[0] * gm_[2],
                   2 * gm_[1] * gm_[2]]
    b = bvals.astype(np.float32)[None, :]
    fr = {t: g.ch[t].ravel()[idx][:, None] for t in ("wm", "gm", "csf")}
    sig = (fr["wm"] * DWI_S0["wm"] * np.exp(-b * (d_wm @ q))
           + fr["gm"] * DWI_S0["gm"] * np.exp(-b * (g.ch["d_gm"] @ q))
           + fr["csf"] * DWI_S0["csf"] * np.exp(-b * np.float32(CSF_D)))      # (N_brain, n)
    other = g.ch["s0_other"] * (1 - np.clip(g.ch["gm"] + g.ch["wm"] + g.ch["csf"], 0, 1))
    warp = subject_warp(plan, p)
    aff, shape = _scanner_grid(pose, p.dwi_voxel_mm, slab=True, warp=warp)
    support = _support(g, p, aff, shape, pose, warp)
    boxes = _boxes(support) if warp is None else None
    ijk = None if warp is None else _voxels(support, shape)
    vol = np.empty(g.shape, np.float32)
    out = np.empty((*shape, n), np.float32, order="F")     # NIfTI order: each volume one contiguous block
    sig = np.ascontiguousarray(sig.T)
    for k in range(n):
        vol[...] = other * np.float32(math.exp(-bvals[k] * OTHER_D))
        vol.ravel()[idx] += sig[k]
        world = np.linalg.inv(pose) @ np.linalg.inv(rigid_matrix(motion[k, 3:], motion[k, :3]))
        if warp is None:
            _resample(vol, g.affine, aff, shape, world, out=out[..., k], boxes=boxes)
        else:
            _pull_volume(vol, g, aff, world, warp, ijk, support, out[..., k])  # type: ignore[arg-type]
    out *= _bias_field(shape, rng, p.epi_bias)[..., None] * np.float32(p.dwi_scale)
    out = _rician(out, p.dwi_scale / p.dwi_snr, rng, support)
    # FSL/BIDS b-vectors are in voxel axes; the image is stored LAS (det < 0), so FSL and dipy agree:
    # voxel axis i points to world -x.
    bvecs = (gdirs * np.array([-1.0, 1.0, 1.0])).T
    return nib.Nifti1Image(_to_int16(out), aff), bvals, bvecs, motion


def _band_limited(rng: np.random.Generator, shape: tuple[int, ...], n_t: int, tr: float,
                  band: tuple[float, float]) -> np.ndarray:
    """Random series (shape..., n_t) with power only in ``band`` (Hz), unit variance on average."""
    freqs = np.fft.rfftfreq(n_t, tr)
    sel = np.flatnonzero((freqs >= band[0]) & (freqs <= band[1]))
    spec = np.zeros(shape + (len(freqs),), np.complex64)
    spec[..., sel] = (rng.standard_normal(shape + (len(sel),), dtype=np.float32)
                      + 1j * rng.standard_normal(shape + (len(sel),), dtype=np.float32))
    x = np.fft.irfft(spec, n=n_t, axis=-1).astype(np.float32)
    return x / np.float32(x.std() + 1e-12)


def make_bold(plan: SubjectPlan, p: SynthParams, rng: np.random.Generator
               ) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Resting-state BOLD (int16 4D, LAS, ``bold_voxel_mm``, TR ``tr_s``) and its motion (N, 6)."""
    g = _bold_grid(p.bold_voxel_mm)
    n_t = p.n_dummy + p.n_bold
    band = (0.01, 0.08)
    brain = (g.ch["gm"] + g.ch["wm"] + g.ch["csf"]) > 0.01
    # Shared fluctuation: band-limited white noise smoothed in space, in the brain's bounding box.
    bb = ndi.find_objects(brain.astype(np.int8))[0]
    box_shape = tuple(s.stop - s.start for s in bb)
    field_ = _band_limited(rng, box_shape, n_t, p.tr_s, band)
    sigma = p.lf_fwhm_mm / 2.3548 / p.bold_voxel_mm
    field_ = ndi.gaussian_filter(field_, (sigma, sigma, sigma, 0))
    field_ /= np.float32(field_.std() + 1e-12)
    idx = np.flatnonzero(brain)
    box_idx = np.ravel_multi_index(tuple(np.unravel_index(idx, g.shape)[a] - bb[a].start for a in range(3)),
                                   box_shape)
    f = field_.reshape(-1, n_t)[box_idx]                                             # (N_brain, T)
    glob = _band_limited(rng, (), n_t, p.tr_s, (0.01, 0.1))                         # (T,)
    amp = np.full(len(idx), p.lf_amplitude, np.float32)
    loss = _loss(_region_weights("func", p.bold_voxel_mm, p.design), plan.effects["func"])
    if loss is not None:
        amp *= 1 - loss.ravel()[idx]
    fr = {t: g.ch[t].ravel()[idx][:, None] for t in ("gm", "wm", "csf")}
    # T1 saturation: signal relative to steady state, M_k/M_ss = 1 + (M0/M_ss - 1) (cos a E1)^k.
    k = np.arange(n_t)
    ca = math.cos(math.radians(p.flip_angle_deg))

    def dummy(tissue: str) -> np.ndarray:
        e1 = math.exp(-p.tr_s / T1_RELAX_S[tissue])
        r = ca * e1
        return (1 + ((1 - r) / (1 - e1) - 1) * r**k).astype(np.float32)

    physio = rng.standard_normal((len(idx), n_t), dtype=np.float32)
    gl = p.global_amplitude * glob[None, :]
    sig = (fr["gm"] * EPI["gm"] * dummy("gm") * (1 + amp[:, None] * f + gl)
           + fr["wm"] * EPI["wm"] * dummy("wm") * (1 + p.wm_lf_fraction * p.lf_amplitude * f + gl)
           + fr["csf"] * EPI["csf"] * dummy("csf") * (1 + gl + p.csf_noise * physio))
    other = g.ch["epi_other"] * (1 - np.clip(g.ch["gm"] + g.ch["wm"] + g.ch["csf"], 0, 1))
    dummy_other = dummy("other")
    tt = np.linspace(-1, 1, n_t)
    c = rng.standard_normal(2) * p.drift
    drift = (1 + c[0] * tt + c[1] * (1.5 * tt**2 - 0.5)).astype(np.float32)
    # Motion: a slow random walk and a few one-volume jerks, zero at the first volume kept.
    motion = _random_walk_motion(rng, n_t, p.bold_walk_mm, p.bold_walk_mm, ref=min(p.n_dummy, n_t - 1))
    cand = np.arange(p.n_dummy + 1, n_t)
    for s in rng.choice(cand, size=min(p.bold_spikes, len(cand)), replace=False):
        d = rng.standard_normal(6)
        d /= np.linalg.norm(d)
        jerk = d * rng.uniform(0.5, 1.0) * p.bold_spike_mm
        motion[s, :3] += jerk[:3]
        motion[s, 3:] += np.deg2rad(jerk[3:])
    pose = plan.pose
    warp = subject_warp(plan, p)
    aff, shape = _scanner_grid(pose, p.bold_voxel_mm, slab=True, warp=warp)
    support = _support(g, p, aff, shape, pose, warp)
    boxes = _boxes(support) if warp is None else None
    ijk = None if warp is None else _voxels(support, shape)
    vol = np.empty(g.shape, np.float32)
    out = np.empty((*shape, n_t), np.float32, order="F")   # NIfTI order: each volume one contiguous block
    sig = np.ascontiguousarray(sig.T)
    for t in range(n_t):
        vol[...] = other * dummy_other[t]
        vol.ravel()[idx] += sig[t]
        world = np.linalg.inv(pose) @ np.linalg.inv(rigid_matrix(motion[t, 3:], motion[t, :3]))
        if warp is None:
            _resample(vol, g.affine, aff, shape, world, out=out[..., t], boxes=boxes)
        else:
            _pull_volume(vol, g, aff, world, warp, ijk, support, out[..., t])  # type: ignore[arg-type]
        out[..., t] *= drift[t]
    out *= _bias_field(shape, rng, p.epi_bias)[..., None] * np.float32(p.bold_scale)
    out = _rician(out, p.bold_scale / p.bold_snr, rng, support)
    return nib.Nifti1Image(_to_int16(out), aff), motion



def build_head_model(p: SynthParams) -> None:
    """Build (and cache, per process) the template-level head model on every grid ``p`` needs: call it
    before forking workers so they share it instead of rebuilding it."""
    _t1_grid(), _dwi_grid(p.dwi_voxel_mm), _bold_grid(p.bold_voxel_mm), _gradient_table(p.n_b0, p.n_directions)
    for modality, voxel in (("anat", 2.0), ("dwi", p.dwi_voxel_mm), ("func", p.bold_voxel_mm)):
        _region_weights(modality, voxel, p.design)
    if p.has_shape:
        build_shape_model()
