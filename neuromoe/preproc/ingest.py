"""Maps from series fMRIPrep or QSIPrep already preprocessed (``inputs.derivatives``; files found by
``neuromoe.inputs.ingested``): no motion correction and no registration of our own for that modality.

``run_ingested`` is the rules' entry (``func_fmriprep``, ``dwi_qsiprep``): it writes the same ``func_*`` /
``dwi_*`` files as the func and dwi stages (maps, masks, confounds or motion, QC, sidecars) but ``func_xfm`` /
``dwi_xfm``, which an ingested series has none of its own. The maps come from the same functions as ours
(``func.clean_and_map``, ``dwi.fit_tensor``), on the ingested series' grid, and reach our MNI grid in one
interpolation: through the tool's T1w -> MNI transform for a T1w-space series, by world coordinates for an
MNI-space one.

What differs from our own preprocessing, on purpose: the BOLD's dummy scans are the volumes fMRIPrep flagged as
non-steady-state (its ``non_steady_state_outlier*`` columns, as XCP-D's ``--dummy-scans auto``), not
``preprocessing.func.dummy_scans`` (which counts volumes of the raw run); the nuisance regressors are fMRIPrep's
own columns of the same names (``trans_*``, ``rot_*``, ``white_matter``, ``csf``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from neuromoe.errors import InputError
from neuromoe.paths import subject_label

log = logging.getLogger("neuromoe.ingest")
TOOL_OF = {"func": "fmriprep", "dwi": "qsiprep"}


def run_ingested(stage: str, inputs: Mapping[str, Any], outputs: Mapping[str, str], subject: str,
                 cfg: Mapping[str, Any], threads: int | None = 1) -> None:
    """The ``stage`` ("func" or "dwi") of one unit from the tool's files ``inputs``; then every sidecar."""
    from neuromoe.config import DwiConfig, FuncConfig
    from neuromoe.preproc.sidecars import write_sidecars

    if stage == "func":
        func_from_fmriprep(inputs, outputs, subject, FuncConfig.from_config(cfg), threads=threads)
    elif stage == "dwi":
        dwi_from_qsiprep(inputs, outputs, subject, DwiConfig.from_config(cfg), threads=threads)
    else:
        raise ValueError(f"no ingestion for stage {stage!r}; func (fMRIPrep) or dwi (QSIPrep)")
    write_sidecars(inputs, outputs, cfg, ingested=TOOL_OF[stage])


def _same_grid(img: nib.Nifti1Image, mask: nib.Nifti1Image, subject: str, path: str, tool: str) -> np.ndarray:
    """``mask`` as a bool array, InputError unless it lies on ``img``'s grid."""
    if mask.shape[:3] != img.shape[:3] or not np.allclose(mask.affine, img.affine, atol=1e-3):
        raise InputError(f"the brain mask's grid ({mask.shape[:3]}) is not that of the series ({img.shape[:3]})",
                         subject=subject_label(subject), path=path,
                         fix=f"use the mask {tool} wrote in the same space and resolution as the series")
    return np.asarray(mask.dataobj) > 0


def read_confounds(path: str | Path, n_volumes: int, subject: str, columns: list[str], tool: str) -> pd.DataFrame:
    """The tool's confounds table (``n/a`` read as missing), checked: one row per volume, ``columns`` present
    and finite."""
    try:
        df = pd.read_csv(path, sep="\t", na_values=["n/a"])
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the confounds table ({exc})", subject=subject_label(subject), path=path,
                         fix=f"use the desc-confounds_timeseries.tsv {tool} wrote") from exc
    if len(df) != n_volumes:
        raise InputError(f"the confounds table has {len(df)} rows for a series of {n_volumes} volumes",
                         subject=subject_label(subject), path=path, fix=f"use the table {tool} wrote for this series")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"the confounds table has no column {', '.join(missing)}", subject=subject_label(subject),
                         path=path, fix=f"use the table {tool} wrote, or drop the regressor from "
                                        "preprocessing.func.nuisance")
    bad = [c for c in columns if not np.isfinite(df[c].to_numpy(dtype=float)).all()]
    if bad:
        raise InputError(f"the confounds column(s) {', '.join(bad)} hold missing values",
                         subject=subject_label(subject), path=path, fix=f"use the table {tool} wrote for this series")
    return df


def leading_outliers(confounds: pd.DataFrame) -> int:
    """How many volumes at the start fMRIPrep flagged as non-steady-state (``non_steady_state_outlier*``)."""
    cols = [c for c in confounds.columns if c.startswith("non_steady_state_outlier")]
    if not cols:
        return 0
    flagged = confounds[cols].fillna(0).to_numpy(dtype=float).sum(axis=1) > 0
    return int(np.argmin(flagged)) if not flagged.all() else len(flagged)


