"""Benchmark: T1w -> MNI registration measured against a known deformation (issue 23, item 2).

usage: python bench/registration.py [--subjects 10] [--shape-mm 3] [--t1-mm 1] [--seed 23]
                                    [--methods affine,bspline,nonlinear] [--threads 1]
                                    [--workdir /tmp/registration-bench] [--out bench/results/registration.json]
                                    [--ants-path DIR]

Writes a synthetic cohort whose subjects differ from the template in shape (``SynthParams(shape_mm=3)``, T1w
only: ``make_cohort(missing=...)`` leaves out DWI and BOLD), then per subject runs the anat stage as the workflow
does (``anat.brain_extraction``, then ``anat.register_to_mni`` with each method, ``initial`` the extraction's
affine) and compares the transform it returns (MNI points -> T1w points) with the truth, the pose applied to
m + u(m) (``read_truth``, ``ShapeWarp``), at the centre of every voxel of the template's brain mask (2 mm grid):

* ``error_mm``: mean, 95th percentile and maximum of the distance between the two T1w points;
* ``dice_tissue``: GM, WM and CSF (the template's probability maps, arg max, in the template's brain mask) at the
  template point the subject's T1w point comes from, taken through the estimated transform and through the truth
  (the truth's inverse maps both back: the Dice of the subject's own tissue, normalised two ways);
* ``dice_regions``: the same for the cohort design's six effect regions (``templates.roi_mask``'s definition: the
  bilateral 14 mm spheres restricted to their tissue at probability >= 0.5) and, as ``dice_spheres``, the spheres
  alone (the planted effects' support);
* ``jacobian_min`` / ``folded_voxels``: the smallest Jacobian determinant of the estimated map over the brain
  and how many brain voxels it folds (determinant <= 0);
* time: ``cpu_s`` (user + sys of the registering process, every thread: comparable on a loaded machine, unlike
  ``wall_s``) and ``wall_s`` of ``register_to_mni`` (registration and the resampling of brain and mask to MNI),
  the brain extraction's once per subject, the process's exact peak RSS (``wait4``) and the stored transform's
  size (``write_transform``).

Every job runs in its own process (one at a time) and leaves its result in the working folder, so an interrupted
run resumes where it stopped (a result made by other code, ``registration.py`` or ``anat.py`` changed since, is
computed again); the cohort is rewritten only when its parameters change. ``--methods`` takes
``affine``, ``bspline`` (the former nonlinear: affine + 40 mm B-spline), ``nonlinear`` (affine + bias-corrected
demons, ``registration.dense_warp``) and, with antspyx importable (``--ants-path`` puts a folder on sys.path; it is
not a dependency of the project), ``syn`` (ANTs' default ``SyN``: its own affine, then SyN with Mattes MI, 40 x 20 x
0 iterations) and ``syn_full`` (``SyNOnly`` from the stage's affine, 100 x 70 x 50). The results file keeps the
methods of an earlier run of the same cohort that this run did not repeat.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"
METHODS = ("affine", "bspline", "nonlinear", "syn", "syn_full")
TARGET_ERROR_MM, TARGET_DICE = 1.0, 0.85  # issue 23's acceptance for the nonlinear registration (1 mm T1w)

from realsize import LAUNCHER  # noqa: E402  (the bare launcher: exact peak RSS and CPU of the job)

# ---------------------------------------------------------------- workers (one process per job)

def _cpu() -> float:
    return time.process_time()  # user + sys of every thread of this process


def work_extract(sub: str, bids: Path, out: Path, threads: int) -> dict[str, Any]:
    import nibabel as nib

    from neuromoe.inputs.imageio import load_image
    from neuromoe.preproc import anat
    from neuromoe.preproc import registration as reg

    t1 = load_image(bids / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz", subject=f"sub-{sub}")
    c0, w0 = _cpu(), time.perf_counter()
    res = anat.brain_extraction(t1, sub, threads=threads)
    rec = {"cpu_s": round(_cpu() - c0, 2), "wall_s": round(time.perf_counter() - w0, 2),
           "steps_s": {k: round(v, 2) for k, v in res.timings.items()}}
    out.mkdir(parents=True, exist_ok=True)
    nib.save(res.brain, out / "brain.nii.gz")
    nib.save(res.mask, out / "mask.nii.gz")
    reg.write_transform(res.template_to_t1w, out / "template_to_t1w.txt")
    return rec


def work_register(sub: str, method: str, extract: Path, out: Path, threads: int) -> dict[str, Any]:
    import nibabel as nib

    from neuromoe.preproc import anat
    from neuromoe.preproc import registration as reg

    brain, mask = nib.load(extract / "brain.nii.gz"), nib.load(extract / "mask.nii.gz")
    initial = reg.read_transform(extract / "template_to_t1w.txt")
    out.mkdir(parents=True, exist_ok=True)
    c0, w0 = _cpu(), time.perf_counter()
    if method.startswith("syn"):
        tf = _ants_syn(brain, mask, method, out, threads)
        suffix = ".h5"  # ANTs' field covers the whole template grid: binary, for the benchmark only
    else:
        tf, _, _ = anat.register_to_mni(brain, mask, kind=method, initial=initial, subject=sub, threads=threads)
        suffix = ".txt"
    rec = {"cpu_s": round(_cpu() - c0, 2), "wall_s": round(time.perf_counter() - w0, 2)}
    path = out / f"xfm{suffix}"
    t0 = time.perf_counter()
    reg.write_transform(tf, path)
    rec["write_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    reg.read_transform(path)
    rec["read_s"] = round(time.perf_counter() - t0, 2)
    rec["xfm_bytes"] = path.stat().st_size
    rec["xfm"] = path.name
    return rec


def _ants_syn(brain: Any, mask: Any, method: str, out: Path, threads: int) -> Any:
    """ANTs SyN (antspyx) of the template brain to the extracted brain, as an ITK composite [affine, field], then
    brain and mask resampled to MNI as ``register_to_mni`` does (so the times compare)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants
    import numpy as np
    import SimpleITK as sitk

    from neuromoe.inputs.imageio import new_image
    from neuromoe.preproc import anat
    from neuromoe.preproc import registration as reg

    tpl, tpl_mask = anat.mni_template()
    fixed = new_image(np.asarray(tpl.dataobj) * (np.asarray(tpl_mask.dataobj) > 0), tpl.affine)
    moving = new_image(np.where(np.asarray(mask.dataobj) > 0, np.asarray(brain.dataobj, dtype=np.float32), 0),
                       brain.affine)
    import nibabel as nib

    nib.save(fixed, out / "fixed.nii.gz")
    nib.save(moving, out / "moving.nii.gz")
    f, m = ants.image_read(str(out / "fixed.nii.gz")), ants.image_read(str(out / "moving.nii.gz"))
    prefix = str(out / "ants_")
    if method == "syn":
        r = ants.registration(f, m, type_of_transform="SyN", outprefix=prefix, random_seed=1)
    else:
        affine = reg.read_transform(out.parent / "affine" / "xfm.txt")
        sitk.WriteTransform(affine, str(out / "initial.mat"))
        r = ants.registration(f, m, type_of_transform="SyNOnly", initial_transform=str(out / "initial.mat"),
                              syn_metric="mattes", reg_iterations=(100, 70, 50), outprefix=prefix, random_seed=1)
    warp = next(p for p in r["fwdtransforms"] if p.endswith(".nii.gz"))
    mats = [p for p in r["fwdtransforms"] if p.endswith(".mat")]
    linear = reg.read_transform(mats[0] if mats else out / "initial.mat")
    tf = sitk.CompositeTransform([linear, sitk.DisplacementFieldTransform(sitk.ReadImage(warp,
                                                                                         sitk.sitkVectorFloat64))])
    reg.resample(brain, tpl, tf, threads=threads)
    reg.resample(new_image(np.asarray(mask.dataobj) > 0, mask.affine), tpl, tf, threads=threads)
    return tf


