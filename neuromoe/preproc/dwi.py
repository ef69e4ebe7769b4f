"""Diffusion stage (python backend): b=0 brain mask, motion correction, tensor fit, FA/MD/AD/RD -> MNI.

``run_dwi`` is what the ``dwi`` rule calls. The pieces are usable alone:

* ``b0_mask``: brain mask from the mean b=0 image (dipy's median_otsu, largest component, holes filled).
* ``fit_tensor``: a vectorised diffusion tensor fit (log-linear OLS, or the weighted least squares of
  Salvador et al. 2005 with weights = fitted signal squared, as dipy's ``wls_fit_tensor``), eigenvalues
  from ``numpy.linalg.eigh`` clipped at 0, and the scalar maps.

Units: b-values s/mm^2, diffusivities (MD, AD, RD, eigenvalues) mm^2/s, FA unitless in [0, 1].
Native maps are on the DWI grid; MNI maps on the 2 mm MNI152 2009a template grid (99 x 117 x 95).
Motion correction is rigid (head motion); eddy-current distortions are not modelled by this backend.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from neuromoe.errors import InputError, StageError
from neuromoe.paths import subject_label
from neuromoe.preproc.masks import largest_component
from neuromoe.preproc.motion import realign_series, rotate_bvecs, rotations_from_params

if TYPE_CHECKING:  # SimpleITK costs ~1 s to import; run_dwi loads it (through registration) when it runs
    import SimpleITK as sitk

    from neuromoe.config import DwiConfig

log = logging.getLogger("neuromoe.dwi")
STAGE = "dwi"
MAPS = ("FA", "MD", "AD", "RD")
MIN_SIGNAL = 1e-4  # signals are clipped here before the log (dipy uses the same floor)


# ----------------------------------------------------------------------------------------------
# mask
# ----------------------------------------------------------------------------------------------
def mean_b0(data: np.ndarray, bvals: np.ndarray, b0_threshold: float = 50.0) -> np.ndarray:
    """Mean of the b=0 volumes (``bval <= b0_threshold``) of a (X, Y, Z, N) series -> (X, Y, Z) float32."""
    b0 = np.flatnonzero(np.asarray(bvals) <= b0_threshold)
    if b0.size == 0:
        raise ValueError(f"no b=0 volume (b <= {b0_threshold} s/mm^2) among b-values {np.unique(bvals)}")
    return np.asarray(data[..., b0], dtype=np.float32).mean(axis=-1)


def b0_mask(dwi: nib.Nifti1Image, bvals: np.ndarray, b0_threshold: float = 50.0) -> np.ndarray:
    """Brain mask (X, Y, Z) bool of a DWI series from its mean b=0 image.

    dipy's median_otsu (median filter, then Otsu threshold; two passes), with a median radius of ~4 mm
    in voxels so that it means the same at 1.25, 2 and 3 mm (1 voxel at 3 mm: Dice 0.99 on the test
    phantom, 4x faster than 2 voxels, which also rounds off the cortex); then the largest connected
    component (drops scalp and eye fragments), a one-voxel closing and 3D hole filling (dark structures
    inside the brain must not become holes).
    """
    b0 = mean_b0(np.asarray(dwi.dataobj, dtype=np.float32), bvals, b0_threshold)
    zoom = float(np.mean(dwi.header.get_zooms()[:3]))
    radius = max(1, int(round(4.0 / zoom)))
    mask = median_otsu_mask(b0, radius, numpass=2)
    mask = largest_component(mask)
    mask = ndimage.binary_closing(mask, iterations=1, border_value=0)
    return ndimage.binary_fill_holes(mask)


def median_otsu_mask(volume: np.ndarray, median_radius: int, numpass: int) -> np.ndarray:
    """The mask of dipy's ``median_otsu`` (its defaults otherwise): ``numpass`` median filters of width
    ``2 * median_radius + 1``, then dipy's Otsu threshold. The same steps as dipy 1.12's ``multi_median``
    (tested equal to ``median_otsu``), without importing ``dipy.segment.mask``, which imports dipy's tensor
    module for another function and cost every dwi job ~0.4 CPU s."""
    from dipy.segment.threshold import otsu

    smooth = volume
    for _ in range(numpass):
        smooth = ndimage.median_filter(smooth, size=2 * int(median_radius) + 1)
    return smooth > otsu(smooth)


# ----------------------------------------------------------------------------------------------
# tensor fit
# ----------------------------------------------------------------------------------------------
def design_matrix(bvals: np.ndarray, bvecs: np.ndarray) -> np.ndarray:
    """(N, 7) log-linear design: ``log S = B @ [Dxx, Dyy, Dzz, Dxy, Dxz, Dyz, log S0]``.

    Row n: ``[-b gx^2, -b gy^2, -b gz^2, -2b gx gy, -2b gx gz, -2b gy gz, 1]`` (bvals s/mm^2, bvecs (3, N)
    unit vectors; the b=0 rows reduce to ``[0, ..., 0, 1]`` whatever their vector).
    """
    b = np.asarray(bvals, float)
    g = np.asarray(bvecs, float)
    gx, gy, gz = g
    return np.column_stack([-b * gx * gx, -b * gy * gy, -b * gz * gz,
                            -2 * b * gx * gy, -2 * b * gx * gz, -2 * b * gy * gz, np.ones_like(b)])


def _normalise_bvecs(bvecs: np.ndarray) -> np.ndarray:
    """Unit b-vectors (3, N); zero and non-finite columns (some exports write NaN for b=0) become 0."""
    g = np.nan_to_num(np.asarray(bvecs, float), nan=0.0, posinf=0.0, neginf=0.0)
    norm = np.linalg.norm(g, axis=0)
    nz = norm > 1e-8
    g[:, nz] /= norm[nz]
    return g


def _solve_wls(design: np.ndarray, logs: np.ndarray, beta_ols: np.ndarray) -> np.ndarray:
    """Per-voxel WLS (V, 7) with weights w = exp(2 B beta_ols) (= fitted signal squared, Salvador 2005)."""
    eta = beta_ols @ design.T                                  # (V, N) fitted log signal
    # Normalising per voxel (weights matter only up to a factor) keeps S^2 ~ 1e6-1e8 from overflowing.
    w = np.exp(2.0 * (eta - eta.max(axis=1, keepdims=True)))   # (V, N)
    lhs = np.einsum("vn,ni,nj->vij", w, design, design)       # (V, 7, 7) = B^T W B
    rhs = np.einsum("vn,ni,vn->vi", w, design, logs)          # (V, 7)    = B^T W y
    try:
        return np.linalg.solve(lhs, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:  # a degenerate voxel (weights underflowed): least squares, voxel by voxel
        sw = np.sqrt(w)
        return np.stack([np.linalg.lstsq(design * s[:, None], s * y, rcond=None)[0]
                         for s, y in zip(sw, logs, strict=True)])


def tensor_scalars(evals: np.ndarray) -> dict[str, np.ndarray]:
    """FA, MD, AD, RD from eigenvalues (..., 3) sorted descending (mm^2/s); FA is 0 where all are 0."""
    l1, l2, l3 = evals[..., 0], evals[..., 1], evals[..., 2]
    md = (l1 + l2 + l3) / 3.0
    num = (l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2
    den = l1**2 + l2**2 + l3**2
    fa = np.sqrt(0.5 * num / np.where(den > 0, den, 1.0))
    fa = np.where(den > 0, fa, 0.0)
    return {"FA": np.clip(fa, 0.0, 1.0), "MD": md, "AD": l1, "RD": (l2 + l3) / 2.0}


def fit_tensor(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray | None = None,
               method: str = "WLS", chunk: int = 20000) -> dict[str, np.ndarray]:
    """Fit a diffusion tensor in every mask voxel of a (X, Y, Z, N) DWI array.

    Args:
        data: (X, Y, Z, N) signal; values <= 0 are clipped to ``MIN_SIGNAL`` before the log.
        bvals: (N,) s/mm^2. bvecs: (3, N), normalised here; their frame is the frame of ``evecs``
            (for BIDS/FSL b-vectors, ``motion.bvec_frame(affine) @ evecs`` gives RAS directions).
        mask: (X, Y, Z) voxels to fit (default all); outside it every output is 0.
        method: ``"WLS"`` (default, own implementation), ``"OLS"`` (own), or ``"NLLS"`` (dipy's
            non-linear least squares, ``dipy.reconst.dti.TensorModel``).
        chunk: voxels per vectorised batch (memory ~ chunk * 0.6 kB).

    Returns:
        dict of float32 arrays: ``FA``, ``MD``, ``AD``, ``RD``, ``S0`` (X, Y, Z); ``evals`` (X, Y, Z, 3)
        descending, clipped at 0 (a negative diffusivity is noise, not physics); ``evecs`` (X, Y, Z, 3, 3)
        with ``evecs[..., :, k]`` the unit eigenvector of ``evals[..., k]``.
    """
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be (X, Y, Z, N), got {data.shape}")
    n = data.shape[3]
    bvals = np.asarray(bvals, float).ravel()
    bvecs = _normalise_bvecs(bvecs)
    if bvals.shape != (n,) or bvecs.shape != (3, n):
        raise ValueError(f"need {n} b-values and (3, {n}) b-vectors, got {bvals.shape} and {bvecs.shape}")
    method = method.upper()
    if method not in ("WLS", "OLS", "NLLS"):
        raise ValueError(f"method must be WLS, OLS or NLLS, got {method!r}")
    design = design_matrix(bvals, bvecs)
    if np.linalg.matrix_rank(design) < 7:
        raise ValueError("the gradient table cannot determine a tensor (needs a b=0 and >= 6 non-collinear "
                         "directions)")
    mask = np.ones(data.shape[:3], bool) if mask is None else np.asarray(mask, bool)
    signal = np.maximum(data[mask].astype(np.float64), MIN_SIGNAL)  # (V, N)
    n_vox = signal.shape[0]

    if method == "NLLS":
        evals, evecs, s0 = _dipy_nlls(signal, bvals, bvecs)
    else:
        pinv = np.linalg.pinv(design)                              # (7, N)
        evals = np.zeros((n_vox, 3))
        evecs = np.zeros((n_vox, 3, 3))
        s0 = np.zeros(n_vox)
        for start in range(0, n_vox, chunk):
            logs = np.log(signal[start:start + chunk])             # (v, N)
            beta = logs @ pinv.T                                   # (v, 7) OLS
            if method == "WLS":
                beta = _solve_wls(design, logs, beta)
            dxx, dyy, dzz, dxy, dxz, dyz, log_s0 = beta.T
            tensor = np.stack([np.stack([dxx, dxy, dxz], -1),
                               np.stack([dxy, dyy, dyz], -1),
                               np.stack([dxz, dyz, dzz], -1)], -2)  # (v, 3, 3)
            w, v = np.linalg.eigh(tensor)                          # ascending
            evals[start:start + chunk] = np.clip(w[:, ::-1], 0.0, None)
            evecs[start:start + chunk] = v[:, :, ::-1]
            s0[start:start + chunk] = np.exp(log_s0)

    out: dict[str, np.ndarray] = {}
    for name, values in tensor_scalars(evals).items():
        out[name] = _unmask(values, mask)
    out["S0"] = _unmask(s0, mask)
    out["evals"] = _unmask(evals, mask)
    out["evecs"] = _unmask(evecs, mask)
    return out


def _unmask(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    full = np.zeros(mask.shape + values.shape[1:], np.float32)
    full[mask] = values
    return full


def _dipy_nlls(signal: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    # dipy insists on unit vectors for every volume above its b0_threshold: put every zero-vector volume
    # (b=0, or a nominal b=5) below it. Its design matrix uses the actual b-values either way.
    zero = np.linalg.norm(bvecs, axis=0) < 1e-8
    threshold = float(bvals[zero].max()) if zero.any() else float(bvals.min())
    gtab = gradient_table(bvals, bvecs=bvecs.T, b0_threshold=threshold)
    fit = TensorModel(gtab, fit_method="NLLS", return_S0_hat=True).fit(signal)
    return np.clip(fit.evals, 0.0, None), fit.evecs, np.asarray(fit.S0_hat)


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
def check_gradients(bvals: np.ndarray, bvecs: np.ndarray, n_volumes: int, b0_threshold: float,
                    subject: str | None, paths: dict[str, str]) -> None:
    """Raise StageError (naming subject, file and fix) if the gradient table cannot give a tensor fit."""
    sub = subject_label(subject)
    if bvecs.ndim != 2 or bvecs.shape[0] != 3:
        raise StageError(f"the b-vectors have shape {bvecs.shape}; expected 3 rows (x, y, z)", subject=sub,
                         stage=STAGE, path=paths["bvec"], fix="write the .bvec as three lines, one per axis")
    if bvals.size != n_volumes:
        raise StageError(f"{bvals.size} b-values but the image has {n_volumes} volumes", subject=sub,
                         stage=STAGE, path=paths["bval"], fix="the .bval must list one b-value per volume")
    if bvecs.shape[1] != n_volumes:
        raise StageError(f"{bvecs.shape[1]} b-vectors but the image has {n_volumes} volumes", subject=sub,
                         stage=STAGE, path=paths["bvec"], fix="the .bvec must have one column per volume")
    dw = bvals > b0_threshold
    # NaN b-vectors are tolerated on b=0 volumes only (some converters write them there).
    if not (np.isfinite(bvals).all() and np.isfinite(bvecs[:, dw]).all()) or (bvals < 0).any():
        raise StageError("the gradient table has negative or non-finite entries", subject=sub, stage=STAGE,
                         path=paths["bval"], fix="check the .bval/.bvec export")
    if not (bvals <= b0_threshold).any():
        raise StageError(f"no b=0 volume: every b-value is above the b=0 threshold ({b0_threshold:g} "
                         f"s/mm^2; smallest is {bvals.min():g})", subject=sub, stage=STAGE,
                         path=paths["bval"],
                         fix="a tensor fit and the b=0 mask need at least one b=0 volume: check the .bval, "
                         "or raise preprocessing.dwi.b0_threshold if the scanner's b=0 is nominally > 0")
    if (np.linalg.norm(bvecs[:, dw], axis=0) < 1e-6).any():
        raise StageError("a diffusion-weighted volume has a zero b-vector", subject=sub, stage=STAGE,
                         path=paths["bvec"], fix="every volume with b > 0 needs a unit direction in the .bvec")
    if np.linalg.matrix_rank(design_matrix(bvals, _normalise_bvecs(bvecs))) < 7:
        raise StageError("the gradient directions cannot determine a tensor (fewer than 6 non-collinear "
                         "directions)", subject=sub, stage=STAGE, path=paths["bvec"],
                         fix="a DTI fit needs >= 6 non-collinear diffusion directions")


def _write_text(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def load_inputs(inputs: Mapping[str, str], subject: str, b0_threshold: float
                ) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    """The DWI (4D), bvals (N,) and bvecs (3, N), checked; the anat-stage inputs must exist (checked now, before
    the slow part). Shared by the python and fsl backends."""
    from neuromoe.inputs.bids import read_gradients
    from neuromoe.inputs.imageio import load_image

    sub = subject_label(subject)
    img = load_image(inputs["dwi"], subject=subject, ndim=4)
    try:
        bvals, bvecs = read_gradients(Path(inputs["bval"]), Path(inputs["bvec"]))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the gradient table ({exc})", subject=sub, path=inputs["bval"],
                         fix="bval: one line of numbers; bvec: three lines of numbers") from exc
    check_gradients(bvals, bvecs, img.shape[3], b0_threshold, subject, dict(inputs))
    for key in ("anat_brain", "anat_mask", "anat_xfm"):  # absent for an ingested QSIPrep series
        if key in inputs and not Path(inputs[key]).exists():
            raise InputError("file not found (an output of the anat stage).", subject=sub, path=inputs[key],
                             fix="run the anat stage for this subject first")
    return img, bvals, bvecs


def run_dwi(inputs: Mapping[str, str], outputs: Mapping[str, str], subject: str, cfg: DwiConfig,
            threads: int = 1) -> Mapping[str, str]:
    """The dwi stage for one subject; writes every ``dwi_*`` and ``qc_dwi_*`` output (see neuromoe.paths).

    inputs: ``dwi`` (4D NIfTI), ``bval``, ``bvec`` (BIDS/FSL text), ``anat_brain`` (skull-stripped T1w),
    ``anat_mask`` (its brain mask), ``anat_xfm`` (ITK .txt, T1w -> MNI in "image" mode, i.e. mapping MNI
    points to T1w points). cfg: ``b0_threshold`` (s/mm^2), ``fit_method``.

    Steps: validate the gradient table; mean b=0 mask; realign the b=0 volumes to each other
    (correlation: same contrast) and take their mean as the reference; realign every volume to it (mutual
    information: contrasts differ), resampling each raw volume once; rotate the b-vectors by each
    volume's rotation; mask on the corrected mean b=0; fit the tensor; register the b=0 brain to the
    T1w brain (rigid, MI), compose with T1w -> MNI and resample the maps onto the MNI 2 mm grid in one
    interpolation; write everything (``write_outputs``). Returns ``outputs``.
    """
    from neuromoe.inputs.imageio import load_image, new_image
    from neuromoe.preproc import registration as reg

    sub = subject_label(subject)
    b0_threshold, method = float(cfg.b0_threshold), str(cfg.fit_method)
    img, bvals, bvecs = load_inputs(inputs, subject, b0_threshold)
    n_vol = img.shape[3]
    data = np.asarray(img.dataobj, dtype=np.float32)
    if not np.isfinite(data).all():
        raise StageError("the DWI contains NaN or infinite values", subject=sub, stage=STAGE,
                         path=inputs["dwi"], fix="check the scanner export / conversion to NIfTI")

    # 1. initial mask, then a sharp b=0 reference: b=0 volumes aligned among themselves.
    mask0 = b0_mask(img, bvals, b0_threshold)
    if mask0.sum() < 100:
        raise StageError(f"the b=0 brain mask is (nearly) empty ({int(mask0.sum())} voxels)", subject=sub,
                         stage=STAGE, path=inputs["dwi"], fix="check that the b=0 volumes contain signal")
    b0_idx = np.flatnonzero(bvals <= b0_threshold)
    if b0_idx.size > 1:
        b0_series = nib.Nifti1Image(data[..., b0_idx], img.affine)
        b0_aligned, _ = realign_series(b0_series, ref_index=0, mask=mask0, metric="corr", subject=sub,
                                       threads=threads)
        reference = np.asarray(b0_aligned.dataobj).mean(axis=-1)
    else:
        reference = data[..., b0_idx[0]]

    # 2. every volume (b=0 ones included, from their raw data) to the reference: one interpolation each.
    # In place: the raw voxels are not read again (the reference and the b=0 mask are taken; img keeps its header).
    corrected, motion = realign_series(img, reference=reference, mask=mask0, metric="mi", subject=sub,
                                       threads=threads, inplace=True)
    log.info("%s: realigned %d volumes in %.1f s", sub, n_vol, motion.attrs["seconds"])
    bvecs_rot = rotate_bvecs(bvecs, rotations_from_params(motion), img.affine)
    data_c = np.asarray(corrected.dataobj, dtype=np.float32)
    corrected_img = new_image(data_c, img.affine, like=img)
    # Voxels that some volume saw outside its field of view hold the resampler's 0 there: not fitted.
    mask = b0_mask(corrected_img, bvals, b0_threshold) & motion.attrs["coverage"]

    # 3. tensor
    fit = fit_tensor(data_c, bvals, bvecs_rot, mask, method=method)
    maps = {m: new_image(fit[m], img.affine) for m in MAPS}

    # 4. b=0 brain -> T1w brain (rigid, MI), then through T1w -> MNI in one resampling.
    b0_brain = data_c[..., b0_idx].mean(axis=-1) * mask
    b0_img = new_image(b0_brain, img.affine)
    t1 = load_image(inputs["anat_brain"], subject=subject, ndim=3)
    t1_mask = load_image(inputs["anat_mask"], subject=subject, ndim=3)
    dwi_to_t1 = reg.register(t1, b0_img, kind="rigid", metric="mi", fixed_mask=t1_mask,
                             moving_mask=new_image(mask, img.affine, dtype=np.uint8), threads=threads)
    t1_to_mni = reg.read_transform(inputs["anat_xfm"])
    mni_to_dwi = reg.compose(t1_to_mni, dwi_to_t1)  # MNI points -> T1w points -> dwi points
    template = _mni_grid()
    maps_mni = {m: reg.resample(maps[m], template, mni_to_dwi, interp="linear", threads=threads) for m in MAPS}

    # 5. files and QC
    write_outputs(outputs, subject, dwi=img, corrected=data_c, bvals=bvals, bvecs=bvecs_rot, mask=mask,
                  motion=motion, maps=maps, maps_mni=maps_mni, transform=dwi_to_t1)
    log.info("%s: dwi stage done; mask %d voxels, median FA %.2f, median MD %.2e mm^2/s", sub, mask.sum(),
             float(np.median(fit["FA"][mask])), float(np.median(fit["MD"][mask])))
    return outputs


def write_outputs(outputs: Mapping[str, str], subject: str, *, dwi: nib.Nifti1Image, corrected: np.ndarray,
                  bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray, motion: pd.DataFrame,
                  maps: Mapping[str, nib.Nifti1Image], maps_mni: Mapping[str, nib.Nifti1Image],
                  transform: sitk.Transform | None) -> None:
    """Write the dwi stage's files (both backends).

    ``dwi``: the raw series (grid and header of ``dwi_preproc``); ``corrected`` (X, Y, Z, N) the corrected series
    (written with its gradients only when ``outputs`` has ``dwi_preproc``: ``preprocessing.keep_series``);
    ``bvals`` (N,) s/mm^2 and ``bvecs`` (3, N) rotated with the motion; ``mask`` (X, Y, Z) bool; ``motion`` the
    table of ``motion.MOTION_COLUMNS``; ``maps`` / ``maps_mni`` FA, MD, AD, RD on the DWI grid / the MNI grid;
    ``transform`` (ITK) maps T1w points to DWI points. QC figures when their keys are in ``outputs``.
    """
    from neuromoe.inputs.imageio import new_image, save_map, save_mask
    from neuromoe.preproc import registration as reg

    if "dwi_preproc" in outputs:  # the series (and its rotated gradients): preprocessing.keep_series
        save_map(new_image(corrected, dwi.affine, like=dwi), outputs["dwi_preproc"])
        _write_text(outputs["dwi_bval"], " ".join(f"{b:g}" for b in bvals) + "\n")
        _write_text(outputs["dwi_bvec"], "\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs) + "\n")
    save_mask(mask, outputs["dwi_mask"], affine=dwi.affine)
    Path(outputs["dwi_motion"]).parent.mkdir(parents=True, exist_ok=True)
    motion.to_csv(outputs["dwi_motion"], sep="\t", index=False, float_format="%.6f")
    for m in MAPS:
        save_map(maps[m], outputs[f"dwi_{m.lower()}"])
        save_map(maps_mni[m], outputs[f"dwi_{m.lower()}_mni"])
    if "dwi_xfm" in outputs:  # an ingested QSIPrep series has none of its own (neuromoe.preproc.ingest)
        reg.write_transform(transform, outputs["dwi_xfm"])
    if "qc_dwi_fa" in outputs and "qc_dwi_motion" in outputs:
        _qc(outputs, subject, maps, new_image(mask, dwi.affine, dtype=np.uint8), motion)


def _mni_grid() -> nib.Nifti1Image:
    """The 2 mm MNI152 2009a template (99 x 117 x 95, from neuromoe.inputs.templates); only its grid is used."""
    from neuromoe.inputs.templates import mni_t1

    return mni_t1()


def _qc(outputs: Mapping[str, str], subject: str, maps: dict[str, nib.Nifti1Image], mask: nib.Nifti1Image,
        motion: pd.DataFrame) -> None:
    """FA/MD slices (native) and the motion traces with framewise displacement (Power 2012: translations
    plus rotations as arc length on a 50 mm sphere)."""
    from neuromoe.preproc import qc

    arr = motion.to_numpy()
    fd = np.r_[0.0, np.abs(np.diff(arr[:, :3], axis=0)).sum(1) + 50.0 * np.abs(np.diff(arr[:, 3:], axis=0)).sum(1)]
    qc.plot_map_slices({"FA": maps["FA"], "MD": maps["MD"]}, outputs["qc_dwi_fa"],
                       title=f"{subject_label(subject)} DTI (native)", mask=mask)
    qc.plot_motion(motion, outputs["qc_dwi_motion"], title=f"{subject_label(subject)} DWI motion", fd=fd)
