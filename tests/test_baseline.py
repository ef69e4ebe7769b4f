"""The logistic-regression baseline on a real (tiny) cohort cache: features, no leakage, run format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuromoe.cache import grid as G
from neuromoe.cache import store as C
from neuromoe.learn.baseline import (
    baseline_features,
    fit_predict,
    region_labels,
    regional_means,
    run_baseline,
)
from neuromoe.learn.splits import make_splits, write_splits
from neuromoe.results.evaluate import ablation_table, collect

GRID = (16, 16, 16)
CLASSES = ["HC", "PD", "iRBD"]
CFG = {
    "cache": {"grid": list(GRID), "dtype": "float16", "dwi_maps": ["FA", "MD"],
              "func_maps": ["fALFF", "ReHo"]},
    "participants": {"diagnosis_column": "diagnosis", "labels": CLASSES,
                     "clinical_columns": ["age", "sex", "updrs3"], "missing_modality": "keep"},
}
N_PER_CLASS = 12
NO_FUNC = "05"  # this subject has no fMRI


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real cohort cache (``build_cohort``) from hand-written subject tensors (robust z-scores, zero outside
    the grid brain mask, as ``cache_subject`` writes them). PD: FA raised in the left half (x index < 8);
    iRBD: ReHo raised in the upper half (z index >= 8). updrs3 is higher in PD, a few values missing."""
    root = tmp_path_factory.mktemp("baseline")
    rng = np.random.default_rng(0)
    mask = G.grid_mask(GRID)
    dx = np.repeat(np.arange(3), N_PER_CLASS)
    ids = [f"{i + 1:02d}" for i in range(len(dx))]
    records = []
    for sub, d in zip(ids, dx, strict=True):
        folder = root / "subjects" / f"sub-{sub}"
        folder.mkdir(parents=True)
        rec = {"subject": sub, "cache_format": C.CACHE_FORMAT, "grid": list(GRID), "dtype": "float16",
               "normalisation": C.normalisation_params(), "modalities": {}}
        for m, chans in (("anat", ["T1w"]), ("dwi", ["FA", "MD"]), ("func", ["fALFF", "ReHo"])):
            if m == "func" and sub == NO_FUNC:
                rec["modalities"][m] = {"channels": chans, "present": False}
                continue
            x = rng.normal(0, 1, (len(chans), *GRID)).astype(np.float32)
            if m == "dwi" and d == 1:
                x[0, :8] += 1.0
            if m == "func" and d == 2:
                x[1, :, :, 8:] += 1.0
            x *= mask
            np.save(folder / f"{m}.npy", C.encode(x, "float16"))
            rec["modalities"][m] = {"channels": chans, "present": True, "file": f"{m}.npy"}
        (folder / "rec.json").write_text(json.dumps(rec))
        records.append(folder / "rec.json")
    updrs = np.where(dx == 1, 25.0, 8.0) + rng.normal(0, 6, len(dx))
    updrs[[3, 17, 30]] = np.nan  # missing values are imputed with the training median
    participants = pd.DataFrame({"participant_id": [f"sub-{s}" for s in ids],
                                 "diagnosis": [CLASSES[k] for k in dx],
                                 "age": rng.normal(65, 8, len(dx)).round(1),
                                 "sex": rng.choice(["M", "F"], len(dx)), "updrs3": updrs.round(1)})
    participants.to_csv(root / "participants.tsv", sep="\t", index=False, na_rep="n/a")
    C.build_cohort(records, root / "participants.tsv", root / "cache", CFG)
    splits = make_splits(participants, "cv", folds=3, seeds=[0], val_fraction=0.2)
    write_splits(splits, root / "splits.tsv")
    return {"root": root, "cache": root / "cache", "splits": root / "splits.tsv", "ids": ids, "dx": dx}


def test_region_labels_and_means() -> None:
    mask = np.ones((4, 6, 2), bool)
    mask[0, 0, 0] = False
    lab = region_labels(mask, (2, 2, 2))
    assert lab[0, 0, 0] == -1 and set(np.unique(lab)) == set(range(-1, 8))
    assert lab[3, 5, 1] == 7 and lab[0, 3, 0] == 2 and lab[2, 0, 0] == 4  # C order: (x, y, z) blocks
    images = np.zeros((1, 2, 4, 6, 2))
    images[0, 1, 2:, :, :] = 3.0  # channel 1: 3 in the upper x half
    means = regional_means(images, lab, 8)
    assert means.shape == (1, 2, 8)
    assert np.allclose(means[0, 1], [0, 0, 0, 0, 3, 3, 3, 3]) and np.allclose(means[0, 0], 0)
    with pytest.raises(ValueError):
        region_labels(mask, (2, 2))


