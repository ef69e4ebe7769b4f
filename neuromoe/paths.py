"""BIDS-derivatives file names: the one place that knows what every output is called.

Rules, stage functions and tests all take names from here, so the python and fsl backends write
the same files and downstream rules cannot tell which ran. Subjects are given without the ``sub-``
prefix (``"01"``), sessions without ``ses-`` (``"1"``); Snakemake patterns use the wildcards ``{subject}`` and,
for a dataset with sessions, ``{session}``. Without a session a name is exactly the session-less one, so a
dataset without ``ses-`` folders keeps the names (and bytes) it always had.

Example::

    >>> derivative("results", "01", "dwi_fa_mni")
    'results/derivatives/neuromoe/sub-01/dwi/sub-01_space-MNI152NLin2009aSym_model-tensor_param-fa_dwimap.nii.gz'
    >>> derivative("results", "01", "anat_mask", session="2")
    'results/derivatives/neuromoe/sub-01/ses-2/anat/sub-01_ses-2_desc-brain_mask.nii.gz'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from neuromoe import MNI_SPACE

PIPELINE = "neuromoe"
# BIDS entity order (BIDS spec appendix + BIDS-derivatives entities we use).
ENTITY_ORDER = ["sub", "ses", "task", "acq", "run", "space", "res", "from", "to", "mode",
                "model", "param", "stat", "label", "desc"]

# key -> (datatype, entities, suffix, extension)
_M = {"space": MNI_SPACE}
OUTPUTS: dict[str, tuple[str, dict[str, str], str, str]] = {
    # anat
    "anat_mask": ("anat", {"desc": "brain"}, "mask", ".nii.gz"),
    "anat_brain": ("anat", {"desc": "brain"}, "T1w", ".nii.gz"),
    "anat_xfm": ("anat", {"from": "T1w", "to": MNI_SPACE, "mode": "image"}, "xfm", ".txt"),
    "anat_brain_mni": ("anat", {**_M, "desc": "brain"}, "T1w", ".nii.gz"),
    "anat_mask_mni": ("anat", {**_M, "desc": "brain"}, "mask", ".nii.gz"),
    # dwi
    "dwi_preproc": ("dwi", {"desc": "preproc"}, "dwi", ".nii.gz"),
    "dwi_bval": ("dwi", {"desc": "preproc"}, "dwi", ".bval"),
    "dwi_bvec": ("dwi", {"desc": "preproc"}, "dwi", ".bvec"),
    "dwi_mask": ("dwi", {"desc": "brain"}, "mask", ".nii.gz"),
    "dwi_motion": ("dwi", {"desc": "motion"}, "timeseries", ".tsv"),
    "dwi_xfm": ("dwi", {"from": "dwi", "to": "T1w", "mode": "image"}, "xfm", ".txt"),
    # BEP016 (diffusion derivatives, as QSIRecon writes them): model-tensor, lowercase param labels
    **{f"dwi_{p}": ("dwi", {"model": "tensor", "param": p}, "dwimap", ".nii.gz") for p in ("fa", "md", "ad", "rd")},
    **{f"dwi_{p}_mni": ("dwi", {**_M, "model": "tensor", "param": p}, "dwimap", ".nii.gz")
       for p in ("fa", "md", "ad", "rd")},
    # func
    "func_preproc": ("func", {"task": "rest", "desc": "preproc"}, "bold", ".nii.gz"),
    "func_mask": ("func", {"task": "rest", "desc": "brain"}, "mask", ".nii.gz"),
    "func_confounds": ("func", {"task": "rest", "desc": "confounds"}, "timeseries", ".tsv"),
    "func_xfm": ("func", {"task": "rest", "from": "bold", "to": "T1w", "mode": "image"}, "xfm", ".txt"),
    # XCP-D's BOLD maps (stat-alff, stat-reho, lowercase); fALFF, which XCP-D has not, as stat-falff
    **{f"func_{s}": ("func", {"task": "rest", "stat": s}, "boldmap", ".nii.gz") for s in ("falff", "reho")},
    **{f"func_{s}_mni": ("func", {"task": "rest", **_M, "stat": s}, "boldmap", ".nii.gz") for s in ("falff", "reho")},
    # QC figures (fMRIPrep puts them in sub-X/figures/)
    "qc_anat_mask": ("figures", {"desc": "brainmask"}, "T1w", ".png"),
    "qc_anat_reg": ("figures", {**_M, "desc": "reg"}, "T1w", ".png"),
    "qc_dwi_fa": ("figures", {"model": "tensor", "desc": "maps"}, "dwi", ".png"),
    "qc_dwi_motion": ("figures", {"desc": "motion"}, "dwi", ".png"),
    "qc_func_maps": ("figures", {"task": "rest", "desc": "maps"}, "bold", ".png"),
    "qc_func_motion": ("figures", {"task": "rest", "desc": "motion"}, "bold", ".png"),
}


# Every image has a JSON sidecar (BIDS-derivatives: Sources, SkullStripped, Units, the model's parameters, ...),
# written by the same job: key ``<image key>_json``, the image's name with ``.json`` (neuromoe.preproc.sidecars).
IMAGE_KEYS: tuple[str, ...] = tuple(k for k, v in OUTPUTS.items() if v[3] == ".nii.gz")
OUTPUTS.update({f"{k}_json": (*OUTPUTS[k][:3], ".json") for k in IMAGE_KEYS})


def sidecar_key(key: str) -> str:
    """The key of an image output's JSON sidecar (``dwi_fa_mni`` -> ``dwi_fa_mni_json``)."""
    return f"{key}_json"


