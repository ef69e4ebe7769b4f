"""The workflow on a real SLURM cluster through profiles/slurm.

``tests/slurm/start-local-slurm.sh`` starts a single-node SLURM (munged, mariadbd, slurmdbd, slurmctld, slurmd)
on this machine; it needs root and Debian's apt/dpkg, and the tests are skipped, with the reason, where it cannot
run. The end-to-end test runs the anat stage of 2 subjects of a 3-subject synthetic cohort twice: once locally through
profiles/local, once through profiles/slurm by way of the BIDS App (`neuromoe BIDS OUT participant --profile
profiles/slurm`, which runs `snakemake --profile profiles/slurm`), and checks that the jobs went through SLURM
(sacct lists them, COMPLETED, grouped per subject, one job step each) and that both runs wrote the same files with
the same data.

Every subprocess has a hard timeout, and a timed-out Snakemake is killed with its jobs (and its SLURM jobs
cancelled), so a hang fails the test instead of stalling CI. The cluster is stopped at the end of the session
if this session started it.

The profile tests at the bottom need no cluster: they check what the profile asks of SLURM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import subset_cohort, write_workdir

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
START = REPO / "tests" / "slurm" / "start-local-slurm.sh"
STOP = REPO / "tests" / "slurm" / "stop-local-slurm.sh"
STATE = Path(os.environ.get("NEUROMOE_SLURM_STATE", "/tmp/neuromoe-slurm"))
SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")
TIMEOUT_S = 600  # hard limit per workflow run
N_SUBJECTS = 3  # in the cohort
N_TARGETS = 2  # subjects whose anat stage is run
ANAT_KEYS = ("anat_brain", "anat_mask", "anat_xfm", "anat_brain_mni", "anat_mask_mni")


def run_bounded(cmd: list, timeout: int, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the group and fail with the output's tail."""
    with subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True, **kw) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return subprocess.CompletedProcess(cmd, -9, f"TIMEOUT after {timeout}s\n{out}", "")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """Environment for talking to the local test cluster; starts it (and stops it afterwards) if needed."""
    if os.geteuid() != 0:
        pytest.skip("local SLURM: needs root to start munged/slurmctld/slurmd")
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        pytest.skip("local SLURM: needs a Debian machine (apt-get, dpkg) to install the SLURM packages")
    res = run_bounded(["bash", START], timeout=1200)
    if res.returncode != 0:
        pytest.skip(f"local SLURM could not be started (exit {res.returncode}):\n{res.stdout[-3000:]}")
    print(res.stdout)
    env = dict(os.environ, SLURM_CONF=str(STATE / "etc" / "slurm.conf"))
    yield env
    if "started this time" in res.stdout and not os.environ.get("NEUROMOE_SLURM_KEEP"):
        print(run_bounded(["bash", STOP], timeout=120).stdout)






