"""Probe H4: experts retrained with each training subject weighted per expert by the stage-1 gate's weights
(one step of alternating mixture-of-experts fitting), then the gate refitted by crossfit as usual.
usage: probe_gate_weighted.py SPLITS   (stage 1 = probe/none//full/<split>/model.safetensors)"""
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


def job(split):
    import neuromoe.learn.train as T
    from neuromoe.config import validate_config
    from neuromoe.learn.data import to_device
    cfg = yaml.safe_load((W / "config.yaml").read_text())
    validate_config(cfg)
    cache = W / "results/cache/cohort"
    splits = W / "results/model/splits.tsv"
    stage1 = W / "probe/none" / "" / "full" / split / "model.safetensors"
    model1, meta = T.load_model(stage1)
    data = T.prepare_data(cache, splits, split, ("anat", "dwi", "func", "clin"), cfg)
    with torch.no_grad():
        wts = torch.softmax(model1.gate(torch.tensor(data.clinical)), dim=-1)  # (N_cache, E) by cache row
    orig_step = T.train_step

    def step(model, opt, batch, dev, weights, lam, grad_clip=0.0, flip_lr=0.0, uniform_weights=False):
        if not uniform_weights:
            return orig_step(model, opt, batch, dev, weights, lam, grad_clip, flip_lr, uniform_weights)
        model.train()
        images, clin, present, y = to_device(batch, model.cfg.experts, dev)
        out = model(images, clin, present, uniform_weights=True)
        w = wts[batch["row"]]  # (B, E)
        a = weights[y] if weights is not None else torch.ones_like(y, dtype=torch.float32)
        nll = -out.expert_log_probs.gather(2, y.view(-1, 1, 1).expand(-1, w.shape[1], 1)).squeeze(2)  # (B, E)
        loss = (a.view(-1, 1) * w * nll).sum() / a.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        return {"loss": float(loss), "wce": float(loss), "balance": 0.0,
                "correct": float((out.log_probs.argmax(1) == y).sum()), "n": float(y.shape[0])}
    T.train_step = step
    out = W / "probe/h4" / "full" / split
    t = time.time()
    m = T.train_run(cache, splits, split, "full", cfg, out, device="cpu", threads=1, progress=False)
    pred = pd.read_csv(out / "predictions.tsv", sep="\t", dtype={"participant_id": str})
    return {"norm": "h4", "variant": "full", "split": split, "bacc": m["test"]["balanced_accuracy"],
            "sec": time.time() - t, "pred": pred[pred["part"] == "test"].to_dict("list")}


if __name__ == "__main__":
    splits = sys.argv[1].split(",")
    with ProcessPoolExecutor(2) as ex:
        res = list(ex.map(job, splits))
    from neuromoe.inputs.synth import read_truth
    pred = pd.concat([pd.DataFrame(r["pred"]) for r in res])
    pred["profile"] = pred["participant_id"].map(lambda p: read_truth(W / "bids", p)["profile"])
    probs = [c for c in pred.columns if c.startswith("prob_")]
    pred["ok"] = pred["label"] == pred[probs].idxmax(axis=1).str[5:]
    gates = [c for c in pred.columns if c.startswith("gate_")]
    print(f"h4 full bacc {np.mean([r['bacc'] for r in res]):.3f} per split {[round(r['bacc'], 2) for r in res]} "
          f"acc by profile {pred.groupby('profile')['ok'].mean().round(2).to_dict()}")
    print(pred.groupby("profile")[gates].mean().round(2))
    with open(W / "probe.jsonl", "a") as f:
        for r in res:
            r.pop("pred")
            f.write(json.dumps(r) + "\n")
