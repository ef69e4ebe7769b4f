"""The local worker (neuromoe.worker): a job handed to it behaves as the same job run alone.

A toy job script stands in for Snakemake's (same ``smk.run`` entry, a Snakemake-like object); the servers here
preload little (``json``) so that each test takes about a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from neuromoe import worker

REPO = Path(__file__).resolve().parents[1]

JOB = textwrap.dedent("""
    import json, os, sys, time
    from types import SimpleNamespace
    sys.path.insert(0, {repo!r})
    from neuromoe import smk
    from neuromoe.errors import InputError

    class Log(list):
        def __init__(self, items):
            super().__init__(v for _, v in items)
            self._items = items
        def items(self):
            return list(self._items)

    class Wildcards(dict):
        __getattr__ = dict.__getitem__

    snakemake = SimpleNamespace(log=Log([("log", "toy.log"), ("benchmark", "toy.tsv")]),
                                threads=int(os.environ.get("TOY_THREADS", 1)), rule="toy",
                                wildcards=Wildcards(subject="07"))

    def main(s):
        with open("toy.json", "w") as fh:
            json.dump({{"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
                       "var": os.environ.get("TOY_VAR"), "argv": sys.argv[1:]}}, fh)
        print("hello from the job", flush=True)
        if sys.argv[1] == "fail":
            raise InputError("the toy input is bad", subject="sub-07", path="toy.nii.gz", fix="give a good one")
        if sys.argv[1] == "sleep":
            time.sleep(120)

    smk.run(snakemake, main)
""")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A private worker folder and the job's environment (worker asked for, as the Snakefile's onstart sets)."""
    return {**os.environ, "NEUROMOE_WORKER": "1", "NEUROMOE_WORKER_DIR": str(tmp_path / "w"), "TOY_VAR": "x",
            "NEUROMOE_WORKER_IDLE": "20"}


@pytest.fixture
def job(tmp_path: Path) -> Path:
    (tmp_path / "job" / ".snakemake" / "scripts").mkdir(parents=True)
    script = tmp_path / "job" / ".snakemake" / "scripts" / "tmp123.toy.py"
    script.write_text(JOB.format(repo=str(REPO)))
    return script


def start_server(env: dict, preload: tuple[str, ...] = ("json",), watch: Path | None = None,
                 pythonpath: str = "") -> subprocess.Popen:
    path = Path(env["NEUROMOE_WORKER_DIR"]) / worker.socket_path("preproc").name
    watch = str(watch or REPO / "neuromoe")
    code = (f"import sys, pathlib; sys.path[:0] = [{str(REPO)!r}, {pythonpath!r}]; from neuromoe import worker; "
            f"worker.serve({str(path)!r}, {preload!r}, idle_s=20, watch=pathlib.Path({watch!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(200):
        if path.is_socket():
            return proc
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        time.sleep(0.05)
    raise AssertionError("the server did not start")


def run_job(script: Path, mode: str, env: dict) -> tuple[subprocess.CompletedProcess, dict]:
    folder = script.parents[2]  # the job runs in the workflow's folder, its script under .snakemake/scripts
    done = subprocess.run([sys.executable, str(script), mode], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=60)
    return done, json.loads((folder / "toy.json").read_text())


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)


def test_a_job_handed_to_the_worker_runs_in_its_fork_with_its_own_stdio_folder_environment_and_log(job, env):
    server = start_server(env)
    try:
        done, seen = run_job(job, "ok", env)
        assert done.returncode == 0, done.stderr
        assert seen["ppid"] == server.pid  # a fork of the server ran it, not the script's interpreter
        assert seen["cwd"] == str(job.parents[2]) and seen["var"] == "x" and seen["argv"] == ["ok"]
        assert "hello from the job" in done.stdout  # the job's own stdout, passed to the fork
        log = (job.parents[2] / "toy.log").read_text()
        assert "rule toy, sub-07: start (threads=1, a fork of worker" in log and "done in" in log
        bench = (job.parents[2] / "toy.tsv").read_text().splitlines()
        assert bench[1].split("\t")[-1] == "ok"
    finally:
        stop(server)


