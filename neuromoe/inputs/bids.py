"""BIDS input discovery and validation.

``validate_dataset`` finds every problem at once, before any work starts, and reports each with the
subject, the file and the fix (:class:`neuromoe.errors.ValidationReport`). It reads headers, gradient
tables and sidecars only (milliseconds per subject); a truncated ``.nii.gz`` is caught without
decompressing it by comparing the gzip trailer's recorded size with the size the header implies.

Layout understood (one session, as the synthetic cohort and most single-visit studies)::

    participants.tsv
    sub-<id>/anat/sub-<id>_T1w.nii.gz
    sub-<id>/dwi/sub-<id>_dwi.nii.gz  .bval  .bvec  [.json]
    sub-<id>/func/sub-<id>_task-rest_bold.nii.gz  .json (RepetitionTime)

or, longitudinal, the same per session (every subject then has ``ses-*`` folders)::

    sub-<id>/[sub-<id>_sessions.tsv]   (session_id, clinical columns that change between visits)
    sub-<id>/ses-<s>/anat/sub-<id>_ses-<s>_T1w.nii.gz   (dwi/, func/ likewise)

A dataset with sessions is processed per subject-session (a *unit*, keyed ``01_ses-2``); one without is
processed per subject (keyed ``01``) with exactly the names it always had. A session without a T1w is placed in
MNI through the T1w of the subject's nearest earlier session that has one (else the nearest later one).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from neuromoe import paths
from neuromoe.errors import InputError, ValidationReport

MODALITIES = ("anat", "dwi", "func")
SUBJECT_RE = re.compile(r"^sub-([A-Za-z0-9]+)$")
SESSION_RE = re.compile(r"^ses-([A-Za-z0-9]+)$")
# participants.tsv sex coding (case-insensitive); the one table data.py and clinical.py use too.
SEX_CODES = {"m": 0.0, "male": 0.0, "f": 1.0, "female": 1.0}


@dataclass
class Subject:
    """One unit's raw inputs (a subject, or a subject-session): which modalities are present and usable.

    ``anat_session``: the session whose T1w places this one in MNI (its own, unless it has none; None
    without sessions)."""

    id: str
    present: dict[str, bool] = field(default_factory=dict)
    session: str | None = None
    anat_session: str | None = None

    @property
    def key(self) -> str:
        """``01`` or ``01_ses-2``: the unit's key in ``Dataset.subjects`` and its label after ``sub-``."""
        return unit_key(self.id, self.session)

    def has(self, modality: str) -> bool:
        """Usable for ``modality``: its own images, or (anat) a T1w of another session of the subject."""
        if modality == "anat" and self.anat_session is not None:
            return True
        return self.present.get(modality, False)


def unit_key(subject: str, session: str | None = None) -> str:
    """``01`` or ``01_ses-2`` (``neuromoe.paths.unit_label`` without ``sub-``)."""
    return paths.unit_label(subject, session).removeprefix("sub-")


@dataclass
class Dataset:
    """The validated dataset: the units to process (keyed by ``unit_key``: per subject, or per subject-session
    where the dataset has sessions), and the problems that excluded some of them."""

    bids_dir: Path
    subjects: dict[str, Subject]
    participants: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    sessions: bool = False

    def with_modality(self, modality: str) -> list[str]:
        return sorted(s for s, sub in self.subjects.items() if sub.has(modality))

    def training_labels(self, diagnosis_column: str) -> list[str]:
        """The diagnoses of the subjects the model trains and tests on: selected and labelled."""
        df = self.participants
        if df.empty:
            return []
        ids = {f"sub-{sub.id}" for sub in self.subjects.values()}
        rows = df[df["participant_id"].isin(ids) & df[diagnosis_column].notna()]
        return rows[diagnosis_column].astype(str).tolist()


def _rel(bids_dir: Path, p: str | Path) -> str:
    try:
        return str(Path(p).relative_to(bids_dir))
    except ValueError:
        return str(p)


def gzip_complete(path: Path, expected_bytes: int) -> bool:
    """True when a .gz file's trailer records ``expected_bytes`` (mod 2**32) of uncompressed data.

    A truncated download or copy loses the trailer, so this catches it in O(1) without decoding.
    """
    size = path.stat().st_size
    if size < 18:
        return False
    with open(path, "rb") as fh:
        fh.seek(-4, 2)
        (isize,) = struct.unpack("<I", fh.read(4))
    return isize == expected_bytes % (1 << 32)


