"""Benchmark: `make demo` on a fresh clone, timed end to end (issue 20).

usage: python bench/demo.py [--workdir /tmp/demo-bench] [--out bench/results/demo.json] [--cores 2]

Clones this repository (its committed HEAD) into ``--workdir``, then times, as a new user meets them:
``make install`` (a new virtual environment; pip's cache as this machine has it), ``make demo`` (synthesise the
cohort, preprocess every subject, cache, train, evaluate, explain, report), and a second, unchanged
``make demo`` (must do nothing but say where the report is). Writes ``wall_s`` (the first ``make demo``),
``install_s``, ``noop_s``, ``disk_bytes`` (the cohort and every output: ``data/`` + ``results/``; the
virtual environment apart, as ``venv_bytes``), ``report_bytes`` (the zip), the per-rule CPU and wall sums
from the workflow's benchmark files, the demo's own table, ``cores`` and ``machine``. A run takes the
machine's cores for its whole length: run it on a quiet machine (``machine.loadavg_1min`` records the load
at the start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
DEFAULT_OUT = ROOT / "bench" / "results" / "demo.json"


def du(path: Path) -> int:
    """Bytes of the files under ``path`` (hard links counted once), 0 when absent."""
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        res = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed after {seconds:.0f} s (exit {res.returncode}); see {log}")
    print(f"{' '.join(cmd)}: {seconds:.0f} s (log: {log})", flush=True)
    return seconds


def rule_seconds(results: Path) -> dict[str, dict[str, float]]:
    """Per rule: jobs, summed wall and CPU seconds, from the workflow's benchmark files."""
    import csv

    out: dict[str, dict[str, float]] = {}
    for f in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = f.relative_to(results / "benchmarks").parts[0].removesuffix(".tsv")
        rows = list(csv.DictReader(f.open(), delimiter="\t"))
        if not rows:
            continue
        r = out.setdefault(rule, {"jobs": 0, "wall_s": 0.0, "cpu_s": 0.0})
        r["jobs"] += 1
        r["wall_s"] += float(rows[-1]["s"])
        try:
            r["cpu_s"] += float(rows[-1]["cpu_time"])
        except (KeyError, ValueError):
            pass
    return {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/demo-bench"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    from _machine import machine

    meta = machine()
    clone = args.workdir / "neuromoe"
    if clone.exists():
        shutil.rmtree(clone)
    args.workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    make = ["make", f"CORES={args.cores}"]
    logs = args.workdir
    install_s = timed([*make, "install"], clone, logs / "install.log")
    wall_s = timed([*make, "demo"], clone, logs / "demo.log")
    noop_s = timed([*make, "demo"], clone, logs / "demo_again.log")
    again = (logs / "demo_again.log").read_text()
    results = clone / "results"
    table = (results / "evaluation" / "ablation.md").read_text()
    entry = {
        "wall_s": round(wall_s, 1), "install_s": round(install_s, 1), "noop_s": round(noop_s, 1),
        "noop_ran_jobs": "Nothing to be done" not in again,
        "disk_bytes": (data_bytes := du(clone / "data")) + (results_bytes := du(results)),
        "data_bytes": data_bytes, "results_bytes": results_bytes, "venv_bytes": du(clone / ".venv"),
        "report_bytes": (results / "report.zip").stat().st_size,
        "cores": args.cores, "git_commit": commit, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rules": rule_seconds(results), "ablation_md": table, "machine": meta,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(entry, indent=1) + "\n")
    print(table)
    print(f"make demo: {wall_s / 60:.1f} min on {args.cores} cores (install {install_s / 60:.1f} min, unchanged "
          f"rerun {noop_s:.0f} s); disk {entry['disk_bytes'] / 1e9:.2f} GB, report "
          f"{entry['report_bytes'] / 1e6:.1f} MB -> {args.out}")


if __name__ == "__main__":
    main()
