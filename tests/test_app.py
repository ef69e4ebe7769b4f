"""The BIDS-App front end: ``neuromoe BIDS_DIR OUTPUT_DIR {participant,group}`` (neuromoe.app)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import KILL_PHASES, REPO, kill_when

from neuromoe import app, paths
from neuromoe.cli import main as cli_main
from neuromoe.config import ConfigError, validate_config
from neuromoe.errors import ValidationReport
from neuromoe.inputs.bids import validate_dataset


def parse(*argv: str) -> tuple[argparse.Namespace, list[str]]:
    return app.build_parser().parse_known_args(list(argv))


def test_options_are_ours_and_the_rest_goes_to_snakemake(tmp_path: Path) -> None:
    args, rest = parse("bids", "out", "participant", "--participant-label", "01", "sub-02", "--skip", "ReHo",
                       "--cores", "4", "--forcerun", "anat", "-n")
    assert args.participant_label == ["01", "sub-02"] and args.skip == ["reho"] and args.cores == "4"
    assert rest == ["--forcerun", "anat", "-n"]
    cmd = app.snakemake_command(args, tmp_path / "config.yaml", rest)
    assert cmd[:3] == [sys.executable, "-m", "snakemake"]
    assert cmd[cmd.index("--directory") + 1] == str(tmp_path)  # Snakemake's records live with the outputs
    assert cmd[cmd.index("--configfile") + 1] == str(tmp_path / "config.yaml")
    assert cmd[-4:] == ["--forcerun", "anat", "-n", "participant"]  # the level is the target rule
    assert "--rerun-incomplete" in cmd  # a job killed mid-write is redone: the same command goes on
    group, _ = parse("bids", "out", "group", "--profile", "profiles/slurm")
    cmd = app.snakemake_command(group, tmp_path / "config.yaml", [])
    # the repository's profile from anywhere; its own cores, not ours
    assert cmd[cmd.index("--profile") + 1] == str(REPO / "profiles" / "slurm") and "--cores" not in cmd
    assert cmd[-1] == "all"
    with pytest.raises(SystemExit):
        app.build_parser().parse_args(["bids", "out", "participant", "--skip", "T1w"])
    with pytest.raises(SystemExit):
        app.build_parser().parse_args(["bids", "out", "subject"])


def test_help_lists_our_options_and_snakemakes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bids", "out", "participant", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--participant-label", "--exclude-participant-label", "--session-label", "--skip", "--registration",
                "--derivatives", "--config",
                "--profile", "--version", "Snakemake options (passed through)", "--forcerun", "--until", "--use-conda"):
        assert opt in text, opt


def test_resolved_config_merges_files_then_options(tmp_path: Path) -> None:
    (tmp_path / "bids").mkdir()
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  epochs: 7\nevaluation:\n  folds: 3\n")
    args, _ = parse(str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--config", str(mine),
                    "--participant-label", "sub-03", "--session-label", "ses-2", "1", "--skip", "reho", "fa")
    cfg = app.resolve_config(args)
    repo = yaml.safe_load((REPO / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 7 and cfg["evaluation"]["folds"] == 3  # ours
    assert cfg["train"]["lr"] == repo["train"]["lr"]  # the repository's, merged key by key
    assert cfg["bids_dir"] == str(tmp_path / "bids") and cfg["output_dir"] == str(tmp_path / "out")
    assert cfg["synthetic"]["generate"] is False  # a BIDS App never invents a cohort
    assert cfg["participant_label"] == ["03"] and cfg["session_label"] == ["2", "1"]
    assert cfg["cache"]["func_maps"] == ["fALFF"] and cfg["cache"]["dwi_maps"] == ["MD"]
    # T1w -> MNI: nonlinear for a dataset (config.yaml's affine is its synthetic demo's), unless asked otherwise
    assert repo["preprocessing"]["anat"]["registration"] == "affine"
    assert cfg["preprocessing"]["anat"]["registration"] == "nonlinear"
    mine.write_text("preprocessing:\n  anat:\n    registration: affine\n")
    args, _ = parse(str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--config", str(mine))
    assert app.resolve_config(args)["preprocessing"]["anat"]["registration"] == "affine"
    args, _ = parse(str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--registration", "affine")
    assert app.resolve_config(args)["preprocessing"]["anat"]["registration"] == "affine"
    args, _ = parse(str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--skip", "falff", "reho")
    with pytest.raises(ConfigError, match="cache.func_maps empty"):
        app.resolve_config(args)
    mine.write_text("train:\n  epochs: -1\n")
    args, _ = parse(str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--config", str(mine))
    with pytest.raises(ConfigError, match="train.epochs"):
        app.resolve_config(args)
    # another tool's outputs (XCP-D's --derivatives TOOL=PATH): absolute paths in inputs.derivatives
    args, _ = parse(str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--derivatives",
                    f"fmriprep={tmp_path / 'fp'}", "QSIPrep=qp")
    cfg = app.resolve_config(args)
    assert cfg["inputs"]["derivatives"] == {"fmriprep": str(tmp_path / "fp"), "qsiprep": str(Path("qp").resolve())}
    assert repo["inputs"]["derivatives"] == {"fmriprep": None, "qsiprep": None}
    with pytest.raises(SystemExit):
        app.build_parser().parse_args(["bids", "out", "participant", "--derivatives", "xcpd=/x"])


def test_bad_call_is_a_clear_error_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 2
    err = capsys.readouterr().err
    assert "BIDS_DIR" in err and "nope" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_participant_labels_select_and_a_typo_is_an_error(synth_cohort: Path) -> None:
    cfg = validate_config({"bids_dir": str(synth_cohort), "participant_label": ["01", "sub-03"]})
    assert sorted(validate_dataset(synth_cohort, cfg).subjects) == ["01", "03"]
    cfg = validate_config({"bids_dir": str(synth_cohort), "exclude_participant_label": ["01"]})
    assert "01" not in validate_dataset(synth_cohort, cfg).subjects
    cfg = validate_config({"bids_dir": str(synth_cohort), "participant_label": ["01", "99"]})
    with pytest.raises(ValidationReport, match=r"participant label\(s\) 99"):
        validate_dataset(synth_cohort, cfg)


def test_another_subjects_problem_does_not_stop_the_selected_ones(synth_cohort: Path, tmp_path: Path) -> None:
    import shutil

    bids = tmp_path / "bids"
    shutil.copytree(synth_cohort, bids)
    bad = bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated
    cfg = validate_config({"bids_dir": str(bids)})
    with pytest.raises(ValidationReport, match="sub-02"):
        validate_dataset(bids, cfg)
    cfg = validate_config({"bids_dir": str(bids), "participant_label": ["01"]})
    assert list(validate_dataset(bids, cfg).subjects) == ["01"]


def test_func_stage_outputs_follow_the_configured_maps() -> None:
    keys = paths.stage_outputs("func_", func_maps=["fALFF"])
    assert "func_falff_mni" in keys and not any("reho" in k for k in keys)
    assert paths.stage_outputs("func_") == paths.stage_outputs("func_", func_maps=["fALFF", "ReHo"])


def test_skip_reho_plans_no_reho_anywhere(workflow_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    small = tmp_path / "small.yaml"  # the suite's 9-subject cohort: 3 folds
    small.write_text("evaluation:\n  folds: 3\n")
    run = subprocess.run([sys.executable, "-m", "neuromoe.cli", str(workflow_run / "bids"), str(out), "group",
                          "--config", str(small), "--skip", "reho", "--cores", "2", "-n"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    plan = run.stdout + run.stderr
    assert "stat-falff" in plan and "stat-reho" not in plan and "ReHo" not in plan  # no map computed, cached or shown
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["cache"]["func_maps"] == ["fALFF"]


# ---------------------------------------------------------------------------------------------------------
# Real runs: participant for two subjects, then group; compared with the plain `make demo` run of the suite
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_run(workflow_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The suite's end-to-end cohort and settings through the BIDS App: participant for 01 and 02 (the tree is
    copied after it), then group, killed with SIGKILL (the whole process group) while preprocessing the other
    subjects, while caching and while training, each time followed by the same command, which then finishes."""
    import shutil

    work = tmp_path_factory.mktemp("app")
    # the plain run's configuration in full (its folder's config.yaml with the schema's defaults), so the
    # repository's config.yaml under it changes nothing
    plain = yaml.safe_load((workflow_run / "config.yaml").read_text())
    full = validate_config({**plain, "bids_dir": str(workflow_run / plain["bids_dir"])})
    (work / "settings.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    out = work / "out"
    base = [sys.executable, "-m", "neuromoe.cli", str(workflow_run / plain["bids_dir"]), str(out)]
    opts = ["--config", str(work / "settings.yaml"), "--cores", "2"]
    for level, extra, snap in (("participant", ["--participant-label", "01", "02"], "after_participant"),
                               ("group", [], None)):
        if level == "group":  # kill -9 of the whole run in each phase, each time followed by the same command
            # killed mid-write where a job's first output shows it (the others' are already there)
            written = {"preprocessing": lambda: any(out.glob("derivatives/neuromoe/sub-0[3-9]/anat/*_mask.nii.gz")),
                       "caching": lambda: any(out.glob("cache/subjects/sub-0[3-9]/*"))}
            for phase, pattern in KILL_PHASES.items():
                kill_when([*base, level, *opts, *extra], work / f"group-killed-in-{phase}.log", pattern,
                          written=written.get(phase))
                assert any((out / ".snakemake" / "locks").iterdir()), f"no lock left by the kill in {phase}"
        run = subprocess.run([*base, level, *opts, *extra], capture_output=True, text=True, timeout=1500)
        (work / f"{level}.log").write_text(run.stdout + run.stderr)
        assert run.returncode == 0, f"{level} failed:\n{(run.stdout + run.stderr)[-6000:]}"
        if snap:
            shutil.copytree(out, work / snap, ignore=shutil.ignore_patterns(".snakemake"))
    return {"work": work, "out": out, "plain": workflow_run / plain["output_dir"]}


def test_participant_level_touches_only_the_selected_subjects(app_run: dict[str, Path]) -> None:
    snap = app_run["work"] / "after_participant"
    deriv = snap / "derivatives" / "neuromoe"
    assert sorted(p.name for p in deriv.glob("sub-*")) == ["sub-01", "sub-02"]
    assert sorted(p.name for p in (snap / "cache" / "subjects").iterdir()) == ["sub-01", "sub-02"]
    for s in ("01", "02"):
        for key in ("anat_brain_mni", "dwi_fa_mni", "func_reho_mni", "qc_anat_reg"):
            assert Path(paths.derivative(snap, s, key)).exists(), (s, key)
    assert not (snap / "model").exists() and not (snap / "evaluation").exists()  # the group level's
    assert (snap / "config.yaml").exists()


def test_participant_then_group_gives_the_plain_runs_metrics(app_run: dict[str, Path]) -> None:
    ours = pd.read_csv(app_run["out"] / "evaluation" / "per_run.tsv", sep="\t").drop(columns="run_dir")
    plain = pd.read_csv(app_run["plain"] / "evaluation" / "per_run.tsv", sep="\t").drop(columns="run_dir")
    pd.testing.assert_frame_equal(ours, plain)
    assert (app_run["out"] / "report_manifest.txt").exists()
    assert (app_run["out"] / "derivatives" / "neuromoe" / "sub-09.html").exists()


def test_killed_in_each_phase_then_rerun_gives_the_plain_runs_tables(app_run: dict[str, Path]) -> None:
    """After kill -9 during preprocessing, caching and training (app_run), every final table equals the
    uninterrupted plain run's byte for byte (per_run.tsv: but for its run_dir column, a path)."""
    assert "removed the lock a stopped run left" in (app_run["work"] / "group.log").read_text()
    ours, plain = app_run["out"], app_run["plain"]
    tables = [p.relative_to(plain) for p in sorted((plain / "evaluation").glob("*.tsv")) if p.name != "per_run.tsv"]
    tables += [p.relative_to(plain) for p in sorted((plain / "model").rglob("predictions.tsv"))]
    assert len(tables) > 10
    for rel in tables:
        assert (ours / rel).read_bytes() == (plain / rel).read_bytes(), rel


def test_a_plain_snakemake_continues_the_apps_run(app_run: dict[str, Path]) -> None:
    """The written configuration is the run's: Snakemake on the output folder finds nothing to do."""
    run = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                          "--directory", str(app_run["out"]), "--cores", "1", "-n"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr


def test_a_stale_lock_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    """`neuromoe unlock-stale` (make demo and the app call it first) removes the lock of a killed run, never the
    lock of a Snakemake still running in that folder."""
    import time

    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("x")
    live = subprocess.Popen(["sleep", "30"], executable="sleep", cwd=tmp_path)  # argv[0]: sleep
    fake = subprocess.Popen(["snakemake", "30"], executable="/bin/sleep", cwd=tmp_path)  # a "Snakemake" here
    try:
        time.sleep(0.2)
        assert cli_main(["unlock-stale", "--directory", str(tmp_path), "--configfile", "c.yaml"]) == 0
        assert (locks / "0.input.lock").exists()  # a Snakemake runs there: its lock stays
        fake.kill()
        fake.wait()
        assert not app.clear_stale_lock(tmp_path / "elsewhere")  # no lock there: nothing to do
        assert app.clear_stale_lock(tmp_path) and not any(locks.iterdir())
    finally:
        for p in (live, fake):
            p.kill()
            p.wait()