def check_image(path: Path, subject: str, bids_dir: Path, ndim: int, what: str) -> tuple[tuple, InputError | None]:
    """Header-level check of one NIfTI: readable, complete, the right number of dimensions."""
    rel = _rel(bids_dir, path)
    if str(path).endswith(".gz"):
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return (), InputError(f"the {what} image is named .nii.gz but is not gzip-compressed",
                                      subject=f"sub-{subject}", path=rel,
                                      fix=f"compress it (gzip -c {path.with_suffix('').name} > {path.name}) or "
                                          "rename it to .nii (BIDS allows both)")
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as exc:  # nibabel raises several types for corrupt files
        return (), InputError(f"cannot read the {what} image ({exc.__class__.__name__}: {exc})",
                              subject=f"sub-{subject}", path=rel,
                              fix="replace the file with a valid NIfTI-1/2 image (re-export from the scanner "
                                  "or dcm2niix)")
    if str(path).endswith(".gz"):
        hdr = img.header
        # dataobj.offset is the real data offset (the header object's vox_offset may read 0 after load).
        offset = int(getattr(img.dataobj, "offset", hdr["vox_offset"]))
        expected = offset + int(np.prod(shape)) * hdr.get_data_dtype().itemsize
        if not gzip_complete(path, expected):
            return shape, InputError(f"the {what} image is truncated or corrupt (gzip stream incomplete)",
                                     subject=f"sub-{subject}", path=rel,
                                     fix="copy or download the file again; `gzip -t` on it should succeed")
    affine = np.asarray(img.affine, dtype=float)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        return shape, InputError(f"the {what} header's affine (sform/qform) is zero or not invertible, so the "
                                 "image has no position or voxel size in space", subject=f"sub-{subject}", path=rel,
                                 fix="re-convert from DICOM (dcm2niix), or set a valid sform/qform (e.g. "
                                     "nibabel's set_sform / FSL's fslorient)")
    if len(shape) != ndim and not (ndim == 3 and len(shape) == 4 and shape[3] == 1):
        need = "3D (one volume)" if ndim == 3 else "4D (a time series of volumes)"
        return shape, InputError(f"the {what} image is {len(shape)}D with shape {shape}; it must be {need}",
                                 subject=f"sub-{subject}", path=rel,
                                 fix="point to the right file, or convert it so it has the expected dimensions")
    return shape, None


def read_gradients(bval: Path, bvec: Path) -> tuple[np.ndarray, np.ndarray]:
    """bvals (N,) and bvecs (3, N) in FSL/BIDS text format."""
    bvals = np.loadtxt(bval, ndmin=1).astype(float).ravel()
    bvecs = np.loadtxt(bvec, ndmin=2).astype(float)
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        bvecs = bvecs.T
    return bvals, bvecs


