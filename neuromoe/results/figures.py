"""Report figures (PNG, matplotlib Agg): training curves, confusion matrix, ROC, gate weights,
ablation bars, calibration, saliency slices.

Every function takes tables already loaded (or paths), writes one PNG and returns its path. A figure
with nothing to show is an error (``NothingToPlotError``), never a silent blank image: a report that
shows an empty axis hides a broken upstream stage.

Figures are drawn on ``matplotlib.figure.Figure`` objects directly (no pyplot), so importing this
module changes no global backend state and figures are freed when they go out of scope.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from neuromoe.errors import NeuroMoEError
from neuromoe.learn.metrics import (
    GATE_PREFIX,
    classes_of,
    compute_metrics,
    experts_of,
    label_indices,
    probabilities,
    reliability_table,
)

DPI = 130
_EXPERT_COLOURS = {"anat": "#4C72B0", "dwi": "#55A868", "func": "#C44E52", "clin": "#8172B2"}


class NothingToPlotError(NeuroMoEError, ValueError):
    """The input of a figure is empty (no runs, no rows, no columns to plot)."""


def _save(fig: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=DPI, bbox_inches="tight")
    return out_png


def _pick(frame: pd.DataFrame, candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in frame.columns), None)


# ---------------------------------------------------------------------------------------------- curves
_TRAIN_LOSS = ("train_loss", "loss", "train_total")
_VAL_LOSS = ("val_loss", "valid_loss", "val_total")
_VAL_BACC = ("val_balanced_accuracy", "val_bal_acc", "val_balanced_acc", "val_bacc")


def _band(ax, runs: list[pd.Series], colour: str, label: str) -> None:
    """Mean over runs per epoch with a +-1 SD band; runs may stop at different epochs (early stopping)."""
    table = pd.concat(runs, axis=1)
    mean, sd = table.mean(axis=1), table.std(axis=1, ddof=1).fillna(0.0)
    ax.plot(mean.index, mean.values, color=colour, lw=1.8, label=f"{label} (mean of {len(runs)} runs)")
    ax.fill_between(mean.index, (mean - sd).values, (mean + sd).values, color=colour, alpha=0.2, lw=0)


def training_curves(histories: Sequence[str | Path | pd.DataFrame], out_png: str | Path,
                    title: str = "Training curves") -> Path:
    """Train/val loss and validation balanced accuracy per epoch, mean +- SD band across runs.

    Each history (``history.csv`` of a run) needs an ``epoch`` column (else the row number is used)
    and at least one of ``train_loss``/``val_loss``/``val_balanced_accuracy`` (a few aliases accepted).
    """
    frames = [h if isinstance(h, pd.DataFrame) else pd.read_csv(h) for h in histories]
    frames = [f for f in frames if len(f)]
    if not frames:
        raise NothingToPlotError("training_curves: no history with any epoch")
    series: dict[str, list[pd.Series]] = {"train_loss": [], "val_loss": [], "val_bacc": []}
    for f in frames:
        epoch = f["epoch"] if "epoch" in f.columns else pd.Series(np.arange(1, len(f) + 1))
        for key, cands in (("train_loss", _TRAIN_LOSS), ("val_loss", _VAL_LOSS), ("val_bacc", _VAL_BACC)):
            col = _pick(f, cands)
            if col is not None and f[col].notna().any():
                series[key].append(pd.Series(f[col].to_numpy(dtype=float), index=epoch.to_numpy()))
    if not any(series.values()):
        raise NothingToPlotError(f"training_curves: histories have none of the columns "
                                 f"{_TRAIN_LOSS[0]}, {_VAL_LOSS[0]}, {_VAL_BACC[0]}")
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    if series["train_loss"]:
        _band(ax_loss, series["train_loss"], "#4C72B0", "train (WCE + λ·balance)")
    if series["val_loss"]:
        _band(ax_loss, series["val_loss"], "#DD8452", "validation (WCE)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend(frameon=False, fontsize=8)
    if series["val_bacc"]:
        _band(ax_acc, series["val_bacc"], "#55A868", "validation")
        ax_acc.set_ylim(0, 1.02)
        ax_acc.legend(frameon=False, fontsize=8)
    else:
        ax_acc.text(0.5, 0.5, "no validation balanced accuracy in history", ha="center",
                    transform=ax_acc.transAxes)
    ax_acc.set(xlabel="epoch", ylabel="balanced accuracy", title="Validation balanced accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    longest = max(len(f) for f in frames)
    stopped = sum(len(f) < longest for f in frames)
    note = f"; {stopped} stopped early, so later epochs average fewer runs" if stopped else ""
    fig.suptitle(f"{title}: {len(frames)} runs, mean ± 1 SD{note}", fontsize=10)
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------ classification
def _require_rows(pred: pd.DataFrame, what: str) -> None:
    if pred is None or len(pred) == 0:
        raise NothingToPlotError(f"{what}: no predictions")


def confusion_figure(pred: pd.DataFrame, out_png: str | Path,
                     title: str = "Confusion matrix (pooled test)") -> Path:
    """Confusion matrix normalised per true class (rows sum to 1), each cell annotated with its count."""
    _require_rows(pred, "confusion_figure")
    classes = classes_of(pred)
    y, y_hat = label_indices(pred, classes), probabilities(pred, classes).argmax(axis=1)
    C = len(classes)
    counts = np.zeros((C, C), dtype=int)
    np.add.at(counts, (y, y_hat), 1)
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    fig = Figure(figsize=(1.3 * C + 2.2, 1.2 * C + 1.6))
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(C):
        for j in range(C):
            ax.text(j, i, f"{frac[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center", fontsize=9,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(C), classes)
    ax.set_yticks(range(C), [f"{c} (n={rows[k, 0]})" for k, c in enumerate(classes)])
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    return _save(fig, out_png)


def roc_figure(pred: pd.DataFrame, out_png: str | Path,
               title: str = "ROC, one-vs-rest (pooled test)") -> Path:
    """One-vs-rest ROC curve per class with its AUC; classes without positives or negatives are skipped."""
    _require_rows(pred, "roc_figure")
    classes = classes_of(pred)
    y, prob = label_indices(pred, classes), probabilities(pred, classes)
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.subplots()
    drawn = 0
    for k, c in enumerate(classes):
        pos = y == k
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, prob[:, k])
        auc = roc_auc_score(pos, prob[:, k])
        ax.plot(fpr, tpr, lw=1.8, label=f"{c} vs rest: AUC {auc:.2f} (n={pos.sum()})")
        drawn += 1
    if not drawn:
        raise NothingToPlotError("roc_figure: no class has both positive and negative subjects")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1),
           ylim=(0, 1.01))
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


def calibration_figure(pred: pd.DataFrame, out_png: str | Path,
                       title: str = "Calibration (pooled test)") -> Path:
    """Reliability diagram: accuracy vs mean confidence per confidence bin, bin counts below."""
    _require_rows(pred, "calibration_figure")
    table = reliability_table(pred)
    ece = compute_metrics(pred)["ece"]
    used = table[table["n"] > 0]
    fig = Figure(figsize=(4.6, 5.2))
    ax, ax_n = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    width = table["bin_high"] - table["bin_low"]
    ax.bar(used["bin_low"], used["accuracy"], width=width[used.index], align="edge", color="#4C72B0",
           alpha=0.8, edgecolor="white", label="accuracy")
    ax.plot(used["confidence"], used["accuracy"], "o", color="black", ms=3,
            label="(mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.set(ylabel="accuracy", title=f"{title}: ECE {ece:.3f}", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax_n.bar(table["bin_low"], table["n"], width=width, align="edge", color="grey", edgecolor="white")
    ax_n.set(xlabel="confidence (max probability)", ylabel="subjects")
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------------------ gates
def gate_figure(pred: pd.DataFrame, out_png: str | Path, title: str = "Gate weight per expert") -> Path:
    """Distribution over subjects of each expert's gate weight (violin + box), with the 1/E line.

    Rows with a weight of exactly 0 for an expert (its modality absent) are left out of that expert.
    """
    _require_rows(pred, "gate_figure")
    experts = experts_of(pred)
    if not experts:
        raise NothingToPlotError("gate_figure: no gate_<expert> columns "
                                 "(a run without a gate, or a baseline)")
    data = [pred[GATE_PREFIX + e].astype(float) for e in experts]
    data = [d[d > 0].dropna().to_numpy() for d in data]
    if not any(len(d) for d in data):
        raise NothingToPlotError("gate_figure: every gate weight is zero or missing")
    E = len(experts)
    fig = Figure(figsize=(1.3 * E + 2.5, 4))
    ax = fig.subplots()
    pos = [k + 1 for k in range(E) if len(data[k])]
    shown = [d for d in data if len(d)]
    if any(len(d) > 1 and np.ptp(d) > 0 for d in shown):
        parts = ax.violinplot(shown, positions=pos, showextrema=False, widths=0.8)
        for body, k in zip(parts["bodies"], pos, strict=True):
            body.set_facecolor(_EXPERT_COLOURS.get(experts[k - 1], "#999999"))
            body.set_alpha(0.45)
    ax.boxplot(shown, positions=pos, widths=0.22, showfliers=False, medianprops={"color": "black"})
    for k, d in zip(pos, shown, strict=True):
        ax.text(k, 1.0, f"mean {d.mean():.0%}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0 / E, ls="--", color="grey", lw=1, label=f"1/E = {1 / E:.0%}")
    ax.set_xticks(range(1, E + 1), experts)
    ax.set(ylabel="gate weight", ylim=(0, 1.08), title=f"{title} (n={len(pred)} subjects)")
    ax.legend(fontsize=8, frameon=False, loc="upper right", bbox_to_anchor=(1.0, 0.94))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------- ablation
def ablation_figure(table: pd.DataFrame, out_png: str | Path, metric: str = "balanced_accuracy",
                    chance: float | None = None, title: str | None = None) -> Path:
    """Bar per variant (table order) of ``<metric>_mean`` with 95% CI whiskers (``_ci_low``/``_ci_high``).

    ``table`` is ``evaluate.ablation_table``'s output; ``chance`` draws a dashed line (e.g. 1/C).
    """
    if table is None or len(table) == 0:
        raise NothingToPlotError("ablation_figure: empty ablation table")
    mean_col = f"{metric}_mean"
    if mean_col not in table.columns:
        raise NothingToPlotError(f"ablation_figure: no column {mean_col!r} in the table")
    tab = table[table[mean_col].notna()]
    if tab.empty:
        raise NothingToPlotError(f"ablation_figure: {metric} is missing for every variant")
    mean = tab[mean_col].to_numpy(dtype=float)
    lo = tab.get(f"{metric}_ci_low", pd.Series(np.nan, index=tab.index)).to_numpy(dtype=float)
    hi = tab.get(f"{metric}_ci_high", pd.Series(np.nan, index=tab.index)).to_numpy(dtype=float)
    err = np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)])
    variants = tab["variant"].astype(str).tolist()
    colours = ["#C44E52" if v == "full" else "#8C8C8C" if v == "baseline" else "#4C72B0" for v in variants]
    fig = Figure(figsize=(max(5.0, 0.7 * len(variants) + 2), 4.2))
    ax = fig.subplots()
    x = np.arange(len(variants))
    ax.bar(x, mean, yerr=err, color=colours, capsize=3, error_kw={"lw": 1})
    for xi, m in zip(x, mean, strict=True):
        ax.text(xi, m / 2, f"{m:.0%}" if m <= 1 else f"{m:.2f}", ha="center", va="center", fontsize=7,
                color="white", rotation=90)
    if chance is not None:
        ax.axhline(chance, ls="--", color="grey", lw=1, label=f"chance {chance:.0%}")
        ax.legend(fontsize=8, frameon=False)
    n_runs = tab["n_runs"].astype(int).tolist() if "n_runs" in tab.columns else None
    ax.set_xticks(x, [f"{v}\n(n={n})" for v, n in zip(variants, n_runs, strict=True)] if n_runs else variants,
                  rotation=45, ha="right", fontsize=8)
    top = max(1.0, float(np.nanmax(hi))) if np.isfinite(hi).any() else 1.0
    ax.set(ylabel=metric.replace("_", " "), ylim=(0, top),
           title=title or f"Ablations: {metric.replace('_', ' ')} (mean, 95% CI over runs)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------- saliency
def _load(img: str | Path | nib.Nifti1Image) -> nib.Nifti1Image:
    return img if isinstance(img, nib.Nifti1Image) else nib.load(str(img))


def saliency_slices(maps: Mapping[str, str | Path | nib.Nifti1Image], out_png: str | Path,
                    template: nib.Nifti1Image | None = None, threshold: float = 0.25,
                    title: str = "Group saliency (gradient x input)") -> Path:
    """Orthogonal slices (sagittal, coronal, axial) through each map's peak, over the template.

    One row per modality; the map is shown where it exceeds ``threshold`` x its maximum. Maps must be
    on the template's grid (``explain.to_mni`` puts them there). Neurological view (left on the left).
    """
    if not maps:
        raise NothingToPlotError("saliency_slices: no maps")
    if template is None:
        from neuromoe.inputs.templates import mni_t1

        template = mni_t1()
    bg = np.asarray(template.dataobj, dtype=float)
    rows = [(m, np.asarray(_load(p).dataobj, dtype=float)) for m, p in maps.items()]
    for m, d in rows:
        if d.shape != bg.shape:
            raise ValueError(f"saliency map {m!r} has grid {d.shape}, the template {bg.shape}: "
                             "resample it first")
    if all(not np.isfinite(d).any() or np.nanmax(d) <= 0 for _, d in rows):
        raise NothingToPlotError("saliency_slices: every map is zero")
    fig = Figure(figsize=(9.5, 3.1 * len(rows) + 0.4))
    axes = np.atleast_2d(fig.subplots(len(rows), 3))
    names = ("sagittal", "coronal", "axial")
    for r, (m, d) in enumerate(rows):
        vmax = float(np.nanmax(d)) if np.nanmax(d) > 0 else 1.0
        rel = d / vmax  # each map relative to its own peak: modalities' scales differ
        peak = np.unravel_index(int(np.nanargmax(d)), d.shape)
        mm = nib.affines.apply_affine(template.affine, peak)
        im = None
        for c, axis in enumerate((0, 1, 2)):
            ax = axes[r, c]
            take = [slice(None)] * 3
            take[axis] = peak[axis]
            b, s = bg[tuple(take)].T, rel[tuple(take)].T  # rows = last remaining axis (superior/anterior up)
            ax.imshow(b, cmap="gray", origin="lower", interpolation="nearest")
            im = ax.imshow(np.ma.masked_less(s, threshold), cmap="hot", origin="lower", vmin=0, vmax=1,
                           alpha=0.85, interpolation="nearest")
            ax.set_title(f"{m}: {names[c]}, {'xyz'[axis]} = {mm[axis]:.0f} mm", fontsize=9)
            if axis != 0:  # coronal and axial: x runs left -> right on screen (neurological view)
                ax.text(0.02, 0.04, "L", color="white", transform=ax.transAxes, fontsize=9)
                ax.text(0.94, 0.04, "R", color="white", transform=ax.transAxes, fontsize=9)
            ax.set_axis_off()
        fig.colorbar(im, ax=axes[r, :].tolist(), fraction=0.02, pad=0.01, label="saliency / peak")
    fig.suptitle(f"{title}: slices through each map's peak, shown above {threshold:.0%} of it", fontsize=10)
    return _save(fig, out_png)
