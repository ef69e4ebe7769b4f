"""JSON sidecars of the preprocessing outputs (BIDS-Derivatives), one beside every image, for both backends.

``write_sidecars`` runs in ``run_stage`` after either backend's stage has written its images, so the two
backends describe their files the same way. Each sidecar holds what the BIDS-Derivatives specification asks of
that kind of file, and what a reader needs to use it without this project's code:

- ``Sources``: BIDS URIs of the files it was computed from: ``bids:raw:sub-01/dwi/sub-01_dwi.nii.gz`` for the
  raw dataset (``DatasetLinks.raw`` in the derivatives' dataset_description.json), ``bids::sub-01/anat/...`` for
  this dataset's own files (the transforms an MNI map went through);
- ``SpatialReference``: for an image on a native grid the raw image whose grid it is, for an MNI image the
  template (its ``space-`` entity names it too);
- ``SkullStripped`` for T1w and the preprocessed series; ``Type: Brain`` for brain masks;
- ``Units`` for the maps; ``Model`` (BEP016) for the tensor maps: description, fit method, b-values used;
  ``Description`` and ``Parameters`` (band, dummy scans, nuisance regressors) for the BOLD maps;
- ``Software``: the backend and the tools that made the file.

Nothing in a sidecar depends on the time or machine it was written on, so reruns keep their bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import neuromoe
from neuromoe import MNI_SPACE, paths

TENSOR_UNITS = {"fa": "arbitrary", "md": "mm^2/s", "ad": "mm^2/s", "rd": "mm^2/s"}  # b in s/mm^2
TENSOR_NAMES = {"fa": "fractional anisotropy", "md": "mean diffusivity", "ad": "axial diffusivity (L1)",
                "rd": "radial diffusivity ((L2 + L3) / 2)"}
# MNI images: the template their space- entity names (nilearn's copy of it)
MNI_REFERENCE = "https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009"
DESCRIPTIONS = {"anat_mask": "brain mask of the T1w", "anat_brain": "skull-stripped, bias-corrected T1w",
                "anat_brain_mni": "skull-stripped T1w resampled to MNI space (one interpolation)",
                "anat_mask_mni": "T1w brain mask resampled to MNI space", "dwi_mask": "brain mask of the mean b=0",
                "dwi_preproc": "motion-corrected DWI series (b-vectors rotated with each volume)",
                "func_preproc": "motion-corrected BOLD series, dummy scans dropped",
                "func_mask": "brain mask of the mean BOLD"}
INGESTED_FROM = {"fmriprep": "fMRIPrep", "qsiprep": "QSIPrep"}
BOLD_MAPS = {"falff": "fractional amplitude of low-frequency fluctuations (fALFF: power in the band / power over "
                      "all frequencies, of the nuisance-regressed series)",
             "reho": "regional homogeneity (ReHo: Kendall's W of each voxel's series with its 26 neighbours)"}


def uri(path: str | Path, links: Mapping[str, Any] | None = None) -> str:
    """A BIDS URI: ``bids::<relative path>`` for a file of this derivatives dataset, ``bids:<tool>:<relative
    path>`` for a file of an ingested dataset (``links``: tool -> its folder, ``inputs.derivatives``),
    ``bids:raw:<relative path>`` for a raw input (the part of its path from its ``sub-`` folder on)."""
    for tool, root in (links or {}).items():
        if root and Path(path).resolve().is_relative_to(Path(root).resolve()):
            return f"bids:{tool}:" + Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    parts = Path(path).parts
    if paths.PIPELINE in parts and "derivatives" in parts:
        i = len(parts) - 1 - parts[::-1].index(paths.PIPELINE)
        return "bids::" + "/".join(parts[i + 1:])
    label = parts[-1].split("_")[0]  # sub-01: its folder, the last of that name, starts the relative path
    at = [i for i, p in enumerate(parts[:-1]) if p == label]
    return "bids:raw:" + "/".join(parts[at[-1]:] if at else parts[-1:])


def _bvalues(bval: str | Path | None, threshold: float) -> list[int]:
    """The series' shells: its b-values rounded to 50 s/mm^2 (0 at or below ``threshold``)."""
    if bval is None or not Path(bval).is_file():
        return []
    values = [float(v) for v in Path(bval).read_text().split()]
    return sorted({0 if v <= threshold else int(round(v / 50.0) * 50) for v in values})