def _check_dwi(bids_dir: Path, s: str, b0_threshold: float, session: str | None = None) -> list[InputError]:
    subj = paths.unit_label(s, session)
    img_p, bval_p, bvec_p = (Path(paths.raw(bids_dir, s, k, session)) for k in ("dwi", "bval", "bvec"))
    problems: list[InputError] = []
    shape, err = check_image(img_p, unit_key(s, session), bids_dir, 4, "DWI")
    if err:
        return [err]
    for p, ext in ((bval_p, "bval"), (bvec_p, "bvec")):
        if not p.exists():
            problems.append(InputError(f"the DWI has no .{ext} file", subject=subj, path=_rel(bids_dir, p),
                                       fix=f"add {p.name} next to the DWI (dcm2niix writes it)"))
    if problems:
        return problems
    try:
        bvals, bvecs = read_gradients(bval_p, bvec_p)
    except ValueError as exc:
        return [InputError(f"cannot parse the gradient table ({exc})", subject=subj, path=_rel(bids_dir, bval_p),
                           fix="bval: one line of numbers; bvec: three lines of numbers")]
    n = shape[3]
    if bvecs.shape[0] != 3:
        problems.append(InputError(f"the .bvec has {bvecs.shape[0]} rows; it must have 3 (x, y, z)",
                                   subject=subj, path=_rel(bids_dir, bvec_p),
                                   fix="write the b-vectors as three rows, one column per volume"))
    if bvals.size != n:
        problems.append(InputError(f"{bvals.size} b-values but the image has {n} volumes", subject=subj,
                                   path=_rel(bids_dir, bval_p), code="VOLUME_COUNT_MISMATCH",
                                   fix="the .bval must list one b-value per DWI volume"))
    if bvecs.shape[0] == 3 and bvecs.shape[1] != n:
        problems.append(InputError(f"{bvecs.shape[1]} b-vectors but the image has {n} volumes", subject=subj,
                                   path=_rel(bids_dir, bvec_p), code="VOLUME_COUNT_MISMATCH",
                                   fix="the .bvec must have one column per DWI volume"))
    bad = np.flatnonzero(~np.isfinite(bvals) | (bvals < 0))
    if bad.size:
        problems.append(InputError(f"the .bval has {bad.size} value(s) that are not b-values (nan, inf or "
                                   f"negative) at volume(s) {', '.join(map(str, bad[:8]))}", subject=subj,
                                   path=_rel(bids_dir, bval_p),
                                   fix="one finite b-value >= 0 per volume (s/mm^2); check the conversion"))
    elif not problems and bvecs.shape[0] == 3:
        dw = bvals > b0_threshold
        norm = np.linalg.norm(np.nan_to_num(bvecs, nan=0.0), axis=0)
        zero = np.flatnonzero(dw & ((norm < 1e-6) | ~np.isfinite(bvecs).all(axis=0)))
        if zero.size:
            problems.append(InputError(
                f"{zero.size} diffusion-weighted volume(s) have a zero or non-finite b-vector (volume(s) "
                f"{', '.join(map(str, zero[:8]))}, b = {bvals[zero[0]]:g})", subject=subj,
                path=_rel(bids_dir, bvec_p),
                fix="every volume with b > preprocessing.dwi.b0_threshold needs its gradient direction (a unit "
                    "vector) in the .bvec; check the conversion, or mark the volume b=0 if it is one"))
    if not problems and not np.any(bvals <= b0_threshold):
        problems.append(InputError(f"no b=0 volume (all b-values > {b0_threshold} s/mm^2)", subject=subj,
                                   path=_rel(bids_dir, bval_p),
                                   fix="a tensor fit needs at least one b=0 volume; check the .bval or "
                                       "preprocessing.dwi.b0_threshold"))
    return problems


def min_volumes(tr: float, f_low: float) -> int:
    """Fewest BOLD volumes whose duration resolves ``f_low``: T * TR >= 1 / f_low (100 s for 0.01 Hz); fALFF and
    the band-pass need it (checked here at start-up and by the func stage)."""
    return int(math.ceil(1.0 / (f_low * tr) - 1e-9))


def _check_func(bids_dir: Path, s: str, func_cfg: Mapping[str, Any], session: str | None = None) -> list[InputError]:
    subj = paths.unit_label(s, session)
    img_p, js_p = (Path(paths.raw(bids_dir, s, k, session)) for k in ("bold", "bold_json"))
    shape, err = check_image(img_p, unit_key(s, session), bids_dir, 4, "BOLD")
    if err:
        return [err]
    fix = ('add {"RepetitionTime": <seconds>} to the sidecar (dcm2niix writes it)')
    if not js_p.exists():
        return [InputError("the BOLD has no JSON sidecar, so its RepetitionTime is unknown", subject=subj,
                           path=_rel(bids_dir, js_p), fix=fix)]
    try:
        meta = json.loads(js_p.read_text())
    except json.JSONDecodeError as exc:
        return [InputError(f"the sidecar is not valid JSON ({exc})", subject=subj, path=_rel(bids_dir, js_p),
                           fix="fix the JSON syntax")]
    tr = meta.get("RepetitionTime")
    if tr is None:
        return [InputError("RepetitionTime is missing from the sidecar", subject=subj, path=_rel(bids_dir, js_p),
                           fix=fix)]
    if isinstance(tr, bool) or not isinstance(tr, (int, float)) or not tr > 0:
        return [InputError(f"RepetitionTime is {tr!r}; it must be a positive number of seconds", subject=subj,
                           path=_rel(bids_dir, js_p), fix=fix)]
    dummy, f_low = int(func_cfg.get("dummy_scans", 0)), float(func_cfg.get("band_hz", [0.01, 0.08])[0])
    need, left = min_volumes(float(tr), f_low), shape[3] - dummy
    if left < need:
        return [InputError(f"the BOLD has {shape[3]} volumes; minus {dummy} dummy scans that leaves {left} "
                           f"({max(left, 0) * tr:g} s at TR {tr:g} s), and fALFF/ReHo need at least {need} "
                           f"({need * tr:g} s, one period of the band's {f_low:g} Hz)", subject=subj,
                           path=_rel(bids_dir, img_p),
                           fix="use a longer resting-state run, or lower preprocessing.func.dummy_scans / raise "
                               "the low edge of preprocessing.func.band_hz")]
    return []


