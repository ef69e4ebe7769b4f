"""Evaluation tables from fixed run folders, and the report figures (valid PNGs; raise on empty input)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from neuromoe.learn.metrics import compute_metrics, summarise
from neuromoe.learn.splits import make_splits
from neuromoe.results.evaluate import (
    ablation_table,
    collect,
    collect_predictions,
    load_run,
    markdown_table,
    pooled_metrics,
    pooled_table,
    variant_order_key,
    write_evaluation,
)
from neuromoe.results.figures import (
    NothingToPlotError,
    ablation_figure,
    calibration_figure,
    confusion_figure,
    gate_figure,
    roc_figure,
    saliency_slices,
    training_curves,
)

CLASSES = ["HC", "PD", "iRBD"]
EXPERTS = ["anat", "dwi", "func", "clin"]
FIXTURE = Path(__file__).parent / "data" / "predictions_fixture.tsv"
# variant -> (experts with a gate column, signal strength of its predictions)
VARIANTS = {"baseline": ([], 0.8), "lambda_1.0": (EXPERTS, 1.2), "only_dwi": ([], 0.5),
            "full": (EXPERTS, 1.5), "drop_dwi": (["anat", "func", "clin"], 1.1), "no_gate": (EXPERTS, 1.0),
            "lambda_0.0": (EXPERTS, 1.4)}
ORDER = ["full", "no_gate", "drop_dwi", "only_dwi", "lambda_0.0", "lambda_1.0", "baseline"]


def fake_predictions(ids: list[str], labels: np.ndarray, part: str, strength: float, experts: list[str],
                     rng: np.random.Generator) -> pd.DataFrame:
    logits = rng.normal(0, 1, (len(ids), 3))
    logits[np.arange(len(ids)), labels] += strength
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    t = pd.DataFrame({"participant_id": ids, "part": part, "label": [CLASSES[k] for k in labels]})
    for j, c in enumerate(CLASSES):
        t[f"prob_{c}"] = p[:, j]
    if experts:
        g = rng.dirichlet(np.ones(len(experts)) * 3, len(ids))
        for j, e in enumerate(experts):
            t[f"gate_{e}"] = g[:, j]
    return t


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results/model/<variant>/<split_id>/ run folders for 7 variants x 3 folds x 2 seeds, 36 subjects."""
    root = tmp_path_factory.mktemp("results") / "model"
    ids = [f"{i + 1:02d}" for i in range(36)]
    dx = np.array([0] * 14 + [1] * 12 + [2] * 10)
    participants = pd.DataFrame({"participant_id": ids, "diagnosis": [CLASSES[k] for k in dx]})
    splits = make_splits(participants, "cv", folds=3, seeds=[0, 1], val_fraction=0.2)
    label_of = dict(zip(ids, dx, strict=True))
    rng = np.random.default_rng(3)
    for variant, (experts, strength) in VARIANTS.items():
        for sid, grp in splits.groupby("split_id"):
            run = root / variant / sid
            run.mkdir(parents=True)
            tables = []
            for part in ("val", "test"):
                pid = sorted(grp.loc[grp["part"] == part, "participant_id"])
                tables.append(fake_predictions(pid, np.array([label_of[i] for i in pid]), part, strength,
                                               experts, rng))
            pd.concat(tables).to_csv(run / "predictions.tsv", sep="\t", index=False)
            meta = {"finished": True, "split_id": sid, "variant": variant}
            (run / "metrics.json").write_text(json.dumps(meta))
            if variant == "full":
                n_ep = 8 + int(rng.integers(0, 5))  # early stopping: runs of different lengths
                ep = np.arange(1, n_ep + 1)
                pd.DataFrame({"epoch": ep, "train_loss": 1.1 * np.exp(-ep / 4) + 0.05,
                              "val_loss": 1.1 * np.exp(-ep / 6) + 0.2 + rng.normal(0, 0.02, n_ep),
                              "val_balanced_acc": 1 - 0.6 * np.exp(-ep / 3)}
                             ).to_csv(run / "history.csv", index=False)
    return root


