"""Per-subject tensors on the model grid and the memory-mapped cohort cache.

Two steps, one Snakemake rule each:

1. ``cache_subject`` (per subject): every MNI-space map of a modality (anat: brain T1w; dwi: the
   configured DTI maps; func: fALFF, ReHo) is resampled to the *model grid* with anti-aliasing, masked
   with the MNI brain mask and normalised per subject (robust z-score), then written as one
   uncompressed ``.npy`` per modality, ``(C, D, H, W)``, plus a JSON record of channels and inputs.
2. ``build_cohort`` (per cohort): the subjects' tensors are streamed into one memory-mappable ``.npy``
   per modality, ``(N, C, D, H, W)``, next to ``index.tsv`` (one row per subject: label, which
   modalities are present, raw clinical columns), ``mask.npy`` (the grid brain mask) and
   ``manifest.json`` (grid, channels, dtype, the config that produced it, a sha256 per array file).

``open_cohort`` memory-maps a cache and refuses one that does not match the config or its checksums
(``CacheError``); nothing is ever loaded with pickle.

The model grid, the resampling and the normalisation are ``neuromoe.cache.grid``'s.

Storage dtype: ``float16`` is stored as numpy ``float16``. numpy has no bfloat16, so ``bfloat16`` is
stored as ``uint16`` holding the bfloat16 bit patterns (torch's round-to-nearest-even conversion);
``decode`` turns either back into float32, and ``torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)``
reinterprets without a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from neuromoe import __version__
from neuromoe.cache.grid import MIN_SUPPORT, ZSCORE_CLIP, check_grid, grid_mask, model_grid, normalise_map
from neuromoe.config import CacheConfig, ParticipantsConfig, schema_defaults
from neuromoe.errors import CacheError, InputError, StageError

if TYPE_CHECKING:  # pandas (~0.25 CPU s) only where tables are read: not in the per-subject cache jobs
    import pandas as pd

MODALITIES: tuple[str, ...] = ("anat", "dwi", "func")
ANAT_CHANNELS: tuple[str, ...] = ("T1w",)
DTYPES: tuple[str, ...] = ("float16", "bfloat16")
CACHE_FORMAT = 1  # bump when the layout or the normalisation changes: old caches are then refused
COHORT_RULE = "cache_cohort"  # rule names used in the fix hints of errors
SUBJECT_RULE = "cache_subject"
_HASH_CHUNK = 8 << 20


# ---------------------------------------------------------------------------------------------
# Storage dtype
# ---------------------------------------------------------------------------------------------
def storage_dtype(dtype: str) -> np.dtype:
    """numpy dtype on disk: float16 -> float16, bfloat16 -> uint16 (bit patterns)."""
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return np.dtype(np.float16) if dtype == "float16" else np.dtype(np.uint16)


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array -> storage array (float16, or uint16 bfloat16 bit patterns, round to nearest even)."""
    if storage_dtype(dtype) == np.float16:
        return np.asarray(x, dtype=np.float32).astype(np.float16)
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def decode(a: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> float32 (same shape). bfloat16 bits are the high half of a float32."""
    if storage_dtype(dtype) == np.float16:
        return np.asarray(a, dtype=np.float32)
    return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------
# Helpers: hashing, atomic writes
# ---------------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    """Tuples -> lists etc., so expected values compare equal to values read back from JSON."""
    return json.loads(json.dumps(x))


_CHANNEL_RE = re.compile(r"_(?:param|stat)-([A-Za-z0-9]+)")
# the file names' lowercase labels (BEP016, XCP-D) -> the channel names of the config (cache.dwi_maps, func_maps)
_CHANNEL_NAMES = {"fa": "FA", "md": "MD", "ad": "AD", "rd": "RD", "falff": "fALFF", "reho": "ReHo"}


def _channel_names(modality: str, paths: Sequence[str | Path]) -> list[str]:
    if modality == "anat" and len(paths) == 1:
        return list(ANAT_CHANNELS)
    names = []
    for i, p in enumerate(paths):
        m = _CHANNEL_RE.search(Path(p).name)
        names.append(_CHANNEL_NAMES.get(m.group(1), m.group(1)) if m else f"{modality}{i}")
    return names


def default_record_path(out_paths: Mapping[str, str | Path], subject: str) -> Path:
    """Where ``cache_subject`` writes its JSON when not told: next to the first modality's .npy."""
    first = Path(next(iter(out_paths.values())))
    return first.parent / f"sub-{subject}_desc-cache.json"


def subject_paths(root: str | Path, subject: str) -> dict[str, Path]:
    """Per-subject cache files under ``root``: ``{anat,dwi,func}`` .npy and ``record`` (the JSON).

    An absent modality's .npy is not written, so a Snakemake rule should declare the record (or the
    subject's folder) as its output, not the .npy files.
    """
    d = Path(root) / f"sub-{subject}"
    out: dict[str, Path] = {m: d / f"sub-{subject}_desc-{m}_cache.npy" for m in MODALITIES}
    out["record"] = default_record_path(out, subject)
    return out


def subject_maps(output_dir: str | Path, subject: str, cfg: Mapping[str, Any], session: str | None = None,
                 anat_session: str | None = None) -> dict[str, list[str]]:
    """The MNI-space derivative maps the config asks for, per modality, in channel order (paths.py names), of
    one subject (and session; the T1w from ``anat_session`` when given: a session without its own)."""
    from neuromoe.paths import derivative

    c = cfg["cache"]
    t1_session = session if anat_session is None else anat_session
    return {"anat": [derivative(output_dir, subject, "anat_brain_mni", t1_session)],
            "dwi": [derivative(output_dir, subject, f"dwi_{p.lower()}_mni", session) for p in c["dwi_maps"]],
            "func": [derivative(output_dir, subject, f"func_{s.lower()}_mni", session) for s in c["func_maps"]]}


# ---------------------------------------------------------------------------------------------
# Per subject
# ---------------------------------------------------------------------------------------------
def cache_subject(maps: Mapping[str, Sequence[str | Path] | None], out_paths: Mapping[str, str | Path],
                  grid: int | Sequence[int], dtype: str, subject: str, *, patch: int,
                  json_path: str | Path | None = None, channels: Mapping[str, Sequence[str]] | None = None,
                  clip: float = ZSCORE_CLIP, session: str | None = None) -> dict[str, Any]:
    """Write one subject's (or subject-session's) model-grid tensors: one uncompressed ``.npy`` per modality +
    a JSON record (``subject``, and ``session`` where given).

    maps: modality -> MNI-space 3D map paths, in channel order (anat: [brain T1w]; dwi: e.g. [FA, MD];
        func: [fALFF, ReHo]). A modality with no paths or any missing file is *absent*: its ``.npy`` is
        not written (a stale one is removed) and the record says ``present: false`` and what was missing.
    out_paths: modality -> ``.npy`` path; each array is (C, D, H, W) in ``storage_dtype(dtype)``, the
        channels robust z-scores (``normalise_map``), zero outside the grid brain mask.
    channels: modality -> channel names; by default ``T1w`` for anat and the ``param-``/``stat-``
        entity of each BIDS file name otherwise.
    json_path: the record (default ``default_record_path``): grid, voxel size, dtype, per modality
        presence, channels, the .npy (relative to the JSON), input paths with sha256 and per-channel
        median / scale. Returns the record.

    patch: the model's patch size (config ``model.patch_size``); each grid size must be a multiple of it.

    Raises ValueError for a bad grid or dtype; StageError naming the subject and file for a map that
    is not a 3D image.
    """
    mg = model_grid(check_grid(grid, patch))
    store = storage_dtype(dtype)
    label = subject if session is None else f"{subject}_ses-{session}"
    json_path = Path(json_path) if json_path is not None else default_record_path(out_paths, label)
    record: dict[str, Any] = {
        "subject": subject, **({"session": session} if session is not None else {}),
        "cache_format": CACHE_FORMAT, "grid": list(mg.shape), "voxel_mm": mg.voxel_mm,
        "dtype": dtype, "storage_dtype": store.name, "normalisation": normalisation_params(clip),
        "neuromoe_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "modalities": {},
    }
    for modality, paths in maps.items():
        if modality not in out_paths:
            raise ValueError(f"no output path for modality {modality!r}; out_paths has {sorted(out_paths)}")
        paths = [Path(p) for p in (paths or [])]
        names = list(channels[modality]) if channels and modality in channels else _channel_names(modality,
                                                                                                 paths)
        if paths and len(names) != len(paths):
            raise ValueError(f"{modality}: {len(paths)} maps but {len(names)} channel names {names}")
        out = Path(out_paths[modality])
        entry: dict[str, Any] = {"channels": names}
        missing = [str(p) for p in paths if not p.is_file()]
        if not paths or missing:
            entry.update(present=False, missing=missing if paths else ["(no input maps)"])
            if out.exists():
                out.unlink()  # never leave a stale tensor next to a record that says absent
            record["modalities"][modality] = entry
            continue
        stack = np.zeros((len(paths), *mg.shape), np.float32)
        stats = []
        for c, p in enumerate(paths):
            try:
                stack[c], st = normalise_map(p, mg.shape, clip)
            except (ValueError, nib.filebasedimages.ImageFileError) as e:
                raise StageError(str(e), subject=f"sub-{label}", stage="cache", path=p,
                                 fix="check the MNI-space map; it must be a 3D NIfTI image") from e
            stats.append({"channel": names[c], **st})
        _save_npy_atomic(out, encode(stack, dtype))
        rel = os.path.relpath(out.resolve(), json_path.resolve().parent)
        entry.update(present=True, file=rel, shape=list(stack.shape),
                     sources=[{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                              for p in paths], stats=stats)
        record["modalities"][modality] = entry
    _write_json_atomic(json_path, record)
    return record


def normalisation_params(clip: float = ZSCORE_CLIP) -> dict[str, Any]:
    """What the cached values mean; stored in records and manifests, and compared on open."""
    return {"method": "robust_zscore", "center": "median", "scale": "1.4826*MAD", "clip": float(clip),
            "mask": "MNI152 brain mask (nilearn, 2 mm) on the model grid", "antialias": "gaussian_fwhm_voxel",
            "min_support": MIN_SUPPORT}


# ---------------------------------------------------------------------------------------------
# Cohort
# ---------------------------------------------------------------------------------------------
def expected_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest keys a config implies; ``open_cohort`` compares each one.

    ``cfg`` is the workflow config (needs ``cache`` and ``participants`` sections).
    """
    c, p = CacheConfig.from_config(cfg), ParticipantsConfig.from_config(cfg)
    return _jsonable({
        "cache_format": CACHE_FORMAT,
        "grid": list(c.grid),
        "dtype": c.dtype,
        "channels": {"anat": list(ANAT_CHANNELS), "dwi": list(c.dwi_maps), "func": list(c.func_maps)},
        "labels": list(p.labels),
        "diagnosis_column": p.diagnosis_column,
        "clinical_columns": list(p.clinical_columns),
        "normalisation": normalisation_params(),
    })


def _config_keys(cfg: Mapping[str, Any]) -> dict[str, Any]:
    p = ParticipantsConfig.from_config(cfg)
    return _jsonable({"cache": dict(cfg["cache"]),
                      "participants": {"diagnosis_column": p.diagnosis_column, "labels": list(p.labels),
                                       "clinical_columns": list(p.clinical_columns)}})


def _record_file(item: str | Path) -> Path:
    p = Path(item)
    if p.is_dir():
        found = sorted(p.glob("sub-*_desc-cache.json"))
        if len(found) != 1:
            raise InputError(f"expected one sub-*_desc-cache.json in the folder, found {len(found)}", path=p,
                             fix=f"rerun the subject cache step (snakemake --forcerun {SUBJECT_RULE})")
        return found[0]
    return p


def _check_record(rec: dict[str, Any], path: Path, exp: dict[str, Any]) -> None:
    sub = f"sub-{rec.get('subject')}"
    fix = (f"rerun the subject cache step (snakemake --forcerun {SUBJECT_RULE}) or delete {path}")
    got = {"cache_format": rec.get("cache_format"), "grid": rec.get("grid"), "dtype": rec.get("dtype"),
           "normalisation": rec.get("normalisation")}
    for key, val in got.items():
        if val != exp[key]:
            raise CacheError(f"[{sub}] {path}: {key} is {val!r} in the subject cache but {exp[key]!r} in the "
                             f"config.\n  fix: {fix}")
    for m in MODALITIES:
        entry = rec["modalities"].get(m)
        if entry is not None and entry["channels"] != exp["channels"][m]:
            raise CacheError(f"[{sub}] {path}: {m} channels are {entry['channels']} in the subject cache but "
                             f"{exp['channels'][m]} in the config.\n  fix: {fix}")


def _read_participants(path: Path, id_column: str = "participant_id") -> pd.DataFrame:
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype={id_column: str}, keep_default_na=True)
    if id_column not in df.columns:
        raise InputError(f"no {id_column!r} column (columns: {list(df.columns)})", path=path,
                         fix="add a participant_id column (sub-XX) as BIDS requires")
    dup = sorted(set(df[id_column][df[id_column].duplicated()]))
    if dup:
        raise InputError(f"participants listed more than once: {dup}", path=path, fix="keep one row each")
    return df.set_index(id_column, drop=False)


def build_cohort(subject_records: Sequence[str | Path], participants_tsv: str | Path, out_dir: str | Path,
                 cfg: Mapping[str, Any]) -> Path:
    """Gather per-subject tensors into the cohort cache; returns the path of ``manifest.json``.

    subject_records: the JSON records ``cache_subject`` wrote (or folders holding one), in row order.
    Writes into ``out_dir``: ``{anat,dwi,func}.npy`` (N, C, D, H, W) in the storage dtype, streamed one
    subject at a time through ``np.lib.format.open_memmap`` (an absent modality is a zero row);
    ``mask.npy`` (D, H, W) uint8 grid brain mask; ``index.tsv`` (row, participant_id, diagnosis, label,
    has_anat, has_dwi, has_func, then the config's clinical columns raw from participants.tsv, ``n/a``
    for missing); ``manifest.json`` last, so a crash never leaves a cache that opens.

    ``cfg``: the ``cache`` and ``participants`` sections, and ``model.patch_size`` (the schema's default if
    absent) that the grid must be a multiple of.

    Raises CacheError when a subject's record disagrees with the config (grid, dtype, channels) and
    InputError for a subject missing from participants.tsv or with a diagnosis not in the labels.
    """
    import pandas as pd

    from neuromoe.inputs.bids import read_sessions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()  # the cache is invalid from here until the new manifest is written
    exp = expected_from_config(cfg)
    patch = cfg.get("model", {}).get("patch_size", schema_defaults("model")["patch_size"])
    grid = check_grid(exp["grid"], patch)
    dtype, channels = exp["dtype"], exp["channels"]
    labels, clin_cols, diag_col = exp["labels"], exp["clinical_columns"], exp["diagnosis_column"]
    store = storage_dtype(dtype)
    participants_tsv = Path(participants_tsv)

    recs: list[tuple[Path, dict[str, Any]]] = []
    for item in subject_records:
        path = _record_file(item)
        rec = json.loads(path.read_text())
        _check_record(rec, path, exp)
        recs.append((path, rec))
    ids = [f"sub-{r['subject']}" for _, r in recs]
    sessions = [r.get("session") for _, r in recs]
    units = [i if ses is None else f"{i}_ses-{ses}" for i, ses in zip(ids, sessions, strict=True)]
    dup = sorted({u for u in units if units.count(u) > 1})
    if dup:
        raise ValueError(f"subjects given more than once: {dup}")
    with_sessions = any(ses is not None for ses in sessions)

    part = _read_participants(participants_tsv)
    for col in [diag_col, *clin_cols]:
        if col not in part.columns:
            raise InputError(f"column {col!r} (from config participants) is missing; columns: "
                             f"{list(part.columns)}", path=participants_tsv,
                             fix="add the column or remove it from config participants")
    visits = {pid: read_sessions(participants_tsv.parent, pid.removeprefix("sub-"))
              for pid, ses in zip(ids, sessions, strict=True) if ses is not None}
    rows = []
    for i, (pid, ses) in enumerate(zip(ids, sessions, strict=True)):
        if pid not in part.index:
            raise InputError("not in participants.tsv", subject=pid, path=participants_tsv,
                             fix="add a row for the subject or remove its data")
        diag = part.at[pid, diag_col]
        unlabelled = pd.isna(diag)  # a new subject to predict: cached, never trained or tested on
        if not unlabelled and diag not in labels:
            raise InputError(f"diagnosis {diag!r} is not one of the configured labels {labels}", subject=pid,
                             path=participants_tsv, fix="correct the diagnosis or config participants.labels")
        present = {m: bool(recs[i][1]["modalities"].get(m, {}).get("present", False)) for m in MODALITIES}
        clinical = {c: part.at[pid, c] for c in clin_cols}
        visit = visits.get(pid)
        if visit is not None and ses in visit.index:  # a session's own value wins over the participant's
            clinical.update({c: visit.at[ses, c] for c in clin_cols if c in visit.columns
                             and not pd.isna(visit.at[ses, c])})
        rows.append({"row": i, "participant_id": pid, **({"session_id": f"ses-{ses}"} if with_sessions else {}),
                     "diagnosis": diag, "label": -1 if unlabelled else labels.index(diag),
                     **{f"has_{m}": present[m] for m in MODALITIES}, **clinical})
    index = pd.DataFrame(rows, columns=["row", "participant_id", *(["session_id"] if with_sessions else []),
                                        "diagnosis", "label", *[f"has_{m}" for m in MODALITIES], *clin_cols])

    n = len(recs)
    files: dict[str, dict[str, Any]] = {}
    for m in MODALITIES:
        shape = (n, len(channels[m]), *grid)
        final = out_dir / f"{m}.npy"
        tmp = out_dir / f"{m}.npy.tmp"
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=store, shape=shape)
        for i, (path, rec) in enumerate(recs):
            entry = rec["modalities"].get(m, {})
            if not entry.get("present", False):
                arr[i] = 0
                continue
            src = (path.parent / entry["file"]).resolve()
            if not src.is_file():
                raise CacheError(f"[{ids[i]}] {src}: the subject's {m} tensor is missing but its record "
                                 f"{path} says present.\n  fix: rerun snakemake --forcerun {SUBJECT_RULE}")
            sub = np.load(src, mmap_mode="r", allow_pickle=False)
            if sub.shape != shape[1:] or sub.dtype != store:
                raise CacheError(f"[{ids[i]}] {src}: {m} tensor is {sub.shape} {sub.dtype}, expected "
                                 f"{shape[1:]} {store}.\n  fix: rerun snakemake --forcerun {SUBJECT_RULE}")
            arr[i] = sub
            del sub
        arr.flush()
        del arr
        os.replace(tmp, final)
        files[final.name] = {"shape": list(shape), "dtype": store.name}
    _save_npy_atomic(out_dir / "mask.npy", grid_mask(grid).astype(np.uint8))
    files["mask.npy"] = {"shape": list(grid), "dtype": "uint8"}
    index.to_csv(out_dir / "index.tsv", sep="\t", index=False, na_rep="n/a")
    files["index.tsv"] = {}
    for name, meta in files.items():
        p = out_dir / name
        meta.update(bytes=p.stat().st_size, sha256=sha256_file(p))

    mg = model_grid(grid)
    config_keys = _config_keys(cfg)
    manifest = {
        **exp,
        "n_subjects": n,
        "voxel_mm": mg.voxel_mm,
        "affine": mg.affine.tolist(),
        "space": "MNI152NLin2009aSym",
        "storage_dtype": store.name,
        "axes": "N, C, D, H, W; D/H/W = grid voxel i/j/k (RAS: left->right, posterior->anterior, "
                "inferior->superior)",
        "files": files,
        "config": config_keys,
        "config_sha256": hashlib.sha256(json.dumps(config_keys, sort_keys=True).encode()).hexdigest(),
        "neuromoe_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json_atomic(manifest_path, manifest)
    return manifest_path


def id_columns(index: pd.DataFrame, rows: Sequence[int]) -> dict[str, np.ndarray]:
    """The id columns of cache ``rows`` for a results table: ``participant_id`` (without ``sub-``), and
    ``session_id`` (``ses-2``) where the cohort has sessions (one row per visit)."""
    by_row = index.set_index("row")
    out = {"participant_id": by_row.loc[list(rows), "participant_id"].astype(str).str.removeprefix("sub-").to_numpy()}
    if "session_id" in by_row.columns:
        out["session_id"] = by_row.loc[list(rows), "session_id"].astype(str).to_numpy()
    return out


def unit_ids(index: pd.DataFrame) -> list[str]:
    """Each cache row's unit, in row order: ``01``, or ``01_ses-2`` in a cohort with sessions."""
    cols = id_columns(index, index["row"].astype(int).tolist())
    if "session_id" not in cols:
        return [str(x) for x in cols["participant_id"]]
    return [f"{p}_{s}" for p, s in zip(cols["participant_id"], cols["session_id"], strict=True)]


@dataclass(frozen=True)
class CohortCache:
    """An opened cohort cache: memory-mapped arrays + index + manifest. Build with ``open_cohort``.

    arrays: modality -> (N, C, D, H, W) read-only memmap in the storage dtype (``decode`` -> float32).
    index: one row per subject (see ``build_cohort``). mask: (D, H, W) bool grid brain mask.
    """

    root: Path
    manifest: dict[str, Any]
    index: pd.DataFrame
    arrays: dict[str, np.ndarray]
    mask: np.ndarray

    def __len__(self) -> int:
        return int(self.manifest["n_subjects"])

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.manifest["grid"])  # type: ignore[return-value]

    @property
    def dtype(self) -> str:
        """``float16`` or ``bfloat16`` (the latter stored as uint16 bits)."""
        return str(self.manifest["dtype"])

    @property
    def channels(self) -> dict[str, list[str]]:
        return dict(self.manifest["channels"])

    @property
    def labels(self) -> list[str]:
        """Class names in class order (label i is labels[i])."""
        return list(self.manifest["labels"])

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) grid voxel -> MNI mm."""
        return np.asarray(self.manifest["affine"], dtype=np.float64)

    @property
    def present(self) -> np.ndarray:
        """(N, 3) bool: has_anat, has_dwi, has_func."""
        return self.index[[f"has_{m}" for m in MODALITIES]].to_numpy(dtype=bool)

    @property
    def y(self) -> np.ndarray:
        """(N,) int64 class labels."""
        return self.index["label"].to_numpy(dtype=np.int64)

    def image(self, modality: str, row: int) -> np.ndarray:
        """One subject's modality tensor decoded to float32, (C, D, H, W) (a copy; for QC, not training)."""
        return decode(self.arrays[modality][row], self.dtype)