def _check_participants(bids_dir: Path, cfg: dict, folders: set[str]) -> tuple[pd.DataFrame, list[InputError]]:
    pcfg = cfg["participants"]
    tsv = bids_dir / "participants.tsv"
    if not tsv.exists():
        return pd.DataFrame(), [InputError("participants.tsv is missing", path="participants.tsv",
                                           fix="add a participants.tsv with participant_id, "
                                               f"{pcfg['diagnosis_column']} and the clinical columns")]
    df = pd.read_csv(tsv, sep="\t", dtype={"participant_id": str}, na_values=["n/a", "NA", ""])
    problems: list[InputError] = []
    need = ["participant_id", pcfg["diagnosis_column"], *pcfg["clinical_columns"]]
    missing_cols = [c for c in need if c not in df.columns]
    if missing_cols:
        problems.append(InputError(f"columns {missing_cols} are missing (found {list(df.columns)})",
                                   path="participants.tsv",
                                   fix="add them, or change participants.clinical_columns / diagnosis_column "
                                       "in config.yaml"))
        return df, problems
    dup = df["participant_id"][df["participant_id"].duplicated()].tolist()
    if dup:
        problems.append(InputError(f"participant_id values appear twice: {dup}", path="participants.tsv",
                                   fix="keep one row per participant"))
    labels = pcfg["labels"]
    for _, row in df.iterrows():
        pid = row["participant_id"]
        dx = row[pcfg["diagnosis_column"]]
        if pd.isna(dx):
            pass  # unlabelled: preprocessed and cached for `neuromoe predict`, never trained or tested on
        elif str(dx) not in labels:
            problems.append(InputError(f"unknown {pcfg['diagnosis_column']} label {dx!r}; allowed: {labels}",
                                       subject=pid, path="participants.tsv",
                                       fix="correct the label, or add it to participants.labels in config.yaml"))
        if pid not in folders:
            problems.append(InputError("listed in participants.tsv but has no folder (no images)", subject=pid,
                                       path="participants.tsv", code="PARTICIPANT_ID_MISMATCH",
                                       fix=f"add {pid}/ with its images, or remove the row"))
    for col in pcfg["clinical_columns"]:
        vals = df[col]
        if col == "sex":
            bad = vals[~vals.isna() & ~vals.astype(str).str.strip().str.lower().isin(list(SEX_CODES))]
        else:
            num = pd.to_numeric(vals, errors="coerce")
            bad = vals[num.isna() & ~vals.isna()]
        for idx, v in bad.items():
            problems.append(InputError(f"column {col!r} has the non-numeric value {v!r}",
                                       subject=df.loc[idx, "participant_id"], path="participants.tsv",
                                       fix="use a number, or n/a for a missing value"
                                       + (" (sex: M or F)" if col == "sex" else "")))
    for folder in sorted(folders - set(df["participant_id"])):
        problems.append(InputError("has images but no row in participants.tsv", subject=folder,
                                   path="participants.tsv", code="PARTICIPANT_ID_MISMATCH",
                                   fix=f"add a row for {folder} with its diagnosis and clinical values"))
    return df, problems


# bids_dir values that name the project's own synthetic cohorts (config.yaml, presets/study.yaml): only these
# are written at start-up when absent; any other synthetic cohort is written on purpose with `neuromoe synth`.
SYNTHETIC_DIRS = ("data/demo_bids", "data/study_bids")


