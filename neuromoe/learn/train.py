"""Training of one (split, variant): ``train_run`` -> a run folder with a model, its history, predictions.

Run folder (``out_dir``)::

    checkpoint/last.safetensors (+ .json)   every epoch: model, AdamW, RNG states, history, early-stop state
    checkpoint/best.safetensors (+ .json)   select val_loss: the weights with the lowest validation loss so far
    history.csv                              one row per epoch
    model.safetensors, model.json            kept weights + configs, classes, clinical preprocessor, metrics
    predictions.tsv                          val and test: participant_id, part, label, prob_*, gate_*
    metrics.json                             val/test accuracy, balanced accuracy, loss, mean gate per expert

A gated variant whose experts train under uniform weights (``gate_fit: heldout`` / ``crossfit``) trains them
exactly as the ungated variant of the same experts does; given that variant's finished run
(``experts_from``, see ``expert_donor``) it adopts those experts and only fits its gate, so e.g. ``full`` and
``no_gate`` differ by the gate alone and the experts are trained once per split.

Screen experts (``model.encoder: screen``) of a model with several experts trained jointly can be refitted
(``train.screen_refits``, an EM loop): after a round's training, each training subject's responsibility of
each expert (``gate.responsibilities``) weights that expert's screen fit, and the model trains again from a
fresh initialisation on the refitted screens. The history then holds every round (column ``round``).

The choices the paper leaves open (validation loss, ``gate_fit``, ``select``, schedule, weight decay, seeds,
missing modalities) are in docs/model.md.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from neuromoe.config import ParticipantsConfig, TrainConfig
from neuromoe.errors import InputError
from neuromoe.learn.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    write_json_atomic,
)
from neuromoe.learn.clinical import ClinicalPreprocessor
from neuromoe.learn.data import CohortDataset, to_device
from neuromoe.learn.gate import expert_log_probs, fit_gate, fit_gate_to, responsibilities
from neuromoe.learn.model import (
    MRI_MODALITIES,
    ModelConfig,
    NeuroMoE,
    class_weights,
    moe_loss,
)
from neuromoe.learn.screen import VoxelScreen, fit_screens
from neuromoe.learn.splits import split_rows
from neuromoe.learn.variants import variant_spec

HISTORY_COLUMNS = ["epoch", "train_loss", "train_wce", "train_balance", "train_acc", "val_loss", "val_acc",
                   "val_balanced_acc", "val_balance", "lr", "seconds", "round"]

class StopRun(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raise from ``on_epoch_end`` to stop a run the way a kill would (its checkpoint is already written)."""