def _fix_hint(cache_dir: Path) -> str:
    return (f"rebuild it: delete {cache_dir} and rerun the workflow, or run "
            f"`snakemake --forcerun {COHORT_RULE}`")


def open_cohort(cache_dir: str | Path, expected: Mapping[str, Any] | None = None, *, verify: bool = True,
                mmap_mode: str = "r") -> CohortCache:
    """Memory-map a cohort cache after checking it against the config and its checksums.

    expected: the values the cache must have, as from ``expected_from_config`` (a full workflow config
        is converted); every key is compared with the manifest and all mismatches are reported in one
        CacheError naming the key and both values. None skips the comparison.
    verify: sha256 of every file (reads all of it once). False (hot loops) checks file sizes only.
    mmap_mode: ``r`` (read-only) or ``c`` (copy-on-write: writable views, nothing written back).
    Never unpickles (``allow_pickle=False``).
    """
    import pandas as pd

    root = Path(cache_dir)
    fix = _fix_hint(root)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise CacheError(f"{mpath}: no manifest; the cache was never built or its build did not finish.\n"
                         f"  fix: {fix}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{mpath}: not valid JSON ({e}).\n  fix: {fix}") from e
    if expected is not None:
        exp = expected_from_config(expected) if "cache" in expected else _jsonable(dict(expected))
        bad = [f"{k} is {manifest.get(k)!r} in the cache but {v!r} in the config"
               for k, v in exp.items() if manifest.get(k) != v]
        if bad:
            raise CacheError(f"{mpath}: the cache does not match the config:\n  - " + "\n  - ".join(bad)
                             + f"\n  fix: {fix}")
    if manifest.get("neuromoe_version") != __version__:
        warnings.warn(f"{mpath}: built by neuromoe {manifest.get('neuromoe_version')}, this is {__version__}",
                      stacklevel=2)
    for name, meta in manifest["files"].items():
        p = root / name
        if not p.is_file():
            raise CacheError(f"{p}: listed in the manifest but missing.\n  fix: {fix}")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise CacheError(f"{p}: {size} bytes but the manifest says {meta['bytes']}; the file changed "
                             f"after the cache was built.\n  fix: {fix}")
        if verify:
            digest = sha256_file(p)
            if digest != meta["sha256"]:
                raise CacheError(f"{p}: sha256 {digest} does not match the manifest's {meta['sha256']}; the "
                                 f"file is corrupt or changed.\n  fix: {fix}")
    arrays = {}
    store = storage_dtype(manifest["dtype"])
    n, grid = int(manifest["n_subjects"]), tuple(manifest["grid"])
    for m in MODALITIES:
        try:
            a = np.load(root / f"{m}.npy", mmap_mode=mmap_mode, allow_pickle=False)
        except ValueError as e:  # e.g. an object array: refused rather than unpickled
            raise CacheError(f"{root / f'{m}.npy'}: cannot be memory-mapped without pickle ({e}).\n"
                             f"  fix: {fix}") from e
        want = (n, len(manifest["channels"][m]), *grid)
        if a.shape != want or a.dtype != store:
            raise CacheError(f"{root / f'{m}.npy'}: array is {a.shape} {a.dtype}, the manifest implies "
                             f"{want} {store}.\n  fix: {fix}")
        arrays[m] = a
    mask = np.load(root / "mask.npy", allow_pickle=False).astype(bool)
    index = pd.read_csv(root / "index.tsv", sep="\t",
                        dtype={"participant_id": str, "session_id": str, "diagnosis": str})
    if len(index) != n or not np.array_equal(index["row"].to_numpy(), np.arange(n)):
        raise CacheError(f"{root / 'index.tsv'}: {len(index)} rows that are not 0..{n - 1}.\n  fix: {fix}")
    for m in MODALITIES:
        index[f"has_{m}"] = index[f"has_{m}"].astype(bool)
    return CohortCache(root, manifest, index, arrays, mask)
