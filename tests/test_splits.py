"""Splits: subject-level, stratified, deterministic, each subject tested once per seed in cv."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuromoe.errors import InputError
from neuromoe.learn.splits import (
    make_splits,
    parse_split_id,
    read_splits,
    split_id_for,
    split_ids,
    split_parts,
    write_splits,
)


def cohort(counts: dict[str, int], prefix: bool = False) -> pd.DataFrame:
    """A participants table with ``counts[c]`` subjects of class c, ids 01.., rows shuffled."""
    labels = [c for c, n in counts.items() for _ in range(n)]
    ids = [f"{'sub-' if prefix else ''}{i + 1:02d}" for i in range(len(labels))]
    frame = pd.DataFrame({"participant_id": ids, "diagnosis": labels, "age": np.arange(len(ids))})
    return frame.sample(frac=1.0, random_state=7).reset_index(drop=True)


COUNTS = {"HC": 23, "PD": 17, "iRBD": 13}  # uneven on purpose: 53 subjects


def assert_disjoint_parts(splits: pd.DataFrame, n_subjects: int) -> None:
    for sid, grp in splits.groupby("split_id"):
        assert grp["participant_id"].is_unique, sid
        assert len(grp) == n_subjects, sid
        parts = {p: set(grp.loc[grp["part"] == p, "participant_id"]) for p in ("train", "val", "test")}
        assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"]
        assert not parts["val"] & parts["test"]


def assert_stratified(splits: pd.DataFrame, participants: pd.DataFrame, fractions: dict[str, float],
                      tolerance: float = 1.0) -> None:
    """Per split, part and class: count within ``tolerance`` subjects of class_count * fraction."""
    dx = dict(zip(participants["participant_id"].str.removeprefix("sub-"), participants["diagnosis"],
                  strict=True))
    totals = participants["diagnosis"].value_counts()
    for sid, grp in splits.groupby("split_id"):
        for part, frac in fractions.items():
            sel = grp.loc[grp["part"] == part, "participant_id"].map(dx).value_counts()
            for cls, n_cls in totals.items():
                expected = n_cls * frac
                got = int(sel.get(cls, 0))
                assert abs(got - expected) <= tolerance, (sid, part, cls, got, expected)


def test_holdout_is_50_25_25_stratified_and_disjoint() -> None:
    p = cohort(COUNTS)
    s = make_splits(p, "holdout", seeds=[0, 1, 2])
    assert split_ids(s) == ["holdout-s0", "holdout-s1", "holdout-s2"]
    assert_disjoint_parts(s, len(p))
    assert_stratified(s, p, {"train": 0.5, "val": 0.25, "test": 0.25})
    # seeds give different test sets
    t0, t1 = (set(split_parts(s, f"holdout-s{k}")["test"]) for k in (0, 1))
    assert t0 != t1


def test_cv_each_subject_tested_once_per_seed_and_val_carved() -> None:
    p = cohort(COUNTS)
    folds, val_fraction = 4, 0.2
    s = make_splits(p, "cv", folds=folds, seeds=[0, 3], val_fraction=val_fraction)
    assert_disjoint_parts(s, len(p))
    for seed in (0, 3):
        test = s[(s["split_id"].str.startswith(f"cv-s{seed}-")) & (s["part"] == "test")]
        counts = test["participant_id"].value_counts()
        assert len(counts) == len(p) and (counts == 1).all()
    # test part = one fold (within one subject of n_c / k per class); val = val_fraction of the rest.
    assert_stratified(s, p, {"test": 1 / folds})
    rest = 1 - 1 / folds
    assert_stratified(s, p, {"val": rest * val_fraction, "train": rest * (1 - val_fraction)})
    for sid in split_ids(s):
        parts = split_parts(s, sid)
        assert all(len(parts[k]) > 0 for k in ("train", "val", "test"))


def test_deterministic_and_row_order_independent_and_prefix_tolerant() -> None:
    p = cohort(COUNTS)
    a = make_splits(p, "cv", folds=3, seeds=[5])
    b = make_splits(p.sample(frac=1.0, random_state=1), "cv", folds=3, seeds=[5])
    c = make_splits(cohort(COUNTS, prefix=True), "cv", folds=3, seeds=[5])
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c)
    assert not a["participant_id"].str.startswith("sub-").any()


def test_no_val_part_when_fraction_zero() -> None:
    s = make_splits(cohort(COUNTS), "cv", folds=3, seeds=[0], val_fraction=0.0)
    assert set(s["part"]) == {"train", "test"}


def test_too_few_subjects_in_a_class_names_class_and_suggests_fewer_folds() -> None:
    p = cohort({"HC": 10, "PD": 10, "iRBD": 3})
    with pytest.raises(InputError) as err:
        make_splits(p, "cv", folds=5, seeds=[0], val_fraction=0.2)
    msg = str(err.value)
    assert "'iRBD' has 3" in msg and "fix:" in msg and "evaluation.folds to 3" in msg
    with pytest.raises(InputError, match="'iRBD' has 3"):
        make_splits(p, "holdout", seeds=[0])
    # the suggestion works: 3 folds test one iRBD subject each, and leave one for val and one for train
    s = make_splits(p, "cv", folds=3, seeds=[0, 1], val_fraction=0.2)
    assert len(s) == 6 * len(p)
    # 2 folds leave a single iRBD subject beside the test fold: no stratified val part possible
    q = cohort({"HC": 3, "PD": 4, "iRBD": 4})
    with pytest.raises(InputError, match="needs at least 4 subjects per class, but 'HC' has 3"):
        make_splits(q, "cv", folds=2, seeds=[0], val_fraction=0.2)
    assert len(make_splits(q, "cv", folds=2, seeds=[0], val_fraction=0.0)) == 2 * len(q)


def test_bad_input_is_named() -> None:
    p = cohort(COUNTS)
    with pytest.raises(InputError, match="protocol"):
        make_splits(p, "loo")
    dup = pd.concat([p, p.iloc[:1]])
    with pytest.raises(InputError, match="duplicate"):
        make_splits(dup, "cv", folds=3)
    nan = p.copy()
    nan.loc[0, "diagnosis"] = None
    with pytest.raises(InputError, match="without a diagnosis"):
        make_splits(nan, "cv", folds=3)


def test_round_trip_keeps_string_ids(tmp_path) -> None:
    s = make_splits(cohort(COUNTS), "holdout", seeds=[0])
    path = write_splits(s, tmp_path / "eval" / "splits.tsv")
    back = read_splits(path)
    pd.testing.assert_frame_equal(back, s)
    assert back["participant_id"].iloc[0].startswith("0")
    (tmp_path / "bad.tsv").write_text("split_id\tparticipant_id\tpart\n"
                                      "holdout-s0\t01\ttrain\nholdout-s0\t01\ttest\n")
    with pytest.raises(InputError, match="more than once"):
        read_splits(tmp_path / "bad.tsv")


def test_split_id_helpers() -> None:
    assert parse_split_id(split_id_for("cv", 2, 3)) == ("cv", 2, 3)
    assert parse_split_id(split_id_for("holdout", 1)) == ("holdout", 1, None)
    with pytest.raises(ValueError):
        parse_split_id("fold3")


@pytest.mark.parametrize("counts", [{"HC": 40, "PD": 40, "iRBD": 33}, {"HC": 8, "PD": 7, "iRBD": 6}])
@pytest.mark.parametrize("folds", [3, 5])
def test_properties_hold_across_cohort_sizes(counts: dict[str, int], folds: int) -> None:
    p = cohort(counts)
    s = make_splits(p, "cv", folds=folds, seeds=[0, 1, 2], val_fraction=0.2)
    assert_disjoint_parts(s, len(p))
    assert_stratified(s, p, {"test": 1 / folds})  # within one subject per class and fold
    for seed in range(3):
        test = s[s["split_id"].str.startswith(f"cv-s{seed}-") & (s["part"] == "test")]
        assert sorted(test["participant_id"]) == sorted(p["participant_id"])
    h = make_splits(p, "holdout", seeds=[0, 1, 2])
    assert_disjoint_parts(h, len(p))
    assert_stratified(h, p, {"train": 0.5, "val": 0.25, "test": 0.25})


def test_planned_split_ids_are_the_ids_make_splits_writes() -> None:
    """The workflow plans one training per id of planned_split_ids: the same ids make_splits writes."""
    from neuromoe.learn.splits import planned_split_ids

    assert planned_split_ids("cv", [0, 1], 3) == ["cv-s0-f0", "cv-s0-f1", "cv-s0-f2", "cv-s1-f0", "cv-s1-f1",
                                                  "cv-s1-f2"]
    assert planned_split_ids("holdout", [0, 2], 5) == ["holdout-s0", "holdout-s2"]
