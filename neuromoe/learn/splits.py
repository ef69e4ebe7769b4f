"""Subject-level, stratified train/val/test splits for the evaluation protocols.

Two protocols (``evaluation.protocol`` in config.yaml):

- ``holdout``: the paper's single split, 50% train / 25% validation / 25% test, stratified by
  diagnosis, one split per seed (``holdout-s{seed}``).
- ``cv``: stratified k-fold cross-validation repeated over seeds (``cv-s{seed}-f{k}``, k from 0).
  The test part of fold k is fold k; a stratified validation part (``val_fraction`` of the rest) is
  carved out of the remaining subjects for early stopping; the others train.

Splits are made once, written to ``splits.tsv`` (long format: ``split_id``, ``participant_id``,
``part``) and read by every training run, so all variants of an ablation see the same subjects.
They are deterministic for a seed (scikit-learn with ``random_state=seed``) and independent of the
row order of participants.tsv (subjects are sorted by id first).

Example::

    splits = make_splits(participants, "cv", folds=3, seeds=[0, 1], val_fraction=0.2)
    write_splits(splits, "results/evaluation/splits.tsv")
    test_ids = split_parts(splits, "cv-s0-f1")["test"]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from neuromoe.errors import InputError

PARTS = ("train", "val", "test")
PROTOCOLS = ("cv", "holdout")
COLUMNS = ["split_id", "participant_id", "part"]
# The paper's holdout: 50/25/25 = folds {0, 1} / {2} / {3} of a stratified 4-fold partition.
_HOLDOUT_FOLDS = 4
_SPLIT_ID = re.compile(r"^(?:cv-s(?P<cseed>\d+)-f(?P<fold>\d+)|holdout-s(?P<hseed>\d+))$")


def split_id_for(protocol: str, seed: int, fold: int | None = None) -> str:
    """The split id of a seed (and fold): ``cv-s{seed}-f{fold}`` or ``holdout-s{seed}``."""
    if protocol == "cv":
        if fold is None:
            raise ValueError("a cv split id needs a fold")
        return f"cv-s{seed}-f{fold}"
    if protocol == "holdout":
        return f"holdout-s{seed}"
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def planned_split_ids(protocol: str, seeds: Sequence[int], folds: int) -> list[str]:
    """Every split id the ``evaluation`` section asks for, in the workflow's order (seed, then fold)."""
    if protocol == "cv":
        return [split_id_for("cv", s, f) for s in seeds for f in range(folds)]
    return [split_id_for(protocol, s) for s in seeds]


def parse_split_id(split_id: str) -> tuple[str, int, int | None]:
    """``"cv-s1-f2"`` -> ``("cv", 1, 2)``; ``"holdout-s0"`` -> ``("holdout", 0, None)``."""
    m = _SPLIT_ID.match(split_id)
    if not m:
        raise ValueError(f"not a split id: {split_id!r} (expected cv-s<seed>-f<fold> or holdout-s<seed>)")
    if m["cseed"] is not None:
        return "cv", int(m["cseed"]), int(m["fold"])
    return "holdout", int(m["hseed"]), None


def is_split_id(text: str) -> bool:
    """True when ``text`` is a split id (``cv-s0-f1``, ``holdout-s2``)."""
    return bool(_SPLIT_ID.match(text))