def worker(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job", choices=["extract", "register"])
    ap.add_argument("--subject", required=True)
    ap.add_argument("--method", default="affine")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ants-path", default=None)
    a = ap.parse_args(argv)
    if a.ants_path:
        sys.path.insert(0, a.ants_path)
    sd = a.workdir / "jobs" / f"sub-{a.subject}"
    if a.job == "extract":
        rec = work_extract(a.subject, a.workdir / "bids", sd / "extract", a.threads)
        (sd / "extract" / "job.json").write_text(json.dumps(rec))
    else:
        rec = work_register(a.subject, a.method, sd / "extract", sd / a.method, a.threads)
        (sd / a.method / "job.json").write_text(json.dumps(rec))


# ---------------------------------------------------------------- driver

def run_job(args: list[str], log: Path) -> dict[str, Any]:
    """Run a worker in a fresh process; its exact peak RSS and CPU seconds (``wait4``)."""
    usage = log.with_suffix(".rusage.json")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(usage), *cmd], stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"{' '.join(args)} failed (exit {rc}); see {log}")
    u = json.loads(usage.read_text())
    return {"process_wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(u["maxrss_kib"] / 1024, 1),
            "process_cpu_s": round(u["user_s"] + u["sys_s"], 2)}


def code_version() -> str:
    """A digest of the code a registration result depends on (registration.py, anat.py): a result made by other
    code is computed again, never reused (the working folder outlives edits)."""
    h = hashlib.sha256()
    for rel in ("neuromoe/preproc/registration.py", "neuromoe/preproc/anat.py"):
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def make_cohort_once(wd: Path, n: int, seed: int, shape_mm: float, t1_mm: float) -> Path:
    """The T1w-only shape cohort in ``wd/bids`` (kept when its parameters match)."""
    from neuromoe.inputs.synth import SynthParams, make_cohort

    bids = wd / "bids"
    key = {"n": n, "seed": seed, "shape_mm": shape_mm, "t1_voxel_mm": t1_mm}
    stamp = wd / "cohort.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        return bids
    if (wd / "jobs").exists():  # results of another cohort
        shutil.rmtree(wd / "jobs")
    params = SynthParams(t1_voxel_mm=t1_mm, shape_mm=shape_mm)
    missing = {f"{i:02d}": ["dwi", "func"] for i in range(1, n + 1)}
    t0 = time.perf_counter()
    make_cohort(bids, n, seed=seed, params=params, missing=missing)
    print(f"cohort: {n} subjects in {time.perf_counter() - t0:.0f} s", flush=True)
    stamp.write_text(json.dumps(key))
    return bids