def test_features_are_regional_means_of_the_cache(cohort: dict) -> None:
    co = C.open_cohort(cohort["cache"], CFG)
    feats = baseline_features(co, CFG["participants"]["clinical_columns"])
    assert feats.shape == (len(cohort["ids"]), 3 + (1 + 2 + 2) * 8)
    assert list(feats.columns[:3]) == ["age", "sex", "updrs3"] and "dwi_FA_r0" in feats.columns
    # recompute one feature by hand from the memory-mapped cache
    lab = region_labels(co.mask)
    row = 7
    fa = co.image("dwi", row)[0]
    assert feats.loc[row, "dwi_FA_r5"] == pytest.approx(fa[lab == 5].mean(), rel=1e-5)
    no_func = co.index.index[co.index["participant_id"] == f"sub-{NO_FUNC}"][0]
    assert feats.filter(like="func_").loc[no_func].isna().all()
    assert feats.filter(like="anat_").notna().all().all()
    # the planted effect is visible: left-hemisphere FA regions (x block 0) higher in PD than in HC
    left = [c for c in feats.columns if c.startswith("dwi_FA_r") and int(c[-1]) < 4]
    pd_mean = feats.loc[cohort["dx"] == 1, left].mean().mean()
    hc_mean = feats.loc[cohort["dx"] == 0, left].mean().mean()
    assert pd_mean > hc_mean + 0.5


def test_imputer_and_scaler_see_only_the_training_part(cohort: dict) -> None:
    co = C.open_cohort(cohort["cache"], CFG)
    feats = baseline_features(co, CFG["participants"]["clinical_columns"])
    train = list(range(0, 36, 2))
    test = list(range(1, 36, 2))
    pipe, probs = fit_predict(feats, co.y, {"train": train, "test": test}, 3)
    medians = np.nanmedian(feats.loc[train].to_numpy(), axis=0)
    assert np.allclose(pipe.named_steps["impute"].statistics_, medians)
    imputed = np.where(np.isnan(feats.loc[train].to_numpy()), pipe.named_steps["impute"].statistics_,
                       feats.loc[train].to_numpy())
    assert np.allclose(pipe.named_steps["scale"].mean_, imputed.mean(axis=0))
    assert probs["test"].shape == (18, 3) and np.allclose(probs["test"].sum(axis=1), 1.0)
    # changing test features changes nothing that was fitted
    shifted = feats.copy()
    shifted.loc[test] += 100.0
    pipe2, _ = fit_predict(shifted, co.y, {"train": train, "test": test}, 3)
    assert np.allclose(pipe2.named_steps["logreg"].coef_, pipe.named_steps["logreg"].coef_)


def test_run_baseline_writes_a_deep_run_format_and_learns(cohort: dict, tmp_path: Path) -> None:
    results = []
    for fold in range(3):
        sid = f"cv-s0-f{fold}"
        out = tmp_path / "model" / "baseline" / sid
        m = run_baseline(cohort["cache"], cohort["splits"], sid, CFG, out)
        results.append(m)
        pred = pd.read_csv(out / "predictions.tsv", sep="\t", dtype={"participant_id": str})
        assert list(pred.columns) == ["participant_id", "part", "label", "prob_HC", "prob_PD", "prob_iRBD"]
        assert set(pred["part"]) == {"val", "test"} and pred["label"].isin(CLASSES).all()
        assert np.allclose(pred.filter(like="prob_").sum(axis=1), 1.0, atol=1e-5)
        meta = json.loads((out / "metrics.json").read_text())
        assert meta["variant"] == "baseline" and meta["split_id"] == sid and meta["finished"] is True
        assert meta["n"]["test"] == (pred["part"] == "test").sum() and meta["n_excluded"]["test"] == 0
    # 12 subjects per class, strong planted effects: well above chance (1/3) on every test fold
    print("baseline test balanced accuracy per fold:",
          [round(r["test"]["balanced_accuracy"], 3) for r in results])
    assert min(r["test"]["balanced_accuracy"] for r in results) >= 0.6, [r["test"] for r in results]
    table = ablation_table(collect(tmp_path / "model"))
    assert list(table["variant"]) == ["baseline"] and table.loc[0, "n_runs"] == 3


def test_exclude_leaves_out_subjects_missing_a_modality(cohort: dict, tmp_path: Path) -> None:
    cfg = {**CFG, "participants": {**CFG["participants"], "missing_modality": "exclude"}}
    m = run_baseline(cohort["cache"], cohort["splits"], "cv-s0-f0", cfg, tmp_path / "run", verify=False)
    assert sum(m["n_excluded"].values()) == 1
    pred = pd.read_csv(tmp_path / "run" / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    assert NO_FUNC not in set(pred["participant_id"])
