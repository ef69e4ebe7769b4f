"""Preprocessed series another tool already wrote: fMRIPrep's BOLD, QSIPrep's DWI (``inputs.derivatives``).

Where a unit's (subject's, or subject-session's) preprocessed series is found in the folder a user names, the
workflow computes that modality's maps from it (``neuromoe.preproc.ingest``) instead of running its own motion
correction and registration: no preprocessing job is planned for that modality of that unit. What is read, in
those tools' own layout and names (``<root>/sub-<label>/[ses-<label>/]<datatype>/``):

fMRIPrep (one resting-state run, ``task-rest``), in the first of these spaces found:
  - ``..._space-<MNI>[_res-<r>]_desc-preproc_bold.nii.gz``, ``<MNI>`` one of ``MNI_SPACES``, with its
    ``..._space-<MNI>[_res-<r>]_desc-brain_mask.nii.gz``: maps go onto our template grid by world coordinates;
  - ``..._space-T1w_desc-preproc_bold.nii.gz`` with its ``..._space-T1w_desc-brain_mask.nii.gz`` and the
    anatomical ``sub-<label>[_ses-<label>]_from-T1w_to-<MNI>_mode-image_xfm.h5`` (or ``.txt``): maps go to MNI
    through that transform (one interpolation);
  - always ``..._desc-confounds_timeseries.tsv`` (motion, ``white_matter``, ``csf``, ``non_steady_state_outlier*``)
    and the RepetitionTime from the series' JSON sidecar (else the raw BOLD's).
QSIPrep: ``..._space-T1w_desc-preproc_dwi.nii.gz`` (or ``space-ACPC``, QSIPrep >= 0.17) with its ``.bval`` and
``.bvec``, ``..._desc-confounds_timeseries.tsv`` (motion), optionally ``..._space-T1w_desc-brain_mask.nii.gz``,
and ``sub-<label>_from-T1w_to-<MNI>_mode-image_xfm.h5`` (``from-ACPC_...``) in its ``anat`` folder.

A unit with none of a tool's files is preprocessed here as usual. One with some but not all of them is an
error at start-up that names the subject, the missing file and the fix, before any job runs: a half-copied
derivatives folder must not silently fall back to (or mix with) our own preprocessing.

The MNI152NLin2009 variants share the MNI world coordinates; reading fMRIPrep's ``MNI152NLin2009cAsym`` maps
onto our ``MNI152NLin2009aSym`` grid by those coordinates is the approximation XCP-D and others make between
these templates (their brains differ by about a millimetre at the cortex).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from neuromoe.errors import InputError

TOOLS = {"fmriprep": "func", "qsiprep": "dwi"}  # tool -> the modality whose preprocessing it replaces
MNI_SPACES = ("MNI152NLin2009cAsym", "MNI152NLin2009aSym", "MNI152NLin2009aAsym", "MNI152NLin2009cSym")
T1W_SPACES = ("T1w", "ACPC")
FIX = {"fmriprep": "copy this subject's whole fMRIPrep output (func/ and anat/), or leave its files out of "
                   "inputs.derivatives.fmriprep so that its raw BOLD is preprocessed here",
       "qsiprep": "copy this subject's whole QSIPrep output (dwi/ and anat/), or leave its files out of "
                  "inputs.derivatives.qsiprep so that its raw DWI is preprocessed here"}


@dataclass(frozen=True)
class Ingested:
    """One unit's preprocessed series from ``tool``: ``files`` are the ingest rule's named inputs (``bold`` or
    ``dwi``, ``mask``, ``confounds``, ``bold_json`` / ``bval``, ``bvec``, and ``xfm`` for a T1w-space series);
    ``space`` the series' space label."""

    tool: str
    space: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def modality(self) -> str:
        return TOOLS[self.tool]


def _entities(name: str) -> dict[str, str]:
    """``sub-01_task-rest_space-T1w_desc-preproc_bold.nii.gz`` -> {sub: 01, task: rest, space: T1w, desc:
    preproc} (the suffix and extension dropped)."""
    stem = name.split(".", 1)[0]
    return dict(p.split("-", 1) for p in stem.split("_")[:-1] if "-" in p)


