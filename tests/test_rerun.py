"""Rerunning one stage: what Snakemake plans to redo after --forcerun, --until, a target, or a config edit.

The module fixture runs the real workflow once, up to the per-subject cache (anat -> dwi, func -> cache_subject,
then cache_cohort), on a 2-subject synthetic cohort in a temporary folder (a few minutes on 2 cores). Every test
then asks Snakemake for its plan with a dry run (``-n``) and reads the job counts per rule from the plan's
"Job stats" table. A real run is needed, not ``--touch`` on placeholder files: only a real run records the params
each output was made with, and the params are what make a config edit rerun a stage (each rule passes exactly
its own config keys as ``params``; see ``stage_config`` in workflow/rules/common.smk).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subset_cohort, write_workdir

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")
TIMEOUT_S = 900  # hard limit per snakemake call: a hang fails the test, not the CI job
N_SUBJECTS = 2
# The stages these tests run for real, named to --until: everything up to the cohort cache (no training).
UNTIL = ["cache_cohort"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # the first test also pays for the module's real run
    pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed next to this Python"),
]


def run_bounded(cmd: list[str], timeout: int = TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``; on timeout kill its whole process group (Snakemake and the jobs it started) and fail."""
    with subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True, **kw) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def snakemake(workdir: Path, *args: str, check: bool = True) -> str:
    cmd = [SNAKEMAKE, "--snakefile", REPO / "Snakefile", "--directory", workdir, "--cores", "2", *args]
    res = run_bounded(cmd)
    if check and res.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} exited {res.returncode}:\n{res.stdout[-6000:]}")
    return res.stdout


def plan(workdir: Path, *args: str) -> tuple[dict[str, int], str]:
    """Jobs per rule that a dry run of ``snakemake *args`` would run ({} when there is nothing to do), and the
    dry run's output (with each job's reason)."""
    out = snakemake(workdir, "--dry-run", *args)
    if "Nothing to be done" in out:
        return {}, out
    table = re.search(r"Job stats:\n(.*?)\n\s*total\s+\d+", out, re.S)  # with --until, "total 0" when empty
    assert table, f"no job stats in the dry run's output:\n{out[-3000:]}"
    rows = re.finditer(r"^(\w+)\s+(\d+)\s*$", table.group(1), re.M)
    return {m.group(1): int(m.group(2)) for m in rows}, out


def planned(workdir: Path, *args: str) -> dict[str, int]:
    return plan(workdir, *args)[0]






