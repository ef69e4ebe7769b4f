"""A supervised voxel screen per MRI modality (``model.encoder: screen``): where to look, fitted on the
training subjects, then a small network on what is there.

Why: a focal change that only some patients of a diagnosis carry moves that diagnosis's voxel means by a
fraction of its size, so a whole-brain learner (the paper's ViT, a CNN, an L2 logistic) must find ~10
informative voxels among ~10,000 from the labels alone and, at cohort sizes of 100-200, does not
(studies/experts/README.md measures it). Two classical screens find them far more often:

* a mean-difference screen: the ``top_k`` voxels (any channel) of largest one-way ANOVA F across the
  diagnoses (``sklearn.feature_selection.f_classif``), as a voxel-based SVM pipeline would select them;
* a tail screen: per voxel and patient diagnosis, the fraction of that diagnosis's subjects whose robust z
  (against all training subjects: median, 1.4826 MAD) lies beyond ``threshold`` minus the fraction of the
  controls (the first class) beyond it (a change in *some* patients only, which a mean difference dilutes);
  the ``peaks`` best-separated maxima per patient diagnosis, at least 2 voxels inside the brain mask; every
  channel there. (Against all other classes instead of the controls it found fewer regions: 79 vs 87 %
  on tuning design 1 with a variant not kept, studies/experts/README.md.)

Both read the volumes smoothed by a Gaussian of ``sigma`` grid voxels, done by the module itself (a fixed
separable convolution), so the fit and every later forward pass read the same values. The chosen voxels and
their training mean and SD are buffers of ``VoxelScreen``: they travel in ``model.safetensors`` with the
weights, and a subject predicted later is read at the same places. Fitting is ``fit_screen`` (numpy) on
the training part of each run, as the clinical scaling is; a crossfit fold fits its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from neuromoe.errors import InputError

MIN_SEPARATION = 3  # grid voxels between two tail peaks (Chebyshev distance)
EDGE_MIN = 2  # tail peaks lie at least this many voxels inside the brain mask (registration residue at the edge)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """1D Gaussian taps (radius ceil(3 sigma)), summing to 1; ``[1.0]`` for sigma 0."""
    if sigma <= 0:
        return np.ones(1, np.float32)
    r = int(math.ceil(3 * sigma))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def smooth(x: Tensor, taps: Tensor) -> Tensor:
    """(B, C, D, H, W) -> same shape: separable convolution with ``taps`` along each spatial axis, zero padded
    (the cache is zero outside the brain)."""
    B, C = x.shape[:2]
    r = taps.numel() // 2
    if r == 0:
        return x
    y = x.reshape(B * C, 1, *x.shape[2:])
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = taps.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r  # F.pad lists the last axis first
        y = F.conv3d(F.pad(y, pad), taps.view(shape).to(y.dtype))
    return y.reshape(x.shape)


def take_peaks(stat: np.ndarray, k: int, min_separation: int = MIN_SEPARATION) -> list[tuple[int, int, int]]:
    """The ``k`` highest voxels of a 3D statistic, each at least ``min_separation`` voxels (Chebyshev) from the
    ones before (greedy non-maximum suppression). Voxels at -inf are never taken; fewer than ``k`` may come back."""
    s = np.array(stat, dtype=np.float64, copy=True)
    peaks: list[tuple[int, int, int]] = []
    r = min_separation - 1
    for _ in range(k):
        flat = int(np.argmax(s))
        if not np.isfinite(s.flat[flat]):
            break
        p = tuple(int(i) for i in np.unravel_index(flat, s.shape))
        peaks.append(p)  # type: ignore[arg-type]
        s[tuple(slice(max(0, j - r), j + r + 1) for j in p)] = -np.inf
    return peaks


def weighted_median(a: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, ...) -> (...): per column, the smallest value at which the cumulative weight reaches half the total
    (``weights``: (N,), >= 0, positive sum)."""
    flat = a.reshape(len(a), -1)
    order = np.argsort(flat, axis=0, kind="stable")
    cum = np.cumsum(weights[order], axis=0)
    first = np.argmax(cum >= 0.5 * cum[-1], axis=0)
    return flat[order[first, np.arange(flat.shape[1])], np.arange(flat.shape[1])].reshape(a.shape[1:])