def _prefix(subject: str, session: str | None) -> str:
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def _folder(root: Path, subject: str, session: str | None, datatype: str) -> Path:
    return root / f"sub-{subject}" / (f"ses-{session}" if session else "") / datatype


def _xfm(root: Path, subject: str, session: str | None, space: str) -> Path | None:
    """The tool's anatomical T1w (or ACPC) -> MNI transform: the session's own, else the subject's."""
    places = [(_folder(root, subject, session, "anat"), _prefix(subject, session))] if session else []
    places.append((root / f"sub-{subject}" / "anat", f"sub-{subject}"))
    for folder, prefix in places:
        for mni in MNI_SPACES:
            for ext in (".h5", ".txt"):
                p = folder / f"{prefix}_from-{space}_to-{mni}_mode-image_xfm{ext}"
                if p.is_file():
                    return p
    return None


def _candidates(folder: Path, prefix: str, suffix: str, extra: Mapping[str, str]) -> dict[str, list[Path]]:
    """The ``desc-preproc_<suffix>`` series in ``folder`` whose name starts with ``prefix`` and holds the
    entities ``extra``, by space label."""
    out: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob(f"{prefix}_*desc-preproc_{suffix}.nii*")):
        ent = _entities(p.name)
        if ent.get("desc") != "preproc" or any(ent.get(k) != v for k, v in extra.items()):
            continue
        if ("ses" in ent) != ("_ses-" in prefix):  # a session's file is not the session-less unit's
            continue
        out.setdefault(ent.get("space", ""), []).append(p)
    return out


def _sibling(series: Path, replace: str, drop_space: bool = False) -> Path:
    """A file named like ``series`` with its ``desc-preproc_<suffix>.<ext>`` replaced by ``replace`` (and its
    ``space-``/``res-`` entities dropped: fMRIPrep's confounds table has none)."""
    name = re.sub(r"desc-preproc_[a-z]+\.nii(\.gz)?$", replace, series.name)
    if drop_space:
        name = re.sub(r"_(space|res)-[A-Za-z0-9]+", "", name)
    return series.with_name(name)


def _one(tool: str, found: list[Path], subject: str) -> Path:
    """The one series of a unit in one space: of several resolutions of it (``res-``), the 2 mm one (our
    template grid's); several runs are an error."""
    if len({tuple(sorted((k, v) for k, v in _entities(p.name).items() if k != "res")) for p in found}) == 1:
        found = [p for p in found if _entities(p.name).get("res") == "2"] or found[:1]
    if len(found) > 1:
        raise InputError(f"{len(found)} preprocessed series for one unit in the {tool} folder "
                         f"({', '.join(p.name for p in found)}); the workflow reads one run per subject and session",
                         subject=f"sub-{subject}", path=found[0].parent,
                         fix="keep one run's files in the derivatives folder given to the workflow")
    return found[0]


def _require(tool: str, path: Path | None, subject: str, what: str, expected: Path) -> Path:
    if path is None or not path.is_file():
        raise InputError(f"{tool}'s preprocessed series is here but its {what} is missing", subject=f"sub-{subject}",
                         path=expected, fix=FIX[tool])
    return path


def find_fmriprep(root: Path, subject: str, session: str | None = None) -> Ingested | None:
    """The unit's fMRIPrep resting-state BOLD (see the module doc), None if fMRIPrep wrote none for it."""
    found = _candidates(_folder(root, subject, session, "func"), _prefix(subject, session), "bold", {"task": "rest"})
    for space in (*MNI_SPACES, "T1w"):
        if space not in found:
            continue
        bold = _one("fmriprep", found[space], subject)
        files = {"bold": str(bold)}
        mask = _sibling(bold, "desc-brain_mask.nii.gz")
        files["mask"] = str(_require("fmriprep", mask, subject, "brain mask", mask))
        conf = _sibling(bold, "desc-confounds_timeseries.tsv", drop_space=True)
        files["confounds"] = str(_require("fmriprep", conf, subject, "confounds table", conf))
        side = _sibling(bold, "desc-preproc_bold.json")
        if side.is_file():
            files["bold_json"] = str(side)
        if space == "T1w":
            xfm = _xfm(root, subject, session, "T1w")
            expected = root / f"sub-{subject}" / "anat" / f"sub-{subject}_from-T1w_to-{MNI_SPACES[0]}_mode-image_xfm.h5"
            files["xfm"] = str(_require("fmriprep", xfm, subject, "T1w -> MNI transform", expected))
        return Ingested("fmriprep", space, files)
    return None


