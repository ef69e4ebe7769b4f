"""Where does the demo's fusion problem fail: the data, the model or the training? (issue 7)

Two measurements on a finished workflow's cohort cache of the synthetic cohort (its BIDS folder holds the
ground truth in ``derivatives/synth-truth``):

- ``signal``: how much of each planted effect survives preprocessing, registration and the cache grid.
  For every effect region (``neuromoe.templates.ROIS``) and map channel, the mean of the cached tensor over
  the region (inside the grid's brain mask), and Cohen's d between subjects that carry the effect (disease
  or distractor) and those that do not.
- ``variants``: trains deep variants (``neuromoe.train.train_run``, the workflow's own training) on the
  workflow's splits with config overrides, and reports each variant's test balanced accuracy per split
  and averaged, with the test-fold gate weights grouped by each subject's true latent profile (a gate that
  learned the fusion problem puts most weight on the profile's modality).

Results are printed and written as JSON (machine noted) under ``bench/results/``.

The working folder: a fresh clone whose ``config.yaml`` says ``synthetic.subjects: 120`` (the recorded
results; a finished demo folder, 60 subjects, works as it is), run up to the splits, which need the cache
(about 37 s CPU per subject)::

    snakemake --cores 8 splits

Usage::

    python bench/fusion_study.py signal --workdir /path/to/finished/workflow
    python bench/fusion_study.py variants --workdir W --variants full,no_gate,only_dwi \\
        --splits cv-s0-f0,cv-s0-f1,cv-s0-f2 --set model.pooling=max train.lr=0.003 --jobs 2 --tag max
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_bench import machine  # noqa: E402  (CPU model, cores, torch, CUDA device, load)


def load_workdir(workdir: Path) -> tuple[dict, Path, Path, Path]:
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    out = workdir / cfg.get("output_dir", "results")
    return cfg, workdir / cfg["bids_dir"], out / "cache" / "cohort", out / "model" / "splits.tsv"


def truth_table(bids: Path, subjects: list[str]) -> pd.DataFrame:
    from neuromoe.synth import read_truth

    rows = []
    for s in subjects:
        t = read_truth(bids, s)
        row = {"participant_id": s.removeprefix("sub-"), "diagnosis": t["diagnosis"], "profile": t["profile"]}
        for m, roles in t["effects"].items():
            for role, e in roles.items():
                row[f"{m}_{role}"] = float(e["strength"])
        rows.append(row)
    return pd.DataFrame(rows)


def signal(workdir: Path) -> dict:
    from neuromoe import templates as tpl
    from neuromoe.cache import open_cohort

    _, bids, cache_dir, _ = load_workdir(workdir)
    c = open_cohort(cache_dir, verify=False)
    truth = truth_table(bids, [str(s) for s in c.index["participant_id"]])
    affine, grid = np.asarray(c.manifest["affine"]), tuple(c.grid)
    out = []
    for m, arr in c.arrays.items():
        a = np.asarray(arr, dtype=np.float32)
        for role, roi in tpl.effect_rois(m).items():
            inside = (tpl.roi_weight(roi.name, affine, grid, taper_mm=0.0) > 0) & c.mask
            has = truth[f"{m}_{role}"].to_numpy() > 0
            for k, ch in enumerate(c.channels[m]):
                v = a[:, k][:, inside].mean(axis=1)
                pooled_sd = np.sqrt(0.5 * (v[has].var(ddof=1) + v[~has].var(ddof=1)))
                out.append({"modality": m, "role": role, "region": roi.name, "channel": ch,
                            "grid_voxels": int(inside.sum()), "n_with_effect": int(has.sum()),
                            "n_without": int((~has).sum()),
                            "cohens_d": float((v[has].mean() - v[~has].mean()) / pooled_sd)})
    for r in out:
        print(f"{r['modality']:5s} {r['role']} {r['region']:20s} {r['channel']:6s} voxels {r['grid_voxels']:3d} "
              f"n {r['n_with_effect']:3d}/{r['n_without']:3d}  d = {r['cohens_d']:+.2f}")
    return {"cache": str(cache_dir), "n_subjects": len(c), "grid": list(grid), "regions": out}


def _override(cfg: dict, items: list[str]) -> dict:
    for kv in items:
        key, value = kv.split("=", 1)
        section, name = key.split(".")
        try:
            cfg.setdefault(section, {})[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            cfg.setdefault(section, {})[name] = value
    return cfg


def _one(job: tuple) -> dict:
    from neuromoe.train import train_run

    cache_dir, splits, split_id, variant, cfg, out = job
    m = train_run(cache_dir, splits, split_id, variant, cfg, out, device="cpu", threads=1, progress=False)
    pred = pd.read_csv(Path(out) / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    return {"split_id": split_id, "variant": variant, "test_balanced_accuracy": m["test"]["balanced_accuracy"],
            "val_balanced_accuracy": m["val"]["balanced_accuracy"], "best_epoch": m["best_epoch"],
            "epochs_run": m["epochs_run"], "test_predictions": pred[pred["part"] == "test"].to_dict("list")}


def variants(workdir: Path, names: list[str], split_ids: list[str], overrides: list[str], jobs: int,
             out_root: Path) -> dict:
    cfg, bids, cache_dir, splits = load_workdir(workdir)
    cfg = _override(cfg, overrides)
    todo = [(cache_dir, splits, s, v, cfg, out_root / v / s) for v in names for s in split_ids]
    t0 = time.time()
    with ProcessPoolExecutor(jobs) as ex:
        runs = list(ex.map(_one, todo))
    truth = truth_table(bids, [f"sub-{p}" for p in pd.read_csv(splits, sep="\t", dtype=str)["participant_id"]
                               .unique()]).set_index("participant_id")
    summary = {}
    for v in names:
        rs = [r for r in runs if r["variant"] == v]
        acc = [r["test_balanced_accuracy"] for r in rs]
        pred = pd.concat([pd.DataFrame(r["test_predictions"]) for r in rs], ignore_index=True)
        gates = [c for c in pred.columns if c.startswith("gate_")]
        by_profile = (pred.join(truth["profile"], on="participant_id").groupby("profile")[gates].mean()
                      .round(3).to_dict("index"))
        summary[v] = {"test_balanced_accuracy_mean": float(np.mean(acc)),
                      "test_balanced_accuracy_sd": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
                      "per_split": {r["split_id"]: round(r["test_balanced_accuracy"], 4) for r in rs},
                      "best_epochs": [r["best_epoch"] for r in rs], "test_gate_by_true_profile": by_profile}
        print(f"{v:10s} test balanced accuracy {np.mean(acc):.3f} +- {summary[v]['test_balanced_accuracy_sd']:.3f}"
              f"  per split {[round(a, 3) for a in acc]}")
        if v != "no_gate" and len(gates) > 1:
            for prof, w in by_profile.items():
                print(f"           gate, true profile {prof:4s}: " + ", ".join(f"{k[5:]} {x:.2f}"
                                                                             for k, x in w.items()))
    return {"cache": str(cache_dir), "splits": split_ids, "overrides": overrides,
            "train": cfg.get("train"), "model": cfg.get("model"), "seconds": round(time.time() - t0, 1),
            "variants": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("signal")
    s.add_argument("--workdir", type=Path, required=True)
    v = sub.add_parser("variants")
    v.add_argument("--workdir", type=Path, required=True)
    v.add_argument("--variants", default="full,no_gate,only_anat,only_dwi,only_func,only_clin")
    v.add_argument("--splits", default="cv-s0-f0,cv-s0-f1,cv-s0-f2")
    v.add_argument("--set", nargs="*", default=[], help="config overrides section.key=value")
    v.add_argument("--jobs", type=int, default=2)
    v.add_argument("--runs-dir", type=Path, default=Path("/tmp/neuromoe_fusion_study"))
    for p in (s, v):
        p.add_argument("--tag", default="")
        p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    if a.cmd == "signal":
        res = signal(a.workdir)
    else:
        res = variants(a.workdir, a.variants.split(","), a.splits.split(","), a.set, a.jobs,
                       a.runs_dir / (a.tag or "default"))
    res = {"machine": machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv[1:],
           **res}
    name = f"fusion_{a.cmd}{'_' + a.tag if a.tag else ''}.json"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / name).write_text(json.dumps(res, indent=1) + "\n")
    print(f"results -> {a.out / name}")


if __name__ == "__main__":
    main()