def robust_z(a: np.ndarray, ref: np.ndarray | None = None, weights: np.ndarray | None = None) -> np.ndarray:
    """(N, ...) -> z of every value against its column's median and 1.4826 MAD over the subjects of ``ref``
    (M, ...) (default: ``a`` itself); with ``weights`` (M,), the weighted median and weighted MAD."""
    ref = a if ref is None else ref
    if weights is None:
        med = np.median(ref, axis=0)
        mad = 1.4826 * np.median(np.abs(ref - med), axis=0)
    else:
        med = weighted_median(ref, weights)
        mad = 1.4826 * weighted_median(np.abs(ref - med), weights)
    return (a - med) / (mad + 1e-3)


def tail_statistic(z: np.ndarray, y: np.ndarray, cls: int, threshold: float, reference: int = 0,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """(N, C, *grid) robust z -> (*grid): per voxel, max over channels and both directions of the fraction of
    class ``cls`` beyond ``threshold`` minus the fraction of class ``reference`` beyond it (fractions of the
    subjects' ``weights`` (N,) when given)."""
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)

    def fraction(cl: int, beyond: np.ndarray) -> np.ndarray:
        sel = y == cl
        if weights is None:
            return beyond[sel].mean(0)
        return np.tensordot(w[sel], beyond[sel], axes=1) / max(w[sel].sum(), 1e-12)

    lo = fraction(cls, z < -threshold) - fraction(reference, z < -threshold)
    hi = fraction(cls, z > threshold) - fraction(reference, z > threshold)
    return np.maximum(lo, hi).max(0)


def weighted_f(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, F) -> (F,): one-way ANOVA F across the classes of ``y`` with subject ``weights`` (N,): weighted
    between-class over within-class sum of squares, each over its degrees of freedom, the subjects counted as
    Kish's effective number ``(sum w)^2 / sum w^2`` and the classes as those with weight. Equal weights give
    ``f_classif``'s F; 0/1 weights its F on the subjects weighted 1."""
    w = np.asarray(weights, np.float64)
    classes = np.unique(y[w > 0])
    total = w.sum()
    grand = w @ x / total
    between = np.zeros(x.shape[1])
    within = np.zeros(x.shape[1])
    for c in classes:
        sel = y == c
        wc = w[sel]
        mean = wc @ x[sel] / wc.sum()
        between += wc.sum() * (mean - grand) ** 2
        within += wc @ (x[sel] - mean) ** 2
    n_eff = total**2 / float(w @ w)
    dof_b, dof_w = max(len(classes) - 1, 1), max(n_eff - len(classes), 1e-12)
    return (between / dof_b) / (within / dof_w)


