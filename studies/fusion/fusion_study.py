"""Where does the demo's fusion problem fail: the data, the model or the training? (issue 7)

Measurements on a finished workflow's cohort cache of the synthetic cohort (its BIDS folder holds the
ground truth in ``derivatives/synth-truth``):

- ``signal``: how much of each planted effect survives preprocessing, registration and the cache grid.
  For every effect region (``neuromoe.inputs.templates.ROIS``) and map channel, the mean of the cached tensor over
  the region (inside the grid's brain mask), and Cohen's d between subjects that carry the effect (disease
  or distractor) and those that do not.
- ``variants``: trains deep variants (``neuromoe.learn.train.train_run``, the workflow's own training) on the
  workflow's splits with config overrides, and reports each variant's test balanced accuracy per split
  and averaged, with the test-fold gate weights grouped by each subject's true latent profile (a gate that
  learned the fusion problem puts most weight on the profile's modality).

- ``learnability``: whether a voxel-level learner can find a modality's regions from the subjects one fold
  labels: an L2 logistic regression per modality on every brain voxel of the cached maps, against the same
  on the means over the true effect regions, trained on only the subjects of that modality's profile (the
  clean labels a perfectly routed expert gets) or on all of them (what an expert gets under a uniform gate).
  Seconds; no training of the deep model.
- ``oracle``: the generator's design alone, without images. Each subject's true region read-outs (an
  effect present: 4 SD, plus unit noise) and clinical table come from ``neuromoe.inputs.synth.subject_plan``; a
  small mixture of experts (one 2-feature expert per modality, a clinical expert, the clinical gate,
  trained with the workflow's ``neuromoe.learn.model.moe_loss`` and ``class_weights``) is fitted on the
  workflow's split protocol (the code: ``oracle`` in ``bench/generality.py``). Its balanced accuracies
  bound what the deep model can reach on a cohort of that size and design, so a design in which routing
  does not beat the best single modality here cannot pass issue 7 with any encoder. About a minute; no workflow needed.

Results are printed and written as JSON (machine noted) under ``studies/fusion/results/``; what they
showed is in ``studies/fusion/README.md``.

The working folder for ``signal`` and ``variants``: a fresh clone, optionally with more subjects in
``config.yaml`` (``synthetic.subjects``; a finished demo folder works as it is), run up to the splits,
which need the cache (about 37 s CPU per subject). Recorded results: ``*_demo120*``, ``*_demo60_max``,
``*lowdistractor90*`` and ``*_try_*`` on the first cohort design (``control_profile_distractors=True``,
``marker_separation=2.4``, profiles drawn per subject), ``*_cohort2_*`` on the current one (``*_flat_last*``:
``--set model.pooling=flat train.epochs=60 train.select=last``, plus ``train.gate_fit=crossfit`` where named)::

    snakemake --cores 8 splits

Usage::

    python studies/fusion/fusion_study.py oracle --subjects 60 --folds 5 --synth control_profile_distractors=True \\
        marker_separation=2.4 --tag first_design_60
    python studies/fusion/fusion_study.py signal --workdir /path/to/finished/workflow
    python studies/fusion/fusion_study.py learnability --workdir W --splits cv-s0-f0,cv-s0-f1 --tag demo60
    python studies/fusion/fusion_study.py variants --workdir W --variants full,no_gate,only_dwi \\
        --splits cv-s0-f0,cv-s0-f1,cv-s0-f2 --set model.pooling=max train.lr=0.003 --jobs 2 --tag max
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/_machine.py

from _machine import machine  # noqa: E402  (CPU model, cores, RAM, torch, GPU, load)


def load_workdir(workdir: Path) -> tuple[dict, Path, Path, Path]:
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    out = workdir / cfg.get("output_dir", "results")
    return cfg, workdir / cfg["bids_dir"], out / "cache" / "cohort", out / "model" / "splits.tsv"


def truth_table(bids: Path, subjects: list[str]) -> pd.DataFrame:
    from neuromoe.inputs.synth import read_truth

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
    from neuromoe.cache.store import open_cohort
    from neuromoe.inputs import templates as tpl

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


def _region_means(c, m: str, a: np.ndarray) -> np.ndarray:
    """(N, 2 * channels): each subject's mean of every channel over the modality's two effect regions."""
    from neuromoe.inputs import templates as tpl

    affine, grid = np.asarray(c.manifest["affine"]), tuple(c.grid)
    cols = []
    for roi in tpl.effect_rois(m).values():
        inside = (tpl.roi_weight(roi.name, affine, grid, taper_mm=0.0) > 0) & c.mask
        cols += [a[:, k][:, inside].mean(axis=1) for k in range(a.shape[1])]
    return np.stack(cols, axis=1)


def learnability(workdir: Path, split_ids: list[str]) -> dict:
    """Can a voxel-level learner find a modality's regions from the labelled subjects a fold gives it?

    Per modality and split, an L2 logistic regression (scikit-learn, standardised inputs) is fitted on the
    train + val subjects and scored on the test subjects (balanced accuracy), three ways: on every brain
    voxel of the cached maps (C = 0.01) or on the means over the modality's two true effect regions (C = 1,
    what a reader told where to look has), each with (a) only the subjects whose latent profile is that
    modality (the clean labels a perfectly routed expert would train on) and (b) every subject (the labels
    an expert gets under a uniform gate: the other profiles' distractors mislead). Region means separating
    well where voxels do not says the signal is there and the sample is too small to localise it.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from neuromoe.cache.store import open_cohort

    _, bids, cache_dir, splits_tsv = load_workdir(workdir)
    c = open_cohort(cache_dir, verify=False)
    pids = c.index["participant_id"].astype(str).str.removeprefix("sub-").to_numpy()
    truth = truth_table(bids, [str(s) for s in c.index["participant_id"]]).set_index("participant_id")
    profile, y = truth.loc[pids, "profile"].to_numpy(), c.index["label"].to_numpy()
    splits = pd.read_csv(splits_tsv, sep="\t", dtype={"participant_id": str})
    pos = {p: i for i, p in enumerate(pids)}
    out: dict[str, dict[str, float]] = {}
    for m, arr in c.arrays.items():
        a = np.asarray(arr, dtype=np.float32)
        feats = {"voxels": (a[:, :, c.mask].reshape(len(a), -1), 0.01),
                 "region_means": (_region_means(c, m, a), 1.0)}
        for fname, (x, C) in feats.items():
            for who in ("own_profile", "all"):
                accs = []
                for sid in split_ids:
                    g = splits[splits["split_id"] == sid]
                    fit = np.array([pos[p] for p in g.loc[g["part"] != "test", "participant_id"]])
                    te = np.array([pos[p] for p in g.loc[g["part"] == "test", "participant_id"]])
                    if who == "own_profile":
                        fit, te = fit[profile[fit] == m], te[profile[te] == m]
                    if not len(te) or len(np.unique(y[fit])) < 2:
                        continue  # a test part without this profile (small cohorts): nothing to score
                    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
                    clf.fit(x[fit], y[fit])
                    with warnings.catch_warnings():  # a profile's few test subjects may miss a class
                        warnings.simplefilter("ignore", UserWarning)
                        accs.append(float(balanced_accuracy_score(y[te], clf.predict(x[te]))))
                key = f"{m}/{fname}/{who}"
                out[key] = {"test_balanced_accuracy_mean": float(np.mean(accs)), "per_split": accs,
                            "n_splits_scored": len(accs)}
                print(f"{key:32s} test balanced accuracy {np.mean(accs):.3f}")
    return {"cache": str(cache_dir), "n_subjects": len(c), "splits": split_ids, "results": out}


def oracle(n: int, synth: list[str], folds: int, seeds: list[int], data_seed: int = 42) -> dict:
    """The oracle of ``bench/generality.py`` (moved there) on SynthParams overrides ``synth``."""
    from generality import oracle as oracle_ceiling  # bench/ is on sys.path

    from neuromoe.inputs.synth import SynthParams

    params = SynthParams(**{k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in synth)})
    summary = oracle_ceiling(n, params, data_seed=data_seed, protocol="cv", folds=folds, seeds=seeds,
                             val_fraction=0.2)
    return {"subjects": n, "synth": synth, "folds": folds, "seeds": seeds, "variants": summary}


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
    from neuromoe.learn.train import train_run

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