def _subjects_and_labels(participants: pd.DataFrame, id_column: str,
                         label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted subject ids (without ``sub-``) and their diagnoses, validated."""
    for col in (id_column, label_column):
        if col not in participants.columns:
            raise InputError(f"participants table has no column {col!r} "
                             f"(columns: {list(participants.columns)})",
                             path="participants.tsv", fix=f"add a {col!r} column or set it in config.yaml")
    frame = participants[[id_column, label_column]].copy()
    frame[id_column] = frame[id_column].astype(str).str.removeprefix("sub-")
    missing = frame[frame[label_column].isna()]
    if len(missing):
        ids = ", ".join(f"sub-{s}" for s in missing[id_column].head(5))
        raise InputError(f"{len(missing)} subject(s) without a diagnosis ({ids})", path="participants.tsv",
                         fix=f"fill {label_column!r} for every subject or remove those rows")
    dup = frame[id_column][frame[id_column].duplicated()].unique()
    if len(dup):
        raise InputError(f"duplicate participant ids: {', '.join('sub-' + s for s in dup[:5])}",
                         path="participants.tsv", fix="give every row its own participant_id")
    frame = frame.sort_values(id_column, kind="stable")
    return frame[id_column].to_numpy(), frame[label_column].astype(str).to_numpy()


def _check_class_sizes(labels: np.ndarray, needed: int, what: str, fix: str) -> None:
    classes, counts = np.unique(labels, return_counts=True)
    classes = [str(c) for c in classes]  # "'HC'", not "np.str_('HC')"
    small = [(c, n) for c, n in zip(classes, counts, strict=True) if n < needed]
    if small:
        listed = ", ".join(f"{c!r} has {n}" for c, n in small)
        all_counts = ", ".join(f"{c}: {n}" for c, n in zip(classes, counts, strict=True))
        raise InputError(f"{what} needs at least {needed} subjects per class, but {listed} "
                         f"(class counts: {all_counts})", path="participants.tsv", fix=fix)


def _cv_fits(n: int, folds: int, with_val: bool) -> bool:
    """Can a class of ``n`` subjects be split in ``folds`` stratified folds?

    Every fold must test at least one subject of it (n >= folds), and the rest of the largest fold
    (n - ceil(n / folds)) must keep one subject for training, plus one for validation when there is a
    validation part (a stratified split needs two of a class).
    """
    return n >= folds and n - math.ceil(n / folds) >= (2 if with_val else 1)


def _cv_min_per_class(folds: int, with_val: bool) -> int:
    """The fewest subjects a class needs for ``_cv_fits``."""
    n = folds
    while not _cv_fits(n, folds, with_val):
        n += 1
    return n


def _carve_val(ids: np.ndarray, labels: np.ndarray, val_fraction: float,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) split of ``ids``; val is ``val_fraction`` of them (at least one per class)."""
    from sklearn.model_selection import train_test_split

    if val_fraction <= 0:
        return ids, ids[:0]
    n_classes = len(np.unique(labels))
    # train_test_split wants at least one val subject per class; round up to that rather than fail.
    n_val = max(int(round(val_fraction * len(ids))), n_classes)
    train, val = train_test_split(ids, test_size=n_val, stratify=labels, random_state=seed, shuffle=True)
    return np.asarray(train), np.asarray(val)


def check_class_sizes(labels: Sequence[str] | np.ndarray, protocol: str, folds: int, val_fraction: float) -> None:
    """InputError unless every class has enough subjects for the protocol (the workflow checks this at start-up
    from participants.tsv, before any preprocessing; ``make_splits`` again)."""
    labels = np.asarray(labels)
    if protocol == "holdout":
        _check_class_sizes(labels, _HOLDOUT_FOLDS, "the 50/25/25 holdout split",
                           "use protocol 'cv' with fewer folds, or add subjects to the small class")
        return
    if int(folds) < 2:
        raise InputError(f"cv needs at least 2 folds, got {folds}", path="config.yaml",
                         fix="set evaluation.folds to 2 or more")
    folds, with_val = int(folds), val_fraction > 0
    smallest = int(np.unique(labels, return_counts=True)[1].min()) if labels.size else 0
    fits = [k for k in range(2, smallest + 1) if _cv_fits(smallest, k, with_val)]
    if fits:
        below = all(_cv_fits(smallest, k, with_val) for k in range(2, max(fits)))
        fix = f"set evaluation.folds to {max(fits)}{' or fewer' if below else ''}"
    else:
        fix = (f"even 2 folds need {_cv_min_per_class(2, with_val)} subjects per class"
               + (" (with the validation part)" if with_val else "") + ": merge or drop the small class")
    what = f"stratified {folds}-fold cv" + (" with a validation part" if with_val else "")
    _check_class_sizes(labels, _cv_min_per_class(folds, with_val), what, fix + ", or add subjects to the small class")


def make_splits(participants: pd.DataFrame, protocol: str = "cv", folds: int = 5,
                seeds: Sequence[int] = (0,), val_fraction: float = 0.2, *,
                id_column: str = "participant_id", label_column: str = "diagnosis") -> pd.DataFrame:
    """Subject-level stratified splits in long format.

    Args:
        participants: one row per subject, with ``id_column`` (``01`` or ``sub-01``) and ``label_column``.
        protocol: ``"cv"`` (stratified ``folds``-fold CV per seed) or ``"holdout"`` (50/25/25 per seed;
            ``folds`` and ``val_fraction`` are not used).
        folds: number of CV folds (>= 2).
        seeds: one partition per seed; ``random_state=seed`` in scikit-learn.
        val_fraction: share of each CV training part held out as the validation part (0 for none).

    Returns:
        DataFrame with columns ``split_id``, ``participant_id`` (no ``sub-`` prefix), ``part``
        (train | val | test): every subject once per split id.

    Raises:
        InputError: a class has too few subjects for the protocol (names the class and counts),
            duplicate ids, missing diagnoses, or bad arguments.
    """
    from sklearn.model_selection import StratifiedKFold  # here: the workflow's start-up imports this module

    if protocol not in PROTOCOLS:
        raise InputError(f"unknown evaluation protocol {protocol!r}", path="config.yaml",
                         fix=f"set evaluation.protocol to one of {', '.join(PROTOCOLS)}")
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction {val_fraction} is outside [0, 1)", path="config.yaml",
                         fix="set evaluation.val_fraction to e.g. 0.2")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"seeds must be a non-empty list without repeats, got {seeds}", path="config.yaml",
                         fix="set evaluation.seeds to e.g. [0, 1, 2]")
    ids, labels = _subjects_and_labels(participants, id_column, label_column)
    check_class_sizes(labels, protocol, folds, val_fraction)
    rows: list[tuple[str, str, str]] = []

    if protocol == "holdout":
        for seed in seeds:
            skf = StratifiedKFold(n_splits=_HOLDOUT_FOLDS, shuffle=True, random_state=seed)
            fold_of = np.empty(len(ids), dtype=int)
            for k, (_, test_idx) in enumerate(skf.split(ids, labels)):
                fold_of[test_idx] = k
            # StratifiedKFold gives the extra subject of a class to the lowest folds: folds 0+1 train.
            part = np.where(fold_of <= 1, "train", np.where(fold_of == 2, "val", "test"))
            sid = split_id_for("holdout", seed)
            rows += [(sid, s, p) for s, p in zip(ids, part, strict=True)]
    else:
        folds = int(folds)
        for seed in seeds:
            skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            for k, (rest_idx, test_idx) in enumerate(skf.split(ids, labels)):
                train, val = _carve_val(ids[rest_idx], labels[rest_idx], val_fraction, seed)
                sid = split_id_for("cv", seed, k)
                part_of = {**{s: "train" for s in train}, **{s: "val" for s in val},
                           **{s: "test" for s in ids[test_idx]}}
                rows += [(sid, s, part_of[s]) for s in ids]

    out = pd.DataFrame(rows, columns=COLUMNS)
    check_splits(out)
    return out