def find_qsiprep(root: Path, subject: str, session: str | None = None) -> Ingested | None:
    """The unit's QSIPrep DWI (see the module doc), None if QSIPrep wrote none for it."""
    found = _candidates(_folder(root, subject, session, "dwi"), _prefix(subject, session), "dwi", {})
    for space in T1W_SPACES:
        if space not in found:
            continue
        dwi = _one("qsiprep", found[space], subject)
        files = {"dwi": str(dwi)}
        for key, ext in (("bval", ".bval"), ("bvec", ".bvec")):
            p = _sibling(dwi, f"desc-preproc_dwi{ext}")
            files[key] = str(_require("qsiprep", p, subject, f"{ext} gradient file", p))
        conf = _sibling(dwi, "desc-confounds_timeseries.tsv", drop_space=True)
        files["confounds"] = str(_require("qsiprep", conf, subject, "confounds table (motion)", conf))
        mask = _sibling(dwi, "desc-brain_mask.nii.gz")
        if mask.is_file():
            files["mask"] = str(mask)
        xfm = _xfm(root, subject, session, space)
        expected = root / f"sub-{subject}" / "anat" / f"sub-{subject}_from-{space}_to-{MNI_SPACES[0]}_mode-image_xfm.h5"
        files["xfm"] = str(_require("qsiprep", xfm, subject, f"{space} -> MNI transform", expected))
        return Ingested("qsiprep", space, files)
    return None


FINDERS = {"fmriprep": find_fmriprep, "qsiprep": find_qsiprep}


def derivative_roots(cfg: Mapping) -> dict[str, Path]:
    """The configured tool folders (``inputs.derivatives``), checked: InputError for a folder that does not
    exist or is not that tool's output (its dataset_description.json, where present, names another tool)."""
    import json

    roots = {}
    for tool, path in ((cfg.get("inputs") or {}).get("derivatives") or {}).items():
        if not path:
            continue
        root = Path(path)
        if not root.is_dir():
            raise InputError(f"inputs.derivatives.{tool}: folder not found", path=root,
                             fix=f"give the folder {tool} wrote (the one holding its sub-* folders), or null")
        desc = root / "dataset_description.json"
        if desc.is_file():
            try:
                names = [str(g.get("Name", "")).lower() for g in json.loads(desc.read_text()).get("GeneratedBy", [])]
            except (ValueError, AttributeError) as exc:
                raise InputError(f"unreadable dataset_description.json ({exc})", path=desc,
                                 fix="repair the JSON, or delete the file") from exc
            if names and not any(tool in n for n in names):
                raise InputError(f"inputs.derivatives.{tool} points to a dataset generated by {', '.join(names)}",
                                 path=desc, fix=f"give the folder {tool} wrote")
        roots[tool] = root
    return roots


def discover(cfg: Mapping, units: Mapping[str, object]) -> dict[str, dict[str, Ingested]]:
    """unit key -> {modality: Ingested} for every unit (``units``: key -> an object with ``id`` and ``session``,
    as ``neuromoe.inputs.bids.Dataset.subjects``) whose preprocessed series a configured tool wrote. Every
    problem at once: a ValidationReport when more than one unit's files are incomplete."""
    from neuromoe.errors import ValidationReport

    roots = derivative_roots(cfg)
    out: dict[str, dict[str, Ingested]] = {}
    problems: list[InputError] = []
    for key, unit in units.items():
        for tool, root in roots.items():
            try:
                found = FINDERS[tool](root, unit.id, unit.session)
            except InputError as exc:
                problems.append(exc)
                continue
            if found is not None:
                out.setdefault(key, {})[found.modality] = found
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ValidationReport(problems)
    return out
