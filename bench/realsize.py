"""Benchmark: one subject at clinical size through the workflow's per-subject rules (issue 23, item 4).

usage: python bench/realsize.py [--size clinical|medium|small] [--small] [--cores 2] [--threads 1]
                                [--registration nonlinear|affine] [--workdir /tmp/realsize-bench] [--keep]
                                [--out bench/results/realsize.json]

Writes one synthetic subject with the repository's generator at the size asked (``clinical``: T1w 1 mm,
about 181 x 214 x 182; DWI 2 mm, 2 b=0 + 64 directions, about 91 x 108 x 85 x 66; BOLD 3 mm, 300 volumes + 4 dummy
scans, about 61 x 72 x 57 x 304), and a second subject, ``scanner_fov``, that is the same subject
with its T1w zero-padded, centred, to a scanner's field of view (192 x 256 x 256 mm: 192 x 256 x 256 voxels at
1 mm), the affine shifted so that every voxel keeps its place in the world. Padding with zeros is what a
scanner's larger field of view adds here: the generator writes air as 0 (``SynthParams.zero_air``).

Each subject is then run through the real Snakefile one stage at a time, each a fresh ``snakemake --until
<rule> participant`` on that subject (anat, dwi, func, then cache_subject), and per stage the script records:

* ``wall_s``: the Snakemake command (its start-up, the DAG and the job); ``job_s``: the job's own record;
* ``peak_rss_mb``: the peak of the summed RSS of every process under Snakemake (the job and anything it runs),
  sampled with psutil every 0.1 s; ``peak_tree_rss_mb`` adds Snakemake's own process;
* ``max_rss_getrusage_mb``: the peak of the command's largest single process, Snakemake or a job (``wait4``:
  exact, no sampling; started from a bare launcher, since Linux carries a process's peak RSS across exec);
* ``benchmark_file_max_rss_mb``: what the workflow's benchmark record says (``results/benchmarks/<rule>/``).
  Those records come from the job's own ``getrusage`` (``neuromoe.smk.write_benchmark``); Snakemake's
  ``benchmark:`` poller, which the project no longer uses, samples every 30 s after a job's first 15 s and
  read 1.27 GB for a func job whose real peak was 2.8 GB (issue 23). The two columns sit side by side so
  that any gap shows;
* ``estimate``: the rule's resources as the workflow computes them from the inputs' headers
  (``neuromoe.preproc.resources``), and whether they cover the measured peak and wall time.

Plus, per subject, ``total_wall_s``, ``peak_rss_mb`` (the largest stage), the image shapes and its disk use
(raw inputs, derivatives, cache entry), and for the run ``cores``, ``threads`` and ``machine``. The issue's
acceptance target (the clinical-size subject's stages <= 120 s wall in all, here run one after another, and <= 4 GB
peak on 2 cores) is checked and printed, the scanner field of view's beside it (``met_per_subject``).
``--no-scanner-fov``: the head-cropped subject only.

``--small`` (= ``--size small``, the demo's coarse acquisition) checks the script end to end in about a minute;
``--size medium`` is the second calibration size of ``neuromoe.preproc.resources``. Run the clinical size on a
quiet machine: it takes the cores it is given for about 10 minutes (``machine.loadavg_1min`` records the load).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"
SEED = 7
STAGES = ("anat", "dwi", "func", "cache_subject")
SCANNER_FOV_MM = (192.0, 256.0, 256.0)  # a sagittal 3D T1w's field of view (x, y, z)
LIMIT_WALL_S, LIMIT_RSS_MB = 120.0, 4096.0  # issue 23's acceptance target, on 2 cores
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(t1_voxel_mm=2.5, dwi_voxel_mm=4.0, bold_voxel_mm=5.0, n_directions=12, n_bold=60),  # the demo's
    "medium": dict(t1_voxel_mm=1.5, dwi_voxel_mm=2.5, bold_voxel_mm=3.0, n_directions=48, n_bold=150),
    "clinical": dict(t1_voxel_mm=1.0, dwi_voxel_mm=2.0, bold_voxel_mm=3.0, n_directions=64, n_bold=300),
}


def du(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when absent)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def pad_to_fov(t1w: Path, fov_mm: tuple[float, float, float] = SCANNER_FOV_MM) -> tuple[int, ...]:
    """Zero-pad the T1w at ``t1w`` in place, centred, to ``fov_mm`` (never cropped); the affine is shifted so that
    each voxel keeps its world position. Returns the new shape."""
    import nibabel as nib
    import numpy as np

    img = nib.load(t1w)
    data = np.asanyarray(img.dataobj)  # the stored integers: no scaling round trip
    zooms = np.abs(np.asarray(img.header.get_zooms()[:3], dtype=float))
    target = [max(n, int(np.ceil(f / z - 1e-6))) for n, f, z in zip(data.shape[:3], fov_mm, zooms, strict=True)]
    before = [(t - n) // 2 for t, n in zip(target, data.shape[:3], strict=True)]
    padded = np.pad(data, [(b, t - n - b) for b, t, n in zip(before, target, data.shape[:3], strict=True)])
    shift = np.eye(4)
    shift[:3, 3] = -np.asarray(before, dtype=float)  # new voxel i is old voxel i - before
    hdr = img.header.copy()
    out = nib.Nifti1Image(padded, img.affine @ shift, header=hdr)
    out.set_qform(img.affine @ shift, code=int(hdr["qform_code"]) or 1)
    out.set_sform(img.affine @ shift, code=int(hdr["sform_code"]) or 1)
    nib.save(out, t1w)
    return tuple(int(s) for s in padded.shape)


def write_config(wd: Path, bids: Path, registration: str = "nonlinear") -> Path:
    """The repository's config.yaml pointed at ``bids``, outputs in ``wd/results``, no cohort generation,
    T1w -> MNI by ``registration`` (default: the workflow's default; config.yaml's demo sets affine)."""
    wd.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "config.yaml").read_text()
    text = re.sub(r"(?m)^bids_dir:.*$", f"bids_dir: {bids}", text)
    text = re.sub(r"(?m)^output_dir:.*$", "output_dir: results", text)
    text = re.sub(r"(?m)^(\s+generate:)\s*true", r"\1 false", text)
    text, n = re.subn(r"(?m)^(\s+registration:)\s*\w+", rf"\1 {registration}", text)
    if n != 1:
        raise SystemExit("realsize: config.yaml has no preprocessing.anat.registration line to set")
    (wd / "config.yaml").write_text(text)
    return wd / "config.yaml"


# Runs the command in a forked child and reports the child's rusage. The child's ru_maxrss would otherwise start
# at this script's own RSS: Linux keeps a process's peak across exec, and the bench has numpy and torch loaded.
LAUNCHER = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"maxrss_kib": usage.ru_maxrss, "user_s": usage.ru_utime, "sys_s": usage.ru_stime}, fh)
sys.exit(os.waitstatus_to_exitcode(status))
"""