def _to_mni(maps: Mapping[str, nib.Nifti1Image], xfm: str | None, threads: int | None) -> dict:
    """``maps`` on our MNI grid: through the tool's T1w -> MNI transform, or by world coordinates (None)."""
    from neuromoe.inputs.templates import mni_t1
    from neuromoe.preproc import registration as reg

    tf = reg.read_transform(xfm) if xfm else None
    grid = mni_t1()
    return {k: reg.resample(m, grid, tf, interp="linear", threads=threads) for k, m in maps.items()}


def func_from_fmriprep(inputs: Mapping[str, Any], outputs: Mapping[str, str], subject: str, cfg: Any,
                       threads: int | None = 1) -> None:
    """fALFF and ReHo from fMRIPrep's preprocessed BOLD (``bold``, ``mask``, ``confounds``, ``bold_json`` or the
    raw ``raw_json`` for the TR, ``xfm`` for a T1w-space series); writes the func stage's files."""
    from neuromoe.inputs.imageio import load_image
    from neuromoe.preproc import func

    img = load_image(inputs["bold"], subject=subject, ndim=4)
    mask = _same_grid(img, load_image(inputs["mask"], subject=subject, ndim=3), subject, inputs["mask"], "fMRIPrep")
    tr = func.repetition_time(inputs.get("bold_json") or inputs["raw_json"], subject)
    chosen = [c for k in cfg.nuisance for c in func.NUISANCE_COLUMNS[k]]
    conf = read_confounds(inputs["confounds"], img.shape[3], subject, chosen, "fMRIPrep")
    n_dummy = leading_outliers(conf)
    img = func.drop_dummy_scans(img, n_dummy, tr, f_low=func.band_hz(cfg)[0], subject=subject)
    conf = conf.iloc[n_dummy:].reset_index(drop=True)
    data = np.asarray(img.dataobj, dtype=np.float32)
    mask &= np.isfinite(data).all(axis=3) & (data.min(axis=3) > 0)  # as ours: voxels with signal throughout
    if mask.sum() < 100:
        raise InputError(f"the brain mask holds {int(mask.sum())} voxels with signal in every volume",
                         subject=subject_label(subject), path=inputs["mask"], fix="check fMRIPrep's mask and series")
    n_t = data.shape[3]
    series = data[mask]
    del data
    clean, maps = func.clean_and_map(series, mask, img.affine, conf, tr, cfg, func.wanted_maps(outputs))
    ours = conf.reindex(columns=func.CONFOUND_COLUMNS)  # fMRIPrep's columns of our table's names
    derived = func.FuncDerivatives(confounds=ours, clean=clean, maps=maps, template=None)
    func.write_outputs(outputs, subject, bold=img, tr=tr, mask=mask, derived=derived,
                       maps_mni=_to_mni(maps, inputs.get("xfm"), threads), transform=None,
                       qc_note="from fMRIPrep", motion_source="fMRIPrep")
    log.info("%s: fALFF/ReHo from fMRIPrep's %s series (%d volumes after %d non-steady-state)", subject_label(subject),
             Path(inputs["bold"]).name, n_t, n_dummy)


def dwi_from_qsiprep(inputs: Mapping[str, Any], outputs: Mapping[str, str], subject: str, cfg: Any,
                     threads: int | None = 1) -> None:
    """Tensor maps from QSIPrep's preprocessed DWI (``dwi``, ``bval``, ``bvec``, ``confounds``, ``xfm``, optional
    ``mask``: else the mean b=0's); writes the dwi stage's files."""
    from neuromoe.inputs.imageio import load_image, new_image
    from neuromoe.preproc import dwi
    from neuromoe.preproc.motion import MOTION_COLUMNS

    img, bvals, bvecs = dwi.load_inputs(inputs, subject, float(cfg.b0_threshold))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if inputs.get("mask"):
        mask = _same_grid(img, load_image(inputs["mask"], subject=subject, ndim=3), subject, inputs["mask"],
                          "QSIPrep")
    else:
        mask = dwi.b0_mask(img, bvals, float(cfg.b0_threshold))
    mask &= np.isfinite(data).all(axis=3)
    motion = read_confounds(inputs["confounds"], img.shape[3], subject, list(MOTION_COLUMNS), "QSIPrep")
    fit = dwi.fit_tensor(data, bvals, bvecs, mask, method=str(cfg.fit_method))
    maps = {m: new_image(fit[m], img.affine) for m in dwi.MAPS}
    dwi.write_outputs(outputs, subject, dwi=img, corrected=data, bvals=bvals, bvecs=bvecs, mask=mask,
                      motion=motion[list(MOTION_COLUMNS)], maps=maps,
                      maps_mni=_to_mni(maps, inputs.get("xfm"), threads), transform=None)
    log.info("%s: tensor maps from QSIPrep's %s (%d volumes, mask %d voxels)", subject_label(subject),
             Path(inputs["dwi"]).name, data.shape[3], int(mask.sum()))
