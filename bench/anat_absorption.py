"""Benchmark: how much of the planted T1w effect does the nonlinear registration to MNI absorb?

Why: with brains that differ in shape (``SynthParams.shape_mm``) the workflow must register nonlinearly, and on
design 12 at 180 subjects the anat expert then lost its signal (README, Evaluation: With shape at 180). The
synthetic T1w effect is an intensity change in one template region (grey matter moved toward CSF, as atrophy's
partial volume looks); an intensity-driven dense field (demons) can move the region's boundaries until it looks
like the template's, so the difference would move from the warped image into the deformation, the reason
voxel-based morphometry modulates by the Jacobian.

How: a template-shaped cohort of the design (T1w only: the generality benchmark's ``cohort_seed`` and
``design_params``), each subject's brain extracted once and registered both ways exactly as the anat rule does
(``anat.brain_extraction``, ``anat.register_to_mni``, ``anat.write_outputs``), plus the log Jacobian determinant
of the dense field on the MNI grid. Per anat effect region (its grey matter): the regional mean of the MNI T1w
over the brain mean outside both regions, in subjects with the effect vs without (difference, Cohen's d, slope
and correlation against the planted strength); the same on the native brain through the truth pose (what was
planted), and for the log Jacobian. Template-shaped brains make the affine exact, so affine vs nonlinear isolates
the absorption from shape noise. Resumable: subjects already registered are kept.

    python bench/anat_absorption.py [--subjects 24] [--design-seed 12] [--workdir /tmp/anat-absorption]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
KINDS = ("affine", "nonlinear")


def write_cohort(bids: Path, n: int, design_seed: int) -> None:
    import generality as G

    from neuromoe.inputs.synth import make_cohort, subject_id

    if not (bids / "participants.tsv").exists():
        make_cohort(bids, n, seed=G.cohort_seed(design_seed), params=G.design_params(design_seed, 0.0),
                    missing={subject_id(i): ["dwi", "func"] for i in range(1, n + 1)}, n_jobs=1)


def register_subject(wd: Path, bids: Path, s: str) -> dict[str, float] | None:
    """Brain extraction once, then affine and nonlinear registration to MNI, outputs under wd/out_<kind>; the
    dense field's log Jacobian determinant on the MNI grid. CPU seconds per step; None if already done."""
    import nibabel as nib
    import SimpleITK as sitk

    from neuromoe import paths
    from neuromoe.inputs.imageio import from_sitk, load_image, new_image
    from neuromoe.preproc import anat
    from neuromoe.preproc import registration as reg

    logjac = wd / "out_nonlinear" / f"sub-{s}_logjac.nii.gz"
    if logjac.exists():
        return None
    times = {}
    t0 = time.process_time()
    res = anat.brain_extraction(load_image(bids / f"sub-{s}" / "anat" / f"sub-{s}_T1w.nii.gz", subject=s), s,
                                threads=1)
    times["extract"] = time.process_time() - t0
    for kind in KINDS:
        t = time.process_time()
        tf, brain_mni, mask_mni = anat.register_to_mni(res.brain, res.mask, kind=kind, initial=res.template_to_t1w,
                                                       subject=s, threads=1)
        times[kind] = time.process_time() - t
        outputs = {k: paths.derivative(wd / f"out_{kind}", s, k) for k in anat.OUTPUT_KEYS}
        anat.write_outputs(outputs, s, mask=res.mask, brain=res.brain, transform=tf, brain_mni=brain_mni,
                           mask_mni=mask_mni, qc_background=res.corrected, mask_title="", method=kind)
    field = sitk.DisplacementFieldTransform(tf.GetNthTransform(1)).GetDisplacementField()
    lj = from_sitk(sitk.Log(sitk.Clamp(sitk.DisplacementFieldJacobianDeterminant(field), lowerBound=1e-3)))
    tpl = anat.mni_template()[0]
    nib.save(new_image(np.asarray(reg.resample(lj, tpl, None, interp="linear").dataobj, np.float32), tpl.affine),
             str(logjac))
    return times


def _cohen(a: np.ndarray, b: np.ndarray) -> float:
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    return float((a.mean() - b.mean()) / np.sqrt(pooled))