def test_a_failing_job_fails_the_same_way_with_and_without_the_worker(job, env):
    server = start_server(env)
    try:
        results = {}
        for mode in ("1", "0"):
            done, seen = run_job(job, "fail", {**env, "NEUROMOE_WORKER": mode})
            results[mode] = (done.returncode, done.stderr.replace(str(seen["pid"]), "PID"))
            assert (seen["ppid"] == server.pid) == (mode == "1")
            assert (job.parents[2] / "toy.tsv").read_text().splitlines()[1].endswith("failed")
        assert results["1"] == results["0"]
        assert results["1"][0] == 1 and "rule toy, sub-07 failed" in results["1"][1] and "toy input is bad" in \
            results["1"][1]
    finally:
        stop(server)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_job_killed_by_snakemake_takes_its_fork_with_it(job, env, how):
    server = start_server(env)
    try:
        client = subprocess.Popen([sys.executable, str(job), "sleep"], cwd=job.parents[2], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(400):
            if (job.parents[2] / "toy.json").exists():
                break
            time.sleep(0.05)
        time.sleep(0.2)
        fork = json.loads((job.parents[2] / "toy.json").read_text())["pid"]
        assert fork != client.pid
        client.send_signal(how)  # SIGTERM: passed on to the fork; SIGKILL: the server sees the script gone
        assert client.wait(timeout=20) != 0
        for _ in range(200):
            try:
                os.kill(fork, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the fork {fork} outlived its job's script")
    finally:
        stop(server)


def test_the_worker_refuses_jobs_once_its_code_changed_and_stops(job, env, tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "toymod.py").write_text("X = 1\n")
    server = start_server(env, preload=("toymod",), watch=pkg, pythonpath=str(pkg))
    try:
        _, seen = run_job(job, "ok", env)
        assert seen["ppid"] == server.pid
        (pkg / "toymod.py").write_text("X = 2\n")
        os.utime(pkg / "toymod.py", ns=(time.time_ns() + 10**9,) * 2)
        done, seen = run_job(job, "ok", {**env, "NEUROMOE_WORKER_IDLE": "1"})
        assert done.returncode == 0 and seen["ppid"] != server.pid  # ran in its own interpreter
        assert server.wait(timeout=20) == 0  # and the stale server stopped
    finally:
        if server.poll() is None:
            stop(server)


def test_with_no_server_the_job_runs_itself_and_starts_one_for_the_next(job, env):
    env = {**env, "NEUROMOE_WORKER_IDLE": "5"}  # long enough for the second job to connect on a busy machine
    done, seen = run_job(job, "ok", env)
    assert done.returncode == 0 and seen["pid"] != seen["ppid"]
    sock = Path(env["NEUROMOE_WORKER_DIR"]) / worker.socket_path("preproc").name
    for _ in range(2400):  # it imports the preprocessing modules first (a few seconds; 2 min on a busy machine)
        if sock.is_socket():
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no server was started")
    done, seen = run_job(job, "ok", env)
    log = Path(f"{sock}.log").read_text()
    assert f"[{seen['ppid']}] serving" in log  # the second job ran in a fork of that server
    for _ in range(1200):  # idle for NEUROMOE_WORKER_IDLE: it stops and removes its socket
        if not sock.exists():
            break
        time.sleep(0.05)
    assert not sock.exists()


def test_only_local_jobs_of_one_thread_ask_for_the_worker(monkeypatch, job):
    assert worker.enabled(True, True, {}) == "1"
    assert worker.enabled(True, True, {"NEUROMOE_WORKER": "0"}) == "0"  # the user's off switch
    assert worker.enabled(False, True, {}) == "0"  # a cluster run's jobs
    assert worker.enabled(True, False, {}) == "0"  # a cluster job's own Snakemake
    assert worker.enabled(True, True, {}, containers=True) == "0"  # --use-apptainer
    monkeypatch.setenv("NEUROMOE_WORKER", "1")
    monkeypatch.setattr(sys, "argv", [str(job)])
    assert worker.wanted(1) and not worker.wanted(2)
    monkeypatch.setattr(sys, "argv", [__file__])  # not a Snakemake job's script (pytest here, say): never
    assert not worker.wanted(1)
    monkeypatch.setattr(sys, "argv", [str(job)])
    monkeypatch.setenv("NEUROMOE_WORKER", "0")
    assert not worker.wanted(1)


def test_a_folder_others_can_write_is_never_used(job, env, tmp_path):
    """The job hands its environment and stdio to whatever listens there: not in a folder open to others."""
    server = start_server(env)
    try:
        os.chmod(env["NEUROMOE_WORKER_DIR"], 0o777)
        done, seen = run_job(job, "ok", env)
        assert done.returncode == 0 and seen["ppid"] != server.pid  # ran in its own interpreter
        os.chmod(env["NEUROMOE_WORKER_DIR"], 0o700)
        _, seen = run_job(job, "ok", env)
        assert seen["ppid"] == server.pid
    finally:
        stop(server)

