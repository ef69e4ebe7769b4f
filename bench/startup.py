"""Benchmark: start-up on large datasets, with and without sessions (issue 21).

usage: python bench/startup.py [--subjects 1000 5000] [--sessions 1 2] [--workdir /tmp/startup-bench]
                               [--peer-python PY] [--out bench/results/startup.json]

Per (subjects, sessions) a BIDS tree of that size is built from symbolic links to a 9-subject synthetic cohort
(the repository's generator, the demo's coarse acquisition: real headers, gradient tables and sidecars; only
the start-up reads them), then timed the way a user meets it, each in a fresh process:

* ``neuromoe validate`` (imports, discovery, every header / gradient / sidecar check);
* ``snakemake -n`` of the default target (config, validation, the whole DAG): wall seconds, jobs, peak RSS.

``--peer-python``: a Python with ``bids2table`` and/or ``pybids`` installed (not dependencies of this project)
to time their indexing of the same trees, for the README's choice of index. Results are merged into the
results file per (subjects, sessions), so the sizes can be run in separate sittings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DEFAULT_OUT = ROOT / "bench" / "results" / "startup.json"
SEED_SUBJECTS = 9
PEER = r"""
import sys, time
root, which = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if which == "bids2table":
    import bids2table
    n = bids2table.index_dataset(root).num_rows
else:
    import bids
    n = len(bids.BIDSLayout(root, validate=False).get())
print(f"{time.perf_counter() - t:.3f} {n}")
"""


def seed_cohort(work: Path) -> Path:
    """The 9 real subjects every tree links to (written once)."""
    from neuromoe.inputs.synth import SynthParams, make_cohort

    bids = work / "seed_bids"
    if not (bids / "participants.tsv").exists():
        make_cohort(bids, SEED_SUBJECTS, seed=7, params=SynthParams(t1_voxel_mm=2.5, dwi_voxel_mm=4.0,
                    bold_voxel_mm=5.0, n_directions=12, n_bold=60), n_jobs=2)
    return bids


def link_tree(src: Path, dst: Path, n: int, sessions: int) -> Path:
    """``n`` subjects (``sessions`` each; 1: no ses- folders) whose files link to ``src``'s subjects in turn (a
    single-session cohort)."""
    if (dst / "participants.tsv").exists():
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "participants.tsv":
            shutil.copy2(f, dst / f.name)
    part = pd.read_csv(src / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    seeds = sorted(p.name.removeprefix("sub-") for p in src.glob("sub-*"))
    rows = []
    for k in range(1, n + 1):
        s, base = f"{k:05d}", seeds[(k - 1) % len(seeds)]
        row = part[part["participant_id"] == f"sub-{base}"].iloc[0].copy()
        row["participant_id"] = f"sub-{s}"
        rows.append(row)
        for ses in ([None] if sessions == 1 else [str(i) for i in range(1, sessions + 1)]):
            for datatype in ("anat", "dwi", "func"):
                out = dst / f"sub-{s}" / (f"ses-{ses}" if ses else "") / datatype
                out.mkdir(parents=True)
                for f in (src / f"sub-{base}" / datatype).iterdir():
                    os.symlink(f, out / f.name.replace(f"sub-{base}_", f"sub-{s}_" + (f"ses-{ses}_" if ses else "")))
    pd.DataFrame(rows).to_csv(dst / "participants.tsv", sep="\t", index=False)
    return dst


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, combined output) of one fresh process (GNU time reads the peak)."""
    t = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    text = run.stdout + run.stderr
    if run.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    peak = re.findall(r"^PEAK_KB (\d+)", text, re.M)
    return wall, int(peak[-1]) / 1024 if peak else float("nan"), text


def measure(work: Path, bids: Path, peer: str | None) -> dict:
    wf = work / f"wf_{bids.name}"
    wf.mkdir(exist_ok=True)
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg.update(bids_dir=str(bids), output_dir=str(wf / "results"))
    cfg["synthetic"]["generate"] = False
    (wf / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    bin_dir = Path(sys.executable).parent
    rec: dict = {}
    rec["validate_s"], rec["validate_peak_mb"], _ = timed(
        [str(bin_dir / "neuromoe"), "validate", "--config", str(wf / "config.yaml")], wf)
    wall, peak, text = timed([str(bin_dir / "snakemake"), "--snakefile", str(ROOT / "Snakefile"), "--directory",
                              str(wf), "--configfile", str(wf / "config.yaml"), "-n", "--cores", "2"], wf)
    jobs = re.search(r"^total\s+(\d+)", text, re.M)
    rec.update(dry_run_s=round(wall, 2), dry_run_jobs=int(jobs.group(1)) if jobs else None,
               dry_run_peak_mb=round(peak, 1))
    rec["validate_s"] = round(rec["validate_s"], 2)
    rec["validate_peak_mb"] = round(rec["validate_peak_mb"], 1)
    if peer:
        for lib in ("bids2table", "pybids"):
            run = subprocess.run([peer, "-c", PEER, str(bids), lib], capture_output=True, text=True)
            if run.returncode == 0:
                secs, n = run.stdout.split()
                rec[f"{lib}_index_s"], rec[f"{lib}_files"] = round(float(secs), 2), int(n)
    return rec


def main() -> None:
    from _machine import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/startup-bench"))
    ap.add_argument("--peer-python", default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = seed_cohort(args.workdir)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    for n in args.subjects:
        for ses in args.sessions:
            bids = link_tree(src, args.workdir / f"bids_n{n}_ses{ses}", n, ses)
            meta = machine()
            rec = {"subjects": n, "sessions": ses, **measure(args.workdir, bids, args.peer_python),
                   "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                text=True).stdout.strip(),
                   "loadavg_1min_at_start": meta["loadavg_1min"]}
            print(json.dumps(rec), flush=True)
            results["runs"] = [r for r in results["runs"] if (r["subjects"], r["sessions"]) != (n, ses)] + [rec]
            results["runs"].sort(key=lambda r: (r["subjects"], r["sessions"]))
            results["machine"] = {k: v for k, v in meta.items() if k != "loadavg_1min"}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