def measure(wd: Path, bids: Path) -> dict[str, Any]:
    """The per-region table (see the module docstring) over the subjects registered so far."""
    import nibabel as nib

    from neuromoe import paths
    from neuromoe.inputs import templates as T
    from neuromoe.inputs.synth import read_design, read_truth
    from neuromoe.preproc import anat

    rois = read_design(bids).effect_rois("anat")
    tpl, tmask = anat.mni_template()
    brain = np.asarray(tmask.dataobj) > 0
    gm = {r: T.roi_mask(roi, tpl, tissue=True) & brain for r, roi in rois.items()}
    ref = brain & ~np.logical_or.reduce([T.roi_weight(roi, tpl.affine, tpl.shape) > 0 for roi in rois.values()])
    subjects = sorted(p.name[4:-len("_logjac.nii.gz")] for p in (wd / "out_nonlinear").glob("sub-*_logjac.nii.gz"))
    rows = []
    for s in subjects:
        truth = read_truth(bids, s)
        strength = {r: v["strength"] for r, v in truth["effects"]["anat"].items()}
        row: dict[str, Any] = {"subject": s, "strength": strength}
        for kind in KINDS:
            a = np.asarray(nib.load(paths.derivative(wd / f"out_{kind}", s, "anat_brain_mni")).dataobj, float)
            for r in rois:
                row[f"{kind}_{r}"] = a[gm[r]].mean() / a[ref & (a > 0)].mean()
        native = nib.load(paths.derivative(wd / "out_affine", s, "anat_brain"))
        na, to_mni = np.asarray(native.dataobj, float), np.linalg.inv(truth["pose"])
        outside = np.ones(na.shape, bool)
        for roi in rois.values():
            outside &= ~(T.roi_weight(roi, native.affine, native.shape, world_to_mni=to_mni) > 0)
        for r, roi in rois.items():
            region = T.roi_mask(roi, native, tissue=True, world_to_mni=to_mni) & (na > 0)
            row[f"native_{r}"] = na[region].mean() / na[outside & (na > 0)].mean()
        lj = np.asarray(nib.load(str(wd / "out_nonlinear" / f"sub-{s}_logjac.nii.gz")).dataobj, float)
        for r in rois:
            row[f"logjac_{r}"] = lj[gm[r]].mean()
        rows.append(row)
    table = []
    for r, roi in rois.items():
        amount = np.array([row["strength"][r] for row in rows])
        has = amount > 0
        if has.sum() < 2 or (~has).sum() < 2:
            continue
        for m in ("native", "affine", "nonlinear", "logjac"):
            v = np.array([row[f"{m}_{r}"] for row in rows])
            table.append({"region": r, "name": roi.name, "measure": m, "with_effect": v[has].mean(),
                          "without": v[~has].mean(), "difference": v[has].mean() - v[~has].mean(),
                          "cohen_d": _cohen(v[has], v[~has]), "slope_vs_strength": float(np.polyfit(amount, v, 1)[0]),
                          "r_vs_strength": float(np.corrcoef(amount, v)[0, 1]), "n_with": int(has.sum()),
                          "n_without": int((~has).sum())})
    diff = {(t["region"], t["measure"]): t["difference"] for t in table}
    absorbed = {r: 1.0 - diff[(r, "nonlinear")] / diff[(r, "affine")] for r in rois if (r, "affine") in diff}
    return {"subjects": len(rows), "table": table, "absorbed_fraction": absorbed, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=24)
    ap.add_argument("--design-seed", type=int, default=12)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/anat-absorption"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "anat_absorption.json")
    args = ap.parse_args(argv)
    from _machine import machine

    meta = machine()
    bids = args.workdir / "cohort"
    write_cohort(bids, args.subjects, args.design_seed)
    cpu: dict[str, list[float]] = {}
    for i in range(1, args.subjects + 1):
        s = f"{i:02d}"
        times = register_subject(args.workdir, bids, s)
        if times:
            print(s, {k: round(v, 1) for k, v in times.items()}, flush=True)
            for k, v in times.items():
                cpu.setdefault(k, []).append(v)
    result = measure(args.workdir, bids)
    for t in result["table"]:
        print(f"{t['region']} {t['measure']:<10} with {t['with_effect']:.3f} without {t['without']:.3f} "
              f"diff {t['difference']:+.3f} d {t['cohen_d']:+.1f} r {t['r_vs_strength']:+.2f}")
    print("absorbed by the nonlinear registration:", {r: round(v, 2) for r, v in result["absorbed_fraction"].items()})
    record = {"benchmark": __doc__.splitlines()[0], "design_seed": args.design_seed, "shape_mm": 0.0,
              "cpu_s_median_this_run": {k: float(np.median(v)) for k, v in cpu.items()}, **result, "machine": meta}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=float) + "\n")
    print("->", args.out)
    return record


if __name__ == "__main__":
    main()
