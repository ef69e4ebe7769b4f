"""The workflow end to end on a small coarse cohort: every stage's outputs under BIDS-derivatives names,
logs and benchmarks per job, a no-op unchanged rerun, a report with every figure, prediction that
reproduces the evaluation, lint, and readable start-up errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import E2E_CONFIG, E2E_SUBJECTS, REPO, snakemake_cmd

from neuromoe import paths

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # the first test pays for the shared run
SUBJECTS = [f"{i:02d}" for i in range(1, E2E_SUBJECTS + 1)]


def run(cmd: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def test_every_stage_writes_bids_derivatives(workflow_run: Path) -> None:
    out = workflow_run / "results"
    desc = json.loads((out / "derivatives/neuromoe/dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    for s in SUBJECTS:
        for key in paths.OUTPUTS:  # the 4D series only with preprocessing.keep_series (default: not kept)
            assert Path(paths.derivative(out, s, key)).is_file() is (key not in paths.SERIES), f"sub-{s}: {key}"
    index = pd.read_csv(out / "cache/cohort/index.tsv", sep="\t", dtype={"participant_id": str})
    assert len(index) == E2E_SUBJECTS and index[["has_anat", "has_dwi", "has_func"]].all().all()


def test_logs_and_benchmarks_for_every_job(workflow_run: Path) -> None:
    out = workflow_run / "results"
    for stage in ("anat", "dwi", "func", "cache_subject"):
        for s in SUBJECTS:
            bench = out / "benchmarks" / stage / f"sub-{s}.tsv"
            assert bench.is_file(), bench
            row = pd.read_csv(bench, sep="\t").iloc[0]
            assert row["s"] > 0 and row["max_rss"] > 0
            assert (out / "logs" / stage / f"sub-{s}.log").is_file()
    assert list((out / "benchmarks" / "train").rglob("*.tsv")), "training jobs have benchmarks"


def test_unchanged_make_demo_only_says_where_the_report_is(workflow_run: Path) -> None:
    """A second, unchanged `make demo` runs no job and does not rebuild the report."""
    from conftest import make_demo_cmd

    report = workflow_run / "results/report.zip"
    before = report.stat().st_mtime_ns
    res = run(make_demo_cmd(workflow_run), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Nothing to be done" in res.stdout + res.stderr
    assert report.stat().st_mtime_ns == before
    assert f"Report: {workflow_run / 'results/report/report.html'}" in res.stdout
    assert "**Verdict**: The full model " in res.stdout  # it ends with the table and what it says, in words
    assert "| **full** |" in res.stdout


def test_unchanged_rerun_is_a_noop(workflow_run: Path) -> None:
    res = run(snakemake_cmd(workflow_run, "-n", "--cores", "1"))
    assert res.returncode == 0, res.stderr
    assert "Nothing to be done" in res.stdout + res.stderr


def test_evaluation_tables_have_every_variant(workflow_run: Path) -> None:
    table = pd.read_csv(workflow_run / "results/evaluation/ablation.tsv", sep="\t")
    expected = set(E2E_CONFIG["evaluation"]["variants"]) | {"baseline"}
    assert expected <= set(table["variant"])
    assert (workflow_run / "results/evaluation/ablation.md").read_text().count("|") > 10


def test_report_holds_every_figure(workflow_run: Path, tmp_path: Path) -> None:
    """The zip report `make demo` built holds every file the workflow's manifest promises: the QC contact
    sheets (not every subject's figures: those stay in the subject pages) and the evaluation's figures;
    `neuromoe check-report` says so, and names a file a report lacks."""
    import zipfile

    report = workflow_run / "results/report.zip"
    assert (workflow_run / "results/report/report.html").is_file()
    assert "all 15 promised files present" in (workflow_run / "snakemake.log").read_text()
    manifest = workflow_run / "results/report_manifest.txt"
    promised = manifest.read_text().split()
    wanted = ["ablation_balanced_accuracy.png", "confusion_full.png", "roc_full.png", "calibration_full.png",
              "gates_full.png", "training_curves_full.png", "group_saliency.png", "ablation.md", "methods.md"]
    wanted += [f"group_{k[3:]}.png" for k in paths.OUTPUTS if k.startswith("qc_")]
    assert sorted(promised) == sorted(wanted)
    ok = run(["neuromoe", "check-report", str(report), "--manifest", str(manifest)])
    assert ok.returncode == 0, ok.stderr
    with zipfile.ZipFile(report) as zf:
        names = [Path(n).name for n in zf.namelist()]
    assert not any(n.startswith("sub-") and n.endswith(".png") for n in names), "per-subject figures in the report"
    # a report that lost a figure fails the check with its name
    lossy = tmp_path / "lossy.zip"
    with zipfile.ZipFile(report) as src, zipfile.ZipFile(lossy, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("roc_full.png"):
                dst.writestr(item, src.read(item))
    bad = run(["neuromoe", "check-report", str(lossy), "--manifest", str(manifest)])
    assert bad.returncode != 0 and "roc_full.png: not in the report" in bad.stderr


def test_subject_pages_show_every_qc_figure(workflow_run: Path) -> None:
    """Each subject has an fMRIPrep-style page in the derivatives root whose images are its QC figures
    (relative links that resolve), and the report's contact sheets are real images."""
    import re

    from PIL import Image

    root = workflow_run / "results/derivatives/neuromoe"
    for sub in SUBJECTS:
        page = root / f"sub-{sub}.html"
        srcs = re.findall(r"<img src='([^']+)'", page.read_text())
        want = {Path(paths.derivative("results", sub, k)).name for k in paths.OUTPUTS if k.startswith("qc_")}
        assert {Path(s).name for s in srcs} == want
        assert all((root / s).is_file() for s in srcs)
    for k in (k for k in paths.OUTPUTS if k.startswith("qc_")):
        with Image.open(workflow_run / f"results/qc/group_{k[3:]}.png") as im:
            assert im.width >= 400 and im.height >= 200


def test_predict_reproduces_the_evaluation(workflow_run: Path, tmp_path: Path) -> None:
    out = workflow_run / "results"
    run_dir = out / "model/runs/full/cv-s0-f0"
    res = run(["neuromoe", "predict", "--model", str(run_dir), "--cache", str(out / "cache/cohort"),
               "--out-dir", str(tmp_path), "--no-explain"])
    assert res.returncode == 0, res.stderr
    mine = pd.read_csv(tmp_path / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    theirs = pd.read_csv(run_dir / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    test = theirs[theirs["part"] == "test"].merge(mine, on="participant_id", suffixes=("_eval", "_pred"))
    assert len(test) >= 3
    for c in [c for c in theirs.columns if c.startswith("prob_") or c.startswith("gate_")]:
        assert (test[f"{c}_eval"] - test[f"{c}_pred"]).abs().max() < 1e-5, c
    assert not mine["flagged"].any()


def test_lint(workflow_run: Path) -> None:
    res = run(snakemake_cmd(workflow_run, "--lint", "--cores", "1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_bad_input_stops_at_startup_with_a_readable_message(synth_cohort: Path, tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    shutil.copytree(synth_cohort, bids, ignore=shutil.ignore_patterns("derivatives"))
    (bids / "sub-04/dwi/sub-04_dwi.bvec").unlink()
    cfg = {"bids_dir": str(bids), "output_dir": str(tmp_path / "results"), **E2E_CONFIG}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = run(snakemake_cmd(tmp_path, "-n", "--cores", "1"))
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "[sub-04]" in text and "sub-04_dwi.bvec" in text and "fix:" in text
    assert not (tmp_path / "results").exists(), "nothing may run before the input is valid"


def test_config_error_names_the_key(synth_cohort: Path, tmp_path: Path) -> None:
    cfg = {"bids_dir": str(synth_cohort), "output_dir": str(tmp_path / "r"), **E2E_CONFIG,
           "cache": {"grid": [18, 16, 16]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = run(snakemake_cmd(tmp_path, "-n", "--cores", "1"))
    assert res.returncode != 0
    assert "cache.grid" in res.stdout + res.stderr


def test_repository_config_is_valid() -> None:
    from neuromoe.config import load_config

    cfg = load_config(REPO / "config.yaml")
    assert cfg["preprocessing"]["backend"] == "python"


def test_paper_preset_is_the_papers_protocol() -> None:
    """presets/paper.yaml merged over config.yaml the way Snakemake merges --configfile: none of the demo's
    departures from the paper (voxel-screen experts, flat pooling, last-epoch weights) leaks into the preset."""
    from snakemake.utils import update_config

    from neuromoe.config import validate_config

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(cfg, yaml.safe_load((REPO / "presets" / "paper.yaml").read_text()))
    cfg = validate_config(cfg)
    assert cfg["cache"]["grid"] == [64, 64, 64]
    assert (cfg["model"]["encoder"], cfg["model"]["dim"], cfg["model"]["depth"], cfg["model"]["pooling"]) == (
        "vit", 256, 4, "mean")
    assert (cfg["train"]["gate_fit"], cfg["train"]["select"], cfg["train"]["flip_lr"]) == ("joint", "val_loss", 0.0)
    assert cfg["evaluation"]["seeds"] == [0, 1, 2]


def _plan(workdir: Path, *extra: str) -> dict[str, int]:
    """Snakemake's own dry-run plan: rule -> number of jobs."""
    res = run(snakemake_cmd(workdir, "-n", "--cores", "1", *extra))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    counts: dict[str, int] = {}
    in_stats = False
    for line in (res.stdout + res.stderr).splitlines():
        if line.startswith("Job stats:"):
            in_stats = True
            continue
        if in_stats:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
                counts[parts[0]] = int(parts[1])
            elif line.strip() == "" and counts:
                break
    return counts


def test_adding_a_subject_reruns_only_that_subjects_preprocessing(workflow_run: Path, tmp_path: Path) -> None:
    from conftest import coarse_params

    from neuromoe.inputs.synth import make_cohort

    work = tmp_path / "work"  # a copy of the finished workflow (outputs, mtimes, Snakemake's records)
    shutil.copytree(workflow_run, work, copy_function=shutil.copy2, symlinks=True)
    bigger = make_cohort(tmp_path / "bigger", E2E_SUBJECTS + 1, seed=11, params=coarse_params(), n_jobs=2)
    new = f"sub-{E2E_SUBJECTS + 1:02d}"
    shutil.copytree(bigger / new, work / "bids" / new)
    shutil.copy2(bigger / "participants.tsv", work / "bids" / "participants.tsv")
    plan = _plan(work)
    for rule in ("anat", "dwi", "func", "cache_subject"):
        assert plan.get(rule) == 1, plan
    assert plan.get("cache_cohort") == 1


def test_a_stage_failure_names_the_subject_and_keeps_the_others(tmp_path: Path) -> None:
    import nibabel as nib
    from conftest import coarse_params

    from neuromoe.inputs.synth import make_cohort

    bids = make_cohort(tmp_path / "bids", 2, seed=5, params=coarse_params(), n_jobs=2)
    bold = bids / "sub-02/func/sub-02_task-rest_bold.nii.gz"
    img = nib.load(bold)
    # a fault only the data show (headers, gradients and sidecars pass start-up): a BOLD without a head
    nib.save(nib.Nifti1Image(np.zeros(img.shape, "int16"), img.affine, img.header), bold)
    cfg = {"bids_dir": str(bids), "output_dir": str(tmp_path / "results"), **E2E_CONFIG}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = run(snakemake_cmd(tmp_path, "--cores", "2", "--keep-going", "--until", "func"), timeout=900)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    log = (tmp_path / "results" / "logs" / "func" / "sub-02.log").read_text()
    assert "sub-02" in text and "rule func, sub-02 failed: [sub-02]" in log and "fix:" in log  # subject, cause, fix
    out = tmp_path / "results"
    assert Path(paths.derivative(out, "01", "func_falff_mni")).is_file(), "sub-01 must be finished and kept"
    assert not Path(paths.derivative(out, "02", "func_falff_mni")).exists()
    assert Path(paths.derivative(out, "02", "anat_brain_mni")).is_file(), "sub-02's other stages are kept"


def test_start_writes_the_demo_cohort_with_its_acquisition(tmp_path: Path) -> None:
    """With synthetic.generate and no bids_dir, the workflow writes the cohort before anything else: whole
    (written aside, then renamed), with config.yaml's synthetic.acquisition sizes."""
    import nibabel as nib

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    acq = cfg["synthetic"]["acquisition"]
    cfg.update({"output_dir": "results"})  # bids_dir: the demo's data/demo_bids, here under tmp_path
    cfg["synthetic"]["subjects"] = 6
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    # a dry run writes nothing and says so
    res = run(snakemake_cmd(tmp_path, "-n", "--cores", "2"), timeout=600)
    assert res.returncode != 0 and "not by a dry run" in res.stdout + res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "data").exists()
    # a real run writes it first (here with the cheapest target)
    res = run(snakemake_cmd(tmp_path, "--cores", "2", "results/derivatives/neuromoe/dataset_description.json"),
              timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    bids = tmp_path / cfg["bids_dir"]
    assert not bids.with_name("demo_bids.partial").exists()
    bold = nib.load(bids / "sub-01/func/sub-01_task-rest_bold.nii.gz")
    assert bold.shape[3] == acq["n_bold"] + cfg["preprocessing"]["func"]["dummy_scans"]
    assert np.allclose(bold.header.get_zooms()[:3], acq["bold_voxel_mm"])
    bvals = np.loadtxt(bids / "sub-01/dwi/sub-01_dwi.bval")
    assert (bvals > 50).sum() == acq["n_directions"]
    t1 = nib.load(bids / "sub-01/anat/sub-01_T1w.nii.gz")
    assert np.allclose(t1.header.get_zooms(), acq["t1_voxel_mm"])
    assert len(sorted(bids.glob("sub-*"))) == 6


def test_a_typo_in_bids_dir_is_an_error_not_a_synthetic_cohort(tmp_path: Path) -> None:
    """synthetic.generate is on in config.yaml, so a copy with a mistyped bids_dir used to get a synthetic
    cohort written there (2 GB at the study's size), even by a dry run."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg.update({"bids_dir": "data/my_studdy", "output_dir": "results"})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    for args in (["-n"], []):
        res = run(snakemake_cmd(tmp_path, *args, "--cores", "1"), timeout=300)
        out = res.stdout + res.stderr
        assert res.returncode != 0
        assert "bids_dir does not exist" in out and "my_studdy" in out, out[-2000:]
        assert "fix: correct bids_dir" in out and "Traceback" not in out
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


def test_job_benchmark_record_counts_children_and_startup(tmp_path: Path) -> None:
    """neuromoe.smk.write_benchmark: Snakemake's column names, CPU of a child process included, wall time
    from the process's start (so the interpreter's start-up counts)."""
    import sys

    out = tmp_path / "b.tsv"
    code = ("import subprocess, sys, time\n"
            "subprocess.run([sys.executable, '-c', 'x = 0\\nfor i in range(3 * 10**7): x += i'])\n"
            f"from neuromoe.smk import write_benchmark\nwrite_benchmark({str(out)!r})\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    row = pd.read_csv(out, sep="\t").iloc[0]
    assert {"s", "h:m:s", "max_rss", "cpu_time", "io_in", "io_out"} <= set(row.index)
    assert row["cpu_time"] >= 0.5 and row["s"] >= row["cpu_time"] * 0.5  # the child's loop is counted
    assert row["max_rss"] > 5 and row["status"] == "ok"


def test_the_scheduler_keeps_one_wakeup_timer_not_one_per_finished_job() -> None:
    """neuromoe.smk.coalesce_scheduler_wakeups (the Snakefile applies it): Snakemake 9 arms a 1 s timer at the end
    of every scheduling pass, so each finished job started a timer chain of its own and the scheduler's passes
    grew with the jobs done. Patched, fifty passes leave one pending daemon timer that re-opens the scheduler
    once, and a later pass arms the next."""
    import threading

    from snakemake.scheduling.job_scheduler import JobScheduler

    from neuromoe.smk import coalesce_scheduler_wakeups

    class Scheduler:
        def _schedule_reevalutation(self, delay: float) -> None:
            raise AssertionError("not patched")

    assert coalesce_scheduler_wakeups(Scheduler) and coalesce_scheduler_wakeups(Scheduler)  # idempotent
    s = Scheduler()
    s._open_jobs = threading.Semaphore(0)
    before = threading.active_count()
    for _ in range(50):                                  # 50 passes, e.g. after 50 finished jobs
        s._schedule_reevalutation(0.3)
    assert threading.active_count() - before == 1 and s._neuromoe_timer.daemon  # no hang at exit either
    assert s._open_jobs.acquire(timeout=10)              # the re-evaluation comes ...
    assert not s._open_jobs.acquire(timeout=1.0)         # ... once, not fifty times
    s._schedule_reevalutation(0.05)
    assert s._open_jobs.acquire(timeout=10)
    # The Snakemake this project pins has the method (an upgrade that renames it fails here, not silently).
    assert coalesce_scheduler_wakeups() and JobScheduler._neuromoe_coalesced


def test_outputs_are_those_of_the_commit_before_sessions(workflow_run: Path) -> None:
    """A dataset without sessions gets exactly the outputs it always had: the sha256 of every derivative, cache
    array, prediction and evaluation table of this run equals tests/data/e2e_outputs.sha256, written from the same
    run at the commit before sessions came in (fb38081); the explanation's float32 maps and gate weights within
    1e-5 (the CPU's kernels change their last bits: tools/e2e_manifest.py). A deliberate change of an output
    rewrites the manifest (tools/e2e_manifest.py --write, saying why in the commit)."""
    sys.path.insert(0, str(REPO / "tools"))
    from e2e_manifest import differing, manifest, read

    found, known = manifest(workflow_run / "results"), read()
    changed = differing(found, known)
    assert not changed, f"{len(changed)} of {len(known)} outputs differ: {changed[:10]}"


def test_the_local_run_hands_its_jobs_to_the_worker(workflow_run: Path) -> None:
    """The run above is local, so the Snakefile's onstart turned the worker on: after the first jobs started it,
    preprocessing and training jobs ran as its forks (their logs say so), and their outputs are the manifest's
    (the test above) and their benchmark records complete."""
    logs = {rule: [p.read_text() for p in (workflow_run / "results" / "logs" / rule).rglob("*.log")]
            for rule in ("anat", "dwi", "func", "cache_subject", "train")}
    forked = {rule: sum("a fork of worker" in text for text in texts) for rule, texts in logs.items()}
    assert all(logs.values()) and forked["func"] and forked["cache_subject"] and forked["train"], forked
    for rule in ("func", "train"):
        for rec in (workflow_run / "results" / "benchmarks" / rule).rglob("*.tsv"):
            row = rec.read_text().splitlines()[1].split("\t")
            assert row[-1] == "ok" and float(row[0]) > 0 and float(row[3]) > 0, (rec, row)


def test_the_manifest_forgives_last_bits_of_explanations_not_changes(tmp_path: Path) -> None:
    """An ``approx:`` entry (evaluation/explain/) holds through a change of a float's last bits, not through a
    changed value, id, shape or affine; every other entry is byte for byte."""
    import nibabel as nib

    sys.path.insert(0, str(REPO / "tools"))
    from e2e_manifest import approx_fingerprint, same

    rng = np.random.default_rng(0)
    vol = rng.random((6, 7, 5)).astype(np.float32)
    table = "participant_id\tpred_class\tprob_HC\tgate_anat\n03\tiRBD\t0.2899835705757141\t0.15027438\n"

    def fingerprints(v: np.ndarray, affine: np.ndarray | None = None, text: str = table) -> tuple[str, str]:
        nib.save(nib.Nifti1Image(v, np.eye(4) if affine is None else affine), tmp_path / "m.nii.gz")
        (tmp_path / "g.tsv").write_text(text)
        return approx_fingerprint(tmp_path / "m.nii.gz"), approx_fingerprint(tmp_path / "g.tsv")

    ref = fingerprints(vol)
    ulp = np.nextafter(vol, np.float32(2))  # every voxel one float32 unit up
    assert all(map(same, fingerprints(ulp, text=table.replace("0.2899835705757141", "0.2899836003780365")), ref))
    moved = vol.copy()
    moved[0, 0, 0], moved[5, 6, 4] = vol[5, 6, 4], vol[0, 0, 0]  # the same values, elsewhere
    assert not same(fingerprints(moved)[0], ref[0])
    assert not same(fingerprints(vol * np.float32(1.001))[0], ref[0])
    assert not same(fingerprints(vol, affine=np.diag([2.0, 2, 2, 1]))[0], ref[0])
    assert not same(fingerprints(vol, text=table.replace("iRBD", "PD"))[1], ref[1])
    assert not same(fingerprints(vol, text=table.replace("0.15027438", "0.15127438"))[1], ref[1])
    assert not same("ab12", "ab13") and same("ab12", "ab12")


def test_derivatives_pass_the_official_bids_validator(workflow_run: Path) -> None:
    """The end-to-end run's derivatives, read by the official validator as a derivative dataset: no error. What
    the released schema cannot read yet (BEP016 model maps, XCP-D's BOLD maps, ITK transforms, QC figures) is
    listed, with why, in the folder's .bidsignore (README: Outputs); the two warnings left are about the dataset
    description (no README, no authors), as for fMRIPrep's output."""
    from neuromoe.inputs import validator as V

    exe = V.validator_executable()
    assert exe, f"the official BIDS validator is part of `make install`: {V.INSTALL_HINT}"
    deriv = workflow_run / "results" / "derivatives" / "neuromoe"
    assert (deriv / ".bidsignore").is_file()
    res = subprocess.run([exe, str(deriv), "--datasetTypes", "derivative", "--format", "json"],
                         capture_output=True, text=True, timeout=300)
    report = json.loads(res.stdout)
    errors, _ = V.parse_report(report)
    assert not errors, "\n".join(str(e) for e in errors[:10])
    warned = {i["code"] for i in report["issues"]["issues"]}
    assert warned <= {"README_FILE_MISSING", "TOO_FEW_AUTHORS"}, warned