def f_pvalues(f: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """P-values of ``weighted_f``'s F under the F distribution with its degrees of freedom."""
    from scipy.stats import f as f_dist

    w = np.asarray(weights, np.float64)
    k = len(np.unique(y[w > 0]))
    n_eff = w.sum() ** 2 / float(w @ w)
    return f_dist.sf(f, max(k - 1, 1), max(n_eff - k, 1e-12))


def benjamini_hochberg(pvalues: np.ndarray, q: float) -> int:
    """How many of the smallest p-values are discoveries at false discovery rate ``q`` (Benjamini & Hochberg
    1995): the largest k with p_(k) <= q k / m."""
    p = np.sort(np.asarray(pvalues, np.float64).ravel())
    passed = np.flatnonzero(p <= q * np.arange(1, len(p) + 1) / max(len(p), 1))
    return int(passed[-1] + 1) if len(passed) else 0


def fit_screen(smoothed: np.ndarray, y: np.ndarray, mask: np.ndarray, n_classes: int, top_k: int, peaks: int,
               threshold: float, weights: np.ndarray | None = None, fdr: float = 0.0) -> np.ndarray:
    """Choose the screen's voxels on training volumes; returns flat indices into (C, D, H, W), int64.

    Args:
        smoothed: (N, C, D, H, W) float32 training volumes, already smoothed (``VoxelScreen.smoothed``).
        y: (N,) int class labels in 0..n_classes-1, >= 2 of class 0 and one more class; class 0 is the reference
            (the controls: the first of ``participants.labels``).
        mask: (D, H, W) bool brain mask on the grid; only voxels inside are chosen.
        top_k: voxels of largest ANOVA F (any channel).
        peaks: tail peaks per non-reference class; every channel at each is taken
            (``peaks * (n_classes - 1) * C`` indices).
        threshold: |robust z| beyond which a subject's voxel counts as a tail.
        weights: (N,) non-negative subject weights (``train.screen_refits``: how much each subject belongs
            to this expert); the F, the robust z and the tail fractions are then weighted. None: all equal.
        fdr: > 0 keeps of the ``top_k`` ANOVA voxels only those significant at this Benjamini-Hochberg false
            discovery rate over every voxel and channel (F test; weighted: Kish's effective number of
            subjects); the slots left are -1 (read as a constant 0 by ``VoxelScreen``). 0: always ``top_k``.
    Returns:
        ``top_k + peaks * (n_classes - 1) * C`` indices (-1: an ANOVA slot ``fdr`` left empty); a peak the
        statistic cannot place (a class absent here, or too few voxels) repeats its class's best peak (or the
        first voxel inside the mask's core), so the length never depends on the data.
    """
    from scipy import ndimage
    from sklearn.feature_selection import f_classif

    n, c = smoothed.shape[:2]
    grid = smoothed.shape[2:]
    mask = np.asarray(mask, bool)
    if mask.shape != grid or not mask.any():
        raise ValueError(f"mask {mask.shape} must be a non-empty (D, H, W) = {grid} brain mask")
    y = np.asarray(y, np.int64)
    counts = np.bincount(y, minlength=n_classes) if len(y) else np.zeros(n_classes, int)
    if len(y) != n or len(counts) != n_classes or counts[0] < 2 or (counts > 0).sum() < 2:
        raise ValueError(f"fit_screen needs {n} labels in 0..{n_classes - 1}: >= 2 of the reference class 0 "
                         f"and a second class; got {len(y)} labels, counts per class {counts.tolist()}")
    flat = smoothed.reshape(n, c, -1)[:, :, mask.ravel()]  # (N, C, V)
    v = int(mask.sum())
    if top_k > c * v:
        raise ValueError(f"screen_top_k {top_k} is more than the {c} x {v} voxels inside the grid's brain mask")
    if weights is not None:
        weights = np.asarray(weights, np.float64)
        if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {n} finite non-negative numbers with a positive sum")
    with np.errstate(divide="ignore", invalid="ignore"):
        if weights is None:
            f, pval = f_classif(flat.reshape(n, -1), y)
        else:
            f = weighted_f(flat.reshape(n, -1).astype(np.float64), y, weights)
            pval = f_pvalues(f, y, weights)
    f = np.nan_to_num(f, nan=-1.0)  # constant voxels
    order = np.argsort(-f, kind="stable")[:top_k]
    if fdr > 0:
        order = order[:benjamini_hochberg(np.nan_to_num(pval, nan=1.0), fdr)]
    inside = np.flatnonzero(mask.ravel())
    chosen = [int(ch * math.prod(grid) + inside[j]) for ch, j in zip(order // v, order % v, strict=True)]
    chosen += [-1] * (top_k - len(chosen))
    z = robust_z(smoothed, weights=weights)
    edge = ndimage.distance_transform_edt(mask) >= EDGE_MIN
    if not edge.any():  # a mask too thin for a core (a tiny grid): any voxel inside
        edge = mask
    for cls in range(1, n_classes):
        found = []
        if counts[cls]:  # a class absent from these subjects (a small crossfit fold) gets fallback peaks
            found = take_peaks(np.where(edge, tail_statistic(z, y, cls, threshold, reference=0,
                                                                    weights=weights), -np.inf), peaks)
        found += [found[0] if found else tuple(int(i) for i in np.argwhere(edge)[0])] * (peaks - len(found))
        for p in found:
            vox = int(np.ravel_multi_index(p, grid))
            chosen += [ch * math.prod(grid) + vox for ch in range(c)]
    return np.asarray(chosen, np.int64)


class VoxelScreen(nn.Module):
    """One MRI modality (B, C, D, H, W) -> (B, n_features): smoothed values at the fitted voxels, standardised
    with the training subjects' mean and SD (a slot ``fdr`` left empty has scale inf: always 0). Unfitted,
    ``forward`` raises (``fit`` first)."""

    def __init__(self, in_channels: int, grid: Sequence[int], n_classes: int, top_k: int, peaks: int,
                 threshold: float, sigma: float, fdr: float = 0.0) -> None:
        super().__init__()
        self.in_channels, self.grid, self.n_classes = in_channels, tuple(grid), n_classes
        self.top_k, self.peaks, self.threshold, self.fdr = top_k, peaks, threshold, fdr
        self.n_features = top_k + peaks * (n_classes - 1) * in_channels
        self.register_buffer("taps", torch.from_numpy(gaussian_kernel(sigma)))
        self.register_buffer("index", torch.zeros(self.n_features, dtype=torch.long))
        self.register_buffer("center", torch.zeros(self.n_features))
        self.register_buffer("scale", torch.ones(self.n_features))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._neighbours: tuple[Tensor, Tensor] | None = None  # read's gather plan, rebuilt when index changes
        self._neighbours_of: tuple | None = None

    def smoothed(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> the same smoothed, as the screen reads it: in float32 even under a bf16 autocast
        (the fit read float32 values; bf16 would move a z of 5 by ~0.03)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return smooth(x.float(), self.taps)

    def neighbourhoods(self) -> tuple[Tensor, Tensor]:
        """Flat indices (n_features, K) into (C, D, H, W) of the K = (2r + 1)^3 voxels the Gaussian reaches from
        each chosen voxel, and their weights (n_features, K): the separable taps' outer product, 0 where a
        neighbour lies outside the grid (its index clamped inside), as ``smooth``'s zero padding."""
        taps = self.taps.float()
        r = taps.numel() // 2
        d_, h_, w_ = self.grid
        n = d_ * h_ * w_
        ch, vox = self.index // n, self.index % n
        off = torch.arange(-r, r + 1, device=self.index.device)
        d = (vox // (h_ * w_))[:, None, None, None] + off[None, :, None, None]
        h = ((vox // w_) % h_)[:, None, None, None] + off[None, None, :, None]
        w = (vox % w_)[:, None, None, None] + off[None, None, None, :]
        valid = (d >= 0) & (d < d_) & (h >= 0) & (h < h_) & (w >= 0) & (w < w_)
        flat = (ch[:, None, None, None] * n + (d.clamp(0, d_ - 1) * h_ + h.clamp(0, h_ - 1)) * w_
                + w.clamp(0, w_ - 1))
        weights = (taps[:, None, None] * taps[None, :, None] * taps[None, None, :])[None] * valid
        return flat.flatten(1), weights.flatten(1)

    def read(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, n_features) smoothed values at the chosen voxels, not standardised: the
        smoothing evaluated at those voxels only (a gather of their neighbourhoods and a weighted sum), equal to
        ``smoothed(x)`` read there up to float rounding and a fraction of its cost (training was mostly the
        whole-volume convolution). In float32 even under a bf16 autocast."""
        key = (self.index._version, self.index.data_ptr(), self.taps.data_ptr())  # a fit or load changes index
        if self._neighbours_of != key:
            self._neighbours, self._neighbours_of = self.neighbourhoods(), key
        idx, weights = self._neighbours
        with torch.autocast(device_type=x.device.type, enabled=False):
            return (x.flatten(1)[:, idx].float() * weights).sum(-1)  # gathered, then float: not every voxel

    @torch.no_grad()
    def fit(self, volumes: Tensor, y: np.ndarray, mask: np.ndarray, chunk: int = 32,
            weights: np.ndarray | None = None) -> None:
        """Choose the voxels on training ``volumes`` (N, C, D, H, W) with labels ``y`` (N,), the (D, H, W)
        brain ``mask`` and optional subject ``weights`` (N,) (see ``fit_screen``); set their standardisation
        from the same subjects (unweighted: every subject passes through it)."""
        sm = torch.cat([self.smoothed(volumes[i:i + chunk].to(self.taps.device))
                        for i in range(0, len(volumes), chunk)]).cpu().numpy()
        idx = fit_screen(sm, y, mask, self.n_classes, self.top_k, self.peaks, self.threshold, weights, self.fdr)
        empty = idx < 0  # ANOVA slots the FDR left empty: a voxel read, then scaled to a constant 0
        idx = np.where(empty, idx[~empty][0] if (~empty).any() else 0, idx)
        feats = sm.reshape(len(sm), -1)[:, idx]
        self.index.copy_(torch.from_numpy(idx))
        self.center.copy_(torch.from_numpy(feats.mean(0)))
        self.scale.copy_(torch.from_numpy(np.where(empty, np.inf, feats.std(0) + 1e-3)))
        self.fitted.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, n_features)."""
        if not bool(self.fitted):
            raise RuntimeError("VoxelScreen is not fitted: call fit_screens(model, ...) on the training "
                               "subjects before training or predicting")
        return (self.read(x) - self.center) / self.scale

    def flops(self) -> int:
        """Forward FLOPs per sample: the three 1D smoothing passes (the gather is free)."""
        return 2 * 3 * self.taps.numel() * self.in_channels * math.prod(self.grid)


def fit_screens(model: nn.Module, cohort, rows: Sequence[int],
                weights: Mapping[str, np.ndarray] | None = None) -> None:
    """Fit every ``VoxelScreen`` of ``model`` (its ``encoders``) on the cohort cache rows ``rows`` (a run's
    training part), leaving out the subjects without that modality. A no-op for the other encoders.
    ``weights``: per modality, (len(rows),) subject weights in ``rows``' order (``train.screen_refits``).

    ``cohort``: an opened ``neuromoe.cache.store.CohortCache``. InputError (naming the modality and the fix)
    when the training subjects with that modality hold fewer than 2 controls or a single class."""
    from neuromoe.cache.store import MODALITIES, decode

    rows = np.asarray(rows, np.int64)
    for m, enc in getattr(model, "encoders", {}).items():
        if not isinstance(enc, VoxelScreen):
            continue
        keep = cohort.present[rows, MODALITIES.index(m)]
        order = np.argsort(rows[keep], kind="stable")
        use = rows[keep][order]  # ascending rows: the memory-mapped cache reads them in one pass
        w = None if weights is None else np.asarray(weights[m], np.float64)[keep][order]
        vols = torch.from_numpy(decode(np.asarray(cohort.arrays[m][use]), cohort.dtype))
        try:
            enc.fit(vols, cohort.y[use], cohort.mask, weights=w)
        except ValueError as e:
            raise InputError(f"model.encoder screen, modality {m}, {len(use)} training subjects: {e}",
                             path=cohort.root, fix="use more subjects per training part (5-fold CV of 60+), "
                             "a smaller model.screen_top_k, or model.encoder: vit") from None
