"""Resting-state fMRI: dummy scans, confounds, WM/CSF masks, and the stage driver (nuisance regression, fALFF
and ReHo themselves are in ``neuromoe.preproc.series``).

Array conventions: a 4D BOLD is (X, Y, Z, T) in voxel order with its NIfTI affine; voxel time series
are flattened to (V, T) (V in-mask voxels, T volumes). Times are in seconds, frequencies in Hz,
translations in mm, rotations in radians (fMRIPrep column names).

The pure functions are vectorised over voxels and work through them a block of rows at a time: a 4 mm BOLD
(~50 x 60 x 50 x 120) takes about a second for confounds, regression, fALFF and ReHo together; realignment and
registration dominate ``run_func``. The series is realigned in place and then only the brain mask's series (V, T)
is kept, so the stage's peak memory is reading the series (an int16 file as float32: 1.5 float32 copies).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from neuromoe.errors import StageError
from neuromoe.inputs.bids import min_volumes  # the rule lives with the start-up checks
from neuromoe.paths import FUNC_MAP_KEYS, subject_label
from neuromoe.preproc.masks import epi_mask
from neuromoe.preproc.series import DEFAULT_BAND_HZ, bandpass, falff, regress_nuisance, reho_series, row_blocks

if TYPE_CHECKING:  # SimpleITK costs ~1 s to import; only run_func and priors_to_native need it, lazily
    import SimpleITK as sitk

    from neuromoe.config import FuncConfig

STAGE = "func"
MOTION_COLUMNS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
CONFOUND_COLUMNS = MOTION_COLUMNS + ["framewise_displacement", "dvars", "std_dvars", "white_matter", "csf"]
# Power et al. 2012: rotations (radians) become arc lengths on a sphere of this radius (mm),
# the typical distance from the centre of the head to the cortex.
FD_RADIUS_MM = 50.0
# fMRIPrep/nipype scale the series so the median in-mask mean is 1000 before DVARS, so DVARS values are
# comparable across scanners and subjects.
DVARS_SCALE = 1000.0


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
        raise StageError("the BOLD sidecar JSON does not exist", subject=subject_label(subject), stage=STAGE,
                         path=path, fix=f"create it with {fix.removeprefix('add ')}") from exc
    except json.JSONDecodeError as exc:
        raise StageError(f"the BOLD sidecar is not valid JSON ({exc.msg}, line {exc.lineno})",
                         subject=subject_label(subject), stage=STAGE, path=path, fix="repair the JSON syntax") from exc
    if not isinstance(meta, dict) or "RepetitionTime" not in meta:
        raise StageError("no RepetitionTime in the BOLD sidecar", subject=subject_label(subject), stage=STAGE,
                         path=path, fix=fix)
    tr = meta["RepetitionTime"]
    if isinstance(tr, bool) or not isinstance(tr, int | float) or not math.isfinite(tr) or tr <= 0:
        raise StageError(f"RepetitionTime is {tr!r}; it must be a positive number of seconds",
                         subject=subject_label(subject), stage=STAGE, path=path, fix=fix)
    if tr > 100:  # a TR in milliseconds is the usual mistake
        raise StageError(f"RepetitionTime is {tr}, which looks like milliseconds; BIDS wants seconds",
                         subject=subject_label(subject), stage=STAGE, path=path, fix=f"write {tr / 1000:g} instead")
    return float(tr)


def drop_dummy_scans(img: nib.Nifti1Image, n: int, tr: float | None = None, *,
                     f_low: float = DEFAULT_BAND_HZ[0], subject: str | None = None) -> nib.Nifti1Image:
    """Remove the first ``n`` volumes (scanner not yet at steady state) of a 4D image (X, Y, Z, T).

    ``tr`` (seconds; from the sidecar, default the header's pixdim[4]) is used to check that the volumes
    left span at least one period of the lowest band frequency ``f_low`` (Hz), i.e. T * TR >= 1 / f_low,
    without which fALFF and the band-pass have no low-frequency bin; StageError otherwise.
    """
    if img.ndim != 4:
        raise StageError(f"the BOLD image is {img.ndim}D {img.shape}; a 4D time series is needed",
                         subject=subject_label(subject), stage=STAGE, fix="pass the 4D *_bold.nii.gz")
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
            subject=subject_label(subject), stage=STAGE,
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


def dvars(data: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DVARS and standardised DVARS (Power 2012; Nichols 2013 as in nipype/fMRIPrep), each (T,).

    ``data`` is (X, Y, Z, T) with a boolean ``mask`` (X, Y, Z), or already (V, T) with ``mask`` None.
    The series is first scaled so that the median voxel mean is 1000 (as fMRIPrep does), then
    DVARS_t = sqrt(mean_v (x_{v,t} - x_{v,t-1})^2), in those units. std_dvars divides by its expectation for
    a temporally AR(1) series without artefacts, sqrt(mean_v) of 2 (1 - ar1_v) sigma_v^2 with a robust
    (IQR / 1.349) sigma, so it is ~1 for clean frames. The first value of both is NaN (no previous frame).
    """
    x = _as_vt(data, mask)
    n_v, n_t = x.shape
    if n_t < 2:
        raise ValueError("DVARS needs at least two volumes")
    blocks = list(row_blocks(n_v, n_t, itemsize=8 * 4))  # float64 block, differences, percentiles, centred
    med = np.median(np.concatenate([x[b].astype(np.float64).mean(axis=1) for b in blocks])) if n_v else 0.0
    scale = DVARS_SCALE / med if med != 0 else 1.0
    sq = np.zeros(n_t - 1)  # sum over voxels of the squared frame-to-frame differences
    sd, ar1 = np.zeros(n_v), np.zeros(n_v)
    for b in blocks:
        xb = x[b].astype(np.float64) * scale
        sq += np.sum(np.diff(xb, axis=1) ** 2, axis=0)
        # Standardisation: robust per-voxel sigma and lag-1 autocorrelation (Yule-Walker); zero-variance voxels
        # (background caught by the mask) are excluded below.
        q75, q25 = np.percentile(xb, [75, 25], axis=1)
        sd[b] = (q75 - q25) / 1.349
        xc = xb - xb.mean(axis=1, keepdims=True)
        denom = np.sum(xc * xc, axis=1)
        ar1[b] = np.where(denom > 0, np.sum(xc[:, 1:] * xc[:, :-1], axis=1) / np.where(denom > 0, denom, 1), 0.0)
    dv = np.sqrt(sq / n_v) if n_v else np.full(n_t - 1, np.nan)
    keep = sd > 0
    expected = np.mean(np.sqrt(2.0 * (1.0 - ar1[keep])) * sd[keep]) if keep.any() else 0.0
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
# Tissue masks for the WM / CSF confounds
# --------------------------------------------------------------------------------------------------

# Brain-mask erosion (mm) before CSF is read off the template: keeps the ventricles, drops the brain edge,
# where "neither GM nor WM" is partial volume with skull and background rather than CSF.
CSF_EDGE_MM = 10.0
TISSUE_THRESHOLDS = {"wm": 0.9, "csf": 0.7}  # prior probability, after averaging into BOLD voxels
MIN_TISSUE_VOXELS = 10


def template_tissue_priors() -> tuple[nib.Nifti1Image, dict[str, np.ndarray]]:
    """MNI152 2009a (nilearn, 2 mm grid) WM and CSF prior probabilities, (99, 117, 95) each, in [0, 1].

    nilearn ships WM and GM probability maps but no CSF map: CSF is taken as the brain mask minus GM minus WM,
    inside the brain mask eroded by ``CSF_EDGE_MM`` (which leaves the ventricles and deep sulci).
    """
    from neuromoe.inputs.templates import nilearn_image

    template = nilearn_image("load_mni152_template")
    wm = np.asarray(nilearn_image("load_mni152_wm_template").dataobj, dtype=np.float64)
    gm = np.asarray(nilearn_image("load_mni152_gm_template").dataobj, dtype=np.float64)
    brain = np.asarray(nilearn_image("load_mni152_brain_mask").dataobj) > 0
    voxel_mm = float(np.abs(np.diag(template.affine)[:3]).mean())
    inner = ndimage.binary_erosion(brain, iterations=max(1, round(CSF_EDGE_MM / voxel_mm)))
    csf = np.clip(1.0 - wm - gm, 0.0, 1.0) * inner
    return template, {"wm": np.clip(wm, 0.0, 1.0), "csf": csf}


def priors_to_native(reference: nib.Nifti1Image, mni_to_native: sitk.Transform | None,
                     priors: Mapping[str, np.ndarray], template: nib.Nifti1Image,
                     threads: int = 1) -> dict[str, np.ndarray]:
    """Template probability maps (on ``template``'s grid) brought onto ``reference``'s grid, (X, Y, Z) each.

    Only the forward transform ``mni_to_native`` (ITK: MNI points -> native points, the one that puts native
    maps into MNI; None: identity, the two grids share a world) is used, so a non-invertible (B-spline)
    T1w -> MNI works as well as an affine one: every template voxel is sent to the native voxel it lands in
    (nearest-neighbour pull of a native index image onto the template grid), and each native voxel gets the
    mean prior of the template voxels that land in it.
    With the 2 mm template and 3-4 mm BOLD, 3-8 template voxels land in each native voxel; native voxels
    nobody lands in (finer than the template) get 0.
    """
    from neuromoe.inputs.imageio import new_image
    from neuromoe.preproc import registration as reg

    shape = reference.shape[:3]
    n_vox = int(np.prod(shape))
    if n_vox >= 2**24:  # the index image is float32 in ITK; beyond this it would not be exact
        raise ValueError(f"reference grid {shape} too large for the index pull")
    # Index + 1 so that 0 (the value for points outside the native field of view) means "nowhere".
    index = np.arange(1, n_vox + 1, dtype=np.float32).reshape(shape)
    pulled = reg.resample(new_image(index, reference.affine), template, mni_to_native, interp="nearest",
                          default=0.0, threads=threads)
    idx = np.rint(np.asarray(pulled.dataobj)).astype(np.int64).ravel()
    hit = idx > 0
    target = idx[hit] - 1
    counts = np.bincount(target, minlength=n_vox).astype(np.float64)
    out = {}
    for name, prob in priors.items():
        sums = np.bincount(target, weights=np.asarray(prob, dtype=np.float64).ravel()[hit], minlength=n_vox)
        out[name] = np.divide(sums, counts, out=np.zeros(n_vox), where=counts > 0).reshape(shape)
    return out


def tissue_mask(prob: np.ndarray, brain: np.ndarray, threshold: float,
                min_voxels: int = MIN_TISSUE_VOXELS) -> np.ndarray:
    """Eroded tissue mask (X, Y, Z) bool: prior >= ``threshold`` inside ``brain``, eroded by one voxel.

    Erosion keeps the mean signal away from partial volume with the neighbouring tissue; it is skipped when
    it would leave fewer than ``min_voxels`` (small ventricles at 4 mm), and when even the threshold leaves
    too few, the ``min_voxels`` voxels of highest prior are used. Empty only if no brain voxel has a prior.
    """
    cand = (prob >= threshold) & brain
    eroded = ndimage.binary_erosion(cand)
    if eroded.sum() >= min_voxels:
        return eroded
    if cand.sum() >= min_voxels:
        return cand
    inside = np.flatnonzero((brain & (prob > 0)).ravel())
    if inside.size == 0:
        return cand
    top = inside[np.argsort(prob.ravel()[inside])[::-1][:min_voxels]]
    out = np.zeros(prob.shape, bool)
    out.ravel()[top] = True
    return out


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

NUISANCE_COLUMNS = {"motion": MOTION_COLUMNS, "wm": ["white_matter"], "csf": ["csf"]}


def band_hz(cfg: FuncConfig) -> tuple[float, float]:
    """``cfg.band_hz`` as (low, high) floats, Hz."""
    return float(cfg.band_hz[0]), float(cfg.band_hz[1])


def run_func(inputs: Mapping[str, str], outputs: Mapping[str, str], subject: str, cfg: FuncConfig,
             threads: int = 1) -> Mapping[str, str]:
    """The func stage for one subject; writes every ``func_*`` and ``qc_func_*`` output (see neuromoe.paths).

    inputs: ``bold`` (4D NIfTI), ``bold_json`` (sidecar with RepetitionTime, s), ``anat_brain``
    (skull-stripped T1w), optional ``anat_mask`` (its brain mask; default anat_brain > 0), ``anat_xfm``
    (ITK .txt, T1w -> MNI in "image" mode, i.e. mapping MNI points to T1w points).
    cfg: ``dummy_scans``, ``band_hz``, ``nuisance``.

    Steps:
      1. TR from the sidecar; drop ``dummy_scans`` (StageError if < 1/f_low seconds remain).
      2. Rigid realignment of every volume to the middle one (correlation; mcflirt's default reference).
      3. Brain mask of the mean realigned BOLD (``masks.epi_mask``: nilearn's ``compute_epi_mask``), minus
         voxels that left the field of view in any volume (their series would contain zeros).
      4. Mean BOLD -> T1w brain, rigid, mutual information, metric masks dilated by ~1 BOLD voxel so the
         brain edge counts (``func_xfm``: T1w points -> BOLD points); composed with ``anat_xfm`` it maps MNI
         points to BOLD points.
      5-8. ``derive_maps``: tissue signals, confounds, nuisance regression, fALFF and ReHo (native); the maps
         go onto the MNI 2 mm template grid (99 x 117 x 95) through the composed transform in one linear
         interpolation.
      9. ``write_outputs``: files and QC (fALFF/ReHo slices and the motion traces with FD).
    Returns ``outputs``.
    """
    import logging
    import time

    from neuromoe.inputs.imageio import load_image, new_image
    from neuromoe.preproc import registration as reg
    from neuromoe.preproc.motion import realign_series

    log = logging.getLogger("neuromoe.func")
    sub = subject_label(subject)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    last = [t_start]

    def lap(step: str) -> None:
        """Seconds spent in ``step`` (logged at the end: where a subject's time goes)."""
        now = time.perf_counter()
        timings[step], last[0] = now - last[0], now

    n_dummy, band = int(cfg.dummy_scans), band_hz(cfg)

    # 1. inputs
    tr = repetition_time(inputs["bold_json"], subject)
    raw = load_image(inputs["bold"], subject=subject, ndim=4)
    if not np.isfinite(np.asarray(raw.dataobj)).all():
        raise StageError("the BOLD series contains NaN or infinite values", subject=sub, stage=STAGE,
                         path=inputs["bold"], fix="check the scanner export / conversion to NIfTI")
    header_tr = float(raw.header.get_zooms()[3])
    if header_tr > 0 and abs(header_tr - tr) > 1e-3 * tr:  # the sidecar wins (BIDS); say so
        log.warning("%s: TR %.4g s in the NIfTI header differs from RepetitionTime %.4g s in %s; using the "
                    "sidecar", sub, header_tr, tr, inputs["bold_json"])
    img = drop_dummy_scans(raw, n_dummy, tr, f_low=band[0], subject=subject)
    del raw  # (img's voxels may be a view of it)
    affine = img.affine
    lap("inputs")

    # 2. realignment
    corrected, motion = realign_series(img, metric="corr", subject=sub, threads=threads, inplace=True)
    # (corrected in place: img's voxels are now the realigned series.) Its grid and header for the outputs, without
    # the voxels, so that the series can be freed once the brain's are taken.
    img = nib.Nifti1Image(np.zeros(img.shape[:3] + (1,), np.uint8), affine, img.header)
    data = np.asarray(corrected.dataobj, dtype=np.float32)  # (X, Y, Z, T)
    del corrected
    n_t = data.shape[3]
    log.info("%s: realigned %d volumes in %.1f s", sub, n_t, motion.attrs.get("seconds", float("nan")))
    lap("realign")

    # 3. brain mask; from here on only its voxels' series (V, T) are kept
    mean_bold = data.mean(axis=3)
    mean_img = new_image(mean_bold, affine)
    mask = epi_mask(mean_bold)
    mask &= data.min(axis=3) > 0
    if mask.sum() < 100:
        raise StageError(f"the BOLD brain mask is (nearly) empty ({int(mask.sum())} voxels)", subject=sub,
                         stage=STAGE, path=inputs["bold"], fix="check that the BOLD volumes contain a head")
    series = data[mask]
    del data
    lap("mask")

    # 4. BOLD -> T1w, and MNI -> BOLD
    t1 = load_image(inputs["anat_brain"], subject=subject, ndim=3)
    if inputs.get("anat_mask"):
        t1_mask = load_image(inputs["anat_mask"], subject=subject, ndim=3)
    else:
        t1_mask = new_image(np.asarray(t1.dataobj) > 0, t1.affine, dtype=np.uint8)
    # Both metric masks are dilated by about one BOLD voxel so that the brain's edge, the strongest feature
    # shared by a T1w brain and a low-resolution EPI, is sampled; the mean BOLD is not cut by the
    # (conservative) EPI mask, whose edge would not match the T1w brain's and biased the fit by ~3 mm on test
    # data.
    bold_mm = float(np.mean(np.abs(img.header.get_zooms()[:3])))
    t1_zoom = float(min(np.abs(t1.header.get_zooms()[:3])))
    fixed_mask = ndimage.binary_dilation(np.asarray(t1_mask.dataobj) > 0,
                                         iterations=max(1, math.ceil(bold_mm / t1_zoom)))
    moving_mask = ndimage.binary_dilation(mask, iterations=2)
    bold_to_t1 = reg.register(t1, mean_img, kind="rigid", metric="mi",
                              fixed_mask=new_image(fixed_mask, t1.affine, dtype=np.uint8),
                              moving_mask=new_image(moving_mask, affine, dtype=np.uint8), threads=threads)
    t1_to_mni = reg.read_transform(inputs["anat_xfm"])
    mni_to_bold = reg.compose(t1_to_mni, bold_to_t1)  # MNI points -> T1w points -> BOLD points
    lap("register")

    # 5-8. tissue signals, confounds, regression, maps; then MNI
    derived = derive_maps(series, mask, affine, mean_img, motion, mni_to_bold, tr, cfg, subject=subject,
                          bold_path=inputs["bold"], threads=threads, maps=wanted_maps(outputs))
    del series
    lap("derive")
    maps_mni = {name: reg.resample(m, derived.template, mni_to_bold, interp="linear", threads=threads)
                for name, m in derived.maps.items()}
    lap("mni")

    # 9. files and QC
    write_outputs(outputs, subject, bold=img, tr=tr, mask=mask, derived=derived, maps_mni=maps_mni,
                  transform=bold_to_t1)
    lap("write")
    log.info("%s: func stage done in %.1f s (%s)", sub, time.perf_counter() - t_start,
             ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return outputs


FUNC_MAPS = tuple(FUNC_MAP_KEYS)  # fALFF, ReHo


def wanted_maps(outputs: Mapping[str, str]) -> tuple[str, ...]:
    """The maps whose files the stage is asked for (``cache.func_maps``: a map nobody uses is not computed)."""
    return tuple(m for m, keys in FUNC_MAP_KEYS.items() if any(k in outputs for k in keys))


@dataclass
class FuncDerivatives:
    """What ``derive_maps`` computes from a realigned series (native BOLD grid)."""

    confounds: pd.DataFrame  # one row per volume, CONFOUND_COLUMNS
    clean: np.ndarray  # (V, T) float32, the cleaned series of the mask's voxels (rows in the order of data[mask])
    maps: dict[str, nib.Nifti1Image]  # fALFF, ReHo (float32, BOLD grid)
    template: nib.Nifti1Image  # the MNI 2 mm template the tissue priors came from (the grid of the MNI maps)


def derive_maps(series: np.ndarray, mask: np.ndarray, affine: np.ndarray, mean_img: nib.Nifti1Image,
                motion: pd.DataFrame, mni_to_bold: sitk.Transform, tr: float, cfg: FuncConfig, *, subject: str | None,
                bold_path: str | Path, threads: int = 1, maps: Sequence[str] = FUNC_MAPS) -> FuncDerivatives:
    """Everything the func stage derives in Python from a realigned series (both backends; FSL has no fALFF/ReHo).

    ``series`` (V, T) the realigned BOLD of the ``mask``'s voxels (``data[mask]`` of the (X, Y, Z, T) series; the
    caller can let the 4D series go), ``mask`` (X, Y, Z) bool brain mask on the grid of ``affine``, ``mean_img``
    the series' mean over time,
    ``motion`` the table of ``MOTION_COLUMNS`` (mm, radians), ``mni_to_bold`` (ITK) maps MNI points to BOLD
    points, ``tr`` seconds. Steps:
      1. WM and CSF masks in BOLD space from the MNI template's priors (not from an intensity segmentation of
         the mean BOLD, whose EPI contrast separates tissues poorly), pulled through the forward MNI -> BOLD
         transform (``priors_to_native``), thresholded and eroded (``tissue_mask``); StageError if one is empty.
      2. Confounds: 6 motion parameters, FD, DVARS, std_dvars, mean WM and CSF signals, fMRIPrep column names.
      3-4. ``clean_and_map``: nuisance regression, then fALFF and ReHo (only those named in ``maps``).
    """
    import logging

    sub = subject_label(subject)
    _check_series(series, mask)
    # 1. WM / CSF masks in BOLD space
    template, priors = template_tissue_priors()
    native = priors_to_native(mean_img, mni_to_bold, priors, template, threads=threads)
    tissue = {k: tissue_mask(native[k], mask, TISSUE_THRESHOLDS[k]) for k in ("wm", "csf")}
    for k, m in tissue.items():
        if not m.any():
            raise StageError(f"no {k.upper()} voxels found in BOLD space", subject=sub, stage=STAGE,
                             path=bold_path,
                             fix="check the BOLD -> T1w -> MNI registration (QC figures of the anat stage)")
    logging.getLogger("neuromoe.func").info("%s: WM mask %d voxels, CSF mask %d voxels", sub, tissue["wm"].sum(),
                                            tissue["csf"].sum())

    # 2. confounds (the tissue masks lie inside the brain mask: their rows of the series)
    fd, (dv, std_dv) = framewise_displacement(motion), dvars(series)
    wm_sig, csf_sig = (series[tissue[k][mask]].mean(axis=0) for k in ("wm", "csf"))
    confounds = confounds_table(motion, fd, dv, wm_sig, csf_sig, std_dvars=std_dv)
    clean, out = clean_and_map(series, mask, affine, confounds, tr, cfg, maps)
    return FuncDerivatives(confounds=confounds, clean=clean, maps=out, template=template)


def _check_series(series: np.ndarray, mask: np.ndarray) -> None:
    if np.ndim(series) != 2 or np.shape(series)[0] != int(np.count_nonzero(mask)):
        raise ValueError(f"series must be (V, T) with V = {int(np.count_nonzero(mask))} mask voxels (data[mask]), "
                         f"got {np.shape(series)}")


def clean_and_map(series: np.ndarray, mask: np.ndarray, affine: np.ndarray, confounds: pd.DataFrame, tr: float,
                  cfg: FuncConfig, maps: Sequence[str] = FUNC_MAPS) -> tuple[np.ndarray, dict[str, nib.Nifti1Image]]:
    """OLS nuisance regression (intercept, linear trend, the ``cfg.nuisance`` columns of ``confounds``; the mean
    is kept) of the in-mask ``series`` (V, T) (``data[mask]``), then fALFF of the cleaned series and ReHo (27
    neighbours) of it band-passed to ``cfg.band_hz`` (only those named in ``maps``). Returns the cleaned series
    (V, T) and the maps on ``affine``'s grid. Shared by ``derive_maps`` and by the maps of an ingested fMRIPrep
    series (``neuromoe.preproc.ingest``)."""
    from neuromoe.inputs.imageio import new_image

    _check_series(series, mask)
    band = band_hz(cfg)
    chosen = [c for k in cfg.nuisance for c in NUISANCE_COLUMNS[k]]
    regressors = confounds[chosen].to_numpy(dtype=float) if chosen else None
    clean = regress_nuisance(series, regressors, detrend=True, keep_mean=True)  # (V, T)
    out: dict[str, nib.Nifti1Image] = {}
    if "fALFF" in maps:
        falff_vol = np.zeros(mask.shape, dtype=np.float32)
        falff_vol[mask] = falff(clean, tr, band)
        out["fALFF"] = new_image(falff_vol, affine)
    if "ReHo" in maps:
        out["ReHo"] = new_image(reho_series(clean, mask, 27, prefilter=lambda rows: bandpass(rows, tr, band)), affine)
    return clean, out


def write_outputs(outputs: Mapping[str, str], subject: str, *, bold: nib.Nifti1Image, tr: float, mask: np.ndarray,
                  derived: FuncDerivatives, maps_mni: Mapping[str, nib.Nifti1Image], transform: sitk.Transform | None,
                  qc_note: str = "", motion_source: str = "") -> None:
    """Write the func stage's files (both backends).

    ``bold``: an image with the grid and header of the series after the dummy scans (its voxels are not read; the
    header of ``func_preproc``, whose TR is set to ``tr``; the cleaned series is written only when ``outputs`` has
    that key: ``preprocessing.keep_series``);
    ``mask`` (X, Y, Z) bool; ``maps_mni``: fALFF and ReHo on the MNI grid; ``transform`` (ITK) maps T1w points to
    BOLD points. QC figures when their keys are in ``outputs``; ``qc_note`` and ``motion_source`` go into their
    titles (e.g. "FSL", "mcflirt").
    """
    from neuromoe.inputs.imageio import new_image, save_map, save_mask
    from neuromoe.preproc import registration as reg

    sub = subject_label(subject)
    affine = bold.affine
    write_confounds(derived.confounds, outputs["func_confounds"])
    if "func_preproc" in outputs:  # the series: preprocessing.keep_series
        series = np.zeros(mask.shape + (derived.clean.shape[1],), dtype=np.float32)  # 0 outside the mask
        series[mask] = derived.clean
        preproc_img = new_image(series, affine, like=bold)
        preproc_img.header.set_xyzt_units("mm", "sec")
        preproc_img.header.set_zooms(preproc_img.header.get_zooms()[:3] + (tr,))
        save_map(preproc_img, outputs["func_preproc"])
    save_mask(mask, outputs["func_mask"], affine=affine)
    if "func_xfm" in outputs:  # an ingested fMRIPrep series has none of its own (neuromoe.preproc.ingest)
        reg.write_transform(transform, outputs["func_xfm"])
    for name, m in derived.maps.items():
        save_map(m, outputs[f"func_{name.lower()}"])
        save_map(maps_mni[name], outputs[f"func_{name.lower()}_mni"])
    if "qc_func_maps" in outputs or "qc_func_motion" in outputs:
        from neuromoe.preproc import qc

        confounds = derived.confounds
        if "qc_func_maps" in outputs:
            qc.plot_map_slices(derived.maps, outputs["qc_func_maps"],
                               title=f"{sub} {' / '.join(derived.maps)} (native{', ' + qc_note if qc_note else ''})",
                               mask=new_image(mask, affine, dtype=np.uint8))
        if "qc_func_motion" in outputs:
            qc.plot_motion(confounds[MOTION_COLUMNS], outputs["qc_func_motion"],
                           title=f"{sub} BOLD motion{f' ({motion_source})' if motion_source else ''}",
                           fd=confounds["framewise_displacement"].to_numpy())
