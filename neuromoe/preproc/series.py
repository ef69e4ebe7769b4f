"""The func stage's voxel-wise computations on in-mask series (V, T), numpy only: nuisance regression, the
band-pass, ALFF/fALFF and ReHo (Kendall's W), and their helpers (a linear detrend, tie-averaged ranks per row).

Each works through the voxels a block of rows at a time (``row_blocks``, ``BLOCK_BYTES``), so its float64
temporaries stay ~32 MB however long the series, and the func stage's peak memory is reading its series
(neuromoe.preproc.resources). Rows are independent, so a block's values are those of the whole.
``detrend`` and ``rank_rows`` replace ``scipy.signal.detrend`` and ``scipy.stats.rankdata``, whose imports alone
cost ~0.8 CPU s of every func job (tests compare the values with scipy's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

# Bytes of the temporaries of one block of rows: a voxel-wise computation (regression, spectra, ranks) works on a
# block of a (V, T) series at a time, sized so that its temporaries stay ~32 MB instead of several float64 copies
# of the whole series (a 3 mm BOLD of 300 volumes has ~70,000 brain voxels: 170 MB a float64 copy).
BLOCK_BYTES = 32 * 2**20
DEFAULT_BAND_HZ = (0.01, 0.08)  # the low-frequency band of fALFF and of ReHo's band-pass (Zou et al. 2008)


def row_blocks(n_rows: int, n_cols: int, itemsize: int = 8, budget: int | None = None) -> Iterator[slice]:
    """Consecutive slices covering ``range(n_rows)``, each of at most ``budget`` bytes (default ``BLOCK_BYTES``)
    of ``n_cols`` items of ``itemsize`` bytes per row (at least one row a block). ``itemsize``: the bytes a
    computation's temporaries hold per element of its block (8 per float64 copy; measured with tracemalloc)."""
    step = max(1, (BLOCK_BYTES if budget is None else budget) // max(1, n_cols * itemsize))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def detrend(y: np.ndarray) -> np.ndarray:
    """(V, T) float64 -> each row minus its least-squares line (``scipy.signal.detrend(type="linear")``, whose
    import alone costs a second per job)."""
    t = np.arange(y.shape[1], dtype=np.float64)
    t -= t.mean()
    centred = y - y.mean(axis=1, keepdims=True)
    slope = centred @ t / (t @ t)
    return centred - slope[:, None] * t


def rank_rows(a: np.ndarray) -> np.ndarray:
    """(V, T) -> float64 ranks 1..T along each row, ties sharing their average rank
    (``scipy.stats.rankdata(a, axis=1)``; a constant series ranks (T + 1) / 2 everywhere)."""
    a = np.asarray(a)
    v, n = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    srt = np.take_along_axis(a, order, axis=1)
    new = np.ones((v, n), bool)  # first element of each run of equal values
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    run_id = np.cumsum(new, axis=1) - 1  # run index per sorted position
    pos = np.arange(1, n + 1, dtype=np.float64)
    flat_run = run_id + (np.arange(v) * n)[:, None]  # runs numbered over the whole array
    total = np.bincount(flat_run.ravel(), weights=np.broadcast_to(pos, (v, n)).ravel(), minlength=v * n)
    count = np.bincount(flat_run.ravel(), minlength=v * n)
    avg = total[flat_run] / count[flat_run]
    out = np.empty((v, n))
    np.put_along_axis(out, order, avg, axis=1)
    return out


# --------------------------------------------------------------------------------------------------
# Denoising and filtering
# --------------------------------------------------------------------------------------------------

def regress_nuisance(data: np.ndarray, regressors: np.ndarray | None = None, detrend: bool = True,
                     keep_mean: bool = True) -> np.ndarray:
    """Residuals of voxel time series after OLS on nuisance regressors, (V, T) -> (V, T) float32.

    The design is [intercept, linear trend (if ``detrend``), regressors (T, K), each column centred].
    With ``keep_mean`` each voxel's temporal mean is added back, so the cleaned series still looks like a
    BOLD image (masks and QC of the mean stay meaningful); fALFF/ReHo are unaffected by the constant. All
    voxels are solved through one pseudo-inverse of the (T, K+2) design, a block of rows at a time.
    """
    y = np.asarray(data)
    if y.ndim != 2:
        raise ValueError(f"data must be (V, T), got {y.shape}")
    n_t = y.shape[1]
    cols = [np.ones(n_t)]
    if detrend:
        cols.append(np.linspace(-1.0, 1.0, n_t))  # centred and scaled: better conditioned than 0..T-1
    if regressors is not None:
        reg = np.asarray(regressors, dtype=np.float64)
        if reg.ndim == 1:
            reg = reg[:, None]
        if reg.shape[0] != n_t:
            raise ValueError(f"regressors have {reg.shape[0]} rows but the data has {n_t} time points")
        if not np.all(np.isfinite(reg)):
            raise ValueError("regressors contain NaN/inf (e.g. the first DVARS row); fill or drop them first")
        reg = reg - reg.mean(axis=0)
        cols.extend(reg.T)
    design = np.column_stack(cols)  # (T, P)
    if design.shape[1] >= n_t:
        raise ValueError(f"{design.shape[1]} regressors for {n_t} time points: nothing left to estimate")
    pinv = np.linalg.pinv(design)  # (P, T)
    out = np.empty(y.shape, dtype=np.float32)
    for b in row_blocks(*y.shape, itemsize=8 * 4):  # ~4 float64 copies of a block
        yb = y[b].astype(np.float64)
        resid = yb - (design @ (pinv @ yb.T)).T
        if keep_mean:
            resid += yb.mean(axis=1, keepdims=True)
        out[b] = resid
    return out


def bandpass(data: np.ndarray, tr: float, band: Sequence[float] = DEFAULT_BAND_HZ) -> np.ndarray:
    """Zero-phase band-pass (V, T) -> (V, T) float32, ``band`` in Hz, ``tr`` in seconds.

    Ideal (FFT-domain) filter after linear detrending, as REST/DPABI do for ReHo: it keeps exactly the
    frequencies fALFF calls low-frequency, with no filter order to tune on short series. The mean is kept.
    """
    y = np.asarray(data)
    n_t = y.shape[1]
    freqs = np.fft.rfftfreq(n_t, d=tr)
    stop = (freqs < band[0]) | (freqs > band[1])
    out = np.empty(y.shape, dtype=np.float32)
    for b in row_blocks(*y.shape, itemsize=8 * 5):  # float64, detrended, spectrum, result
        yb = y[b].astype(np.float64)
        spec = np.fft.rfft(detrend(yb), axis=1)
        spec[:, stop] = 0.0
        out[b] = np.fft.irfft(spec, n=n_t, axis=1) + yb.mean(axis=1, keepdims=True)
    return out


# --------------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------------

def _band_bins(n_t: int, tr: float, band: Sequence[float]) -> np.ndarray:
    """(F,) bool over the bins 0 < f <= Nyquist of ``n_t`` volumes at ``tr`` s: inside ``band`` (Hz, edges
    included); ValueError when no bin is."""
    freqs = np.fft.rfftfreq(n_t, d=tr)[1:]
    inband = (freqs >= band[0]) & (freqs <= band[1])
    if not inband.any():
        raise ValueError(f"no frequency bin in {tuple(band)} Hz for {n_t} volumes at TR {tr} s")
    return inband


def _amplitude_spectra(data: np.ndarray) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Per block of rows of ``data`` (V, T): (rows, the block as float64, its one-sided amplitude spectrum over
    0 < f <= Nyquist (rows, F)) after linear detrending of each series (so drift does not dominate the lowest
    bins)."""
    y = np.asarray(data)
    for b in row_blocks(*y.shape, itemsize=8 * 5):  # float64, detrended, spectrum, amplitudes
        yb = y[b].astype(np.float64)
        yield b, yb, np.abs(np.fft.rfft(detrend(yb), axis=1))[:, 1:]


def falff(data: np.ndarray, tr: float, band: Sequence[float] = DEFAULT_BAND_HZ) -> np.ndarray:
    """Fractional ALFF (Zou et al. 2008), (V, T) -> (V,) float32 in [0, 1].

    Sum of the amplitude spectrum (sqrt of power) over ``band`` (Hz, edges included) divided by its sum over
    the whole spectrum 0 < f <= 1 / (2 TR), after linear detrending; ``tr`` in seconds. A sinusoid inside the
    band gives ~1; white noise gives about the band's share of the frequency bins, (f_hi - f_lo) / Nyquist.
    A constant series (no spectrum) gives 0.
    """
    inband = _band_bins(np.shape(data)[1], tr, band)
    out = np.zeros(np.shape(data)[0], dtype=np.float32)
    for b, y, amp in _amplitude_spectra(data):
        total = amp.sum(axis=1)
        part = amp[:, inband].sum(axis=1)
        # A constant (or linear) series leaves only round-off after detrending; call it "no spectrum", not a
        # ratio of rounding errors. Round-off is ~1e-16 of the signal's magnitude per bin.
        scale = np.abs(y).max(axis=1) * amp.shape[1]
        has_spectrum = total > 1e-10 * np.maximum(scale, np.finfo(np.float64).tiny)
        out[b] = np.divide(part, total, out=np.zeros_like(total), where=has_spectrum)
    return out


def alff(data: np.ndarray, tr: float, band: Sequence[float] = DEFAULT_BAND_HZ) -> np.ndarray:
    """ALFF, (V, T) -> (V,) float32: mean one-sided amplitude over ``band`` (Hz), in the data's units.

    Amplitude of bin k is 2 |X_k| / T, so a sinusoid of amplitude a on a bin gives a at that bin.
    """
    n_t = np.shape(data)[1]
    inband = _band_bins(n_t, tr, band)
    out = np.zeros(np.shape(data)[0], dtype=np.float32)
    for b, _, amp in _amplitude_spectra(data):
        out[b] = 2.0 / n_t * amp[:, inband].mean(axis=1)
    return out


_CUBE = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]
# 27: faces, edges and corners; 19: faces and edges; 7: faces (offsets with at most 3 / 2 / 1 non-zero).
_NEIGHBOUR_OFFSETS = {n: [o for o in _CUBE if sum(map(abs, o)) <= d] for n, d in ((27, 3), (19, 2), (7, 1))}


def _neighbour_sum(a: np.ndarray, neighbourhood: int) -> np.ndarray:
    """Sum of ``a`` (X, Y, Z[, ...]) over each voxel's neighbourhood (zero outside the volume), same shape.

    27: separable 3-tap sums along x, y, z (9 adds instead of 27); 19 and 7: shifted views. Values are summed
    exactly (integer or half-integer ranks), so W = 1 comes out exactly for identical neighbours.
    """
    if neighbourhood == 27:
        out = a
        for ax in range(3):
            s = out.copy()
            idx_lo = [slice(None)] * a.ndim
            idx_hi = [slice(None)] * a.ndim
            idx_lo[ax], idx_hi[ax] = slice(1, None), slice(None, -1)
            s[tuple(idx_lo)] += out[tuple(idx_hi)]  # neighbour at -1
            s[tuple(idx_hi)] += out[tuple(idx_lo)]  # neighbour at +1
            out = s
        return out
    out = np.zeros_like(a)
    shape = a.shape[:3]
    for off in _NEIGHBOUR_OFFSETS[neighbourhood]:
        dst, src = [], []
        for o, n in zip(off, shape, strict=True):
            dst.append(slice(max(0, -o), n - max(0, o)))
            src.append(slice(max(0, o), n - max(0, -o)))
        out[tuple(dst)] += a[tuple(src)]
    return out


def reho(data: np.ndarray, mask: np.ndarray, neighbourhood: int = 27) -> np.ndarray:
    """Regional homogeneity (Zang et al. 2004), (X, Y, Z, T) + mask (X, Y, Z) -> (X, Y, Z) float32.

    Kendall's coefficient of concordance over each in-mask voxel and its in-mask neighbours (cluster of
    ``neighbourhood`` = 27, 19 or 7 voxels; fewer at the mask edge, K counts only those in the mask):
        W = (12 sum_t R_t^2 - 3 K^2 n (n + 1)^2) / (K^2 (n^3 - n)),
    with n time points and R_t the sum over the K voxels of the rank of time point t in each voxel's series.
    W = 1 when all K series are identical (up to monotone transforms); for K independent series E[W] = 1/K.
    Ties get average ranks and the tie-free formula (ties are measure-zero for real BOLD). 0 outside the mask
    and for voxels with no in-mask neighbour (K = 1 gives the meaningless W = 1, so it is set to 0).

    Ranks are computed once per voxel along time; the neighbourhood sums are array shifts, not voxel loops.
    """
    data = np.asarray(data)
    mask = np.asarray(mask, dtype=bool)
    if data.ndim != 4 or data.shape[:3] != mask.shape:
        raise ValueError(f"data must be (X, Y, Z, T) matching mask {mask.shape}, got {data.shape}")
    return reho_series(data[mask], mask, neighbourhood)


def reho_series(series: np.ndarray, mask: np.ndarray, neighbourhood: int = 27,
                prefilter: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """``reho`` of the in-mask series (V, T) (rows in the order of ``mask``'s voxels, ``data[mask]``) -> (X, Y, Z)
    float32; ``prefilter`` (e.g. the band-pass) is applied to each block of rows before it is ranked, so the
    filtered series is never held whole. Ranks a block of voxels at a time and sums neighbours a block of time
    points at a time, so beyond the ranks (float32, the mask's bounding box) it needs ~``BLOCK_BYTES``."""
    if neighbourhood not in _NEIGHBOUR_OFFSETS:
        raise ValueError(f"neighbourhood must be one of {sorted(_NEIGHBOUR_OFFSETS)}, got {neighbourhood}")
    series = np.asarray(series)
    mask = np.asarray(mask, dtype=bool)
    if series.ndim != 2 or series.shape[0] != mask.sum():
        raise ValueError(f"series must be (V, T) with V = {int(mask.sum())} mask voxels, got {series.shape}")
    out = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return out
    # Work inside the mask's bounding box (+1 voxel), which is most of the cost saved for a head in a FOV.
    (x0, y0, z0), (x1, y1, z1) = np.argwhere(mask).min(0), np.argwhere(mask).max(0) + 1
    box = (slice(x0, x1), slice(y0, y1), slice(z0, z1))
    m = mask[box]
    n_t = series.shape[1]
    # Ranks are integers or half-integers <= n: float32 holds them, and their sums over <= 27 voxels, exactly
    # (and the sums of their squares in float64, in any order).
    ranks = np.zeros(m.shape + (n_t,), dtype=np.float32)
    flat, inside = ranks.reshape(-1, n_t), np.flatnonzero(m)  # a view; box voxels in C order, like data[mask]
    for b in row_blocks(*series.shape, itemsize=8 * 9):  # rank_rows: ~8 copies; prefilter
        flat[inside[b]] = rank_rows(series[b] if prefilter is None else prefilter(series[b]))
    s2 = np.zeros(inside.size)
    for t in row_blocks(n_t, int(m.size), itemsize=4 * 3):  # time points: ~3 box-sized float32 copies each
        r_sum = _neighbour_sum(ranks[..., t], neighbourhood)[m].astype(np.float64)  # (V, block)
        s2 += np.einsum("vt,vt->v", r_sum, r_sum)
    del ranks, flat
    k = _neighbour_sum(m.astype(np.float32), neighbourhood)[m].astype(np.float64)  # (V,)
    w = (12.0 * s2 - 3.0 * k**2 * n_t * (n_t + 1) ** 2) / (k**2 * (n_t**3 - n_t))
    w[k < 2] = 0.0
    sub = np.zeros(m.shape, dtype=np.float32)
    sub[m] = w
    out[box] = sub
    return out


def null_reho(mask: np.ndarray, neighbourhood: int = 27) -> np.ndarray:
    """Expected ReHo under independence, E[W] = 1/K per voxel, (X, Y, Z); K counts in-mask neighbours and
    the voxel itself (0 outside the mask and where K = 1, as in ``reho``)."""
    m = np.asarray(mask, dtype=bool)
    k = _neighbour_sum(m.astype(np.float32), neighbourhood)
    out = np.zeros(m.shape, dtype=np.float32)
    sel = m & (k >= 2)
    out[sel] = 1.0 / k[sel]
    return out