def test_collect_recomputes_metrics_per_run(results: Path) -> None:
    per_run = collect(results)
    assert len(per_run) == len(VARIANTS) * 6
    assert list(dict.fromkeys(per_run["variant"])) == ORDER
    row = per_run[(per_run["variant"] == "drop_dwi") & (per_run["split_id"] == "cv-s1-f2")].iloc[0]
    pred = pd.read_csv(results / "drop_dwi" / "cv-s1-f2" / "predictions.tsv", sep="\t", dtype=str)
    pred = pred.astype({c: float for c in pred.columns if c.startswith(("prob_", "gate_"))})
    m = compute_metrics(pred[pred["part"] == "test"])
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc", "ece", "gate_anat"):
        assert row[k] == pytest.approx(m[k], abs=1e-12), k
    assert (row["seed"], row["fold"], row["protocol"]) == (1, 2, "cv") and np.isnan(row["gate_dwi"])
    assert per_run.groupby("variant")["n_test"].sum().eq(72).all()  # 36 subjects x 2 seeds


def test_ablation_table_order_summary_and_paired_delta(results: Path) -> None:
    per_run = collect(results)
    table = ablation_table(per_run)
    assert list(table["variant"]) == ORDER
    assert (table["n_runs"] == 6).all() and (table["n_seeds"] == 2).all()
    for variant in ("full", "baseline"):
        vals = per_run.loc[per_run["variant"] == variant, "balanced_accuracy"]
        s = summarise(vals)
        r = table[table["variant"] == variant].iloc[0]
        assert r["balanced_accuracy_mean"] == pytest.approx(vals.mean())
        assert r["balanced_accuracy_sd"] == pytest.approx(vals.std(ddof=1))
        ci = (r["balanced_accuracy_ci_low"], r["balanced_accuracy_ci_high"])
        assert ci == pytest.approx((min(s.ci_low, 1), min(s.ci_high, 1)))
    full = per_run[per_run["variant"] == "full"].set_index("split_id")["balanced_accuracy"]
    nog = per_run[per_run["variant"] == "no_gate"].set_index("split_id")["balanced_accuracy"]
    r = table[table["variant"] == "no_gate"].iloc[0]
    assert r["delta_balanced_accuracy_mean"] == pytest.approx((nog - full).mean())
    assert np.isnan(table.loc[0, "delta_balanced_accuracy_mean"])
    # gate weights: mean over runs of each run's mean; 0 < w < 1; absent experts NaN
    assert 0 < table.loc[0, "gate_clin_mean"] < 1
    assert np.isnan(table.set_index("variant").loc["baseline", "gate_anat_mean"])
    md = markdown_table(table, "Ablations")
    lines = md.splitlines()
    assert lines[0] == "### Ablations" and "Balanced acc. (%)" in lines[2] and "Δ bal. acc." in lines[2]
    assert lines[4].startswith("| **full** | 6 |") and "±" in lines[4] and "[" in lines[4]
    assert "approximate" in md


def test_pooled_metrics_concatenate_folds_per_seed(results: Path) -> None:
    preds = collect_predictions(results)
    assert {"participant_id", "variant", "split_id", "seed", "fold", "label", "prob_HC", "gate_clin",
            "pred"} <= set(preds.columns)
    assert len(preds) == len(VARIANTS) * 2 * 36
    full0 = preds[(preds["variant"] == "full") & (preds["seed"] == 0)]
    assert full0["participant_id"].is_unique and len(full0) == 36  # each subject tested once per seed
    pooled = pooled_metrics(preds)
    r = pooled[(pooled["variant"] == "full") & (pooled["seed"] == 0)].iloc[0]
    m = compute_metrics(full0)
    assert r["n"] == 36 and r["n_folds"] == 3
    assert r["balanced_accuracy"] == pytest.approx(m["balanced_accuracy"])
    assert r["auc"] == pytest.approx(m["auc"])
    summary = pooled_table(pooled)
    assert list(summary["variant"]) == ORDER and (summary["n_seeds"] == 2).all()