def sidecar(key: str, inputs: Mapping[str, Any], outputs: Mapping[str, str], cfg: Mapping[str, Any],
            ingested: str | None = None) -> dict[str, Any]:
    """The sidecar of output ``key`` (an image key of ``neuromoe.paths.OUTPUTS``) of a stage run with ``inputs``
    and ``outputs`` (the rule's named files) and the workflow config ``cfg`` (or a rule's params holding its
    sections). A native image's sources are the raw files it came from; an MNI image's, its native image and the
    transforms its one interpolation composed. ``ingested``: the tool (fmriprep, qsiprep) whose preprocessed
    series the maps were computed from (``neuromoe.preproc.ingest``)."""
    from neuromoe.config import DwiConfig, FslConfig, FuncConfig

    stage = key.split("_")[0]
    pre = cfg["preprocessing"]
    backend = pre.get("backend", "python")
    mni = paths.OUTPUTS[key][1].get("space") == MNI_SPACE
    if mni:
        files = [outputs.get(key.removesuffix("_mni")), outputs.get(f"{stage}_xfm")]
        files += [] if stage == "anat" else [inputs.get("anat_xfm"), inputs.get("xfm")]
    else:
        files = [inputs.get(k) for k in {"anat": ["t1w"], "dwi": ["dwi", "bval", "bvec"], "func": ["bold"]}[stage]]
    sources = [uri(f, (cfg.get("inputs") or {}).get("derivatives")) for f in files if f]
    meta: dict[str, Any] = {"Description": DESCRIPTIONS.get(key, ""), "Sources": sources}
    if mni:
        meta["SpatialReference"] = MNI_REFERENCE
    elif sources:
        meta["SpatialReference"] = sources[0]
    software = {"python": "neuromoe (SimpleITK, dipy, nilearn)", "fsl": "neuromoe with FSL"}[backend]
    meta["Software"] = f"{software} {neuromoe.__version__}"
    if ingested:
        meta["Software"] = f"neuromoe {neuromoe.__version__}, from {INGESTED_FROM[ingested]}'s preprocessed series"
    suffix = paths.OUTPUTS[key][2]
    if suffix == "mask":
        meta["Type"] = "Brain"
    elif suffix == "T1w":
        meta["SkullStripped"] = True
    elif key in ("dwi_preproc", "func_preproc"):
        meta["SkullStripped"] = False
    if suffix == "dwimap":
        param = paths.OUTPUTS[key][1]["param"]
        dwi = DwiConfig.from_config(cfg)
        own = "dipy.reconst.dti.TensorModel" if dwi.fit_method == "NLLS" else "neuromoe's own, matches dipy's"
        fit = (f"dtifit{' --wls' if dwi.fit_method == 'WLS' else ''} (FSL)" if backend == "fsl"
               else f"{dwi.fit_method} ({own})")
        meta.update({"Description": TENSOR_NAMES[param] + (" in MNI space" if mni else ""),
                     "Units": TENSOR_UNITS[param],
                     "Model": {"Description": "diffusion tensor (Basser et al. 1994), one tensor per voxel",
                               "Parameters": {"FitMethod": fit, "B0Threshold": dwi.b0_threshold,
                                              "Shells": _bvalues(inputs.get("bval"), dwi.b0_threshold)}}})
        if backend == "fsl":
            meta["Model"]["Parameters"]["DWICorrection"] = FslConfig.from_config(cfg).dwi_correction
    elif suffix == "boldmap":
        stat = paths.OUTPUTS[key][1]["stat"]
        func = FuncConfig.from_config(cfg)
        dummy = "fMRIPrep's non-steady-state volumes" if ingested else func.dummy_scans
        meta.update({"Description": BOLD_MAPS[stat] + (" in MNI space" if mni else ""), "Units": "arbitrary",
                     "Parameters": {"BandHz": list(func.band_hz), "DummyScans": dummy,
                                    "NuisanceRegressors": list(func.nuisance)}})
    return meta