def check_splits(splits: pd.DataFrame) -> None:
    """Raise ``ValueError`` unless every subject has exactly one part per split and parts are known."""
    missing = [c for c in COLUMNS if c not in splits.columns]
    if missing:
        raise ValueError(f"splits table lacks columns {missing}; has {list(splits.columns)}")
    bad = set(splits["part"]) - set(PARTS)
    if bad:
        raise ValueError(f"unknown part(s) {sorted(bad)} in splits; expected {PARTS}")
    dup = splits[splits.duplicated(["split_id", "participant_id"], keep=False)]
    if len(dup):
        r = dup.iloc[0]
        raise ValueError(f"sub-{r['participant_id']} appears more than once in split {r['split_id']}")
    for sid in splits["split_id"].unique():
        if not is_split_id(str(sid)):
            raise ValueError(f"not a split id: {sid!r}")


def write_splits(splits: pd.DataFrame, path: str | Path) -> Path:
    """Write ``splits`` as a TSV (columns ``split_id participant_id part``) and return the path."""
    check_splits(splits)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    splits[COLUMNS].to_csv(path, sep="\t", index=False)
    return path


def read_splits(path: str | Path) -> pd.DataFrame:
    """Read a ``splits.tsv``; ids stay strings (``"01"``, not 1). Raises ``InputError`` if malformed."""
    path = Path(path)
    frame = pd.read_csv(path, sep="\t", dtype=str)
    try:
        check_splits(frame)
    except ValueError as err:
        raise InputError(str(err), path=path, fix="regenerate it with `neuromoe splits`") from err
    return frame[COLUMNS].reset_index(drop=True)


def split_parts(splits: pd.DataFrame, split_id: str) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` participant ids of one split (sorted)."""
    sel = splits[splits["split_id"] == split_id]
    if sel.empty:
        known = ", ".join(sorted(splits["split_id"].unique())[:6])
        raise KeyError(f"split {split_id!r} not in the splits table (has {known}, ...)")
    return {p: sorted(sel.loc[sel["part"] == p, "participant_id"].astype(str)) for p in PARTS}


def split_ids(splits: pd.DataFrame) -> list[str]:
    """The split ids of a table, in the order seeds then folds."""
    def key(sid: str) -> tuple[int, int]:
        _, seed, fold = parse_split_id(sid)
        return seed, fold or 0

    return sorted(splits["split_id"].unique(), key=key)


def subject_table(index: pd.DataFrame) -> pd.DataFrame:
    """One row per participant of a cohort index (whose rows are visits where the dataset has sessions): what
    ``make_splits`` splits, so that all of a subject's sessions fall in the same part of every split."""
    return index.drop_duplicates("participant_id", keep="first").reset_index(drop=True)


def split_rows(index: pd.DataFrame, splits_tsv: str | Path, split_id: str) -> dict[str, list[int]]:
    """Cache rows of each part (train, val, test) of ``split_id``: every row (session) of each of its subjects;
    ids matched without ``sub-``."""
    try:
        parts = split_parts(read_splits(splits_tsv), split_id)
    except KeyError as err:
        raise InputError(str(err.args[0]), path=splits_tsv, fix="use a split id from the table") from err
    rows_of: dict[str, list[int]] = {}
    for pid, row in zip(index["participant_id"].astype(str).str.removeprefix("sub-"), index["row"].astype(int),
                        strict=True):
        rows_of.setdefault(pid, []).append(int(row))
    unknown = [i for ids in parts.values() for i in ids if i not in rows_of]
    if unknown:
        raise InputError(f"split {split_id} names subject(s) not in the cohort cache: "
                         + ", ".join(f"sub-{i}" for i in unknown[:5]), path=splits_tsv,
                         fix="rebuild the splits from the same participants as the cache")
    return {p: sorted(r for i in ids for r in rows_of[i]) for p, ids in parts.items()}