@pytest.fixture(scope="module")
def tiny_bids(synth_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first subjects of the session's shared synthetic cohort (tests/conftest.py)."""
    return subset_cohort(synth_cohort, tmp_path_factory.mktemp("rerun_bids") / "bids", N_SUBJECTS)


@pytest.fixture(scope="module")
def done(tiny_bids: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workflow folder where everything up to the cohort cache has really run."""
    wd = write_workdir(tmp_path_factory.mktemp("rerun") / "wd", tiny_bids)
    snakemake(wd, "--until", *UNTIL)
    return wd


@pytest.fixture
def config_edit(done: Path):
    """Edit the run's config.yaml for one test, and put it back afterwards."""
    cfg = done / "config.yaml"
    original = cfg.read_text()
    yield cfg
    cfg.write_text(original)


def test_unchanged_rerun_is_a_no_op(done: Path) -> None:
    assert planned(done, "--until", *UNTIL) == {}
    assert "Nothing to be done" in snakemake(done, "--dry-run", "cache_cohort")


def test_forcerun_reruns_the_stage_and_its_dependents_only(done: Path) -> None:
    n = N_SUBJECTS
    assert planned(done, "--until", *UNTIL, "--forcerun", "func") == {"func": n, "cache_subject": n,
                                                                       "cache_cohort": 1}
    assert planned(done, "--until", *UNTIL, "--forcerun", "dwi") == {"dwi": n, "cache_subject": n, "cache_cohort": 1}
    # anat feeds everything per subject
    assert planned(done, "--until", *UNTIL, "--forcerun", "anat") == {"anat": n, "dwi": n, "func": n,
                                                                       "cache_subject": n, "cache_cohort": 1}


def test_until_stops_at_the_named_stage(done: Path) -> None:
    assert planned(done, "--until", "anat", "--forcerun", "anat") == {"anat": N_SUBJECTS}
    assert planned(done, "--until", "func", "--forcerun", "anat") == {"anat": N_SUBJECTS, "func": N_SUBJECTS}


def test_until_on_a_fresh_folder_plans_only_that_stage(tiny_bids: Path, tmp_path: Path) -> None:
    wd = write_workdir(tmp_path / "fresh", tiny_bids)
    assert planned(wd, "--until", "anat") == {"anat": N_SUBJECTS}
    # the whole workflow cannot evaluate 2 subjects with 5 folds: said at start-up, before any preprocessing
    out = snakemake(wd, "--dry-run", check=False)
    assert "stratified 5-fold cv" in out and "needs at least" in out, out[-2000:]


def test_rule_and_file_targets(done: Path, tiny_bids: Path, tmp_path: Path) -> None:
    from neuromoe import paths

    # A rule without wildcards is a target by name; here everything it needs is up to date.
    assert planned(done, "cache_cohort") == {}
    # On a fresh folder the same target plans its whole upstream and nothing downstream (no training).
    wd = write_workdir(tmp_path / "fresh", tiny_bids)
    n = N_SUBJECTS
    assert planned(wd, "cache_cohort") == {"anat": n, "dwi": n, "func": n, "cache_subject": n, "cache_cohort": 1}
    # One subject's one map: that subject's anat and func only.
    falff = paths.derivative("results", "01", "func_falff_mni")
    assert planned(wd, falff) == {"anat": 1, "func": 1}


def test_changing_a_stage_key_reruns_that_stage_and_downstream(done: Path, config_edit: Path) -> None:
    text = config_edit.read_text()
    edited = re.sub(r"(?m)^(\s+band_hz:).*$", r"\1 [0.01, 0.1]", text)
    assert edited != text, "config.yaml has no preprocessing.func.band_hz line"
    config_edit.write_text(edited)
    jobs, out = plan(done, "--until", *UNTIL)
    assert jobs == {"func": N_SUBJECTS, "cache_subject": N_SUBJECTS, "cache_cohort": 1}
    assert "Params have changed since last execution" in out  # func's own trigger; the rest follow its outputs


def test_editing_a_downstream_stage_key_reruns_nothing_upstream(done: Path, config_edit: Path) -> None:
    # Training settings are params of train only: the preprocessing and cache outputs stay valid.
    text = config_edit.read_text()
    edited = re.sub(r"(?m)^(\s+epochs:).*$", r"\1 3", text)
    assert edited != text
    config_edit.write_text(edited)
    assert planned(done, "--until", *UNTIL) == {}


def test_cosmetic_config_edit_reruns_nothing(done: Path, config_edit: Path) -> None:
    text = config_edit.read_text()
    config_edit.write_text("# a comment added at the top\n" + text.replace("band_hz:", "band_hz:  ") + "\n# end\n")
    assert planned(done, "--until", *UNTIL) == {}


def test_the_4d_series_are_not_kept_unless_asked_and_asking_reruns_only_what_writes_them(done: Path,
                                                                                         config_edit: Path) -> None:
    from neuromoe import paths

    deriv = done / "results" / "derivatives" / "neuromoe"
    assert not [p for k in paths.SERIES for p in deriv.rglob(f"*{paths.OUTPUTS[k][2]}{paths.OUTPUTS[k][3]}")
                if "desc-preproc" in p.name]  # the default: no motion-corrected DWI or BOLD series on disk
    text = config_edit.read_text()
    edited = text.replace("keep_series: false", "keep_series: true", 1)
    assert edited != text, "config.yaml has no preprocessing.keep_series line"
    config_edit.write_text(edited)
    jobs, out = plan(done, "--until", "func", "dwi")
    assert jobs == {"dwi": N_SUBJECTS, "func": N_SUBJECTS}  # to write the series; params unchanged
    assert "Missing output files" in out and "desc-preproc_bold.nii.gz" in out


def test_editing_an_fsl_only_key_plans_no_python_backend_job(workflow_run: Path, tmp_path: Path) -> None:
    """preprocessing.fsl is read by the fsl backend only (neuromoe.preproc.preproc_keys names each rule's params):
    with backend python, editing bet_frac in a finished workflow plans no preprocessing or cache job."""
    import yaml

    work = tmp_path / "work"  # a copy of the finished workflow (outputs, mtimes, Snakemake's records)
    shutil.copytree(workflow_run, work, copy_function=shutil.copy2, symlinks=True)
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    pre = cfg.setdefault("preprocessing", {})
    assert pre.get("backend", "python") == "python"
    fsl = pre.setdefault("fsl", {})
    fsl["bet_frac"] = 0.3 if fsl.get("bet_frac", 0.5) != 0.3 else 0.4
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs, out = plan(work)
    rerun = {r: n for r, n in jobs.items() if r in ("anat", "dwi", "func") or r.startswith("cache")}
    assert not rerun, f"editing preprocessing.fsl.bet_frac plans python-backend jobs {rerun}:\n{out[-3000:]}"