def generate_synthetic(bids_dir: str | Path, cfg: Mapping[str, Any], *, dry_run: bool) -> bool:
    """Whether the start-up writes the synthetic cohort into ``bids_dir``: only when it is absent,
    ``synthetic.generate`` is on and the path is the demo's own (``SYNTHETIC_DIRS``, relative to the working
    directory); never in a dry run. Anything else absent is a ValidationReport naming the path and the fix
    (a typo'd path used to get a 2 GB synthetic cohort)."""
    path = Path(bids_dir)
    if path.exists():
        return False
    if cfg["synthetic"].get("generate", True) and path.as_posix().rstrip("/") in SYNTHETIC_DIRS:
        if not dry_run:
            return True
        raise ValidationReport([InputError(
            "does not exist yet: the synthetic demo cohort is written by the first real run, not by a dry run",
            path=bids_dir, fix="run without -n/--dry-run (make demo), or point bids_dir at your dataset")])
    raise ValidationReport([InputError(
        "bids_dir does not exist", path=path.resolve(),
        fix="correct bids_dir in your config (or the BIDS_DIR argument); a synthetic cohort is written only "
            f"at {' or '.join(SYNTHETIC_DIRS)}, or on purpose with `neuromoe synth PATH`")])


def session_order(labels: Sequence[str]) -> list[str]:
    """Session labels in visit order: numbers by value (``2`` before ``10``), then the others by name."""
    return sorted(set(labels), key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0, x))


def select_sessions(found: set[str], cfg: Mapping[str, Any], bids_dir: Path, has_sessions: bool) -> set[str] | None:
    """The sessions to process: ``session_label`` (labels without ``ses-``; empty: every session), as a BIDS
    App's ``--session-label``; None for all. A label no selected subject has is an error."""
    labels = [str(x).removeprefix("ses-") for x in cfg.get("session_label") or []]
    if not labels:
        return None
    if not has_sessions:
        raise ValidationReport([InputError("session labels were given, but the dataset has no ses-* folders",
                                           path=bids_dir, fix="drop --session-label (session_label in the config)")])
    unknown = sorted(set(labels) - found)
    if unknown:
        raise ValidationReport([InputError(f"no session folder for session label(s) {', '.join(unknown)}",
                                           path=bids_dir, fix="use labels without 'ses-' that exist in the dataset ("
                                                              + ", ".join(session_order(list(found))[:10]) + ")")])
    return set(labels)


def _place_anatomy(units: list[Subject]) -> None:
    """Set each session's ``anat_session``: its own when it has a T1w, else the nearest earlier session's that
    has one, else the nearest later one's (``units`` in visit order). Without sessions nothing changes."""
    with_t1 = [k for k, u in enumerate(units) if u.session is not None and u.present.get("anat")]
    for k, u in enumerate(units):
        if u.session is None or not with_t1:
            continue
        earlier = [j for j in with_t1 if j <= k]
        u.anat_session = units[earlier[-1] if earlier else with_t1[0]].session


def sessions_tsv(bids_dir: str | Path, subject: str) -> Path:
    """``sub-<id>/sub-<id>_sessions.tsv``: a subject's per-visit values (BIDS)."""
    return Path(bids_dir) / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"


def read_sessions(bids_dir: str | Path, subject: str) -> pd.DataFrame | None:
    """A subject's sessions.tsv indexed by session label (without ``ses-``), or None when there is none."""
    path = sessions_tsv(bids_dir, subject)
    if not path.is_file():
        return None
    df = pd.read_csv(path, sep="\t", dtype={"session_id": str}, na_values=["n/a", "NA", ""])
    if "session_id" not in df.columns:
        return df.iloc[0:0]
    return df.set_index(df["session_id"].astype(str).str.removeprefix("ses-"))


def _check_sessions_tsv(bids_dir: Path, s: str, clinical_columns: Sequence[str]) -> list[InputError]:
    """A sessions.tsv, where there is one: a session_id column, one row per session, numeric clinical values
    (its clinical columns override participants.tsv's for that session)."""
    path = sessions_tsv(bids_dir, s)
    if not path.is_file():
        return []
    rel, subj = _rel(bids_dir, path), f"sub-{s}"
    df = read_sessions(bids_dir, s)
    if df is None or df.empty and "session_id" not in df.columns:
        return [InputError("sessions.tsv has no session_id column", subject=subj, path=rel,
                           fix="name the first column session_id (values ses-1, ses-2, ...)")]
    problems = []
    dup = sorted(set(df.index[df.index.duplicated()]))
    if dup:
        problems.append(InputError(f"sessions listed more than once: {', '.join('ses-' + d for d in dup)}",
                                   subject=subj, path=rel, fix="keep one row per session"))
    for col in [c for c in clinical_columns if c in df.columns and c != "sex"]:
        vals = df[col]
        bad = vals[pd.to_numeric(vals, errors="coerce").isna() & ~vals.isna()]
        for ses, v in bad.items():
            problems.append(InputError(f"column {col!r} has the non-numeric value {v!r} (ses-{ses})", subject=subj,
                                       path=rel, fix="use a number, or n/a for a missing value"))
    return problems