class TreeSampler(threading.Thread):
    """Peaks of the summed RSS under the launcher ``pid``: of Snakemake's descendants (its jobs and anything they
    run) and of Snakemake with them, polled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_jobs = self.peak_tree = 0
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        def rss(procs: list[psutil.Process]) -> int:
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:  # ended between the listing and the read
                    pass
            return total

        try:
            launcher = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        snakemake = None
        while not self.stop.is_set():
            try:
                if snakemake is None:
                    kids = launcher.children()
                    snakemake = kids[0] if kids else None
                if snakemake is not None:
                    jobs = rss(snakemake.children(recursive=True))
                    own = snakemake.memory_info().rss
                    self.peak_jobs, self.peak_tree = max(self.peak_jobs, jobs), max(self.peak_tree, jobs + own)
                    self.samples += 1
            except psutil.NoSuchProcess:
                return
            self.stop.wait(self.interval)


def run_measured(cmd: list[str], cwd: Path, log: Path) -> dict[str, Any]:
    """Run ``cmd``; its wall seconds, the sampled peaks and the exact peak of its largest process (``wait4``)."""
    usage = log.with_suffix(".rusage.json")
    # Each job in its own interpreter, as on a cluster: a job the local worker forks (neuromoe/worker.py) runs
    # outside Snakemake's process tree, where this sampler looks, and its memory is what mem_mb must cover.
    env = {**os.environ, "NEUROMOE_WORKER": "0"}
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(usage), *cmd], cwd=cwd, stdout=fh,
                                stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed after {wall:.0f} s (exit {proc.returncode}); see {log}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(sampler.peak_jobs / 2**20, 1),
            "peak_tree_rss_mb": round(sampler.peak_tree / 2**20, 1),
            "max_rss_getrusage_mb": round(json.loads(usage.read_text())["maxrss_kib"] / 1024, 1),
            "samples": sampler.samples}


def benchmark_record(results: Path, rule: str, unit: str) -> dict[str, float]:
    path = results / "benchmarks" / rule / f"{unit}.tsv"
    rows = list(csv.DictReader(path.open(), delimiter="\t")) if path.exists() else []
    if not rows:
        return {}
    return {"job_s": float(rows[-1]["s"]), "benchmark_file_max_rss_mb": float(rows[-1]["max_rss"])}


def stage_estimate(stage: str, bids: Path, subject: str) -> dict[str, Any] | None:
    """The rule's resources as the workflow sizes them (attempt 1), from the subject's raw images."""
    from neuromoe import paths
    from neuromoe.preproc.resources import STAGE_IMAGE, job_estimate

    if stage not in STAGE_IMAGE:
        return None
    image = paths.raw(bids, subject, {"anat": "T1w", "dwi": "dwi", "func": "bold"}[stage])
    t1w = None if stage == "anat" else paths.raw(bids, subject, "T1w")
    return asdict(job_estimate(stage, image, t1w))


def shapes(bids: Path, subject: str) -> dict[str, list[int]]:
    import nibabel as nib

    from neuromoe import paths

    return {k: list(nib.load(paths.raw(bids, subject, k)).shape) for k in ("T1w", "dwi", "bold")}


def run_subject(name: str, bids: Path, wd: Path, cores: int, threads: int,
                stages: tuple[str, ...] = STAGES, registration: str = "nonlinear") -> dict[str, Any]:
    """The per-subject ``stages`` (every one by default) of the one subject in ``bids``, one Snakemake run
    each, measured."""
    snakemake = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    config = write_config(wd, bids, registration)
    results = wd / "results"
    records: dict[str, Any] = {}
    for stage in stages:
        cmd = [snakemake, "participant", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(wd),
               "--configfile", str(config), "--cores", str(cores), "--until", stage]
        if threads != 1:
            cmd += ["--set-threads", *(f"{s}={threads}" for s in STAGES)]
        rec = run_measured(cmd, wd, wd / f"{stage}.log")
        rec.update(benchmark_record(results, stage, "sub-01"))
        est = stage_estimate(stage, bids, "01")
        if est is not None:
            est["covers_peak"] = est["mem_mb"] >= rec["peak_rss_mb"]
            est["covers_wall"] = est["runtime_min"] * 60 >= rec["wall_s"]
            rec["estimate"] = est
        records[stage] = rec
        print(f"  {name} {stage:13s} {rec['wall_s']:7.1f} s (job {rec.get('job_s', float('nan')):6.1f} s)  "
              f"peak {rec['peak_rss_mb']:7.0f} MB (tree {rec['peak_tree_rss_mb']:.0f}, largest process "
              f"{rec['max_rss_getrusage_mb']:.0f}, benchmark file {rec.get('benchmark_file_max_rss_mb', 0):.0f})"
              + (f"  estimate {est['mem_mb']} MB / {est['runtime_min']} min" if est else ""), flush=True)
    deriv, cache = results / "derivatives" / "neuromoe" / "sub-01", results / "cache" / "subjects" / "sub-01"
    disk = {"raw_bytes": du(bids / "sub-01"), "derivatives_bytes": du(deriv), "cache_bytes": du(cache)}
    disk["per_subject_bytes"] = disk["derivatives_bytes"] + disk["cache_bytes"]
    return {"shapes": shapes(bids, "01"), "stages": records,
            "total_wall_s": round(sum(s["wall_s"] for s in records.values()), 1),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in records.values()), "disk": disk}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="clinical")
    ap.add_argument("--small", action="store_true", help="the demo's coarse images: a quick end-to-end check")
    ap.add_argument("--cores", type=int, default=2, help="Snakemake --cores")
    ap.add_argument("--threads", type=int, default=1, help="threads per job (the rules' own: 1)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/realsize-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the working folder (cohorts and outputs)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="run only these stages, in the workflow's order (a quick check of the script)")
    ap.add_argument("--registration", choices=["nonlinear", "affine"], default="nonlinear",
                    help="preprocessing.anat.registration (default: the workflow's default, nonlinear)")
    ap.add_argument("--no-scanner-fov", action="store_true",
                    help="only the head-cropped subject (the suite's quick check: pad_to_fov has its own test)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default bench/results/realsize.json; realsize_<size>.json for others)")
    args = ap.parse_args(argv)
    size = "small" if args.small else args.size
    out = args.out or RESULTS / ("realsize.json" if size == "clinical" else f"realsize_{size}.json")
    from _machine import machine

    from neuromoe.inputs.synth import SynthParams, make_cohort

    meta = machine()  # before the benchmark adds its own load
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    params = SynthParams(**SIZES[size])
    t0 = time.perf_counter()
    bids = make_cohort(args.workdir / "bids", 1, seed=SEED, params=params)
    synth_s = time.perf_counter() - t0
    fov_bids, fov_shape = args.workdir / "bids_fov", None
    if not args.no_scanner_fov:
        shutil.copytree(bids, fov_bids, ignore=shutil.ignore_patterns("derivatives"))  # truth: the old grid
        fov_shape = pad_to_fov(fov_bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    print(f"{size}: subject written in {synth_s:.0f} s; scanner-FOV T1w {fov_shape}", flush=True)

    stages = tuple(s for s in STAGES if s in args.stages)
    subjects = {"template_fov": run_subject("subject", bids, args.workdir / "run", args.cores, args.threads,
                                            stages, args.registration)}
    if not args.no_scanner_fov:
        subjects["scanner_fov"] = run_subject("fov", fov_bids, args.workdir / "run_fov", args.cores, args.threads,
                                              stages, args.registration)
    main_subject = subjects["template_fov"]
    record = {
        "benchmark": "one subject through the per-subject rules (anat, dwi, func, cache_subject), one Snakemake "
                     "run per stage; RSS sampled over the process tree every 0.1 s",
        "size": size, "params": SIZES[size], "seed": SEED, "stages_run": list(stages),
        "registration": args.registration,
        "cores": args.cores, "threads": args.threads,
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "synth_s": round(synth_s, 1),
        "stages": main_subject["stages"], "total_wall_s": main_subject["total_wall_s"],
        "peak_rss_mb": main_subject["peak_rss_mb"],
        "disk_bytes_per_subject": main_subject["disk"]["per_subject_bytes"],
        "subjects": subjects,
        "scanner_fov_note": None if fov_shape is None else
        f"the same subject, T1w zero-padded (centred, affine shifted) to {SCANNER_FOV_MM} mm = {list(fov_shape)} "
        "voxels; the generator writes air as 0, so padding adds only air",
        # the target: the clinical-size subject (every stage, here one after another) within the limits;
        # the scanner field of view is recorded beside it ("met" per subject)
        "acceptance": {"max_total_wall_s": LIMIT_WALL_S, "max_peak_rss_mb": LIMIT_RSS_MB, "cores": 2,
                       "subject": "template_fov",
                       "met": main_subject["total_wall_s"] <= LIMIT_WALL_S
                       and main_subject["peak_rss_mb"] <= LIMIT_RSS_MB,
                       "met_per_subject": {name: sub["total_wall_s"] <= LIMIT_WALL_S
                                           and sub["peak_rss_mb"] <= LIMIT_RSS_MB for name, sub in subjects.items()}},
        "machine": meta,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    for name, sub in subjects.items():
        print(f"{name}: T1w {sub['shapes']['T1w']}, DWI {sub['shapes']['dwi']}, BOLD {sub['shapes']['bold']}: "
              f"{sub['total_wall_s']:.0f} s in all, peak {sub['peak_rss_mb']:.0f} MB, "
              f"{sub['disk']['per_subject_bytes'] / 1e6:.1f} MB of derivatives + cache "
              f"(raw {sub['disk']['raw_bytes'] / 1e6:.1f} MB)")
    per = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in record["acceptance"]["met_per_subject"].items())
    print(f"acceptance (the clinical subject's stages <= {LIMIT_WALL_S:.0f} s in all, <= {LIMIT_RSS_MB:.0f} MB): "
          f"{'met' if record['acceptance']['met'] else 'NOT met'} ({per}) -> {out}")
    if not args.keep:
        shutil.rmtree(args.workdir)
    return record


if __name__ == "__main__":
    main()
