"""Resting-state fMRI: dummy scans, confounds, nuisance regression, fALFF, ReHo, and the stage driver.

Array conventions: a 4D BOLD is (X, Y, Z, T) in voxel order with its NIfTI affine; voxel time series
are flattened to (V, T) (V in-mask voxels, T volumes). Times are in seconds, frequencies in Hz,
translations in mm, rotations in radians (fMRIPrep column names).

The pure functions are vectorised over voxels: a 4 mm BOLD (~50 x 60 x 50 x 120) takes about a second
for confounds, regression, fALFF and ReHo together; realignment and registration dominate ``run_func``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, signal, stats

from neuromoe.errors import StageError

STAGE = "func"
MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
CONFOUND_COLUMNS = MOTION_COLUMNS + ["framewise_displacement", "dvars", "std_dvars", "white_matter", "csf"]
# Power et al. 2012: rotations (radians) become arc lengths on a sphere of this radius (mm),
# the typical distance from the centre of the head to the cortex.
FD_RADIUS_MM = 50.0
# fMRIPrep/nipype scale the series so the median in-mask mean is 1000 before DVARS, so DVARS values are
# comparable across scanners and subjects.
DVARS_SCALE = 1000.0
DEFAULT_BAND_HZ = (0.01, 0.08)


def _sub(subject: str | None) -> str | None:
    """Subjects are passed without the prefix; messages print ``sub-XX``."""
    if subject is None:
        return None
    return subject if subject.startswith("sub-") else f"sub-{subject}"


# --------------------------------------------------------------------------------------------------
# Inputs: TR and dummy scans
# --------------------------------------------------------------------------------------------------

def repetition_time(json_path: str | Path, subject: str | None = None) -> float:
    """RepetitionTime (seconds) from the BIDS sidecar of a BOLD run.

    The sidecar is authoritative in BIDS (NIfTI pixdim[4] is often 0 or 1 after conversion), so a missing,
    non-numeric or non-positive value is an error rather than a silent fallback to the header.
    """
    path = Path(json_path)
    fix = f'add "RepetitionTime": <seconds> (e.g. 2.0) to {path.name}'
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise StageError("the BOLD sidecar JSON does not exist", subject=_sub(subject), stage=STAGE,
                         path=path, fix=f"create it with {fix.removeprefix('add ')}") from exc
    except json.JSONDecodeError as exc:
        raise StageError(f"the BOLD sidecar is not valid JSON ({exc.msg}, line {exc.lineno})",
                         subject=_sub(subject), stage=STAGE, path=path, fix="repair the JSON syntax") from exc
    if not isinstance(meta, dict) or "RepetitionTime" not in meta:
        raise StageError("no RepetitionTime in the BOLD sidecar", subject=_sub(subject), stage=STAGE,
                         path=path, fix=fix)
    tr = meta["RepetitionTime"]
    if isinstance(tr, bool) or not isinstance(tr, int | float) or not math.isfinite(tr) or tr <= 0:
        raise StageError(f"RepetitionTime is {tr!r}; it must be a positive number of seconds",
                         subject=_sub(subject), stage=STAGE, path=path, fix=fix)
    if tr > 100:  # a TR in milliseconds is the usual mistake
        raise StageError(f"RepetitionTime is {tr}, which looks like milliseconds; BIDS wants seconds",
                         subject=_sub(subject), stage=STAGE, path=path, fix=f"write {tr / 1000:g} instead")
    return float(tr)


def min_volumes(tr: float, f_low: float = DEFAULT_BAND_HZ[0]) -> int:
    """Fewest volumes whose duration resolves ``f_low``: T * TR >= 1 / f_low (100 s for 0.01 Hz)."""
    return int(math.ceil(1.0 / (f_low * tr) - 1e-9))


def drop_dummy_scans(img: nib.Nifti1Image, n: int, tr: float | None = None, *,
                     f_low: float = DEFAULT_BAND_HZ[0], subject: str | None = None) -> nib.Nifti1Image:
    """Remove the first ``n`` volumes (scanner not yet at steady state) of a 4D image (X, Y, Z, T).

    ``tr`` (seconds; from the sidecar, default the header's pixdim[4]) is used to check that the volumes
    left span at least one period of the lowest band frequency ``f_low`` (Hz), i.e. T * TR >= 1 / f_low,
    without which fALFF and the band-pass have no low-frequency bin; StageError otherwise.
    """
    if img.ndim != 4:
        raise StageError(f"the BOLD image is {img.ndim}D {img.shape}; a 4D time series is needed",
                         subject=_sub(subject), stage=STAGE, fix="pass the 4D *_bold.nii.gz")
    if n < 0:
        raise ValueError(f"dummy_scans must be >= 0, got {n}")
    if tr is None:
        tr = float(img.header.get_zooms()[3])
    n_vols = img.shape[3]
    left = n_vols - n
    need = min_volumes(tr, f_low)
    if left < need:
        raise StageError(
            f"{n_vols} volumes minus {n} dummy scans leaves {left} volumes ({max(left, 0) * tr:g} s at "
            f"TR {tr:g} s); fALFF/ReHo need at least {need} volumes ({need * tr:g} s = 1/{f_low:g} Hz) so "
            f"that the lowest band frequency {f_low:g} Hz is resolved",
            subject=_sub(subject), stage=STAGE,
            fix="use a longer resting-state run, or lower preprocessing.func.dummy_scans / raise the low "
                "edge of preprocessing.func.band_hz")
    if n == 0:
        return img
    # Slicing the array proxy reads only the kept volumes.
    data = np.asarray(img.dataobj[..., n:])
    out = nib.Nifti1Image(data, img.affine, img.header)
    out.header.set_data_shape(data.shape)
    return out


# --------------------------------------------------------------------------------------------------
# Confounds
# --------------------------------------------------------------------------------------------------

def _motion_array(params: pd.DataFrame | np.ndarray) -> np.ndarray:
    """(T, 6) float64: trans_x..z (mm) then rot_x..z (radians)."""
    if isinstance(params, pd.DataFrame):
        missing = [c for c in MOTION_COLUMNS if c not in params.columns]
        if missing:
            raise ValueError(f"motion parameters lack columns {missing}; need {MOTION_COLUMNS}")
        arr = params[MOTION_COLUMNS].to_numpy(dtype=np.float64)
    else:
        arr = np.asarray(params, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 6:
        raise ValueError(f"motion parameters must be (T, 6), got {arr.shape}")
    return arr


def framewise_displacement(params: pd.DataFrame | np.ndarray, radius: float = FD_RADIUS_MM) -> np.ndarray:
    """Framewise displacement (Power et al. 2012), (T,) in mm; the first value is 0.

    FD_t = sum |d trans_{x,y,z}| + radius * sum |d rot_{x,y,z}|, with rotations in radians turned into arc
    lengths on a sphere of ``radius`` mm. ``params`` is (T, 6) or a DataFrame with fMRIPrep column names.
    """
    arr = _motion_array(params)
    d = np.abs(np.diff(arr, axis=0))
    fd = d[:, :3].sum(axis=1) + radius * d[:, 3:].sum(axis=1)
    return np.concatenate([[0.0], fd])


def dvars(data: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DVARS and standardised DVARS (Power 2012; Nichols 2013 as in nipype/fMRIPrep), each (T,).

    ``data`` is (X, Y, Z, T) with a boolean ``mask`` (X, Y, Z), or already (V, T) with ``mask`` None.
    The series is first scaled so that the median voxel mean is 1000 (as fMRIPrep does), then
    DVARS_t = sqrt(mean_v (x_{v,t} - x_{v,t-1})^2), in those units. std_dvars divides by its expectation for
    a temporally AR(1) series without artefacts, sqrt(mean_v) of 2 (1 - ar1_v) sigma_v^2 with a robust
    (IQR / 1.349) sigma, so it is ~1 for clean frames. The first value of both is NaN (no previous frame).
    """
    x = _as_vt(data, mask).astype(np.float64)
    means = x.mean(axis=1)
    if x.shape[1] < 2:
        raise ValueError("DVARS needs at least two volumes")
    med = np.median(means)
    if med != 0:
        x = x * (DVARS_SCALE / med)
    dv = np.sqrt(np.mean(np.diff(x, axis=1) ** 2, axis=0))
    # Standardisation: robust per-voxel sigma and lag-1 autocorrelation (Yule-Walker), zero-variance voxels
    # (background caught by the mask) excluded.
    q75, q25 = np.percentile(x, [75, 25], axis=1)
    sd = (q75 - q25) / 1.349
    keep = sd > 0
    xc = x[keep] - x[keep].mean(axis=1, keepdims=True)
    denom = np.sum(xc * xc, axis=1)
    ar1 = np.where(denom > 0, np.sum(xc[:, 1:] * xc[:, :-1], axis=1) / np.where(denom > 0, denom, 1), 0.0)
    expected = np.mean(np.sqrt(2.0 * (1.0 - ar1)) * sd[keep]) if keep.any() else 0.0
    # nipype's dvars_stdz: DVARS over the mean expected differenced sd.
    std = dv / expected if expected > 0 else np.full_like(dv, np.nan)
    nan = np.array([np.nan])
    return np.concatenate([nan, dv]), np.concatenate([nan, std])


def confounds_table(params: pd.DataFrame | np.ndarray, fd: np.ndarray, dvars: np.ndarray,
                    wm: np.ndarray, csf: np.ndarray, std_dvars: np.ndarray | None = None) -> pd.DataFrame:
    """The confounds TSV as a DataFrame, one row per (kept) volume, fMRIPrep column names.

    Columns: trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (radians), framewise_displacement (mm),
    dvars (series scaled to median 1000), std_dvars (unitless), white_matter and csf (mean BOLD signal in
    eroded WM / CSF masks, scanner units). Rows where a value is undefined (DVARS of the first frame) are NaN,
    written ``n/a`` in the TSV as fMRIPrep does.
    """
    arr = _motion_array(params)
    n = arr.shape[0]
    std = np.full(n, np.nan) if std_dvars is None else std_dvars
    cols = {"framewise_displacement": fd, "dvars": dvars, "std_dvars": std, "white_matter": wm, "csf": csf}
    for name, v in cols.items():
        if np.shape(v) != (n,):
            raise ValueError(f"{name} has shape {np.shape(v)}; expected ({n},) like the motion parameters")
    df = pd.DataFrame(arr, columns=MOTION_COLUMNS)
    for name, v in cols.items():
        df[name] = np.asarray(v, dtype=np.float64)
    return df[CONFOUND_COLUMNS]


def write_confounds(df: pd.DataFrame, path: str | Path) -> None:
    """Write the confounds TSV (tab-separated, ``n/a`` for NaN, BIDS style)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, sep="\t", index=False, na_rep="n/a", float_format="%.6g")


# --------------------------------------------------------------------------------------------------
# Denoising and filtering
# --------------------------------------------------------------------------------------------------

def _as_vt(data: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(X, Y, Z, T) + mask -> (V, T) view of the in-mask voxels; (V, T) passes through."""
    data = np.asarray(data)
    if mask is None:
        if data.ndim != 2:
            raise ValueError(f"pass a mask with 4D data, or data as (V, T); got {data.shape}")
        return data
    mask = np.asarray(mask, dtype=bool)
    if data.shape[:-1] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match data {data.shape}")
    return data[mask]


def regress_nuisance(data: np.ndarray, regressors: np.ndarray | None = None, detrend: bool = True,
                     keep_mean: bool = True) -> np.ndarray:
    """Residuals of voxel time series after OLS on nuisance regressors, (V, T) -> (V, T) float32.

    The design is [intercept, linear trend (if ``detrend``), regressors (T, K), each column centred]. With
    ``keep_mean`` each voxel's temporal mean is added back, so the cleaned series still looks like a BOLD image
    (masks and QC of the mean stay meaningful); fALFF/ReHo are unaffected by the constant. All voxels are
    solved at once through one pseudo-inverse of the (T, K+2) design.
    """
    y = np.asarray(data, dtype=np.float64)
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
    beta = np.linalg.pinv(design) @ y.T  # (P, V)
    resid = y - (design @ beta).T
    if keep_mean:
        resid += y.mean(axis=1, keepdims=True)
    return resid.astype(np.float32)


def bandpass(data: np.ndarray, tr: float, band: Sequence[float] = DEFAULT_BAND_HZ) -> np.ndarray:
    """Zero-phase band-pass (V, T) -> (V, T) float32, ``band`` in Hz, ``tr`` in seconds.

    Ideal (FFT-domain) filter after linear detrending, as REST/DPABI do for ReHo: it keeps exactly the
    frequencies fALFF calls low-frequency, with no filter order to tune on short series. The mean is kept.
    """
    y = np.asarray(data, dtype=np.float64)
    mean = y.mean(axis=1, keepdims=True)
    y = signal.detrend(y, axis=1, type="linear")
    freqs = np.fft.rfftfreq(y.shape[1], d=tr)
    spec = np.fft.rfft(y, axis=1)
    spec[:, (freqs < band[0]) | (freqs > band[1])] = 0.0
    return (np.fft.irfft(spec, n=y.shape[1], axis=1) + mean).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------------

def _amplitude_spectrum(data: np.ndarray, tr: float) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (F,) in Hz for 0 < f <= Nyquist and the one-sided amplitude spectrum (V, F), after
    linear detrending of each series (so drift does not dominate the lowest bins)."""
    y = signal.detrend(np.asarray(data, dtype=np.float64), axis=1, type="linear")
    freqs = np.fft.rfftfreq(y.shape[1], d=tr)
    amp = np.abs(np.fft.rfft(y, axis=1))
    return freqs[1:], amp[:, 1:]


def falff(data: np.ndarray, tr: float, band: Sequence[float] = DEFAULT_BAND_HZ) -> np.ndarray:
    """Fractional ALFF (Zou et al. 2008), (V, T) -> (V,) float32 in [0, 1].

    Sum of the amplitude spectrum (sqrt of power) over ``band`` (Hz, edges included) divided by its sum over
    the whole spectrum 0 < f <= 1 / (2 TR), after linear detrending; ``tr`` in seconds. A sinusoid inside the
    band gives ~1; white noise gives about the band's share of the frequency bins, (f_hi - f_lo) / Nyquist.
    A constant series (no spectrum) gives 0.
    """
    freqs, amp = _amplitude_spectrum(data, tr)
    inband = (freqs >= band[0]) & (freqs <= band[1])
    if not inband.any():
        raise ValueError(f"no frequency bin in {tuple(band)} Hz for {np.shape(data)[1]} volumes at TR {tr} s")
    total = amp.sum(axis=1)
    part = amp[:, inband].sum(axis=1)
    # A constant (or linear) series leaves only round-off after detrending; call it "no spectrum", not a
    # ratio of rounding errors. Round-off is ~1e-16 of the signal's magnitude per bin.
    scale = np.abs(np.asarray(data, dtype=np.float64)).max(axis=1) * amp.shape[1]
    has_spectrum = total > 1e-10 * np.maximum(scale, np.finfo(np.float64).tiny)
    out = np.divide(part, total, out=np.zeros_like(total), where=has_spectrum)
    return out.astype(np.float32)


def alff(data: np.ndarray, tr: float, band: Sequence[float] = DEFAULT_BAND_HZ) -> np.ndarray:
    """ALFF, (V, T) -> (V,) float32: mean one-sided amplitude over ``band`` (Hz), in the data's units.

    Amplitude of bin k is 2 |X_k| / T, so a sinusoid of amplitude a on a bin gives a at that bin.
    """
    freqs, amp = _amplitude_spectrum(data, tr)
    inband = (freqs >= band[0]) & (freqs <= band[1])
    if not inband.any():
        raise ValueError(f"no frequency bin in {tuple(band)} Hz for {np.shape(data)[1]} volumes at TR {tr} s")
    n_t = np.shape(data)[1]
    return (2.0 / n_t * amp[:, inband].mean(axis=1)).astype(np.float32)


_NEIGHBOUR_OFFSETS = {
    27: [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)],
    19: [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if abs(i) + abs(j) + abs(k) <= 2],
    7: [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1) if abs(i) + abs(j) + abs(k) <= 1],
}


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
    if neighbourhood not in _NEIGHBOUR_OFFSETS:
        raise ValueError(f"neighbourhood must be one of {sorted(_NEIGHBOUR_OFFSETS)}, got {neighbourhood}")
    data = np.asarray(data)
    mask = np.asarray(mask, dtype=bool)
    if data.ndim != 4 or data.shape[:3] != mask.shape:
        raise ValueError(f"data must be (X, Y, Z, T) matching mask {mask.shape}, got {data.shape}")
    out = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return out
    # Work inside the mask's bounding box (+1 voxel), which is most of the cost saved for a head in a FOV.
    (x0, y0, z0), (x1, y1, z1) = np.argwhere(mask).min(0), np.argwhere(mask).max(0) + 1
    box = (slice(x0, x1), slice(y0, y1), slice(z0, z1))
    m = mask[box]
    n_t = data.shape[3]
    # Ranks are integers or half-integers <= n: float32 holds them, and their sums over <= 27 voxels, exactly.
    ranks = np.zeros(m.shape + (n_t,), dtype=np.float32)
    ranks[m] = stats.rankdata(data[box][m], axis=1)
    r_sum = _neighbour_sum(ranks, neighbourhood)[m].astype(np.float64)  # (V, T)
    k = _neighbour_sum(m.astype(np.float32), neighbourhood)[m].astype(np.float64)  # (V,)
    s2 = np.einsum("vt,vt->v", r_sum, r_sum)
    w = (12.0 * s2 - 3.0 * k**2 * n_t * (n_t + 1) ** 2) / (k**2 * (n_t**3 - n_t))
    w[k < 2] = 0.0
    sub = np.zeros(m.shape, dtype=np.float32)
    sub[m] = w
    out[box] = sub
    return out


def null_reho(mask: np.ndarray, neighbourhood: int = 27) -> np.ndarray:
    """Expected ReHo under independence, E[W] = 1/K per voxel (K in-mask neighbours incl. itself), (X, Y, Z)."""
    m = np.asarray(mask, dtype=bool)
    k = _neighbour_sum(m.astype(np.float32), neighbourhood)
    out = np.zeros(m.shape, dtype=np.float32)
    sel = m & (k >= 2)
    out[sel] = 1.0 / k[sel]
    return out