def select_participants(folders: set[str], cfg: Mapping[str, Any], bids_dir: Path) -> set[str]:
    """The subject folders to process: ``participant_label`` (labels without ``sub-``; empty: every subject)
    minus ``exclude_participant_label``, as a BIDS App's ``--participant-label`` /
    ``--exclude-participant-label``. A label with no folder is an error (a typo would otherwise run nobody or
    everybody)."""
    def folder(label: str) -> str:
        return "sub-" + str(label).removeprefix("sub-")

    include = [folder(x) for x in cfg.get("participant_label") or []]
    exclude = [folder(x) for x in cfg.get("exclude_participant_label") or []]
    unknown = sorted({f for f in include + exclude if f not in folders})
    if unknown:
        shown = ", ".join(f.removeprefix("sub-") for f in sorted(folders)[:10]) + (", ..." if len(folders) > 10 else "")
        raise ValidationReport([InputError(f"no subject folder for participant label(s) "
                                           f"{', '.join(u.removeprefix('sub-') for u in unknown)}",
                                           path=bids_dir, fix=f"use labels without 'sub-' that exist in the "
                                                              f"dataset ({shown})")])
    chosen = set(include) if include else set(folders)
    return chosen - set(exclude)


def _check_unit_files(bids_dir: Path, s: str, ses: str | None, present: dict[str, bool], b0_thr: float,
                      func_cfg: dict) -> list[InputError]:
    """The image headers, gradient tables and sidecars of one unit's present modalities."""
    problems: list[InputError] = []
    if present["anat"]:
        _, err = check_image(Path(paths.raw(bids_dir, s, "T1w", ses)), unit_key(s, ses), bids_dir, 3, "T1w")
        if err:
            problems.append(err)
    if present["dwi"]:
        problems += _check_dwi(bids_dir, s, b0_thr, ses)
    if present["func"]:
        problems += _check_func(bids_dir, s, func_cfg, ses)
    return problems