# The motion-corrected 4D series (and the DWI's rotated gradients): only the maps computed in the same job use
# them, so they are written only with ``preprocessing.keep_series`` (a stage skips a key it is not given).
SERIES: tuple[str, ...] = ("dwi_preproc", "dwi_bval", "dwi_bvec", "func_preproc", "dwi_preproc_json",
                           "func_preproc_json")


# config name of a BOLD map (cache.func_maps) -> its output keys (native, MNI, and their sidecars)
FUNC_MAP_KEYS = {m: (f"func_{m.lower()}", f"func_{m.lower()}_mni", f"func_{m.lower()}_json",
                     f"func_{m.lower()}_mni_json") for m in ("fALFF", "ReHo")}


def stage_outputs(prefix: str, keep_series: bool = False, func_maps: Sequence[str] | None = None) -> list[str]:
    """Output keys of the stage whose keys start with ``prefix`` (``anat_``, ``dwi_``, ``func_``), the series
    left out unless ``keep_series``; given ``func_maps`` (``cache.func_maps``), the BOLD maps not named there
    too (the func stage computes only the maps it is asked for; DWI maps all come from one tensor fit)."""
    unwanted = {k for m, ks in FUNC_MAP_KEYS.items() if func_maps is not None and m not in func_maps for k in ks}
    return [k for k in OUTPUTS if k.startswith(prefix) and (keep_series or k not in SERIES) and k not in unwanted]


def bids_name(subject: str, suffix: str, ext: str, **entities: str) -> str:
    """File name ``sub-<subject>[_key-value...]_<suffix><ext>`` with entities in BIDS order.

    ``from`` is a Python keyword: pass it as ``**{"from": "T1w"}``.
    """
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}; known: {ENTITY_ORDER}")
    parts = [f"sub-{subject}"]
    parts += [f"{k}-{entities[k]}" for k in ENTITY_ORDER if k in entities and entities[k] is not None]
    return "_".join(parts) + f"_{suffix}{ext}"


def derivatives_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "derivatives" / PIPELINE


def unit_label(subject: str, session: str | None = None) -> str:
    """``sub-01`` or ``sub-01_ses-2``: how one subject-session is named in folders, logs and messages."""
    return f"sub-{subject}" + (f"_ses-{session}" if session is not None else "")


def subject_label(subject: str | None) -> str | None:
    """``sub-01`` for ``01`` (or ``sub-01``): how a subject is named in messages, logs and figure titles; None
    stays None (an error or log line without a subject)."""
    if subject is None:
        return None
    return subject if subject.startswith("sub-") else f"sub-{subject}"


def unit_dir(subject: str, session: str | None = None) -> Path:
    """``sub-01`` or ``sub-01/ses-2``: the folder of one subject-session in a BIDS tree."""
    return Path(f"sub-{subject}") / (f"ses-{session}" if session is not None else "")


def derivative(output_dir: str | Path, subject: str, key: str, session: str | None = None) -> str:
    """Path of output ``key`` (see OUTPUTS) for one subject (and session), as a string (Snakemake-friendly)."""
    if key not in OUTPUTS:
        raise KeyError(f"unknown derivative {key!r}; known: {sorted(OUTPUTS)}")
    datatype, entities, suffix, ext = OUTPUTS[key]
    name = bids_name(subject, suffix, ext, ses=session, **entities)
    return str(derivatives_root(output_dir) / unit_dir(subject, session) / datatype / name)


def derivative_pattern(output_dir: str | Path, key: str, sessions: bool = False) -> str:
    """The same path with a ``{subject}`` (and ``{session}``) wildcard, for Snakemake rules."""
    return derivative(output_dir, "{subject}", key, "{session}" if sessions else None)


# raw input kind -> (datatype folder, name after sub-<id>[_ses-<s>]_)
RAW_INPUTS = {
    "T1w": ("anat", "T1w.nii.gz"),
    "dwi": ("dwi", "dwi.nii.gz"),
    "bval": ("dwi", "dwi.bval"),
    "bvec": ("dwi", "dwi.bvec"),
    "dwi_json": ("dwi", "dwi.json"),
    "bold": ("func", "task-rest_bold.nii.gz"),
    "bold_json": ("func", "task-rest_bold.json"),
}


def raw(bids_dir: str | Path, subject: str, kind: str, session: str | None = None) -> str:
    """Raw BIDS input of one subject (and session): kind in T1w, dwi, bval, bvec, dwi_json, bold, bold_json. An
    image is ``.nii.gz``, or ``.nii`` where only that exists (a ``{subject}`` pattern stays ``.nii.gz``)."""
    if kind not in RAW_INPUTS:
        raise KeyError(f"unknown raw input {kind!r}; known: {sorted(RAW_INPUTS)}")
    datatype, rest = RAW_INPUTS[kind]
    u = unit_label(subject, session)
    folder = f"sub-{subject}/ses-{session}" if session is not None else f"sub-{subject}"
    path = f"{Path(bids_dir)}/{folder}/{datatype}/{u}_{rest}"  # few Path objects: start-up calls this per file
    if path.endswith(".gz") and "{" not in path and not os.path.exists(path):
        plain = path[:-3]  # BIDS allows an uncompressed .nii as well
        if os.path.exists(plain):
            return plain
    return path