def evaluate(tf: Any, bids: Path, sub: str) -> dict[str, Any]:
    """Errors and Dice of ``tf`` (MNI points -> T1w points, ITK) against the subject's truth (module docstring)."""
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    from neuromoe.inputs import templates as tpl
    from neuromoe.inputs.imageio import affine_to_itk
    from neuromoe.inputs.synth import ShapeWarp, read_truth

    t = read_truth(bids, sub)
    warp = ShapeWarp.from_nifti(t["warp"], t["warp_inverse"])
    pose, inv_pose = t["pose"], np.linalg.inv(t["pose"])
    grid = tpl.brain_mask()
    brain = np.asarray(grid.dataobj) > 0
    spacing, origin, direction = affine_to_itk(grid.affine)
    field = sitk.TransformToDisplacementField(tf, sitk.sitkVectorFloat64, list(grid.shape), origin, spacing,
                                              direction)
    jac = np.asarray(sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))).T[brain]
    disp = np.transpose(sitk.GetArrayFromImage(field), (2, 1, 0, 3))[brain] * [-1.0, -1.0, 1.0]  # RAS mm
    ijk = np.argwhere(brain)
    m = nib.affines.apply_affine(grid.affine, ijk)
    est = m + disp
    truth = warp.to_subject(m) @ pose[:3, :3].T + pose[:3, 3]
    err = np.linalg.norm(est - truth, axis=1)
    # The template point each T1w point shows (the truth's inverse), reached through either transform.
    q_est = warp.to_template(est @ inv_pose[:3, :3].T + inv_pose[:3, 3])
    q_true = warp.to_template(truth @ inv_pose[:3, :3].T + inv_pose[:3, 3])
    probs = {k: f().get_fdata(dtype=np.float32) for k, f in
             (("gm", tpl.gm_probability), ("wm", tpl.wm_probability), ("csf", tpl.csf_probability))}
    to_vox = np.linalg.inv(grid.affine)

    def sample(q: np.ndarray) -> dict[str, np.ndarray]:
        c = (q @ to_vox[:3, :3].T + to_vox[:3, 3]).T
        return {k: ndi.map_coordinates(p, c, order=1, cval=0.0) for k, p in probs.items()}

    p_est, p_true = sample(q_est), sample(q_true)
    names = list(probs)
    lab_est = np.argmax(np.stack([p_est[k] for k in names]), 0)
    lab_true = np.argmax(np.stack([p_true[k] for k in names]), 0)

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))

    tissue = {k: dice(lab_est == i, lab_true == i) for i, k in enumerate(names)}
    def inside(roi: Any, q: np.ndarray, p: dict[str, np.ndarray] | None) -> np.ndarray:
        # roi_mask's definition at template points q: in a sphere, and (p given) in the region's tissue
        d = np.min([np.linalg.norm(q - c, axis=1) for c in roi.centres_mm], axis=0)
        return (d <= roi.radius_mm) & (p[roi.tissue] >= 0.5 if p is not None else True)

    regions, spheres = {}, {}
    for modality in ("anat", "dwi", "func"):
        for roi in t["design"].effect_rois(modality).values():
            regions[roi.name] = dice(inside(roi, q_est, p_est), inside(roi, q_true, p_true))
            spheres[roi.name] = dice(inside(roi, q_est, None), inside(roi, q_true, None))
    u = warp.to_subject(m) - m
    return {"error_mm": {"mean": float(err.mean()), "p95": float(np.percentile(err, 95)), "max": float(err.max())},
            "dice_tissue": tissue, "dice_regions": regions, "dice_spheres": spheres,
            "dice_regions_mean": float(np.mean(list(regions.values()))),
            "dice_spheres_mean": float(np.mean(list(spheres.values()))),
            "jacobian_min": float(jac.min()), "folded_voxels": int((jac <= 0).sum()),
            "truth_displacement_mm": float(np.linalg.norm(u, axis=1).mean())}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    def stat(get: Any) -> dict[str, float]:
        v = np.array([get(r) for r in rows], dtype=float)
        return {"mean": round(float(v.mean()), 3), "min": round(float(v.min()), 3), "max": round(float(v.max()), 3)}

    tissues = rows[0]["dice_tissue"].keys()
    regions = rows[0]["dice_regions"].keys()
    return {
        "n_subjects": len(rows),
        "error_mean_mm": stat(lambda r: r["error_mm"]["mean"]),
        "error_p95_mm": stat(lambda r: r["error_mm"]["p95"]),
        "error_max_mm": stat(lambda r: r["error_mm"]["max"]),
        "dice_tissue": {k: stat(lambda r, k=k: r["dice_tissue"][k]) for k in tissues},
        "dice_regions": {k: stat(lambda r, k=k: r["dice_regions"][k]) for k in regions},
        "dice_regions_mean": stat(lambda r: r["dice_regions_mean"]),
        "dice_spheres_mean": stat(lambda r: r["dice_spheres_mean"]),
        "jacobian_min": stat(lambda r: r["jacobian_min"]),
        "folded_voxels": stat(lambda r: r["folded_voxels"]),
        "cpu_s": stat(lambda r: r["job"]["cpu_s"]),
        "wall_s": stat(lambda r: r["job"]["wall_s"]),
        "peak_rss_mb": stat(lambda r: r["process"]["peak_rss_mb"]),
        "xfm_bytes": stat(lambda r: r["job"]["xfm_bytes"]),
        "read_s": stat(lambda r: r["job"]["read_s"]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--shape-mm", type=float, default=3.0, help="SynthParams.shape_mm (RMS displacement in the brain)")
    ap.add_argument("--t1-mm", type=float, default=1.0, help="T1w voxel size")
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--methods", default="affine,bspline,nonlinear",
                    help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=1, help="threads of each job (the anat rule's: 1)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/registration-bench"))
    ap.add_argument("--out", type=Path, default=RESULTS / "registration.json")
    ap.add_argument("--ants-path", default=None, help="a folder holding antspyx, for syn / syn_full")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        ap.error(f"unknown methods {bad}; known: {', '.join(METHODS)}")
    if "syn_full" in methods and "affine" not in methods:
        methods.append("affine")  # syn_full starts from the stage's affine
    methods = sorted(set(methods), key=METHODS.index)

    from _machine import machine

    from neuromoe.preproc import registration as reg

    meta = machine()
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    bids = make_cohort_once(wd, args.subjects, args.seed, args.shape_mm, args.t1_mm)
    common = ["--workdir", str(wd), "--threads", str(args.threads)]
    if args.ants_path:
        common += ["--ants-path", args.ants_path]
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    extraction, code = [], code_version()
    for i in range(1, args.subjects + 1):
        sub = f"{i:02d}"
        sd = wd / "jobs" / f"sub-{sub}"
        if not (sd / "extract" / "result.json").exists():
            proc = run_job(["extract", "--subject", sub, *common], sd / "extract.log")
            job = json.loads((sd / "extract" / "job.json").read_text())
            (sd / "extract" / "result.json").write_text(json.dumps({"job": job, "process": proc}))
        extraction.append(json.loads((sd / "extract" / "result.json").read_text()))
        for method in methods:
            res = sd / method / "result.json"
            if not res.exists() or json.loads(res.read_text()).get("code") != code:
                proc = run_job(["register", "--subject", sub, "--method", method, *common], sd / f"{method}.log")
                job = json.loads((sd / method / "job.json").read_text())
                ev = evaluate(reg.read_transform(sd / method / job["xfm"]), bids, sub)
                res.write_text(json.dumps({"subject": sub, "code": code, "job": job, "process": proc, **ev}))
            r = json.loads(res.read_text())
            rows[method].append(r)
            print(f"sub-{sub} {method:10s} error {r['error_mm']['mean']:.2f} mm (p95 {r['error_mm']['p95']:.2f}), "
                  f"Dice GM {r['dice_tissue']['gm']:.3f} WM {r['dice_tissue']['wm']:.3f} "
                  f"CSF {r['dice_tissue']['csf']:.3f}, regions {r['dice_regions_mean']:.3f} "
                  f"(spheres {r['dice_spheres_mean']:.3f}), {r['job']['cpu_s']:.1f} s CPU, "
                  f"{r['process']['peak_rss_mb']:.0f} MB", flush=True)
    cohort = {"subjects": args.subjects, "seed": args.seed, "shape_mm": args.shape_mm, "t1_voxel_mm": args.t1_mm,
              "modalities": ["anat"]}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    summary = {m: {"git_commit": commit, "code": code, **summarise(rows[m])} for m in methods}
    subjects: dict[str, Any] = {m: rows[m] for m in methods}
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    if old.get("cohort") == cohort and old.get("threads") == args.threads:
        for m, s in old.get("methods", {}).items():  # methods not rerun: kept, each with the commit it ran at
            if m not in summary:
                summary[m] = {"git_commit": s.get("git_commit", old.get("git_commit")), **s}
                subjects[m] = old.get("subjects", {}).get(m, [])
    record = {
        "benchmark": "T1w -> MNI registration of shape-varied synthetic subjects against the truth warp: point error "
                     "over the template's brain, tissue and region Dice after normalisation, time and memory per "
                     "registration (bench/registration.py's docstring)",
        "cohort": cohort, "threads": args.threads, "git_commit": commit,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "brain_extraction": summarise_extraction(extraction),
        "methods": summary,
        "subjects": subjects,
        "acceptance": {"error_mean_mm_max": TARGET_ERROR_MM, "dice_regions_min": TARGET_DICE,
                       **({"nonlinear_met": summary["nonlinear"]["error_mean_mm"]["mean"] <= TARGET_ERROR_MM
                           and summary["nonlinear"]["dice_regions_mean"]["mean"] >= TARGET_DICE}
                          if "nonlinear" in summary else {})},
        "machine": meta,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n{'method':10s} {'error mm':>9s} {'p95 mm':>7s} {'GM':>6s} {'WM':>6s} {'CSF':>6s} {'regions':>8s} "
          f"{'spheres':>8s} {'CPU s':>6s} {'wall s':>7s} {'RSS MB':>7s} {'xfm MB':>7s}")
    for m, s in summary.items():
        print(f"{m:10s} {s['error_mean_mm']['mean']:9.2f} {s['error_p95_mm']['mean']:7.2f} "
              f"{s['dice_tissue']['gm']['mean']:6.3f} {s['dice_tissue']['wm']['mean']:6.3f} "
              f"{s['dice_tissue']['csf']['mean']:6.3f} {s['dice_regions_mean']['mean']:8.3f} "
              f"{s['dice_spheres_mean']['mean']:8.3f} {s['cpu_s']['mean']:6.1f} {s['wall_s']['mean']:7.1f} "
              f"{s['peak_rss_mb']['max']:7.0f} {s['xfm_bytes']['mean'] / 1e6:7.2f}")
    print(f"-> {args.out}")
    return record


def summarise_extraction(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    def stat(key: str, where: str) -> dict[str, float]:
        v = np.array([r[where][key] for r in rows], dtype=float)
        return {"mean": round(float(v.mean()), 2), "max": round(float(v.max()), 2)}

    return {"n_subjects": len(rows), "cpu_s": stat("cpu_s", "job"), "wall_s": stat("wall_s", "job"),
            "peak_rss_mb": stat("peak_rss_mb", "process")}


if __name__ == "__main__":
    main()