def validate_dataset(bids_dir: str | Path, cfg: dict, *, check_files: bool = True) -> Dataset:
    """Discover and validate a BIDS dataset; raise ValidationReport listing every problem.

    ``check_files=False`` discovers only (layout, participants.tsv, which modalities each unit has) without
    reading image headers, gradient tables, sidecars or sessions.tsv: for the Snakemake process of a cluster
    job, which re-reads the Snakefile after the main process validated everything (23 s at 5,000 subjects).

    Only the subjects chosen by ``participant_label`` / ``exclude_participant_label`` are checked and returned
    (another subject's problem does not stop them); the dataset-level checks of participants.tsv always run.

    A subject lacking a whole modality is not an error: with ``participants.missing_modality: keep`` it
    stays (its absent experts are masked later), with ``exclude`` it is dropped, and either way it is
    listed in ``Dataset.warnings``.
    """
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise ValidationReport([InputError("the BIDS folder does not exist", path=bids_dir,
                                           fix="set bids_dir in config.yaml (or --config bids_dir=...)")])
    folders = {p.name for p in bids_dir.glob("sub-*") if p.is_dir()}
    problems: list[InputError] = []
    sessions_of: dict[str, list[str]] = {}
    for f in sorted(folders):
        if not SUBJECT_RE.match(f):
            label = f.removeprefix("sub-")
            odd = sorted({c for c in label if not c.isascii() or not c.isalnum()})
            problems.append(InputError("subject folder name is not sub-<label>" + (
                f": the label has {', '.join(repr(c) for c in odd)}" if odd else ": the label is empty"),
                subject=f, path=f, fix="rename it, e.g. sub-01: BIDS labels hold only the letters A-Z, a-z and "
                                       "the digits 0-9 (no '-', '_', spaces or other signs)"))
            continue
        found = [p.name for p in (bids_dir / f).glob("ses-*") if p.is_dir()]
        for name in sorted(x for x in found if not SESSION_RE.match(x)):
            problems.append(InputError("session folder name is not ses-<label>", subject=f, path=f"{f}/{name}",
                                       fix="rename it, e.g. ses-1 (letters and digits only), in the file names too"))
        sessions_of[f] = session_order([m.group(1) for x in found if (m := SESSION_RE.match(x))])
    has_sessions = any(sessions_of.values())
    if has_sessions:
        for f in sorted(f for f, ses in sessions_of.items() if not ses):
            problems.append(InputError("has no ses-* folder, but other subjects have sessions", subject=f, path=f,
                                       fix="move its anat/, dwi/ and func/ into a session folder (e.g. ses-1, with "
                                           "_ses-1 in the file names): every subject has sessions, or none"))
    chosen = select_participants(folders, cfg, bids_dir)
    wanted = select_sessions({s for f in chosen for s in sessions_of.get(f, [])}, cfg, bids_dir, has_sessions)
    df, pproblems = _check_participants(bids_dir, cfg, folders)
    problems += pproblems
    if chosen != folders:  # a selection: another subject's problem is not this run's
        problems = [p for p in problems if p.subject is None or p.subject.split("_")[0] in chosen]

    keep = cfg["participants"].get("missing_modality", "exclude") == "keep"
    b0_thr = float(cfg["preprocessing"]["dwi"].get("b0_threshold", 50))
    subjects: dict[str, Subject] = {}
    warnings: list[str] = []
    for f in sorted(folders & chosen):
        m = SUBJECT_RE.match(f)
        if not m:
            continue
        s = m.group(1)
        sessions: list[str | None] = [x for x in sessions_of[f] if wanted is None or x in wanted] \
            if has_sessions else [None]
        if has_sessions and check_files:
            problems += _check_sessions_tsv(bids_dir, s, cfg["participants"]["clinical_columns"])
        units: list[Subject] = []
        for ses in sessions:
            label = paths.unit_label(s, ses)
            present = {
                "anat": Path(paths.raw(bids_dir, s, "T1w", ses)).exists(),
                "dwi": Path(paths.raw(bids_dir, s, "dwi", ses)).exists(),
                "func": Path(paths.raw(bids_dir, s, "bold", ses)).exists(),
            }
            if not any(present.values()):
                problems.append(InputError("has no T1w, DWI or BOLD image under the expected names", subject=label,
                                           path=str(paths.unit_dir(s, ses)),
                                           fix=f"name them {label}_T1w.nii.gz, {label}_dwi.nii.gz, "
                                               f"{label}_task-rest_bold.nii.gz in anat/, dwi/, func/ "
                                               "(.nii works too)"))
                continue
            if check_files:
                problems += _check_unit_files(bids_dir, s, ses, present, b0_thr, cfg["preprocessing"]["func"])
            units.append(Subject(s, present, ses))
        _place_anatomy(units)
        for u in units:
            label = paths.unit_label(s, u.session)
            if not u.has("anat"):
                # Every MNI map is registered through the T1w, so a unit without one cannot be placed in MNI.
                warnings.append(f"{label}: no T1w image" + (" in any selected session" if has_sessions else "")
                                + "; excluded (DWI and BOLD are registered to MNI via the T1w)")
                continue
            if u.anat_session != u.session:
                warnings.append(f"{label}: no T1w image; placed in MNI through ses-{u.anat_session}'s")
            absent = [k for k in ("dwi", "func") if not u.has(k)]
            if absent:
                verb = "kept with the expert(s) masked" if keep else "excluded (participants.missing_modality: exclude)"
                warnings.append(f"{label}: missing {', '.join(absent)}; {verb}")
                if not keep:
                    continue
            subjects[u.key] = u
    if cfg.get("validation", {}).get("bids_validator"):
        from neuromoe.inputs.validator import merge_problems, run_validator

        official, notes = run_validator(bids_dir)
        problems = merge_problems(problems, [p for p in official if p.subject is None or p.subject in chosen])
        warnings += notes
    if problems:
        raise ValidationReport(problems)
    if not df.empty:
        unlabelled = df.loc[df[cfg["participants"]["diagnosis_column"]].isna()
                            & df["participant_id"].isin(chosen), "participant_id"].tolist()
        if unlabelled:
            warnings.append(f"{len(unlabelled)} subject(s) without a diagnosis ({', '.join(unlabelled[:5])}"
                            f"{', ...' if len(unlabelled) > 5 else ''}): processed for prediction only")
    if not subjects:
        raise ValidationReport([InputError("no usable subjects found", path=bids_dir,
                                           fix="check bids_dir and the file names (see README)")])
    return Dataset(bids_dir, subjects, df, warnings, sessions=has_sessions)