def _refit_gate(expert_lp, clin, y, weights, n_steps: int = 300, seed: int = 0):
    """A fresh gate (clinical -> expert weights, the model's 2-layer shape without dropout) fitted to fixed
    experts' log-probs with the workflow's ``fit_gate_to`` (balance term off)."""
    import torch
    from torch import nn

    from neuromoe.learn.gate import fit_gate_to

    torch.manual_seed(seed)
    gate = nn.Sequential(nn.Linear(clin.shape[1], 16), nn.ReLU(), nn.Linear(16, expert_lp.shape[1]))
    present = torch.ones(expert_lp.shape[:2], dtype=torch.bool)
    fit_gate_to(gate, expert_lp, clin, present, y, weights, 0.0, n_steps, seed)
    return gate


def experts(workdir: Path, runs: Path) -> dict:
    """Are a variant's trained experts worth routing, and does a gate learn to route them?

    For each finished run under ``runs`` (``variants``' ``<runs-dir>/<tag>/<variant>``, one folder per split),
    with the run's weights frozen: each image expert's test accuracy on subjects of its own latent profile
    and of the others; and the test balanced accuracy of the run's own output, of uniform expert weights, of
    sending each subject to its true profile's expert (the ceiling of these experts under routing), and of
    a gate refitted to the frozen experts on the training part or on the validation part. A gate that
    routes when fitted on held-out subjects but not on the training subjects says the experts' training
    fits (memorised) mislead it.
    """
    import torch
    from sklearn.metrics import balanced_accuracy_score
    from torch.utils.data import DataLoader

    from neuromoe.learn.data import CohortDataset, to_device
    from neuromoe.learn.train import load_model, prepare_data

    torch.set_num_threads(1)
    cfg, bids, cache_dir, splits = load_workdir(workdir)
    rows, gates = [], []
    for rd in sorted(p for p in runs.iterdir() if (p / "model.safetensors").is_file()):
        model, _ = load_model(rd / "model.safetensors")
        exps = list(model.cfg.experts)
        if not set(exps) >= {"anat", "dwi", "func"}:
            raise SystemExit(f"{rd}: variant with experts {exps}; experts needs all three image experts")
        data = prepare_data(cache_dir, splits, rd.name, exps, cfg)
        pids = data.cohort.index["participant_id"].astype(str)
        truth = truth_table(bids, list(pids)).set_index("participant_id")["profile"]
        out = {}
        for part in ("train", "val", "test"):
            ds = CohortDataset(data.cohort, data.rows[part], data.clinical)
            with torch.no_grad():
                b = next(iter(DataLoader(ds, batch_size=len(ds))))
                images, clin, present, y = to_device(b, exps, torch.device("cpu"))
                o = model(images, clin, present)
            prof = truth.loc[pids.str.removeprefix("sub-").to_numpy()[np.asarray(b["row"])]].to_numpy()
            out[part] = (o, clin, y, prof)
        o, clin, y, prof = out["test"]
        lp = o.expert_log_probs
        pred = {"run": o.log_probs.argmax(1), "uniform": torch.logsumexp(lp, 1).argmax(1),
                "true_profile_expert": lp[torch.arange(len(y)), [exps.index(p) for p in prof]].argmax(1)}
        for part in ("train", "val"):
            g = _refit_gate(out[part][0].expert_log_probs, out[part][1], out[part][2], data.weights)
            with torch.no_grad():
                lw = torch.log_softmax(g(clin), -1)
            pred[f"gate_refit_on_{part}"] = torch.logsumexp(lw.unsqueeze(-1) + lp, 1).argmax(1)
            gates.append(pd.DataFrame(lw.exp().numpy(), columns=exps).assign(fit_on=part, profile=prof))
        row = {"split_id": rd.name, **{k: float(balanced_accuracy_score(y, v)) for k, v in pred.items()}}
        for m in ("anat", "dwi", "func"):
            own = prof == m
            hit = (lp[:, exps.index(m)].argmax(1) == y).numpy()
            row[f"{m}_acc_own_profile"], row[f"{m}_acc_other"] = float(hit[own].mean()), float(hit[~own].mean())
        rows.append(row)
    df = pd.DataFrame(rows)
    mean = df.drop(columns="split_id").mean().round(4).to_dict()
    by_profile = (pd.concat(gates).groupby(["fit_on", "profile"]).mean().round(3)
                  .reset_index().to_dict("records"))
    for k, v in mean.items():
        print(f"{k:28s} {v:.3f}")
    print(pd.DataFrame(by_profile).to_string(index=False))
    return {"cache": str(cache_dir), "runs": str(runs), "n_runs": len(df), "mean": mean,
            "per_split": df.round(4).to_dict("records"), "refit_gate_by_true_profile": by_profile}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("oracle")
    o.add_argument("--subjects", type=int, default=60)
    o.add_argument("--synth", nargs="*", default=[], help="SynthParams overrides name=value")
    o.add_argument("--folds", type=int, default=3)
    o.add_argument("--seeds", default="0,1")
    s = sub.add_parser("signal")
    s.add_argument("--workdir", type=Path, required=True)
    lr = sub.add_parser("learnability")
    lr.add_argument("--workdir", type=Path, required=True)
    lr.add_argument("--splits", default="cv-s0-f0,cv-s0-f1,cv-s0-f2,cv-s0-f3,cv-s0-f4")
    e = sub.add_parser("experts")
    e.add_argument("--workdir", type=Path, required=True)
    e.add_argument("--runs", type=Path, required=True, help="<runs-dir>/<tag>/<variant> of a variants call")
    v = sub.add_parser("variants")
    v.add_argument("--workdir", type=Path, required=True)
    v.add_argument("--variants", default="full,no_gate,only_anat,only_dwi,only_func,only_clin")
    v.add_argument("--splits", default="cv-s0-f0,cv-s0-f1,cv-s0-f2")
    v.add_argument("--set", nargs="*", default=[], help="config overrides section.key=value")
    v.add_argument("--jobs", type=int, default=2)
    v.add_argument("--runs-dir", type=Path, default=Path("/tmp/neuromoe_fusion_study"))
    for p in (o, s, lr, e, v):
        p.add_argument("--tag", default="")
        p.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()
    if a.cmd == "oracle":
        res = oracle(a.subjects, a.synth, a.folds, [int(x) for x in a.seeds.split(",")])
    elif a.cmd == "signal":
        res = signal(a.workdir)
    elif a.cmd == "experts":
        res = experts(a.workdir, a.runs)
    elif a.cmd == "learnability":
        res = learnability(a.workdir, a.splits.split(","))
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
