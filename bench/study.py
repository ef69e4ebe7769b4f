"""Benchmark: `make study` (the full ablation) on a clone, timed in sittings of at most ``--part-minutes``.

usage: python bench/study.py [--workdir /tmp/study-bench] [--part-minutes 45] [--venv .venv] [--cores 2]
                             [--out bench/results/study.json]

The study is longer than one sitting on 2 cores, so this runs it the way a user would: ``make study`` for at
most ``--part-minutes``, then an interrupt (SIGINT: Snakemake stops its running jobs and leaves no lock), then
the same command again in the next call, until it finishes (``--rerun-incomplete`` redoes the interrupted
jobs). Each call is one part; call it again until it prints "finished". The first call clones this
repository's committed HEAD into ``--workdir`` (later calls reuse that clone, so a part never mixes code).
``--venv``: an installed environment to use (``make -o install``; ``bench/demo.py`` times the install).

Written after every part: ``parts`` (wall seconds, minutes allowed, whether it finished, Snakemake's last
progress line), ``wall_s`` (their sum: the study's time on this machine), and when finished ``disk_bytes``,
``report_bytes``, the per-rule CPU and wall sums from the jobs' benchmark records and the ablation table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
DEFAULT_OUT = ROOT / "bench" / "results" / "study.json"
PROGRESS = re.compile(r"^(\d+) of (\d+) steps \((\d+%)\) done", re.M)


def last_progress(log_text: str) -> str | None:
    """Snakemake's last "N of M steps (P%) done" line of a part, None when it ran no job."""
    found = PROGRESS.findall(log_text)
    return "{} of {} steps ({}) done".format(*found[-1]) if found else None


def _default_sigint() -> None:
    # A shell without job control starts background commands (nohup ... &) with SIGINT ignored, and children
    # inherit that: Snakemake would never see the interrupt. Give the part its default SIGINT back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_part(cmd: list[str], cwd: Path, log: Path, limit_s: float) -> tuple[float, bool]:
    """Run ``cmd`` for at most ``limit_s``; then SIGINT its process group and wait for a clean stop (Snakemake
    removes its lock and marks the running jobs incomplete). Returns (wall seconds, finished)."""
    t0 = time.perf_counter()
    with log.open("a") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_sigint)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return time.perf_counter() - t0, False
    if rc:
        sys.exit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0, True


def main() -> None:
    from _machine import machine
    from demo import du, rule_seconds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/study-bench"))
    ap.add_argument("--part-minutes", type=float, default=45.0)
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    clone = args.workdir / "neuromoe"
    state_path = args.workdir / "parts.json"
    if not clone.exists():
        args.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        state_path.unlink(missing_ok=True)
    state = json.loads(state_path.read_text()) if state_path.exists() else {"parts": []}
    if state["parts"] and state["parts"][-1]["finished"]:
        print(f"finished already: {state['wall_s'] / 60:.1f} min in {len(state['parts'])} parts -> {args.out}")
        return
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    k = len(state["parts"]) + 1
    log = args.workdir / f"study_part{k}.log"
    cmd = ["make", "-o", "install", f"VENV={args.venv.resolve()}", f"CORES={args.cores}", "study"]
    meta = machine()
    if state["parts"]:  # a part stopped by force leaves Snakemake's lock behind (README: Rerunning a stage)
        subprocess.run([str(args.venv.resolve() / "bin" / "snakemake"), "--unlock", "--cores", "1",
                        "--configfile", "presets/study.yaml"], cwd=clone, capture_output=True, check=False)
    print(f"part {k}: {' '.join(cmd)} for at most {args.part_minutes:g} min (log: {log})", flush=True)
    wall, finished = run_part(cmd, clone, log, args.part_minutes * 60)
    state["parts"].append({"part": k, "wall_s": round(wall, 1), "limit_min": args.part_minutes,
                           "finished": finished, "progress": last_progress(log.read_text()),
                           "loadavg_1min_at_start": meta.get("loadavg_1min"),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - wall))})
    state.update({"wall_s": round(sum(p["wall_s"] for p in state["parts"]), 1), "cores": args.cores,
                  "git_commit": commit, "machine": meta, "finished": finished})
    out_dir = clone / "study"
    if finished:
        state.update({"disk_bytes": (d := du(clone / "data")) + (r := du(out_dir)), "data_bytes": d,
                      "results_bytes": r, "report_bytes": (out_dir / "report.zip").stat().st_size,
                      "rules": rule_seconds(out_dir),
                      "ablation_md": (out_dir / "evaluation" / "ablation.md").read_text()})
    state_path.write_text(json.dumps(state, indent=1) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(state, indent=1) + "\n")
    print(f"part {k}: {wall / 60:.1f} min, {'finished' if finished else 'interrupted: run again to go on'}; "
          f"study so far {state['wall_s'] / 60:.1f} min -> {args.out}")


if __name__ == "__main__":
    main()