def write_sidecars(inputs: Mapping[str, Any], outputs: Mapping[str, str], cfg: Mapping[str, Any],
                   ingested: str | None = None) -> list[str]:
    """Write the sidecar of every image in ``outputs`` whose sidecar key is there too; returns their paths."""
    written = []
    for key in paths.IMAGE_KEYS:
        side = paths.sidecar_key(key)
        if key in outputs and side in outputs:
            Path(outputs[side]).parent.mkdir(parents=True, exist_ok=True)
            Path(outputs[side]).write_text(json.dumps(sidecar(key, inputs, outputs, cfg, ingested), indent=2) + "\n")
            written.append(outputs[side])
    return written


# ---------------------------------------------------------------- the README's table of outputs

CONVENTIONS = {  # suffix (or key) -> whose naming the file follows
    "mask": "BIDS-Derivatives (`desc-brain_mask`, as fMRIPrep)",
    "T1w": "BIDS-Derivatives (`desc-brain`, as fMRIPrep)",
    "dwi": "BIDS-Derivatives (`desc-preproc`, as QSIPrep)",
    "bold": "BIDS-Derivatives (`desc-preproc`, as fMRIPrep)",
    "xfm": "BIDS-Derivatives (`from-_to-_mode-image_xfm`, as fMRIPrep; ITK text)",
    "timeseries": "BIDS-Derivatives (`desc-confounds_timeseries`, as fMRIPrep; motion likewise)",
    "dwimap": "BEP016 diffusion derivatives (`model-tensor_param-*`, as QSIRecon)",
    "boldmap": "XCP-D (`stat-reho`; `stat-falff` is ours: XCP-D has ALFF only)",
    "png": "fMRIPrep (`figures/`)",
}


def outputs_table() -> str:
    """The README's table: every per-subject output's name pattern, its sidecar's keys (from ``sidecar`` itself,
    for the python backend) and the convention it follows."""
    raw = {"t1w": "bids/sub-01/anat/sub-01_T1w.nii.gz", "dwi": "bids/sub-01/dwi/sub-01_dwi.nii.gz",
           "bval": "bids/sub-01/dwi/sub-01_dwi.bval", "bvec": "bids/sub-01/dwi/sub-01_dwi.bvec",
           "bold": "bids/sub-01/func/sub-01_task-rest_bold.nii.gz"}
    outs = {k: paths.derivative("out", "01", k) for k in paths.OUTPUTS}
    inputs = {**raw, "anat_xfm": outs["anat_xfm"]}
    cfg = {"preprocessing": {"backend": "python"}}
    lines = ["| file (under `derivatives/neuromoe/sub-<label>/[ses-<label>/]`) | sidecar keys | convention |",
             "|---|---|---|"]
    for key, (datatype, _, suffix, ext) in paths.OUTPUTS.items():
        if key.endswith("_json"):
            continue
        name = Path(paths.derivative("out", "<label>", key)).name
        keys = ", ".join(f"`{k}`" for k in sidecar(key, inputs, outs, cfg)) if key in paths.IMAGE_KEYS else ""
        conv = CONVENTIONS["png" if ext == ".png" else suffix]
        lines.append(f"| `{datatype}/{name}` | {keys or 'none (not a NIfTI image)'} | {conv} |")
    return "\n".join(lines) + "\n"
