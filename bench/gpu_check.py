"""The GPU path, checked in one prepared command (issue 25): ``make gpu-check`` (or ``bash bench/gpu_check.sh``).

Runs, in order, and writes ``--out`` (default ``bench/results/gpu.json``) after each part, so a timeout keeps
what was done:

a. ``tests``: the suite's tests marked ``cuda`` (tests/test_gpu_path.py: bf16 against float32, a training step
   under CUDA's sync check, a checkpoint from the GPU predicting the same on the CPU);
b. ``throughput``: ``bench/train_bench.py``'s cases on the device, ``demo`` (32^3) and ``paper`` (64^3, the
   paper-size model, batch 8), each without and with ``torch.compile``: samples/s, MFU, the share of the step
   spent waiting for data, peak GPU memory;
c. ``training``: the workflow's own training function (``neuromoe.learn.train.train_run``, what rule ``train``
   calls) for one variant and split of a small cohort cache, on the CPU and on the device, their test metrics
   compared (``TOLERANCE``: bf16 autocast and other kernels make the runs differ in the last digits first, then
   along the way);
d. ``projection``: the paper protocol (presets/paper.yaml's variants x folds x seeds x epochs at 180 subjects)
   from the measured paper step time, and the largest batch of the paper model that fits in the GPU's memory.

``--tiny``: every part at toy sizes on the CPU (no compile, no batch search), in seconds: what the test suite
runs (tests/test_gpu_check.py), so the check cannot rot before a GPU is there to run it.
``--cohort DIR``: a cohort cache (``cache/cohort`` of a workflow run) with its ``splits.tsv`` beside it or in
``DIR/../../model``; default: a random cache (its metrics then compare two runs on noise, still a like-for-like
test of the device).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# CPU against GPU (bf16 autocast), the same seed and data: test balanced accuracy and class-weighted test NLL
TOLERANCE = {"balanced_accuracy": 0.15, "loss": 0.1}
SUBJECTS = 180  # the paper protocol's cohort


def _write(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, out)


def part_tests(ctx: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    if ctx["tiny"]:
        env["NEUROMOE_CHECK_DEVICE"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-o", "addopts=",
           str(ROOT / "tests" / "test_gpu_path.py")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    tail = (run.stdout + run.stderr).strip().splitlines()
    return {"ok": run.returncode == 0, "summary": tail[-1] if tail else "", "output_tail": tail[-15:]}


def part_throughput(ctx: dict) -> dict:
    import yaml
    from train_bench import bench_case

    from neuromoe.learn.model import ModelConfig

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    base = {"channels": {"anat": 1, "dwi": 2, "func": 2}, "n_clinical": 2, "n_classes": 3}
    dev, results = ctx["device"], []
    if ctx["tiny"]:
        cases = [("demo", ModelConfig(**base, grid=(16, 16, 16), **cfg["model"]), 2, 2, 1)]
        compiles = [False]
    else:
        cases = [("demo", ModelConfig(**base, grid=(32, 32, 32), **cfg["model"]), cfg["train"]["batch_size"], 20, 3),
                 ("paper", ModelConfig(**base, grid=(64, 64, 64)), 8, 20, 3)]
        compiles = [False, True]
    for name, mcfg, batch, steps, warmup in cases:
        for comp in compiles:
            try:
                r = bench_case(name, mcfg, batch, steps, warmup + (5 if comp else 0), 4 if dev.type == "cuda" else 0,
                               dev, compile=comp)
            except Exception as exc:  # compile can fail where the toolchain is missing: say so, go on
                r = {"case": name, "compile": comp, "error": f"{type(exc).__name__}: {exc}"}
            results.append(r)
            print(f"  throughput {name} compile={comp}: "
                  + (f"{r['samples_per_s']:.2f} samples/s, MFU {r['mfu']}" if "error" not in r else r["error"]),
                  file=sys.stderr)
    return {"ok": all("error" not in r for r in results if not r["compile"]), "results": results}


def _cohort(ctx: dict, tmp: Path) -> tuple[Path, Path, dict]:
    """(cache dir, splits.tsv, config) of the cohort the training part uses."""
    import pandas as pd
    from train_bench import make_cache

    from neuromoe.learn.splits import make_splits, subject_table, write_splits

    if ctx["cohort"]:
        cache = Path(ctx["cohort"])
        splits = next((p for p in (cache / "splits.tsv", cache.parent.parent / "model" / "splits.tsv")
                       if p.is_file()), None)
        cfg_file = next((p for p in (cache / "config.yaml", cache.parent.parent / "config.yaml") if p.is_file()),
                        None)
        if splits is None or cfg_file is None:
            raise FileNotFoundError(f"{cache}: no splits.tsv / config.yaml beside it or in the run's folder")
        import yaml

        from neuromoe.config import validate_config

        cfg = yaml.safe_load(cfg_file.read_text())
        return cache, splits, validate_config({**cfg, "bids_dir": str(cache), "evaluation": {"folds": 3}})
    n = 18 if ctx["tiny"] else 36
    cache, cfg = make_cache(tmp, (16, 16, 16) if ctx["tiny"] else (32, 32, 32), n, seed=1)
    index = pd.read_csv(cache / "index.tsv", sep="\t", dtype={"participant_id": str})
    splits = write_splits(make_splits(subject_table(index), "cv", 3, [0], 0.2), tmp / "splits.tsv")
    from neuromoe.config import validate_config

    model = {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2, "clin_hidden": [16, 8], "expert_hidden": 16,
             "gate_hidden": 8, "encoder": "vit"}
    train = {"epochs": 2 if ctx["tiny"] else 10, "batch_size": 4, "warmup_epochs": 1, "num_workers": 0}
    full = validate_config({"bids_dir": str(tmp), **cfg, "model": model, "train": train})
    return cache, Path(splits), full


def part_training(ctx: dict) -> dict:
    import numpy as np
    import pandas as pd

    from neuromoe.learn.splits import read_splits, split_ids
    from neuromoe.learn.train import train_run

    with tempfile.TemporaryDirectory(prefix="neuromoe-gpucheck-") as tmp:
        cache, splits, cfg = _cohort(ctx, Path(tmp))
        split = split_ids(read_splits(splits))[0]
        devices = ["cpu", "cpu"] if ctx["tiny"] else ["cpu", "cuda"]
        runs = {}
        for i, d in enumerate(devices):
            t0 = time.perf_counter()
            m = train_run(cache, splits, split, "full", cfg, Path(tmp) / f"run{i}-{d}", device=d, progress=False)
            pred = pd.read_csv(Path(tmp) / f"run{i}-{d}" / "predictions.tsv", sep="\t")
            runs[f"{i}-{d}"] = {"seconds": time.perf_counter() - t0, "metrics": m, "pred": pred}
        a, b = runs.values()
        test_a, test_b = (r["pred"][r["pred"]["part"] == "test"] for r in (a, b))
        prob_cols = [c for c in test_a.columns if c.startswith("prob_")]
        agree = float(np.mean(test_a[prob_cols].to_numpy().argmax(1) == test_b[prob_cols].to_numpy().argmax(1)))
        diff = {k: abs(float(a["metrics"]["test"][k]) - float(b["metrics"]["test"][k])) for k in TOLERANCE}
        return {"ok": all(diff[k] <= TOLERANCE[k] for k in TOLERANCE), "split": split, "devices": devices,
                "cohort": str(ctx["cohort"] or "random cache"), "tolerance": TOLERANCE, "difference": diff,
                "test_argmax_agreement": agree,
                "runs": {k: {"seconds": r["seconds"], "test": r["metrics"]["test"]} for k, r in runs.items()}}


def part_projection(ctx: dict, record: dict) -> dict:
    import yaml

    paper = yaml.safe_load((ROOT / "presets" / "paper.yaml").read_text())
    ev, tr = paper["evaluation"], paper["train"]
    runs = (len(ev["variants"]) + len(ev.get("lambda_sweep", []))) * ev["folds"] * len(ev["seeds"])
    n_train = int(SUBJECTS * (1 - 1 / ev["folds"]) * (1 - 0.2))
    steps_per_run = tr["epochs"] * math.ceil(n_train / tr["batch_size"])
    measured = [r for r in record["parts"].get("throughput", {}).get("results", [])
                if r.get("case") == ("demo" if ctx["tiny"] else "paper") and "error" not in r]
    if not measured:
        return {"ok": False, "why": "no step time measured (throughput failed)"}
    best = min(measured, key=lambda r: r["seconds_per_step"])
    total_s = runs * steps_per_run * best["seconds_per_step"] * tr["batch_size"] / best["batch"]
    out = {"ok": True, "runs": runs, "epochs": tr["epochs"], "steps_per_run": steps_per_run,
           "seconds_per_step_at_batch_8": best["seconds_per_step"] * tr["batch_size"] / best["batch"],
           "from": {"case": best["case"], "compile": best["compile"]}, "projected_hours_one_gpu": total_s / 3600,
           "note": "upper bound: every run to its last epoch (early stopping ends most sooner), evaluation apart"}
    if ctx["device"].type == "cuda":
        out["largest_batch"] = largest_batch()
    return out


def largest_batch(limit: int = 512) -> dict:
    """The largest power-of-two batch of the paper model whose training step fits in the GPU's memory."""
    import torch

    from neuromoe.learn.model import ModelConfig, NeuroMoE
    from neuromoe.learn.train import train_step

    mcfg = ModelConfig(channels={"anat": 1, "dwi": 2, "func": 2}, n_clinical=2, n_classes=3, grid=(64, 64, 64))
    dev, fits, batch = torch.device("cuda"), None, 8
    while batch <= limit:
        try:
            model = NeuroMoE(mcfg).to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            b = {m: torch.randn(batch, c, 64, 64, 64).half() for m, c in mcfg.channels.items()}
            b |= {"clin": torch.randn(batch, 2), "present": torch.ones(batch, 3, dtype=torch.bool),
                  "label": torch.arange(batch) % 3, "row": torch.arange(batch)}
            torch.cuda.reset_peak_memory_stats()
            train_step(model, opt, b, dev, None, 0.1, 1.0)
            torch.cuda.synchronize()
            fits = {"batch": batch, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            batch *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            model = opt = b = None
            torch.cuda.empty_cache()
    return {"largest": fits, "tried_up_to": min(batch, limit)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (what the test suite runs)")
    p.add_argument("--cohort", type=Path, default=None, help="a cohort cache for the training part")
    p.add_argument("--parts", nargs="+", default=["tests", "throughput", "training", "projection"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = p.parse_args(argv)
    import torch
    from _machine import machine

    if args.tiny:
        torch.set_num_threads(1)
    dev = torch.device("cpu") if args.tiny or not torch.cuda.is_available() else torch.device("cuda")
    if dev.type == "cpu" and not args.tiny:
        print("gpu_check: torch sees no CUDA device; run with --tiny for the CPU rehearsal", file=sys.stderr)
        return 2
    ctx = {"tiny": args.tiny, "device": dev, "cohort": args.cohort}
    record = {"machine": machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tiny": args.tiny,
              "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "parts": {}}
    _write(args.out, record)
    for name in args.parts:
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            fn = {"tests": part_tests, "throughput": part_throughput, "training": part_training}.get(name)
            res = fn(ctx) if fn else part_projection(ctx, record)
        except Exception as exc:
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        record["parts"][name] = res
        _write(args.out, record)
        print(f"gpu_check: {name}: {'ok' if res.get('ok') else 'FAILED'} ({res['seconds']} s)", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0 if all(r.get("ok") for r in record["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