def node_size(env: dict[str, str]) -> tuple[int, int]:
    """CPUs and memory (MB) of the test cluster's node."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], env=env, capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()
    return int(out[0]), int(out[1])


def sacct_jobs(env: dict[str, str], run_id: str) -> list[dict[str, str]]:
    """Jobs and job steps of one Snakemake run (the plugin names every job after the run's id)."""
    fields = ["JobID", "JobName", "Comment", "State", "ExitCode"]
    out = subprocess.run(["sacct", "--parsable2", "--noheader", "--starttime", "now-1day", "--name", run_id,
                          "-o", ",".join(fields)], env=env, capture_output=True, text=True, timeout=30,
                         check=True).stdout
    jobs = [dict(zip(fields, line.split("|"), strict=False)) for line in out.splitlines() if line]
    # steps (<id>.batch, <id>.0, ...) carry the step's name, not the run id: list them too
    ids = ",".join(j["JobID"] for j in jobs)
    if ids:
        out = subprocess.run(["sacct", "--parsable2", "--noheader", "-j", ids, "-o", ",".join(fields)], env=env,
                             capture_output=True, text=True, timeout=30, check=True).stdout
        jobs = [dict(zip(fields, line.split("|"), strict=False)) for line in out.splitlines() if line]
    return jobs


def assert_same_outputs(a: Path, b: Path) -> None:
    """Same files under both folders; NIfTI data and affines equal within float tolerance, text numbers too."""
    import nibabel as nib

    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        name = str(rel)
        if name.endswith((".nii", ".nii.gz")):
            ia, ib = nib.load(a / rel), nib.load(b / rel)
            assert ia.shape == ib.shape, name
            np.testing.assert_allclose(ia.affine, ib.affine, atol=1e-5, err_msg=name)
            da, db = np.asanyarray(ia.dataobj, dtype=np.float64), np.asanyarray(ib.dataobj, dtype=np.float64)
            scale = max(float(np.abs(da).max()), 1e-12)
            np.testing.assert_allclose(da, db, rtol=0, atol=1e-4 * scale, err_msg=name)
        elif name.endswith(".txt"):
            num = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")
            va = [float(x) for x in num.findall((a / rel).read_text())]
            vb = [float(x) for x in num.findall((b / rel).read_text())]
            np.testing.assert_allclose(va, vb, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_anat_stage_on_slurm_matches_local_run(slurm_env: dict[str, str], synth_cohort: Path,
                                               tmp_path: Path) -> None:
    if SNAKEMAKE is None:
        pytest.skip("snakemake is not installed next to this Python")
    from neuromoe import paths

    bids = subset_cohort(synth_cohort, tmp_path / "bids", N_SUBJECTS)
    subjects = sorted(p.name[4:] for p in bids.glob("sub-*"))[:N_TARGETS]  # the last subject is left alone
    targets = [paths.derivative("results", s, k) for s in subjects for k in ("anat_brain_mni", "anat_mask_mni")]
    cpus, mem_mb = node_size(slurm_env)

    # The same threads in both runs, so both do the same arithmetic (ITK reductions depend on thread count).
    threads = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-threads"]["anat"]
    local = write_workdir(tmp_path / "local", bids)
    # (targets first: options such as --set-threads take several values)
    t0 = time.monotonic()
    res = run_bounded([SNAKEMAKE, *targets, "-s", REPO / "Snakefile", "-d", local, "--profile",
                       REPO / "profiles" / "local", "--cores", str(max(cpus, threads)),
                       "--set-threads", f"anat={threads}"], timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-6000:]

    # On the cluster, through the BIDS App (which runs `snakemake --profile profiles/slurm ...` and says so):
    # participant level for those subjects, up to their anat stage. The profile as it is, except the
    # per-group-job caps, which must fit this one small node (the profile's 8 CPUs / 32 GB would never be
    # scheduled here), and a quick first status check.
    cluster = tmp_path / "app"
    t1 = time.monotonic()
    res = run_bounded([sys.executable, "-m", "neuromoe.cli", bids, cluster, "participant",
                       "--participant-label", *subjects, "--registration", "affine",  # the local run's (config.yaml)
                       "--profile", "profiles/slurm", "--cores", str(cpus),
                       "--until", "anat", "--resources", f"mem_mb={min(mem_mb, 32000)}",
                       "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5",
                       "--slurm-keep-successful-logs"], timeout=TIMEOUT_S, env=slurm_env)
    print(f"anat of {N_TARGETS} subjects: local run {t1 - t0:.0f} s, SLURM run {time.monotonic() - t1:.0f} s")
    run_id = re.search(r"SLURM run ID: (\S+)", res.stdout)
    if res.returncode != 0 and run_id:  # leave nothing queued behind a failed or killed run
        subprocess.run(["scancel", "--name", run_id.group(1)], env=slurm_env, timeout=30)
    assert res.returncode == 0, res.stdout[-6000:]
    assert run_id, res.stdout[-3000:]
    assert "--profile " + str(REPO / "profiles" / "slurm") in res.stdout  # the command the app ran

    jobs = sacct_jobs(slurm_env, run_id.group(1))
    allocations = [j for j in jobs if "." not in j["JobID"]]
    assert allocations, f"sacct lists no job named {run_id.group(1)}"
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    # anat jobs are grouped per subject (group "subject"), several subjects per submission.
    assert all(j["Comment"].startswith("rule_subject") for j in allocations), allocations
    assert len(allocations) < N_TARGETS
    # each anat job ran as its own job step (srun) inside an allocation
    steps = [j for j in jobs if re.fullmatch(r"\d+\.\d+", j["JobID"])]
    assert len(steps) == N_TARGETS, jobs
    slurm_logs = list((cluster / ".snakemake" / "slurm_logs").rglob("*.log"))
    # the group job's log shows each anat job run by the job-step Snakemake that srun started
    assert sum(len(re.findall(r"(?m)^localrule anat:", log.read_text())) for log in slurm_logs) == N_TARGETS

    deriv = Path("results") / "derivatives" / "neuromoe"
    assert_same_outputs(local / deriv, cluster / "derivatives" / "neuromoe")  # the local run's files and values
    for s in subjects:
        for k in ANAT_KEYS:
            assert Path(paths.derivative(cluster, s, k)).exists()
    assert not (cluster / "derivatives" / "neuromoe" / f"sub-{N_SUBJECTS:02d}").exists()


# --- the profile, without a cluster --------------------------------------------------------------------------

def profile() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


class _Resources(dict):
    __getattr__ = dict.__getitem__


def _sbatch_call(rule: str, threads: int = 1) -> str:
    """The sbatch command line the installed executor plugin builds for ``rule`` under the profile."""
    plugin = pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    prof = profile()
    res = {k: v for k, v in prof["default-resources"].items()}
    for k, v in prof["set-resources"].get(rule, {}).items():
        res[k] = eval(str(v), {"attempt": 1}) if isinstance(v, str) and "attempt" in v else v
    job = SimpleNamespace(resources=_Resources(res), threads=prof.get("set-threads", {}).get(rule, threads),
                          is_group=lambda: False, name=rule)
    settings = SimpleNamespace(requeue=False, no_requeue=False, qos=None, reservation=None)
    params = {"run_uuid": "RUN", "slurm_logfile": "log", "comment_str": f"rule_{rule}", "account": "",
              "partition": f" -p {res['slurm_partition']}", "workdir": "/w"}
    assert plugin
    return get_submit_command(job, params, settings=settings) + set_gres_string(job)


def test_profile_asks_a_gpu_for_training() -> None:
    call = _sbatch_call("train")
    assert "--gpus=1" in call and "-p gpu" in call
    assert "--mem 32000" in call and "-t 240" in call


def test_profile_preprocessing_requests() -> None:
    for rule, cpus in profile()["set-threads"].items():
        if rule in ("anat", "dwi", "func"):
            call = _sbatch_call(rule)
            assert f"--cpus-per-task={cpus}" in call and "-p cpu" in call and "--mem " in call, call
            assert "--gpus" not in call


def test_profile_groups_per_subject_jobs() -> None:
    prof = profile()
    assert {prof["groups"][r] for r in ("anat", "dwi", "func", "cache_subject")} == {"subject"}
    assert prof["group-components"]["subject"] > 1
    assert prof["executor"] == "slurm" and prof["rerun-incomplete"] is True and prof["retries"] >= 1


@pytest.fixture(scope="module")
def plan_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workflow folder over a 1-subject cohort, for dry runs and lint."""
    if SNAKEMAKE is None:
        pytest.skip("snakemake is not installed next to this Python")
    synth = pytest.importorskip("neuromoe.inputs.synth",
                                reason="neuromoe.inputs.synth (the synthetic cohort) is not available")
    base = tmp_path_factory.mktemp("profiles")
    synth.make_cohort(base / "bids", 1, seed=3)
    return write_workdir(base / "wd", base / "bids")


def _lints(out: str) -> list[str]:
    return sorted(line.strip() for line in out.splitlines() if line.strip().startswith(("Lints for", "*")))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["slurm", "local"])
def test_profiles_lint_and_plan(name: str, plan_workdir: Path) -> None:
    """Each profile is accepted by ``snakemake --lint`` and a dry run (no cluster needed for either), and adds
    no lint of its own: whatever --lint reports about the rules, it reports the same with and without it."""
    base = [SNAKEMAKE, "-s", REPO / "Snakefile", "-d", plan_workdir]
    plain = run_bounded([*base, "--lint"], timeout=300)
    lint = run_bounded([*base, "--profile", REPO / "profiles" / name, "--lint"], timeout=300)
    assert "Error" not in lint.stdout and "Traceback" not in lint.stdout, lint.stdout[-4000:]
    assert lint.returncode == plain.returncode and _lints(lint.stdout) == _lints(plain.stdout), lint.stdout[-4000:]
    plan = run_bounded([*base, "--profile", REPO / "profiles" / name, "--dry-run", "--until", "anat"], timeout=300)
    assert plan.returncode == 0 and re.search(r"(?m)^anat\s+1\s*$", plan.stdout), plan.stdout[-4000:]
