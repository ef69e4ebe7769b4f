"""Training-step throughput of NeuroMoE: samples/s, FLOP/s, MFU (CUDA), share of step time waiting for data.

Two cases:

- ``demo``:  the 32^3 grid and the model section of config.yaml (what the bundled demo trains);
- ``paper``: the 64^3 grid and the paper-size model (width 256, depth 4, 8 heads, MLP 4; the defaults).

Each case builds a real cohort cache (``neuromoe.cache.store.build_cohort``, float16, memory-mapped) of random
subjects in a temporary folder, reads it through ``neuromoe.learn.data.CohortDataset`` and a DataLoader, times
``neuromoe.learn.train.train_step`` (forward, class-weighted loss, backward, AdamW; bf16 autocast on CUDA) after
warm-up steps. "data wait" is the time blocked in ``next(loader)`` over the whole step time. On CPU the
paper case runs one timed step at batch 1 (~850 GFLOP per sample and step: tens of seconds there).
MFU = 3 x forward FLOPs x samples/s / the bf16 dense peak of the GPU (table below; None elsewhere).

Usage::

    python bench/train_bench.py                # both cases, results -> bench/results/train.json
    python bench/train_bench.py --cases demo --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import machine  # noqa: E402

from neuromoe.cache import store as C  # noqa: E402
from neuromoe.learn.data import CohortDataset  # noqa: E402
from neuromoe.learn.model import ModelConfig, NeuroMoE, class_weights  # noqa: E402
from neuromoe.learn.screen import fit_screens  # noqa: E402
from neuromoe.learn.train import resolve_device, train_step  # noqa: E402

# bf16 dense tensor-core peaks (FLOP/s), vendor data sheets; matched on the device name.
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100 NVL": 835.0e12, "H100": 989.4e12,
             "A100": 312.0e12}
LABELS = ["HC", "PD", "iRBD"]


def peak_flops(dev: torch.device) -> float | None:
    """bf16 dense peak of the CUDA device from PEAK_BF16, None if unknown or CPU."""
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16.items():  # ordered: "H100 PCIe" before "H100"
        if key in name:
            return peak
    return None


def make_cache(root: Path, grid: tuple[int, int, int], n: int, seed: int = 0) -> tuple[Path, dict]:
    """A float16 cohort cache of ``n`` random subjects (all modalities) on ``grid``; returns (dir, cfg)."""
    rng = np.random.default_rng(seed)
    cfg = {"cache": {"grid": list(grid), "dtype": "float16", "dwi_maps": ["FA", "MD"],
                     "func_maps": ["fALFF", "ReHo"]},
           "participants": {"diagnosis_column": "diagnosis", "labels": LABELS,
                            "clinical_columns": ["age", "updrs3"]}}
    records, subs = [], [f"{i:02d}" for i in range(1, n + 1)]
    for sub in subs:
        d = root / f"sub-{sub}"
        d.mkdir(parents=True)
        rec = {"subject": sub, "cache_format": C.CACHE_FORMAT, "grid": list(grid), "dtype": "float16",
               "normalisation": C.normalisation_params(), "modalities": {}}
        for m, ch in (("anat", ["T1w"]), ("dwi", ["FA", "MD"]), ("func", ["fALFF", "ReHo"])):
            x = rng.standard_normal((len(ch), *grid), dtype=np.float32)
            np.save(d / f"{m}.npy", x.astype(np.float16))
            rec["modalities"][m] = {"channels": ch, "present": True, "file": f"{m}.npy"}
        (d / "rec.json").write_text(json.dumps(rec))
        records.append(d / "rec.json")
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subs],
                  "diagnosis": [LABELS[i % 3] for i in range(n)], "age": rng.normal(65, 8, n),
                  "updrs3": rng.normal(20, 8, n)}).to_csv(root / "participants.tsv", sep="\t", index=False)
    C.build_cohort(records, root / "participants.tsv", root / "cache", cfg)
    return root / "cache", cfg


def bench_case(name: str, mcfg: ModelConfig, batch: int, steps: int, warmup: int, workers: int,
               dev: torch.device, compile: bool = False) -> dict:
    """Time ``steps`` training steps (after ``warmup``) through a DataLoader over a memmapped cache;
    ``compile``: the model through ``torch.compile`` (its compilation falls in the warm-up steps)."""
    with tempfile.TemporaryDirectory(prefix=f"neuromoe-bench-{name}-") as tmp:
        n = max(batch * (steps + warmup), len(LABELS))  # every class once, for the class weights
        cache_dir, _ = make_cache(Path(tmp), mcfg.grid, n)
        ds = CohortDataset(cache_dir, None, np.zeros((n, mcfg.n_clinical), np.float32))
        loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers, drop_last=True,
                            pin_memory=dev.type == "cuda", persistent_workers=workers > 0)
        torch.manual_seed(0)
        model = NeuroMoE(mcfg).to(dev)
        fit_screens(model, C.open_cohort(cache_dir), list(range(n)))  # the demo's screen experts (else a no-op)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)
        stepped = torch.compile(model) if compile else model
        w = class_weights(ds.labels, len(LABELS)).to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        wait = total = 0.0
        it = iter(loader)
        for i in range(steps + warmup):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            b = next(it)
            t1 = time.perf_counter()
            train_step(stepped, opt, b, dev, w, 0.1, 1.0)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= warmup:
                wait, total = wait + (t1 - t0), total + (t2 - t0)
            note = " (warm-up)" if i < warmup else ""
            print(f"  {name}: step {i + 1}/{steps + warmup} {t2 - t0:.3f} s{note}", file=sys.stderr)
        sps = steps * batch / total
        flops = model.estimate_flops()
        peak = peak_flops(dev)
        res = {"case": name, "compile": compile, "grid": list(mcfg.grid), "tokens_per_modality": mcfg.n_tokens,
               "model": {k: getattr(mcfg, k) for k in ("dim", "depth", "heads", "mlp_ratio")},
               "n_params": model.num_params(), "batch": batch, "steps": steps, "warmup": warmup,
               "num_workers": workers, "device": str(dev), "seconds_per_step": total / steps,
               "samples_per_s": sps, "fwd_gflop_per_sample": flops / 1e9,
               "train_tflop_per_s": 3 * flops * sps / 1e12, "data_wait_fraction": wait / total,
               "mfu": model.estimate_mfu(batch, total / steps, peak) if peak else None,
               "peak_bf16_tflops": peak / 1e12 if peak else None}
        if dev.type == "cuda":
            res["max_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["demo", "paper"], choices=["demo", "paper"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default: 10 demo; paper 20 GPU, 1 CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: config train.num_workers)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    workers = cfg["train"].get("num_workers", 0) if args.workers is None else args.workers
    base = {"channels": {"anat": 1, "dwi": 2, "func": 2}, "n_clinical": 2, "n_classes": 3}
    gpu = dev.type == "cuda"
    mach = machine()  # load average before this benchmark adds its own
    results = []
    for case in args.cases:
        if case == "demo":
            mcfg = ModelConfig(**base, grid=(32, 32, 32), **cfg["model"])
            batch, steps, warmup = cfg["train"]["batch_size"], args.steps or 10, 2
        else:
            mcfg = ModelConfig(**base, grid=(64, 64, 64))
            batch, steps, warmup = (8, args.steps or 20, 3) if gpu else (1, args.steps or 1, 1)
        results.append(bench_case(case, mcfg, batch, steps, warmup, workers, dev))
    out = {"machine": mach, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    print(f"machine: {mach['cpu']} ({mach['cores']} cores, {mach['torch_threads']} torch threads), "
          f"torch {mach['torch']}, device {mach['gpu'] or 'cpu'}")
    head = f"{'case':6} {'grid':>5} {'params':>8} {'batch':>5} {'s/step':>8} {'samples/s':>10} " \
           f"{'TFLOP/s':>8} {'MFU':>6} {'data wait':>9}"
    print(head)
    print("-" * len(head))
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['case']:6} {r['grid'][0]:>4}^3 {r['n_params'] / 1e6:>7.2f}M {r['batch']:>5} "
              f"{r['seconds_per_step']:>8.3f} {r['samples_per_s']:>10.2f} {r['train_tflop_per_s']:>8.3f} "
              f"{mfu:>6} {r['data_wait_fraction']:>9.1%}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
