"""bench/generality.py: argument parsing, the piece's config, the analysis of a finished piece (paired interval,
gate by true profile), the oracle on a tiny cohort (no images), and the results file (merge, atomic write,
pooled difference, report). The workflow itself is not run here (tests/test_workflow.py runs it)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("generality", REPO / "bench" / "generality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- arguments and config --------------------------------------------------------------------------------
def test_run_arguments_and_defaults(gen) -> None:
    a = gen.build_parser().parse_args(["run", "--design-seed", "11"])
    assert (a.design_seed, a.subjects, a.cores, a.overrides, a.out) == (11, 180, 2, [], gen.DEFAULT_OUT)
    a = gen.build_parser().parse_args(["run", "--design-seed", "none", "--subjects", "9", "--workdir", "/x",
                                       "--cores", "4", "--set", "cache.grid=[16,16,16]", "train.epochs=3",
                                       "--out", "/tmp/r.json"])
    assert a.design_seed is None and a.subjects == 9 and a.workdir == Path("/x") and a.cores == 4
    assert gen.parse_overrides(a.overrides) == {"cache.grid": [16, 16, 16], "train.epochs": 3}
    assert gen.build_parser().parse_args(["report"]).out == gen.DEFAULT_OUT
    with pytest.raises(SystemExit):
        gen.build_parser().parse_args(["run"])  # --design-seed is required


def test_a_set_that_restates_config_yaml_is_the_protocol_setting(gen) -> None:
    base = gen.piece_config(Path("."), {})
    same = {"model.encoder": base["model"]["encoder"], "train.epochs": base["train"]["epochs"]}
    assert gen.effective_overrides(same) == {}
    assert gen.effective_overrides({**same, "train.epochs": base["train"]["epochs"] + 1}) == {
        "train.epochs": base["train"]["epochs"] + 1}
    assert gen.current_setting(same)["tag"] == gen.current_setting()["tag"]


def test_bad_arguments_are_refused(gen) -> None:
    for bad in (["train.epochs"], ["=3"], ["train..epochs=3"], ["bids_dir=/data"], ["synthetic.subjects=9"]):
        with pytest.raises(ValueError):
            gen.parse_overrides(bad)
    with pytest.raises(SystemExit, match="at least 9"):
        gen.main(["run", "--design-seed", "1", "--subjects", "6"])
    assert set(gen.HELDOUT_DESIGN_SEEDS).isdisjoint(gen.TUNING_DESIGN_SEEDS) and len(gen.HELDOUT_DESIGN_SEEDS) >= 4


def test_piece_config_is_the_repository_config_with_the_protocol(gen, tmp_path: Path) -> None:
    from neuromoe.config import validate_config

    cfg = gen.piece_config(tmp_path / "bids", {"train.epochs": 3, "cache.grid": [16, 16, 16]})
    assert cfg["bids_dir"] == str(tmp_path / "bids") and cfg["output_dir"] == "results"
    assert cfg["synthetic"]["generate"] is False
    assert cfg["evaluation"]["variants"] == gen.VARIANTS and cfg["evaluation"]["lambda_sweep"] == []
    assert cfg["evaluation"]["baseline"] == "logreg"
    assert cfg["train"]["epochs"] == 3 and cfg["cache"]["grid"] == [16, 16, 16]
    assert cfg["model"]["pooling"] == "flat"  # the rest is config.yaml's demo settings
    validate_config(cfg)
    targets = gen.phase_targets(cfg)
    n_splits = cfg["evaluation"]["folds"] * len(cfg["evaluation"]["seeds"])
    assert len(targets["training"]) == (len(gen.VARIANTS) + 1) * n_splits
    assert targets["evaluation"] == ["results/evaluation/ablation.tsv"]
    assert gen.piece_name(11, 180) == "design-11_n180" and gen.piece_name(None, 9) == "design-demo_n9"
    assert gen.piece_name(11, 180, {"train.epochs": 3}) != gen.piece_name(11, 180, {"train.epochs": 4})
    # a design with shape: its own cohort and folders, registered nonlinearly (config.yaml's demo: affine)
    assert gen.piece_name(11, 60, shape_mm=3) == "design-11-shape3_n60"
    assert gen.piece_config(tmp_path, {}, shape_mm=3)["preprocessing"]["anat"]["registration"] == "nonlinear"
    assert cfg["preprocessing"]["anat"]["registration"] == "affine"
    assert gen.design_params(11, 3).shape_mm == 3 and gen.design_params(11).shape_mm == 0
    assert gen.cohort_seed(None) == 42 and gen.cohort_seed(11) != gen.cohort_seed(12)
    argv = gen.snakemake_argv(tmp_path, 2, ["a"])
    assert argv[1:] == ["--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                        str(tmp_path / "config.yaml"), "--cores", "2", "--rerun-incomplete",
                        "--scheduler-subsample", str(gen.SCHEDULER_SUBSAMPLE), "a"]


# --- analysis --------------------------------------------------------------------------------------------
def _per_run(diffs: list[float]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.6, len(diffs))
    rows = []
    for k, (b, d) in enumerate(zip(base, diffs, strict=True)):
        rows += [{"variant": "no_gate", "split_id": f"cv-s0-f{k}", "balanced_accuracy": b},
                 {"variant": "full", "split_id": f"cv-s0-f{k}", "balanced_accuracy": b + d}]
    return pd.DataFrame(rows)


def test_paired_difference_is_a_t_interval_over_splits(gen) -> None:
    diffs = [0.1, 0.2, 0.0, 0.1, -0.05]
    table = _per_run(diffs)
    table = pd.concat([table, pd.DataFrame([{"variant": "full", "split_id": "cv-s1-f0", "balanced_accuracy": 0.9}])])
    d = gen.paired_difference(table)  # the split only full ran is left out
    half = stats.t.ppf(0.975, 4) * np.std(diffs, ddof=1) / math.sqrt(5)
    assert d["n_splits"] == 5 and d["wins"] == 3 and d["ties"] == 1
    assert d["mean"] == pytest.approx(np.mean(diffs))
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(np.mean(diffs) - half), pytest.approx(np.mean(diffs) + half))
    assert gen.paired_difference(table[table["variant"] == "full"]) is None
    one = gen.paired_difference(_per_run([0.1]))
    assert one["mean"] == pytest.approx(0.1) and one["ci_low"] is None  # JSON-safe, no NaN
    t = _per_run(diffs)
    mean, sd = gen.variant_accuracy(t)
    full = t.loc[t["variant"] == "full", "balanced_accuracy"]
    assert set(mean) == {"full", "no_gate"} and mean["full"] == pytest.approx(full.mean())
    assert sd["full"] == pytest.approx(full.std(ddof=1))


def test_gate_by_profile_groups_test_predictions_of_full_by_true_profile(gen) -> None:
    pred = pd.DataFrame({
        "participant_id": ["01", "02", "03", "01", "02", "01"],
        "variant": ["full", "full", "full", "full", "no_gate", "full"],
        "part": ["test", "test", "test", "test", "test", "val"],
        "label": ["PD", "HC", "iRBD", "PD", "HC", "PD"], "pred": ["PD", "PD", "iRBD", "HC", "HC", "PD"],
        "gate_anat": [0.6, 0.1, 0.2, 0.4, 0.25, 0.9], "gate_dwi": [0.2, 0.7, 0.2, 0.2, 0.25, 0.0],
        "gate_func": [0.1, 0.1, 0.5, 0.2, 0.25, 0.0], "gate_clin": [0.1, 0.1, 0.1, 0.2, 0.25, 0.1]})
    out = gen.gate_by_profile(pred, {"01": "anat", "02": "dwi", "03": "func"})
    assert set(out) == {"anat", "dwi", "func"}
    assert out["anat"] == {"anat": 0.5, "dwi": 0.2, "func": 0.15, "clin": 0.15, "n": 2, "accuracy": 0.5}
    assert out["dwi"]["dwi"] == 0.7 and out["dwi"]["n"] == 1 and out["dwi"]["accuracy"] == 0.0
    with pytest.raises(ValueError, match="no true profile"):
        gen.gate_by_profile(pred, {"01": "anat"})


def test_benchmark_cpu_seconds_sums_the_workflow_benchmark_files(gen, tmp_path: Path) -> None:
    for rel, cpu in (("anat/sub-01.tsv", 8.0), ("cache_subject/sub-01.tsv", 4.0), ("cache_cohort.tsv", 1.5),
                     ("train/full/cv-s0-f0.tsv", 20.0), ("train/no_gate/cv-s0-f0.tsv", 10.0)):
        f = tmp_path / "benchmarks" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"s\th:m:s\tmax_rss\tcpu_time\n1.0\t0:00:01\t100\t{cpu}\n")
    assert gen.benchmark_cpu_seconds(tmp_path) == {"preprocessing+cache": 13.5, "training": 30.0}


# --- oracle ----------------------------------------------------------------------------------------------
def test_oracle_on_a_tiny_cohort(gen) -> None:
    res = gen.oracle(9, None, data_seed=3, folds=3, seeds=[0], epochs=20, verbose=False)
    assert set(res) == set(gen.ORACLE_VARIANTS)
    for v in res.values():
        assert len(v["per_split"]) == 3 and 0 <= v["test_balanced_accuracy_mean"] <= 1
    gates = res["full"]["test_gate_by_true_profile"]
    assert set(gates) <= set(gen.PROFILES)
    for w in gates.values():
        assert set(w) == {"anat", "dwi", "func", "clin"} and sum(w.values()) == pytest.approx(1, abs=0.01)


def test_oracle_cohort_is_in_the_workflows_subject_order(gen) -> None:
    from neuromoe.inputs.synth import DIAGNOSES, subject_plan

    x, clin, y, part = gen.oracle_cohort(101, 42)
    ids = part["participant_id"].tolist()
    assert ids == sorted(ids) and ids[9:12] == ["10", "100", "101"]
    k = ids.index("100")
    plan = subject_plan(100, 42)
    assert y[k] == DIAGNOSES.index(plan.diagnosis) and part["profile"][k] == plan.profile
    assert x.shape == (101, 3, 2) and clin.shape == (101, 7)


# --- results file ----------------------------------------------------------------------------------------
def _entry(seed, diff: float, n: int = 180, overrides: dict | None = None, config: dict | None = None,
           shape_mm: float = 0.0) -> dict:
    import generality

    config = config or generality.piece_config(Path("bids"), overrides or {}, shape_mm)
    return {"design_seed": seed, "n_subjects": n, "config_overrides": overrides or {}, "finished": True,
            **({"shape_mm": shape_mm, "registration": "nonlinear"} if shape_mm else {}),
            "config": config, "setting": generality.setting_of(config),
            "balanced_accuracy": {"full": 0.5 + diff, "no_gate": 0.5, "only_anat": 0.53, "only_dwi": 0.45,
                                  "baseline": 0.4},
            "oracle": {"full": {"test_balanced_accuracy_mean": 0.8}, "no_gate": {"test_balanced_accuracy_mean": 0.7}},
            "paired_full_minus_no_gate": {"mean": diff, "ci_low": diff - 0.05, "ci_high": diff + 0.05,
                                          "n_splits": 10}}


def test_results_merge_replaces_only_the_pieces_own_entry(gen, tmp_path: Path) -> None:
    out = tmp_path / "r" / "generality.json"
    h = gen.HELDOUT_DESIGN_SEEDS
    gen.write_results(out, _entry(h[0], 0.10), {"cpu": "a"})
    gen.write_results(out, _entry(h[1], 0.02))
    gen.write_results(out, _entry(h[1], 0.06, n=9))                 # another size: its own entry
    gen.write_results(out, _entry(h[1], 0.02, overrides={"train.epochs": 3}))  # another setting
    gen.write_results(out, _entry(gen.TUNING_DESIGN_SEEDS[0], 0.5))  # never pooled
    gen.write_results(out, _entry(None, 0.11))                       # the demo: never pooled
    earlier = gen.piece_config(Path("bids"), {"model.encoder": "vit", "train.gate_fit": "crossfit"})
    gen.write_results(out, _entry(h[1], 0.30, config=earlier))      # run before config.yaml changed: kept apart
    gen.write_results(out, _entry(h[1], 0.20, shape_mm=3))           # the design with shape: its own entry
    r = gen.write_results(out, _entry(h[0], 0.04), {"cpu": "b"})     # rerun of the first piece
    assert json.loads(out.read_text()) == r
    assert [p.name for p in out.parent.iterdir()] == ["generality.json"]  # no temporary or lock file left
    assert len(r["designs"]) == 8 and r["machine"] == {"cpu": "b"}
    assert [d["paired_full_minus_no_gate"]["mean"] for d in r["designs"] if d["design_seed"] == h[0]] == [0.04]
    p = r["pooled_full_minus_no_gate"]
    assert p["n_designs"] == 2 and p["design_seeds"] == [h[0], h[1]] and p["mean"] == pytest.approx(0.03)
    half = stats.t.ppf(0.975, 1) * np.std([0.04, 0.02], ddof=1) / math.sqrt(2)
    assert p["ci_low"] == pytest.approx(0.03 - half) and p["designs_full_wins"] == 2
    # distance to the oracle (0.8 - 0.54, 0.8 - 0.52) and full against the best single modality (0.53)
    assert p["oracle_minus_full"] == pytest.approx(0.27) and p["oracle_minus_full_per_design"] == [0.26, 0.28]
    assert p["designs_full_beats_every_single"] == 1
    assert len(r["pooled_by_setting"]) == 5
    shaped = [q for q in r["pooled_by_setting"] if q.get("shape_mm") == 3]
    assert len(shaped) == 1 and shaped[0]["design_seeds"] == [h[1]] and shaped[0]["mean"] == pytest.approx(0.20)

    table = gen.report(r)
    assert "an earlier config.yaml: vit experts, gate_fit crossfit" in table and "+30.0" not in table.split("Other")[0]
    assert f"| {h[0]} | 54.0 | 50.0 |" in table and "| 80.0 / 70.0 | +4.0 [-1.0, 9.0] | not shown |" in table
    assert "**pooled** (2 designs; full better in 2, above every single modality in 1)" in table
    assert "| oracle - full 27.0 |" in table and "tuning" in table and "demo, n 180" in table
    # one table per size and shape, each pooled, the protocol's (180, template-shaped) first
    first = table.index("held-out designs, 180 subjects, the repository's")
    assert first == table.index("held-out designs") < table.index("held-out designs, 9 subjects")
    assert table.index("held-out designs, 180 subjects, shape 3 mm (nonlinear registration)") > first
    assert table.count("**pooled**") == 3


def test_the_report_names_the_shape_of_each_timed_piece(gen, tmp_path: Path) -> None:
    """Whole pieces are listed with their time; a piece with shape says so (it registers nonlinearly: slower)."""
    out = tmp_path / "generality.json"
    secs = {"cohort": 150.0, "preprocessing+cache": 1260.0, "training": 310.0}
    for shape in (0.0, 3.0):
        e = _entry(gen.HELDOUT_DESIGN_SEEDS[1], 0.1, n=60, shape_mm=shape)
        gen.write_results(out, {**e, "seconds": secs, **gen.piece_time(secs, sittings=1, reused=None),
                                "local_worker": bool(shape)})
    timed = gen.report(json.loads(out.read_text())).split("Whole pieces timed")[1]
    seed = gen.HELDOUT_DESIGN_SEEDS[1]
    lines = [line for line in timed.splitlines() if line.startswith(f"- design {seed},")]
    (shaped,), (plain,) = ([x for x in lines if "shape" in x], [x for x in lines if "shape" not in x])
    assert shaped.startswith(f"- design {seed}, shape 3 mm (nonlinear), 60 subjects: 28.7 min")
    assert plain.startswith(f"- design {seed}, 60 subjects: 28.7 min")
    # a piece whose jobs ran as forks of the local worker says so (cluster runs and NEUROMOE_WORKER=0 do not)
    assert shaped.endswith("; jobs as forks of the local worker)") and "worker" not in plain


def test_results_write_is_atomic(gen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "generality.json"
    gen.write_results(out, _entry(gen.HELDOUT_DESIGN_SEEDS[0], 0.1))
    before = out.read_text()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        gen.write_results(out, _entry(gen.HELDOUT_DESIGN_SEEDS[1], 0.1))
    assert out.read_text() == before  # the old file is whole; a reader never sees half a file


def test_a_drawn_design_reaches_the_generator(gen) -> None:
    import dataclasses

    from neuromoe.inputs.synth import SynthParams

    if "design_seed" not in {f.name for f in dataclasses.fields(SynthParams)}:
        pytest.skip("SynthParams has no design_seed yet")
    params = gen.design_params(gen.HELDOUT_DESIGN_SEEDS[0])
    assert params.design_seed == gen.HELDOUT_DESIGN_SEEDS[0] and gen.design_params(None).design_seed is None
    x, clin, y, part = gen.oracle_cohort(9, gen.cohort_seed(gen.HELDOUT_DESIGN_SEEDS[0]), params)
    assert x.shape == (9, 3, 2) and sorted(np.bincount(y)) == [3, 3, 3]


def test_a_new_setting_reuses_the_preprocessing_of_the_same_design(gen, tmp_path: Path) -> None:
    import yaml

    bids = tmp_path / "cohorts" / "design-11_n9"
    base = tmp_path / gen.piece_name(11, 9)
    cfg = gen.piece_config(bids, {})
    (base / "results" / "cache" / "cohort").mkdir(parents=True)
    (base / "results" / "cache" / "cohort" / "manifest.json").write_text("{}")
    for rel in ("derivatives/neuromoe/sub-01/anat/t1.nii.gz", "logs/anat/sub-01.log", "logs/train/full/x.log",
                "benchmarks/cache_cohort.tsv", "benchmarks/train/full/x.tsv"):
        (base / "results" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "results" / rel).write_text("x")
    (base / ".snakemake" / "metadata").mkdir(parents=True)
    (base / ".snakemake" / "metadata" / "abc").write_text("{}")
    (base / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / gen.piece_name(11, 90)).mkdir()  # another size: never taken

    train = tmp_path / gen.piece_name(11, 9, {"train.epochs": 3})
    assert gen.reusable_preprocessing(train, gen.piece_config(bids, {"train.epochs": 3})) == base
    grid = tmp_path / gen.piece_name(11, 9, {"cache.grid": [16, 16, 16]})
    assert gen.reusable_preprocessing(grid, gen.piece_config(bids, {"cache.grid": [16, 16, 16]})) is None
    assert gen.reusable_preprocessing(tmp_path / gen.piece_name(12, 9), gen.piece_config(bids, {})) is None
    # the same design with shape is another cohort: never the template-shaped one's preprocessing
    shaped = tmp_path / gen.piece_name(11, 9, {"preprocessing.anat.registration": "affine"}, shape_mm=3)
    assert gen.reusable_preprocessing(shaped, gen.piece_config(bids, {"preprocessing.anat.registration": "affine"},
                                                               shape_mm=3)) is None

    # A folder written before a key existed matches when the key's default is the new config's value.
    older = yaml.safe_load(yaml.safe_dump(cfg))
    del older["preprocessing"]["keep_series"]  # added to config.yaml later, default false
    (base / "config.yaml").write_text(yaml.safe_dump(older))
    assert gen.reusable_preprocessing(train, gen.piece_config(bids, {"train.epochs": 3})) == base
    series = tmp_path / gen.piece_name(11, 9, {"preprocessing.keep_series": True})
    assert gen.reusable_preprocessing(series, gen.piece_config(bids, {"preprocessing.keep_series": True})) is None

    gen.seed_preprocessing(base, train)
    t1 = "results/derivatives/neuromoe/sub-01/anat/t1.nii.gz"
    assert (train / t1).stat().st_ino == (base / t1).stat().st_ino  # hard links: no second copy on disk
    assert (train / "results/logs/anat/sub-01.log").is_file()
    assert (train / "results/benchmarks/cache_cohort.tsv").is_file()
    assert not (train / "results/logs/train").exists() and not (train / "results/benchmarks/train").exists()
    assert (train / ".snakemake/metadata/abc").is_file()


def test_a_smaller_piece_reads_the_first_subjects_of_a_larger_cohort(gen, tmp_path: Path) -> None:
    """A 60-subject piece of a design whose 180-subject cohort is written takes its first 60 subjects (the same
    subjects, synth_plan) and reuses that piece's preprocessing; its own cohort, when written, comes first."""
    import yaml

    cohorts = tmp_path / "cohorts"
    (cohorts / "design-11_n180").mkdir(parents=True)
    (cohorts / "design-11_n90.partial").mkdir()           # an interrupted write is never read
    (cohorts / "design-11-shape3_n120").mkdir()           # another cohort (shape): not this design's
    bids, labels = gen.source_cohort(tmp_path, 11, 60)
    assert bids == cohorts / "design-11_n180"
    assert labels == [f"{k:02d}" for k in range(1, 61)]
    assert gen.source_cohort(tmp_path, 11, 180) == (cohorts / "design-11_n180", None)
    assert gen.source_cohort(tmp_path, 12, 60) == (cohorts / "design-12_n60", None)      # none larger: its own
    assert gen.source_cohort(tmp_path, 11, 60, shape_mm=3) == (cohorts / "design-11-shape3_n120",
                                                                [f"{k:02d}" for k in range(1, 61)])
    (cohorts / "design-11_n120").mkdir()
    assert gen.source_cohort(tmp_path, 11, 60)[0] == cohorts / "design-11_n120"        # the smallest larger one
    (cohorts / "design-11_n60").mkdir()
    assert gen.source_cohort(tmp_path, 11, 60) == (cohorts / "design-11_n60", None)

    big = tmp_path / gen.piece_name(11, 180)
    (big / "results" / "cache" / "cohort").mkdir(parents=True)
    (big / "results" / "cache" / "cohort" / "manifest.json").write_text("{}")
    (big / "config.yaml").write_text(yaml.safe_dump(gen.piece_config(cohorts / "design-11_n180", {})))
    cfg = gen.piece_config(cohorts / "design-11_n180", {}, participants=labels)
    assert cfg["participant_label"] == labels
    assert gen.reusable_preprocessing(tmp_path / gen.piece_name(11, 60), cfg) == big
    # a 60-subject piece reading its own cohort of 60 has other inputs: nothing to reuse
    own = gen.piece_config(cohorts / "design-11_n60", {})
    assert "participant_label" not in own or not own["participant_label"]
    assert gen.reusable_preprocessing(tmp_path / gen.piece_name(11, 60), own) is None


def test_a_piece_counts_against_the_45_minutes_only_when_timed_whole(gen) -> None:
    """Only a piece run in one sitting that wrote its own preprocessing is a measure of a piece's time."""
    secs = {"cohort": 300.0, "preprocessing+cache": 1900.0, "training": 500.0, "evaluation": 20.0, "oracle": 40.0}
    whole = gen.piece_time(secs, sittings=1, reused=None)
    assert whole == {"wall_s": 2760.0, "sittings": 1, "whole_piece_measured": True, "within_target": False}
    assert gen.piece_time({**secs, "training": 400.0}, 1, None)["within_target"] is True  # 2,660 s <= 2,700
    assert gen.piece_time(secs, sittings=2, reused=None)["within_target"] is None
    assert gen.piece_time(secs, 1, None, n_subjects=60)["within_target"] is None  # the target is for 180
    assert gen.piece_time(secs, sittings=1, reused="/w/design-14_n180")["whole_piece_measured"] is False