# ---------------------------------------------------------------------------------------------
# Variants and settings
# ---------------------------------------------------------------------------------------------
def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any printable parts (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def resolve_device(device: str = "auto", configured: str = "auto") -> torch.device:
    """``device`` if not auto, else ``configured`` if not auto, else CUDA when available, else CPU."""
    choice = device if device != "auto" else configured
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device; use device auto or cpu")
    return torch.device(choice)


class EpochSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from (seed, epoch): stateless, so resuming replays it."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "shuffle", self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


# ---------------------------------------------------------------------------------------------
# One pass
# ---------------------------------------------------------------------------------------------
def _autocast(dev: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()


def augment(images: dict[str, Tensor], flip_lr: float) -> dict[str, Tensor]:
    """Mirror each sample left-right (grid axis D, MNI x -> -x) with probability ``flip_lr``.

    All modalities of a sample are mirrored together. The draw comes from torch's global generator on
    the CPU (seeded per epoch by ``train_run``), so a run is reproducible and resumable and a CUDA run
    draws the same flips as a CPU run. Only meaningful on a grid symmetric about the mid-sagittal plane
    (``check_flip_grid``) and for effects that are not lateralised; set ``train.flip_lr: 0`` otherwise.
    """
    if flip_lr <= 0 or not images:
        return images
    x0 = next(iter(images.values()))
    flip = (torch.rand(x0.shape[0]) < flip_lr).view(-1, 1, 1, 1, 1).to(x0.device, non_blocking=True)
    return {m: torch.where(flip, x.flip(2), x) for m, x in images.items()}


def check_flip_grid(affine: Sequence[Sequence[float]], grid: Sequence[int]) -> None:
    """ValueError unless the grid's first axis runs along x and is centred on x = 0 (so a flip of that
    axis is the mirror x -> -x of the symmetric MNI template)."""
    a = np.asarray(affine, dtype=float)
    centre_x = a[0, 3] + a[0, 0] * (grid[0] - 1) / 2.0
    if not (np.allclose(a[1:3, 0], 0) and np.allclose(a[0, 1:3], 0) and abs(centre_x) < 0.25 * abs(a[0, 0])):
        raise ValueError(f"train.flip_lr > 0 needs a cache grid whose first axis is x, centred on x = 0 mm "
                         f"(MNI mid-sagittal plane); this cache's grid is centred on x = {centre_x:.2f} mm. "
                         "Set train.flip_lr: 0 or rebuild the cache with the workflow's MNI grid")


def train_step(model: NeuroMoE, opt: torch.optim.Optimizer, batch: Mapping[str, Tensor],
               dev: torch.device, weights: Tensor | None, balance_lambda: float,
               grad_clip: float = 0.0, flip_lr: float = 0.0, uniform_weights: bool = False) -> dict[str, Tensor]:
    """One optimiser step on a collated batch (bf16 autocast on CUDA); the learning rate is the caller's.

    ``uniform_weights``: experts weighted equally, the gate not trained (``gate_fit: heldout`` / ``crossfit``).

    Returns {"loss", "wce", "balance"} (batch means) and {"correct", "n"} (counts) as detached scalar tensors on
    the device: nothing in the step waits for the GPU (no ``float()`` / ``.item()``; tests/test_cuda.py runs it
    under CUDA's sync check), so the host queues the next batch while this one computes.
    """
    model.train()
    images, clin, present, y = to_device(batch, model.cfg.experts, dev)
    images = augment(images, flip_lr)
    with _autocast(dev):
        out = model(images, clin, present, uniform_weights=uniform_weights)
    loss, parts = moe_loss(out, y, weights, balance_lambda)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    correct = (out.log_probs.detach().argmax(1) == y).sum()
    return {"loss": loss.detach(), **parts, "correct": correct, "n": torch.tensor(float(y.shape[0]))}


def train_epoch(model: NeuroMoE, opt: torch.optim.Optimizer, batches: Iterable[Mapping[str, Any]],
                dev: torch.device, weights: Tensor | None, lam: float, tc: TrainConfig, step: int, warmup: int,
                total: int, uniform_weights: bool) -> tuple[dict[str, float], int, float]:
    """One pass of ``train_step`` over ``batches``, the learning rate set per step by the run's schedule.

    ``step``: optimiser steps taken before this epoch. Returns (sums of loss/wce/balance weighted by batch
    size, correct and n; the step count after the epoch; the last learning rate). The sums stay on the device
    until the epoch ends (one host sync per epoch); a ``tqdm`` as ``batches`` shows the running loss and
    accuracy at most once a second.
    """
    sums: dict[str, Any] = dict.fromkeys(("loss", "wce", "balance", "correct", "n"), 0.0)
    lr, shown = tc.lr, time.monotonic()
    for batch in batches:
        lr = lr_at(step, tc.lr, warmup, total, tc.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        r = train_step(model, opt, batch, dev, weights, lam, tc.grad_clip, tc.flip_lr, uniform_weights)
        step += 1
        n = float(r["n"])  # a CPU tensor: no sync
        for k in ("loss", "wce", "balance"):  # in float64, as the floats they were
            sums[k] = sums[k] + r[k].double() * n
        sums["correct"] = sums["correct"] + r["correct"]
        sums["n"] += n
        if isinstance(batches, tqdm) and time.monotonic() - shown >= 1.0:
            shown = time.monotonic()
            batches.set_postfix(loss=f"{float(sums['loss']) / sums['n']:.3f}",
                                acc=f"{float(sums['correct']) / sums['n']:.2f}")
    return {k: float(v) for k, v in sums.items()}, step, lr


@torch.no_grad()
def predict(model: NeuroMoE, loader: DataLoader, dev: torch.device, uniform_weights: bool = False
            ) -> dict[str, np.ndarray]:
    """Eval-mode pass -> numpy {"log_probs" (N,C), "gate" (N,E), "label" (N,), "row" (N,)}, loader order."""
    model.eval()
    out: dict[str, list[Tensor]] = {"log_probs": [], "gate": [], "label": [], "row": []}
    for batch in loader:
        images, clin, present, y = to_device(batch, model.cfg.experts, dev)
        with _autocast(dev):
            o = model(images, clin, present, uniform_weights=uniform_weights)
        out["log_probs"].append(o.log_probs.float().cpu())
        out["gate"].append(o.gate.float().cpu())
        out["label"].append(y.cpu())
        out["row"].append(torch.as_tensor(batch["row"]).long())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def _accuracy(y: np.ndarray, y_hat: np.ndarray) -> float:
    return float(np.mean(y == y_hat)) if len(y) else float("nan")


def _balanced_accuracy(y: np.ndarray, y_hat: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (scikit-learn's definition)."""
    return float(np.mean([np.mean(y_hat[y == c] == c) for c in np.unique(y)])) if len(y) else float("nan")


def _weighted_nll(log_probs: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    """sum_i a_{y_i} (-log p_i[y_i]) / sum_i a_{y_i}, as F.nll_loss(weight=a) over the whole set."""
    a = weights[y]
    return float(np.sum(-log_probs[np.arange(len(y)), y] * a) / np.sum(a)) if len(y) else float("nan")


def part_metrics(pred: Mapping[str, np.ndarray], weights: np.ndarray,
                 experts: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, class-weighted NLL, mean gate per expert of a ``predict`` output."""
    y, y_hat = pred["label"], pred["log_probs"].argmax(1)
    return {"n": int(len(y)), "accuracy": _accuracy(y, y_hat),
            "balanced_accuracy": _balanced_accuracy(y, y_hat),
            "loss": _weighted_nll(pred["log_probs"], y, weights),
            "gate_mean": {e: float(pred["gate"][:, i].mean()) if len(y) else float("nan")
                          for i, e in enumerate(experts)}}


# ---------------------------------------------------------------------------------------------
# train_run
# ---------------------------------------------------------------------------------------------
def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def _predictions_table(pred: Mapping[str, np.ndarray], part: str, index: pd.DataFrame,
                       classes: Sequence[str], experts: Sequence[str]) -> pd.DataFrame:
    from neuromoe.cache.store import id_columns

    table = pd.DataFrame({**id_columns(index, pred["row"]), "part": part,
                          "label": [classes[i] for i in pred["label"]]})
    probs = np.exp(pred["log_probs"])
    for j, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, j]
    for j, e in enumerate(experts):
        table[f"gate_{e}"] = pred["gate"][:, j]
    return table


@dataclass
class RunData:
    """What a run needs from the cohort cache and the splits (see ``prepare_data``)."""

    cohort: Any  # neuromoe.cache.store.CohortCache
    rows: dict[str, list[int]]  # part -> cache rows used
    excluded: dict[str, list[int]]  # part -> cache rows left out (missing modalities)
    clinical: np.ndarray  # (N_cache, F) float32, fitted on the train rows
    preprocessor: ClinicalPreprocessor
    weights: Tensor  # (C,) class weights of the train rows


def prepare_data(cache_dir: str | Path, splits_tsv: str | Path, split_id: str, experts: Sequence[str],
                 cfg: Mapping[str, Any]) -> RunData:
    """Open the cache (checked against ``cfg``), pick the split's rows, fit clinical scaling on train."""
    from neuromoe.cache.store import open_cohort

    cohort = open_cohort(cache_dir, expected=cfg)
    index = cohort.index
    rows = split_rows(index, splits_tsv, split_id)
    for part in ("train", "val"):
        if not rows.get(part):
            raise InputError(f"split {split_id} has no {part} subjects", path=splits_tsv,
                             fix="regenerate the splits (each needs train and val subjects)")
    has = index.set_index("row")[[f"has_{m}" for m in MRI_MODALITIES]].astype(bool)
    has.columns = list(MRI_MODALITIES)
    needed = [m for m in experts if m in MRI_MODALITIES]
    participants = ParticipantsConfig.from_config(cfg)
    if participants.missing_modality == "exclude":
        usable = has.all(axis=1)
    elif "clin" in experts or not needed:
        usable = pd.Series(True, index=has.index)
    else:
        usable = has[needed].any(axis=1)
    excluded = {p: [r for r in rs if not usable[r]] for p, rs in rows.items()}
    rows = {p: [r for r in rs if usable[r]] for p, rs in rows.items()}
    if not rows["train"] or not rows["val"]:
        raise InputError(f"split {split_id}, experts {list(experts)}: no usable train or val subject after "
                         "leaving out those missing modalities", path=cache_dir,
                         fix="set participants.missing_modality: keep, or check the cache's has_* columns")
    clin_cols = list(participants.clinical_columns)
    pre = ClinicalPreprocessor(clin_cols).fit(index.iloc[rows["train"]])
    y = index["label"].to_numpy(dtype=np.int64)
    return RunData(cohort=cohort, rows=rows, excluded=excluded, clinical=pre.transform(index),
                   preprocessor=pre, weights=class_weights(y[rows["train"]], len(cohort.labels)))


def crossfit_fold_count(train_labels: np.ndarray, wanted: int) -> int:
    """Folds of the training part for ``gate_fit: crossfit``: ``train.crossfit_folds``, at most the largest
    class's size (a stratified fold needs a subject of that class to hold out)."""
    return min(wanted, int(np.bincount(np.asarray(train_labels, dtype=np.int64)).max(initial=0)))


def check_crossfit(data: RunData, tc: TrainConfig, split_id: str, splits_tsv: str | Path) -> None:
    """InputError, before any training, when the training part is too small to cut into 2 crossfit folds."""
    labels = data.cohort.index["label"].to_numpy()[np.asarray(data.rows["train"])]
    if crossfit_fold_count(labels, tc.crossfit_folds) < 2:
        raise InputError(f"split {split_id}: train.gate_fit crossfit cuts the training part into stratified folds, "
                         f"but it holds at most one subject per class ({len(labels)} subjects)", path=splits_tsv,
                         fix="use more subjects (at least 2 per class in every training part; 18 in all with "
                             "5-fold CV), or train.gate_fit: joint")


def crossfit_log_probs(mcfg: ModelConfig, data: RunData, tc: TrainConfig, dev: torch.device, lam: float,
                       seed: int, epochs: int, loader_kw: Mapping[str, Any], tag: str = "",
                       progress: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Out-of-fold expert log-probs of every training subject (``gate_fit: crossfit``).

    The training part is cut into ``tc.crossfit_folds`` stratified folds; for each, a fresh model's experts
    train under uniform weights on the other folds for ``epochs`` epochs of the run's schedule, then
    predict the held-out fold. Returns (log-probs (N, E, C), clin, present, y) over the training rows, so
    a gate can be fitted on subjects none of whose predictions come from a model that trained on them.
    """
    from sklearn.model_selection import StratifiedKFold

    rows = np.asarray(data.rows["train"])
    labels = data.cohort.index["label"].to_numpy()[rows]
    k = crossfit_fold_count(labels, tc.crossfit_folds)
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=derive_seed(seed, "crossfit"))
    weights = data.weights.to(dev)
    parts: list[tuple[Tensor, ...]] = []
    for fold, (fit_idx, held_idx) in enumerate(skf.split(rows, labels)):
        fold_seed = derive_seed(seed, "crossfit", fold)
        torch.manual_seed(fold_seed)
        sub = NeuroMoE(mcfg).to(dev)
        fit_screens(sub, data.cohort, rows[fit_idx])  # a fold's screen sees only the fold's fitting subjects
        opt = torch.optim.AdamW(_param_groups(sub, tc.weight_decay), lr=tc.lr, fused=dev.type == "cuda" or None)
        sampler = EpochSampler(len(fit_idx), fold_seed)
        loader = DataLoader(CohortDataset(data.cohort, rows[fit_idx].tolist(), data.clinical), sampler=sampler,
                            **loader_kw)
        warmup, total = tc.warmup_epochs * len(loader), tc.epochs * len(loader)
        step = 0
        for epoch in tqdm(range(epochs), desc=f"{tag} crossfit {fold + 1}/{k}", file=sys.stderr, leave=False,
                          disable=not progress):
            torch.manual_seed(derive_seed(fold_seed, "epoch", epoch))
            sampler.set_epoch(epoch)
            _, step, _ = train_epoch(sub, opt, loader, dev, weights, lam, tc, step, warmup, total, True)
        held = DataLoader(CohortDataset(data.cohort, rows[held_idx].tolist(), data.clinical), shuffle=False,
                          **loader_kw)
        parts.append(expert_log_probs(sub, held, dev))
    return tuple(torch.cat(t) for t in zip(*parts, strict=True))  # type: ignore[return-value]


def _fresh_state() -> dict[str, Any]:
    return {"epoch": 0, "step": 0, "history": [], "best_val": float("inf"), "best_epoch": -1, "bad_epochs": 0,
            "finished": False, "stopped_early": False, "round": 0, "epochs_before": 0}


@dataclass
class Run:
    """One (split, variant) being trained: its settings, data, model, optimiser and loaders (see ``train_run``)."""

    tag: str
    out_dir: Path
    split_id: str
    variant: str
    experts: tuple[str, ...]
    use_gate: bool
    # Experts trained under uniform weights, the gate fitted after them (gate_fit heldout / crossfit).
    uniform_weights: bool
    tc: TrainConfig
    lam: float  # balance lambda
    dev: torch.device
    seed: int
    data: RunData
    mcfg: ModelConfig
    fingerprint: dict[str, Any]  # a checkpoint resumes only a run with the same
    model: NeuroMoE
    opt: torch.optim.Optimizer
    sampler: EpochSampler
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    loader_kw: dict[str, Any]
    warmup: int  # optimiser steps
    total: int
    weights: Tensor  # class weights on dev
    progress: bool

    @property
    def last_path(self) -> Path:
        return self.out_dir / "checkpoint" / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "checkpoint" / "best.safetensors"


def _resume(run: Run) -> dict[str, Any]:
    """The run's state: fresh, or restored (model, optimiser, RNG) from ``checkpoint/last.safetensors``."""
    if not run.last_path.exists():
        return _fresh_state()
    ck = load_checkpoint(run.last_path, device=run.dev)
    if ck.meta.get("fingerprint") != run.fingerprint:
        raise CheckpointError(f"{run.last_path}: written by a run with another configuration (split, "
                              "variant, model, train settings or subjects differ).\n"
                              f"  fix: delete {run.last_path.parent} to start this run over")
    run.model.load_state_dict(ck.model_state)
    run.opt.load_state_dict(ck.optimizer_state)
    state = ck.meta["state"]
    if ck.rng_state is not None:
        restore_rng_state(ck.rng_state)
    tqdm.write(f"{run.tag} resuming after epoch {state['epoch']}", file=sys.stderr)
    return state


def _adopt_experts(run: Run, donor: Path) -> dict[str, Any]:
    """Load the experts of a finished ungated run (``expert_donor``) into ``run.model``; returns the
    finished state (the donor's history and kept epoch). CheckpointError when the donor trained other
    experts, on other subjects or with other settings."""
    ck = load_checkpoint(donor, device=run.dev)
    meta = ck.meta
    own_train = {k: v for k, v in asdict(run.tc).items() if k not in ("num_workers", "device")}
    donor_train = {k: v for k, v in meta.get("train_config", {}).items() if k not in ("num_workers", "device")}
    checks = {"split": (meta.get("split_id"), run.split_id),
              "model settings": ({**meta.get("model_config", {}), "use_gate": run.mcfg.use_gate},
                                 run.mcfg.to_dict()),
              "train settings": (donor_train, own_train),
              "training subjects (clinical scaling)": (meta.get("clinical"), run.data.preprocessor.to_dict()),
              "subjects per part": ((meta.get("metrics") or {}).get("n"),
                                    {p: len(r) for p, r in run.data.rows.items()})}
    differ = [name for name, (theirs, ours) in checks.items() if theirs != ours]
    if meta.get("model_config", {}).get("use_gate", True):
        differ.insert(0, "gate (the donor must be an ungated run)")
    if differ:
        raise CheckpointError(f"{donor}: {run.tag} cannot adopt these experts: {', '.join(differ)} differ.\n"
                              f"  fix: rerun that run with the current config (snakemake --forcerun train), or "
                              f"delete {donor.parent}")
    missing, unexpected = run.model.load_state_dict(ck.model_state, strict=False)
    if unexpected or any(not k.startswith("gate.") for k in missing):
        raise CheckpointError(f"{donor}: its weights do not fit {run.tag} (missing {missing}, unexpected "
                              f"{unexpected}).\n  fix: delete {donor.parent} and rerun")
    history = pd.read_csv(donor.parent / "history.csv").to_dict("records")
    tqdm.write(f"{run.tag} experts adopted from {donor.parent} (trained once for both runs)", file=sys.stderr)
    return {**_fresh_state(), "history": history, "epoch": int(meta["metrics"]["epochs_run"]),
            "best_epoch": int(meta["epoch"]), "stopped_early": bool(meta["metrics"]["stopped_early"]),
            "finished": True, "experts_from": meta.get("variant")}


def _run_epoch(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    """Train one epoch, validate, update ``state`` and write the checkpoints; returns the history row."""
    tc, epoch, experts = run.tc, state["epoch"], run.experts
    torch.manual_seed(derive_seed(run.seed, "epoch", epoch))  # dropout draws: a function of the epoch
    run.sampler.set_epoch(epoch)
    t0 = time.time()
    bar = tqdm(run.train_loader, desc=f"{run.tag} epoch {epoch + 1}/{tc.epochs}", file=sys.stderr,
               leave=False, disable=not run.progress, mininterval=1.0)
    sums, state["step"], lr = train_epoch(run.model, run.opt, bar, run.dev, run.weights, run.lam, tc,
                                          state["step"], run.warmup, run.total, run.uniform_weights)
    bar.close()
    val = predict(run.model, run.eval_loaders["val"], run.dev, uniform_weights=run.uniform_weights)
    vm = part_metrics(val, run.data.weights.numpy(), experts)
    n = max(sums["n"], 1.0)
    row = {"epoch": state.get("epochs_before", 0) + epoch + 1, "train_loss": sums["loss"] / n,
           "train_wce": sums["wce"] / n,
           "train_balance": sums["balance"] / n, "train_acc": sums["correct"] / n,
           "val_loss": vm["loss"], "val_acc": vm["accuracy"], "val_balanced_acc": vm["balanced_accuracy"],
           "val_balance": float(np.mean((val["gate"].mean(0) - 1.0 / len(experts)) ** 2)),
           "lr": lr, "seconds": time.time() - t0, "round": state.get("round", 0)}
    state["history"].append(row)
    state["epoch"] = epoch + 1
    if tc.select == "last":  # the kept weights are last.safetensors' (written below)
        state.update(best_val=vm["loss"], best_epoch=epoch + 1)
    elif vm["loss"] < state["best_val"]:
        state.update(best_val=vm["loss"], best_epoch=epoch + 1, bad_epochs=0)
        save_checkpoint(run.best_path, run.model.state_dict(), {"epoch": epoch + 1, "val": vm})
    else:
        state["bad_epochs"] += 1
    if state["bad_epochs"] >= tc.patience:
        state.update(finished=True, stopped_early=True)
    elif state["epoch"] >= tc.epochs:
        state["finished"] = True
    # best before last: a kill in between replays this epoch, which rewrites the same best.
    save_checkpoint(run.last_path, run.model.state_dict(), {"fingerprint": run.fingerprint, "state": state},
                    optimizer_state=run.opt.state_dict(), rng_state=capture_rng_state())
    _write_history(run.out_dir / "history.csv", state["history"])
    tqdm.write(f"{run.tag} epoch {epoch + 1}: train loss {row['train_loss']:.4f} val loss {row['val_loss']:.4f} "
               f"acc {row['val_acc']:.3f} bacc {row['val_balanced_acc']:.3f} lr {lr:.2e} "
               f"({row['seconds']:.1f} s)", file=sys.stderr)
    return row


def refit_due(run: Run, state: dict[str, Any]) -> bool:
    """Whether a finished round is followed by a screen refit (``train.screen_refits``): the model has screen
    experts and another expert to share subjects with, and its experts train under its own routing (an
    ungated model: uniform; ``gate_fit: joint``: the gate's)."""
    screens = any(isinstance(e, VoxelScreen) for e in run.model.encoders.values())
    return (screens and len(run.experts) > 1 and not run.uniform_weights
            and state.get("round", 0) < run.tc.screen_refits)


def refit_screens(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    """One EM step of the screens: responsibilities of the finished round's model on the training part
    weight each screen's refit; the network restarts from a fresh initialisation (its heads read other
    voxels now) with a fresh optimiser and schedule. Returns the next round's state, checkpointed at once
    so that a kill resumes with the refitted screens."""
    data, r = run.data, state.get("round", 0) + 1
    if run.tc.select == "val_loss" and run.best_path.exists():  # the round's kept weights, as _finish keeps them
        run.model.load_state_dict(load_checkpoint(run.best_path, device=run.dev).model_state)
    loader = DataLoader(CohortDataset(data.cohort, data.rows["train"], data.clinical), shuffle=False,
                        **run.loader_kw)
    resp = responsibilities(run.model, loader, run.dev).numpy()
    weights = {m: resp[:, i] for i, m in enumerate(run.experts) if m in MRI_MODALITIES}
    torch.manual_seed(derive_seed(run.seed, "round", r))
    fresh = NeuroMoE(run.mcfg).to(run.dev)
    fit_screens(fresh, data.cohort, data.rows["train"], weights)
    run.model.load_state_dict(fresh.state_dict())
    run.opt = torch.optim.AdamW(_param_groups(run.model, run.tc.weight_decay), lr=run.tc.lr,
                                fused=run.dev.type == "cuda" or None)
    nxt = {**_fresh_state(), "round": r, "history": state["history"],
           "epochs_before": state.get("epochs_before", 0) + state["epoch"]}
    save_checkpoint(run.last_path, run.model.state_dict(), {"fingerprint": run.fingerprint, "state": nxt},
                    optimizer_state=run.opt.state_dict(), rng_state=capture_rng_state())
    share = ", ".join(f"{m} {w.mean():.2f}" for m, w in weights.items())
    tqdm.write(f"{run.tag} round {r}: screens refitted on the responsibilities (mean share {share})",
               file=sys.stderr)
    return nxt


def fit_gate_after(run: Run, state: dict[str, Any]) -> None:
    """Fit the gate to the kept experts when they trained under uniform weights (``gate_fit``)."""
    if not run.uniform_weights:  # joint: the gate trained with the experts
        return
    if run.tc.gate_fit == "heldout":
        fit_gate(run.model, run.eval_loaders["val"], run.dev, run.weights, run.lam, run.tc.gate_fit_steps,
                 derive_seed(run.seed, "gate"))
        return
    oof = crossfit_log_probs(run.mcfg, run.data, run.tc, run.dev, run.lam, run.seed, state["best_epoch"],
                             run.loader_kw, run.tag, run.progress)
    val = expert_log_probs(run.model, run.eval_loaders["val"], run.dev)  # the kept experts did not train on these
    fit_gate_to(run.model.gate, *(torch.cat(t) for t in zip(oof, val, strict=True)), run.weights, run.lam,
                run.tc.gate_fit_steps, derive_seed(run.seed, "gate"))


def _finish(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    """Kept weights (+ gate fit) -> model.safetensors, predictions.tsv, metrics.json; returns the metrics.

    The history is rewritten too: a run that finished its epochs but lost its final files (killed in this
    stage; Snakemake removes an incomplete job's outputs before rerunning it) comes back here from its
    checkpoint.
    """
    tc, data, model, classes = run.tc, run.data, run.model, run.data.cohort.labels
    run.out_dir.mkdir(parents=True, exist_ok=True)  # a run with adopted experts wrote no checkpoint
    _write_history(run.out_dir / "history.csv", state["history"])
    if not state.get("experts_from"):  # adopted experts are in the model already
        kept_path = run.last_path if tc.select == "last" else run.best_path
        if not kept_path.exists():
            raise RuntimeError(f"{run.tag} no epoch had a finite validation loss (training diverged); "
                               "lower train.lr or check the inputs for NaNs")
        model.load_state_dict(load_checkpoint(kept_path, device=run.dev).model_state)
    fit_gate_after(run, state)
    results: dict[str, dict[str, Any]] = {}
    tables = []
    for part, loader in run.eval_loaders.items():
        pred = predict(model, loader, run.dev)
        results[part] = part_metrics(pred, data.weights.numpy(), run.experts)
        tables.append(_predictions_table(pred, part, data.cohort.index, classes, run.experts))
    pd.concat(tables, ignore_index=True).to_csv(run.out_dir / "predictions.tsv", sep="\t", index=False,
                                                float_format="%.6g")
    metrics = {"finished": True, "split_id": run.split_id, "variant": run.variant, "experts": list(run.experts),
               "use_gate": run.use_gate, "balance_lambda": run.lam, "classes": list(classes), "seed": run.seed,
               "best_epoch": state["best_epoch"],
               "epochs_run": state.get("epochs_before", 0) + state["epoch"],
               "stopped_early": state["stopped_early"], "experts_from": state.get("experts_from"),
               "screen_round": state.get("round", 0),
               "n_params": model.num_params(),
               "flops_per_sample": model.estimate_flops(), "device": str(run.dev),
               # adopted experts trained in the donor's run: their seconds are counted there, not again here
               "train_seconds": (0.0 if state.get("experts_from")
                                 else float(sum(r["seconds"] for r in state["history"]))),
               "n": {p: len(rs) for p, rs in data.rows.items()},
               "n_excluded": {p: len(rs) for p, rs in data.excluded.items()}, **results}
    meta = {"model_config": run.mcfg.to_dict(), "train_config": asdict(tc),
            "clinical": data.preprocessor.to_dict(), "classes": list(classes),
            "channels": data.cohort.channels, "variant": run.variant, "split_id": run.split_id,
            "epoch": state["best_epoch"], "metrics": metrics}
    save_checkpoint(run.out_dir / "model.safetensors", model.state_dict(), meta)
    write_json_atomic(run.out_dir / "metrics.json", metrics)
    return metrics


def deterministic_algorithms(mode: bool, warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=...)`` without the import of TorchInductor's config
    that the public call makes (torch._inductor and torch._dynamo: 1.6 CPU s in every training job, for a
    flag only ``torch.compile`` reads; training here never compiles). Once Inductor is loaded, the public call."""
    if "torch._inductor.config" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def train_run(cache_dir: str | Path, splits_tsv: str | Path, split_id: str, variant: str,
              cfg: Mapping[str, Any], out_dir: str | Path, device: str = "auto", threads: int | None = None,
              *, max_epochs_this_run: int | None = None,
              on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
              progress: bool = True, experts_from: str | Path | None = None) -> dict[str, Any]:
    """Train one variant on one split; resume from ``out_dir/checkpoint/last.safetensors`` if present.

    Args:
        cache_dir: the cohort cache (``neuromoe.cache.store.build_cohort``); opened and checked against ``cfg``,
            read through ``neuromoe.learn.data.CohortDataset``.
        splits_tsv, split_id: which subjects train / validate / test (``neuromoe.learn.splits``).
        variant: see ``variant_spec``.
        cfg: the whole validated config (reads the cache, participants, model and train sections).
        out_dir: the run folder (see the module docstring).
        device: auto | cpu | cuda (auto defers to train.device, then to what is available).
        threads: ``torch.set_num_threads`` (CPU intra-op threads) when given.
        max_epochs_this_run: stop (as a kill would) after this many epochs in this call; for tests and
            time-sliced jobs. The call then returns ``{"finished": False, ...}`` and writes no final files.
        on_epoch_end: called with (epoch, history row) after each epoch's checkpoint is written; it may
            raise (``StopRun`` or anything) to interrupt the run.
        progress: show a tqdm bar per epoch on stderr.
        experts_from: ``model.safetensors`` of the finished ungated run whose experts this gated run adopts
            (``expert_donor``); only its gate is then fitted. Ignored under ``gate_fit: joint``.
    Returns:
        The metrics dict also written to metrics.json (``finished: True``).
    """
    out_dir = Path(out_dir)
    experts, use_gate, lam_override = variant_spec(variant)
    tc = TrainConfig.from_config(cfg)
    lam = tc.balance_lambda if lam_override is None else lam_override
    dev = resolve_device(device, tc.device)
    if threads:
        torch.set_num_threads(int(threads))
    data = prepare_data(cache_dir, splits_tsv, split_id, experts, cfg)
    if tc.flip_lr > 0:
        check_flip_grid(data.cohort.manifest["affine"], data.cohort.grid)
    if use_gate and tc.gate_fit == "crossfit":
        check_crossfit(data, tc, split_id, splits_tsv)
    mcfg = ModelConfig.from_dict({**cfg.get("model", {}), "experts": experts, "use_gate": use_gate,
                                  "channels": {m: len(c) for m, c in data.cohort.channels.items()},
                                  "grid": data.cohort.grid, "n_clinical": len(data.preprocessor.columns),
                                  "n_classes": len(data.cohort.labels)})
    seed = derive_seed(tc.seed, split_id)
    run_keys = {k: v for k, v in asdict(tc).items() if k not in ("num_workers", "device")}
    fingerprint = {"split_id": split_id, "variant": variant, "seed": seed, "model_config": mcfg.to_dict(),
                   "train_config": run_keys, "balance_lambda": lam, "rows": data.rows}

    prev_det = torch.are_deterministic_algorithms_enabled()
    if dev.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # only effective before cuBLAS starts
        torch.backends.cudnn.benchmark = False
    deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(seed)
        model = NeuroMoE(mcfg).to(dev)
        opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr,
                                fused=dev.type == "cuda" or None)
        datasets = {p: CohortDataset(data.cohort, rs, data.clinical) for p, rs in data.rows.items() if rs}
        loader_kw: dict[str, Any] = {"batch_size": tc.batch_size, "num_workers": tc.num_workers,
                                     "pin_memory": dev.type == "cuda",
                                     "persistent_workers": tc.num_workers > 0}
        sampler = EpochSampler(len(datasets["train"]), seed)
        train_loader = DataLoader(datasets["train"], sampler=sampler,
                                  generator=torch.Generator().manual_seed(seed), **loader_kw)
        run = Run(tag=f"[{split_id}/{variant}]", out_dir=out_dir, split_id=split_id, variant=variant,
                  experts=experts, use_gate=use_gate, uniform_weights=use_gate and tc.gate_fit != "joint",
                  tc=tc, lam=lam, dev=dev, seed=seed, data=data, mcfg=mcfg, fingerprint=fingerprint,
                  model=model, opt=opt, sampler=sampler, train_loader=train_loader,
                  eval_loaders={p: DataLoader(ds, shuffle=False, **loader_kw)
                                for p, ds in datasets.items() if p != "train"},
                  loader_kw=loader_kw, warmup=tc.warmup_epochs * len(train_loader),
                  total=tc.epochs * len(train_loader), weights=data.weights.to(dev), progress=progress)
        if experts_from and run.uniform_weights:
            state = _adopt_experts(run, Path(experts_from))
        else:
            state = _resume(run)
            if state["epoch"] == 0 and not state.get("round"):  # a resumed model has its fitted inputs
                fit_screens(model, data.cohort, data.rows["train"])
        epochs_here = 0
        while not state["finished"] or refit_due(run, state):
            if state["finished"]:
                state = refit_screens(run, state)
                continue
            row = _run_epoch(run, state)
            if on_epoch_end is not None:
                on_epoch_end(state["epoch"], row)
            epochs_here += 1
            more = not state["finished"] or refit_due(run, state)
            if more and max_epochs_this_run is not None and epochs_here >= max_epochs_this_run:
                return {"finished": False, "epochs_run": state["epoch"], "split_id": split_id, "variant": variant}
        return _finish(run, state)
    finally:
        deterministic_algorithms(prev_det)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[NeuroMoE, dict[str, Any]]:
    """A trained ``model.safetensors`` -> (NeuroMoE in eval mode, meta: configs, classes, clinical, ...)."""
    ck = load_checkpoint(path, device=device)
    model = NeuroMoE(ModelConfig.from_dict(ck.meta["model_config"])).to(device)
    model.load_state_dict(ck.model_state)
    return model.eval(), ck.meta


