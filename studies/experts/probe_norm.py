"""Probe: do experts get stronger with inputs standardised per voxel on the training fold?
usage: probe_norm.py NORM(none|voxel|cnn|refit) VARIANTS SPLITS [key=value ...]

``refit`` (session 8): with ``train.gate_fit=joint`` the experts specialise under the gate during training
(the paper's joint fit); the gate is then refitted as ``crossfit`` does, on out-of-fold predictions of fold
models trained the same (joint) way plus the validation part. PROBE_PROCS: parallel runs (default 2)."""
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

W = Path(os.environ.get("PROBE_WORKDIR", "/tmp/tune90"))  # a workflow folder run up to `splits`


class CnnEncoder(torch.nn.Module):
    """A small 3D CNN in place of the ViT encoder (probe ``cnn``): three conv-ReLU-maxpool stages (16, 32, 32
    channels, 3^3 kernels), then one linear layer over the flattened positions -> (B, dim)."""

    def __init__(self, cfg, in_channels: int) -> None:
        super().__init__()
        nn = torch.nn
        layers, c = [], in_channels
        for width in (16, 32, 32):
            layers += [nn.Conv3d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        n = c * int(np.prod([g // 8 for g in cfg.grid]))
        self.readout = nn.Sequential(nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(n, cfg.dim))

    def forward(self, x):
        return self.readout(self.features(x))


def job(args):
    norm, variant, split, overrides = args
    import neuromoe.learn.data as D
    import neuromoe.learn.gate as G
    import neuromoe.learn.train as T
    from neuromoe.cache.store import open_cohort
    from neuromoe.config import validate_config
    from neuromoe.learn.splits import split_rows
    cfg = yaml.safe_load((W / "config.yaml").read_text())
    for kv in overrides:
        k, v = kv.split("=", 1)
        node = cfg
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = yaml.safe_load(v)
    validate_config(cfg)
    cache = W / "results/cache/cohort"
    splits = W / "results/model/splits.tsv"
    if norm == "voxel":
        c = open_cohort(cache, verify=False)
        rows = split_rows(c.index, splits, split)["train"]
        stats = {}
        for m in ("anat", "dwi", "func"):
            a = np.load(cache / f"{m}.npy", mmap_mode="r")[rows].astype(np.float32)
            stats[m] = (torch.tensor(a.mean(0)), torch.tensor(a.std(0)).clamp_min(0.25))
        orig = D.to_device
        def patched(batch, experts, dev):
            images, clin, present, y = orig(batch, experts, dev)
            return {m: (x - stats[m][0].to(dev)) / stats[m][1].to(dev) for m, x in images.items()}, clin, present, y
        T.to_device = patched
        G.to_device = patched
    if norm == "cnn":
        import neuromoe.learn.model as M
        M.VolumeEncoder = CnnEncoder
    if norm == "refit":
        joint_epoch = T.train_epoch

        def train_epoch_joint(*args):  # crossfit fold models train under the gate too
            return joint_epoch(*args[:-1], False)

        def refit_after(run, state):
            T.train_epoch = train_epoch_joint
            oof = T.crossfit_log_probs(run.mcfg, run.data, run.tc, run.dev, run.lam, run.seed, state["best_epoch"],
                                       run.loader_kw, run.tag, False)
            T.train_epoch = joint_epoch
            val = G.expert_log_probs(run.model, run.eval_loaders["val"], run.dev)
            G.fit_gate_to(run.model.gate, *(torch.cat(t) for t in zip(oof, val, strict=True)), run.weights, run.lam,
                          run.tc.gate_fit_steps, T.derive_seed(run.seed, "gate"))
        T.fit_gate_after = refit_after  # the probe replaces this one step of the product
    out = W / "probe" / norm / "_".join(overrides) / variant / split
    t = time.time()
    m = T.train_run(cache, splits, split, variant, cfg, out, device="cpu", threads=1, progress=False)
    pred = pd.read_csv(out / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    return {"norm": norm, "variant": variant, "split": split, "bacc": m["test"]["balanced_accuracy"],
            "sec": time.time() - t, "pred": pred[pred["part"] == "test"].to_dict("list")}


if __name__ == "__main__":
    norm, variants, splits = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
    overrides = sys.argv[4:]
    with ProcessPoolExecutor(int(os.environ.get("PROBE_PROCS", 2))) as ex:
        res = list(ex.map(job, [(norm, v, s, overrides) for v in variants for s in splits]))
    from neuromoe.inputs.synth import read_truth
    prof = {}
    for r in res:
        for pid in r["pred"]["participant_id"]:
            if pid not in prof:
                prof[pid] = read_truth(W / "bids", pid)["profile"]
    for v in variants:
        rs = [r for r in res if r["variant"] == v]
        pred = pd.concat([pd.DataFrame(r["pred"]) for r in rs])
        pred["profile"] = pred["participant_id"].map(prof)
        probs = [c for c in pred.columns if c.startswith("prob_")]
        pred["ok"] = pred["label"] == pred[probs].idxmax(axis=1).str[5:]
        by = pred.groupby("profile")["ok"].mean().round(2).to_dict()
        print(f"{norm:6s} {' '.join(overrides):30s} {v:10s} bacc {np.mean([r['bacc'] for r in rs]):.3f}  "
              f"per split {[round(r['bacc'], 2) for r in rs]}  acc by profile {by}  "
              f"{np.mean([r['sec'] for r in rs]):.0f}s",
              flush=True)
    with open(W / "probe.jsonl", "a") as f:
        for r in res:
            r.pop("pred")
            f.write(json.dumps({**r, "overrides": overrides}) + "\n")
