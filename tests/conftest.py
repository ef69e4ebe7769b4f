"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Seed of the shared tiny cohort. Chosen (by searching subject plans, which costs no images) so that its
# six subjects (2 HC, 2 PD, 2 iRBD) hold, for every modality, a patient whose latent profile is that
# modality and a control without a change in the matching region: tests/test_synth.py measures the
# planted effects on these images. It checks that precondition first, so a generator change that breaks
# it fails with that message rather than with a missing effect.
SYNTH_COHORT_SEED = 3
SYNTH_COHORT_SUBJECTS = 6


# The modules that use the end-to-end run (the session fixture workflow_run; test_architecture.py checks the list)
E2E_MODULES = ("test_app.py", "test_rerun.py", "test_workflow.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """How `make test` splits the suite over its pytest-xdist workers (``-n 2``): a module's tests run on one
    worker, so its module fixtures are made once, and the modules of E2E_MODULES all on the same worker, so the
    end-to-end run is made once. (xdist's ``loadgroup`` marks are lost under pytest 9: its test ids do not take
    the group suffix.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "e2e" if Path(module).name in E2E_MODULES else module

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def template_copies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The on-disk template copies (``neuromoe.inputs.templates.nilearn_image``) of this session, in its tmp
    folder rather than the user's ~/.cache; Snakemake jobs the tests start inherit the variable."""
    folder = tmp_path_factory.mktemp("neuromoe_cache")
    old = os.environ.get("NEUROMOE_CACHE_DIR")
    os.environ["NEUROMOE_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("NEUROMOE_CACHE_DIR", None)
    else:
        os.environ["NEUROMOE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic BIDS cohort (6 subjects, 2 per group, all modalities, default SynthParams), built
    once per test session. Treat it as read-only: copy it before planting faults."""
    from neuromoe.inputs.synth import make_cohort

    # Two processes: on a 2-core CI machine this halves the wait; the bytes are the same as with one.
    return make_cohort(tmp_path_factory.mktemp("synth") / "bids", SYNTH_COHORT_SUBJECTS, seed=SYNTH_COHORT_SEED,
                       n_jobs=2)


# ---------------------------------------------------------------------------------------------------------
# One real end-to-end run of the workflow on a small, coarse cohort, shared by the workflow tests
# ---------------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
E2E_SUBJECTS = 9  # 3 per group: the fewest a stratified 3-fold CV with a validation part accepts
E2E_CONFIG = {
    "synthetic": {"generate": False},
    # the demo's (config.yaml's): the synthetic brains have the template's shape; the default, nonlinear, is
    # tested on its own (test_stage_contract, test_registration_truth) and measured (bench/registration.py)
    "preprocessing": {"anat": {"registration": "affine"}},
    "cache": {"grid": [16, 16, 16]},
    "model": {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2, "clin_hidden": [16, 8], "expert_hidden": 16,
              "gate_hidden": 8},
    "train": {"epochs": 3, "batch_size": 4, "warmup_epochs": 1, "patience": 5},
    "evaluation": {"protocol": "cv", "folds": 3, "seeds": [0], "variants": ["full", "no_gate", "only_clin"],
                   "lambda_sweep": [], "baseline": "logreg"},
}


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    import shutil
    import sys

    exe = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    return [exe, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), *args]


def coarse_params():
    """Coarser, shorter images than the demo: the same generator, a fraction of the preprocessing time."""
    from neuromoe.inputs.synth import SynthParams

    return SynthParams(t1_voxel_mm=2.5, dwi_voxel_mm=4.0, bold_voxel_mm=5.0, n_directions=12, n_bold=60)


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the whole workflow (all rules, the report and its check) once with `make demo`; returns the working
    directory."""
    import subprocess

    import yaml

    from neuromoe.inputs.synth import make_cohort

    work = tmp_path_factory.mktemp("e2e")
    make_cohort(work / "bids", E2E_SUBJECTS, seed=11, params=coarse_params(), n_jobs=2)
    # relative to the working directory, so a copy of the whole folder is the same workflow state
    cfg = {"bids_dir": "bids", "output_dir": "results", **E2E_CONFIG}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = subprocess.run(make_demo_cmd(work), capture_output=True, text=True, timeout=1500)
    (work / "snakemake.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, f"make demo failed:\n{(run.stdout + run.stderr)[-6000:]}"
    return work


def make_demo_cmd(work: Path) -> list[str]:
    """`make demo`, the README's command, on the workflow folder ``work`` (its config.yaml, its results/): the
    same recipe (workflow, zip report, check of every promised file) as a user's first run."""
    import sys

    # -o install: the suite runs in an installed environment; make must never reinstall into it
    return ["make", "-s", "-o", "install", "-C", str(REPO), "demo", "CORES=2", f"VENV={sys.prefix}",
            f"DEMO_OUT={work / 'results'}", f"DEMO_ARGS=--directory {work} --configfile {work / 'config.yaml'}"]


def write_workdir(dst: Path, bids: Path) -> Path:
    """A workflow folder: config.yaml (the repository's, pointed at ``bids``, output in ./results)."""
    import re

    dst.mkdir(parents=True, exist_ok=True)
    text = (REPO / "config.yaml").read_text()
    text = re.sub(r"(?m)^bids_dir:.*$", f"bids_dir: {bids}", text)
    text = re.sub(r"(?m)^output_dir:.*$", "output_dir: results", text)
    text = re.sub(r"(?m)^(\s+generate:)\s*true", r"\1 false", text)
    (dst / "config.yaml").write_text(text)
    return dst


def subset_cohort(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` subjects of a BIDS cohort (folders and participants.tsv rows), copied to ``dst``."""
    import shutil

    import pandas as pd

    keep = sorted(p.name for p in src.glob("sub-*"))[:n]
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "participants.tsv":
            shutil.copy2(f, dst / f.name)
    for s in keep:
        shutil.copytree(src / s, dst / s)
    df = pd.read_csv(src / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    df[df["participant_id"].isin(keep)].to_csv(dst / "participants.tsv", sep="\t", index=False)
    return dst


# Phases of a run and the log line that says the run is inside one: a job of that stage was submitted (Snakemake
# prints "[local]rule NAME:" as it starts a job).
KILL_PHASES = {"preprocessing": r"^(local)?rule (anat|dwi|func):", "caching": r"^(local)?rule cache_subject:",
               "training": r"^(local)?rule train:"}


def kill_when(cmd: list[str], log: Path, pattern: str, timeout: float = 900, written=None) -> None:
    """Run ``cmd`` in its own process group (output to ``log``) and SIGKILL the whole group soon after a line
    matches ``pattern``: kill -9 of the workflow and every job it runs, as an OOM kill or a lost session does.
    ``written``: a callable; then the kill waits until it is true (a job's first output on disk), so that the
    job dies mid-write, leaving outputs Snakemake marks incomplete, whatever the machine's speed."""
    import re
    import signal
    import subprocess
    import time

    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    try:
        while not re.search(pattern, log.read_text(), re.M):
            assert proc.poll() is None, f"the run ended before {pattern!r}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - t0 < timeout, f"no {pattern!r} in {timeout} s"
            time.sleep(0.05)
        if written is None:
            time.sleep(0.5)  # inside the job: its outputs are being written
        while written is not None and not written():
            assert proc.poll() is None, f"the run ended before the output it waited for:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - t0 < timeout, f"no output in {timeout} s"
            time.sleep(0.02)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended by itself (the assertion above says how)
            pass
        proc.wait()