def test_path_fallback_unfinished_and_duplicates(results: Path, tmp_path: Path) -> None:
    src = results / "full" / "cv-s0-f1"
    run = tmp_path / "model" / "no_gate" / "cv-s0-f1"
    run.mkdir(parents=True)
    (run / "predictions.tsv").write_bytes((src / "predictions.tsv").read_bytes())
    r = load_run(run)  # no metrics.json: variant and split from the path
    assert (r.variant, r.split_id, r.seed, r.fold) == ("no_gate", "cv-s0-f1", 0, 1)
    (run / "metrics.json").write_text(json.dumps({"finished": False}))
    with pytest.raises(ValueError, match="not finished"):
        load_run(run)
    meta = {"finished": True, "variant": "full", "split_id": "cv-s0-f1"}
    (run / "metrics.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="two runs of variant 'full'"):
        collect([src, run])
    with pytest.raises(ValueError, match="no finished runs"):
        collect(tmp_path / "model" / "nothing_here_dir" if False else [])
    assert variant_order_key("lambda_0.1") < variant_order_key("lambda_0.5") < variant_order_key("baseline")


def assert_png(path: Path, min_px: int = 200) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] >= min_px and img.shape[1] >= min_px
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_write_evaluation_tables_and_figures(results: Path) -> None:
    out = write_evaluation(results, results.parent / "evaluation")  # results/evaluation beside results/model
    assert len(collect(results.parent)) == len(VARIANTS) * 6  # its subject_predictions.tsv is not a run
    for key in ("per_run", "ablation", "ablation_md", "pooled", "pooled_summary", "predictions"):
        assert out[key].is_file() and out[key].stat().st_size > 100, key
    back = pd.read_csv(out["ablation"], sep="\t")
    assert list(back["variant"]) == ORDER
    for key in ("fig_ablation", "fig_confusion", "fig_roc", "fig_calibration", "fig_gates", "fig_curves"):
        assert_png(out[key])


def test_figures_raise_on_nothing_to_plot(results: Path, tmp_path: Path) -> None:
    preds = collect_predictions(results)
    empty = preds.iloc[:0]
    for fn in (confusion_figure, roc_figure, calibration_figure, gate_figure):
        with pytest.raises(NothingToPlotError):
            fn(empty, tmp_path / "x.png")
    with pytest.raises(NothingToPlotError, match="gate"):
        gate_figure(preds[preds["variant"] == "baseline"].dropna(axis=1, how="all"), tmp_path / "x.png")
    with pytest.raises(NothingToPlotError, match="both positive and negative"):
        roc_figure(preds[preds["label"] == "PD"], tmp_path / "x.png")
    with pytest.raises(NothingToPlotError):
        ablation_figure(pd.DataFrame(), tmp_path / "x.png")
    with pytest.raises(NothingToPlotError):
        training_curves([], tmp_path / "x.png")
    with pytest.raises(NothingToPlotError, match="none of the columns"):
        training_curves([pd.DataFrame({"epoch": [1, 2], "lr": [0.1, 0.1]})], tmp_path / "x.png")
    with pytest.raises(NothingToPlotError):
        saliency_slices({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()  # nothing was written by a failing call


def test_single_figures_from_the_fixture(tmp_path: Path) -> None:
    pred = pd.read_csv(FIXTURE, sep="\t", dtype={"participant_id": str})
    assert_png(confusion_figure(pred, tmp_path / "cm.png"))
    assert_png(roc_figure(pred, tmp_path / "roc.png"))
    assert_png(gate_figure(pred, tmp_path / "gates.png"))
    assert_png(calibration_figure(pred, tmp_path / "cal.png"))


def test_verdict_says_whether_full_beats_uniform_fusion_and_each_modality() -> None:
    """The sentence atop ablation.md (and what `make demo` ends with): 'beats' only when the paired
    interval of full - variant lies above 0."""
    from neuromoe.results.evaluate import ablation_table, verdict

    rng = np.random.default_rng(0)
    rows = []
    for k in range(10):
        for v, acc in {"full": 0.70, "no_gate": 0.55, "only_anat": 0.40, "only_dwi": 0.69}.items():
            rows.append({"variant": v, "split_id": f"cv-s0-f{k}", "seed": 0, "fold": k, "protocol": "cv",
                         "balanced_accuracy": acc + rng.normal(0, 0.03)})
    said = verdict(ablation_table(pd.DataFrame(rows)))
    assert said.startswith("The full model beats no_gate (full - no_gate: +1")
    assert "It does not beat only_dwi (" in said and "only_anat +" in said
    assert verdict(ablation_table(pd.DataFrame([r for r in rows if r["variant"] != "full"]))) == ""
