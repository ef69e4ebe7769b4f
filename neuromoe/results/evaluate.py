"""Gather finished runs into tables: per run, per variant (ablation table), pooled, per subject.

A run folder holds ``predictions.tsv`` (val and test rows) and ``metrics.json`` (with ``variant`` and
``split_id``), as ``neuromoe.learn.train.train_run`` and ``neuromoe.learn.baseline.run_baseline`` write them. When
metrics.json lacks them, the variant and split are read from the path ``.../<variant>/<split_id>/``.

Metrics are recomputed here from each run's test predictions (``neuromoe.learn.metrics``), so the deep runs
and the baseline are scored by the same code.

Tables:

- ``collect`` -> one row per run: variant, split_id, protocol, seed, fold, n_test, accuracy,
  balanced_accuracy, macro_f1, auc, ece, gate_<expert>.
- ``ablation_table`` -> one row per variant (full first, then no_gate, drop_*, only_*, lambda_* by
  value, baseline, others): n_runs, then for each metric ``_mean``, ``_sd``, ``_ci_low``, ``_ci_high``
  (95% t-interval over folds x seeds; approximate, since CV folds share training subjects), and the
  paired difference in balanced accuracy from ``full`` over the splits both ran.
- ``pooled_metrics`` -> per variant and seed, the metrics of the test predictions of all folds
  concatenated (in CV every subject is tested once per seed); ``pooled_table`` summarises them over seeds.
- ``collect_predictions`` -> per subject and run: participant_id, variant, split_id, seed, fold, label,
  prob_<class>, gate_<expert>.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from neuromoe.learn.metrics import (
    GATE_PREFIX,
    PROB_PREFIX,
    SCALAR_METRICS,
    classes_of,
    compute_metrics,
    summarise,
)
from neuromoe.learn.model import EXPERTS
from neuromoe.learn.splits import is_split_id, parse_split_id

METRIC_LABELS = {"accuracy": "Accuracy (%)", "balanced_accuracy": "Balanced acc. (%)",
                 "macro_f1": "Macro F1 (%)", "auc": "ROC AUC", "ece": "ECE"}
_PERCENT = {"accuracy", "balanced_accuracy", "macro_f1"}
UNIT = (0.0, 1.0)  # every scalar metric and gate weight lies in [0, 1]; CIs are clipped to it


@dataclass
class Run:
    """One finished run: where it is, what it is, and its predictions (val and test rows)."""

    run_dir: Path
    variant: str
    split_id: str
    protocol: str
    seed: int
    fold: int | None
    predictions: pd.DataFrame


def _is_run_dir(p: Path) -> bool:
    """A folder with predictions.tsv and either metrics.json or a split id in its path."""
    return (p / "predictions.tsv").is_file() and ((p / "metrics.json").is_file()
                                                  or any(is_split_id(part) for part in p.parts))


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Run folders: each path that is one, or every run folder below it.

    A run folder holds ``predictions.tsv`` and either ``metrics.json`` or a split id in its path, so
    an evaluation folder (``subject_predictions.tsv``) inside a results tree is never taken for a run.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for p in map(Path, paths):
        if _is_run_dir(p):
            found.append(p)
        elif p.is_dir():
            found += [q.parent for q in p.rglob("predictions.tsv") if _is_run_dir(q.parent)]
        else:
            raise FileNotFoundError(f"{p}: not a run folder or a results folder")
    return sorted(set(found))


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder (see the module docstring for where variant and split come from)."""
    run_dir = Path(run_dir)
    meta: dict = {}
    mpath = run_dir / "metrics.json"
    if mpath.is_file():
        meta = json.loads(mpath.read_text())
        if meta.get("finished") is False:
            raise ValueError(f"{run_dir}: the run has not finished (metrics.json says finished: false)")
    split_id = meta.get("split_id")
    if not split_id:
        split_id = next((part for part in reversed(run_dir.parts) if is_split_id(part)), None)
    if not split_id:
        raise ValueError(f"{run_dir}: no split id in metrics.json or in the path "
                         "(cv-s<seed>-f<fold>, holdout-s<seed>)")
    variant = meta.get("variant")
    if not variant:
        parts = run_dir.parts
        k = len(parts) - 1 - parts[::-1].index(split_id) if split_id in parts else len(parts) - 1
        variant = parts[k - 1] if k >= 1 else "unknown"
    protocol, seed, fold = parse_split_id(split_id)
    pred = pd.read_csv(run_dir / "predictions.tsv", sep="\t",
                       dtype={"participant_id": str, "session_id": str, "label": str})
    if "part" not in pred.columns:
        pred["part"] = "test"
    classes_of(pred)  # raises if there are no probability columns
    return Run(run_dir, str(variant), split_id, protocol, seed, fold, pred)


def _runs(runs: Sequence[Run] | str | Path | Iterable[str | Path]) -> list[Run]:
    if isinstance(runs, (str, Path)):
        return [load_run(p) for p in find_runs(runs)]
    runs = list(runs)
    if runs and all(isinstance(r, Run) for r in runs):
        return runs  # type: ignore[return-value]
    return [load_run(p) for p in find_runs(runs)]


def _check_unique(runs: Sequence[Run]) -> None:
    seen: dict[tuple[str, str], Path] = {}
    for r in runs:
        key = (r.variant, r.split_id)
        if key in seen:
            raise ValueError(f"two runs of variant {r.variant!r} on split {r.split_id}: "
                             f"{seen[key]} and {r.run_dir}")
        seen[key] = r.run_dir


def collect(runs: Sequence[Run] | str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Per-run test metrics: one row per run (see the module docstring). Raises if there is no run."""
    runs = _runs(runs)
    if not runs:
        raise ValueError("no finished runs found (no predictions.tsv)")
    _check_unique(runs)
    rows = []
    for r in runs:
        test = r.predictions[r.predictions["part"] == "test"]
        if test.empty:
            raise ValueError(f"{r.run_dir}: predictions.tsv has no test rows")
        m = compute_metrics(test)
        rows.append({"variant": r.variant, "split_id": r.split_id, "protocol": r.protocol, "seed": r.seed,
                     "fold": r.fold if r.fold is not None else -1, "n_test": m["n"],
                     **{k: m[k] for k in SCALAR_METRICS},
                     **{k: v for k, v in m.items() if k.startswith(GATE_PREFIX)},
                     "auc_skipped": ",".join(m["auc_skipped"]), "run_dir": str(r.run_dir)})
    table = pd.DataFrame(rows)
    gate_cols = sorted([c for c in table.columns if c.startswith(GATE_PREFIX)], key=_expert_key)
    front = ["variant", "split_id", "protocol", "seed", "fold", "n_test", *SCALAR_METRICS, *gate_cols]
    table = table[front + [c for c in table.columns if c not in front]]
    return sort_variants(table).reset_index(drop=True)


def collect_predictions(runs: Sequence[Run] | str | Path | Iterable[str | Path],
                        part: str | None = "test") -> pd.DataFrame:
    """Per-subject predictions of every run (only ``part`` rows; None: all), one row per subject and run."""
    runs = _runs(runs)
    if not runs:
        raise ValueError("no finished runs found (no predictions.tsv)")
    frames = []
    for r in runs:
        p = r.predictions if part is None else r.predictions[r.predictions["part"] == part]
        p = p.copy()
        p.insert(1, "variant", r.variant)
        p.insert(2, "split_id", r.split_id)
        p.insert(3, "seed", r.seed)
        p.insert(4, "fold", r.fold if r.fold is not None else -1)
        frames.append(p)
    table = pd.concat(frames, ignore_index=True)
    probs = [c for c in table.columns if c.startswith(PROB_PREFIX)]
    gates = sorted([c for c in table.columns if c.startswith(GATE_PREFIX)], key=_expert_key)
    session = ["session_id"] if "session_id" in table.columns else []  # a cohort with sessions: per visit
    front = ["participant_id", *session, "variant", "split_id", "seed", "fold", "part", "label", *probs, *gates]
    table = table[front + [c for c in table.columns if c not in front]]
    table["pred"] = [c.removeprefix(PROB_PREFIX) for c in table[probs].idxmax(axis=1)]
    return sort_variants(table, extra=["seed", "fold", "participant_id", *session]).reset_index(drop=True)


def _expert_key(col: str) -> tuple[int, str]:
    e = col.removeprefix(GATE_PREFIX)
    return (EXPERTS.index(e) if e in EXPERTS else len(EXPERTS), e)


def variant_order_key(variant: str) -> tuple[int, float, str]:
    """Sort key: full, no_gate, drop_* (anat, dwi, func, clin), only_*, lambda_* by value, baseline, rest."""
    kind, _, arg = variant.partition("_")
    if variant == "full":
        return (0, 0.0, "")
    if variant == "no_gate":
        return (1, 0.0, "")
    if kind in ("drop", "only"):
        rank = EXPERTS.index(arg) if arg in EXPERTS else len(EXPERTS)
        return (2 if kind == "drop" else 3, float(rank), arg)
    if kind == "lambda":
        try:
            return (4, float(arg), "")
        except ValueError:
            return (4, math.inf, arg)
    if variant == "baseline" or variant.startswith("baseline"):
        return (5, 0.0, variant)
    return (6, 0.0, variant)


def sort_variants(table: pd.DataFrame, extra: Sequence[str] = ("seed", "fold")) -> pd.DataFrame:
    """Rows in variant order (``variant_order_key``), then by ``extra`` columns present."""
    key = table["variant"].map(variant_order_key)
    cols = [c for c in extra if c in table.columns]
    order = sorted(range(len(table)), key=lambda i: (key.iloc[i], *[table[c].iloc[i] for c in cols]))
    return table.iloc[order]


def _metric_columns(per_run: pd.DataFrame) -> list[str]:
    gates = sorted([c for c in per_run.columns if c.startswith(GATE_PREFIX)], key=_expert_key)
    return [m for m in SCALAR_METRICS if m in per_run.columns] + gates


def ablation_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: n_runs, mean/sd/95% CI of every metric, paired delta balanced accuracy vs full.

    ``delta_balanced_accuracy_*`` summarise, over the splits where both ran, the variant's balanced
    accuracy minus full's (NaN for full itself or without common splits).
    """
    if per_run is None or per_run.empty:
        raise ValueError("no runs to tabulate")
    metrics = _metric_columns(per_run)
    full = per_run[per_run["variant"] == "full"].set_index("split_id")["balanced_accuracy"]
    rows = []
    for variant, grp in per_run.groupby("variant", sort=False):
        row: dict = {"variant": variant, "n_runs": len(grp), "n_seeds": grp["seed"].nunique(),
                     "protocol": ",".join(sorted(grp["protocol"].unique()))}
        for m in metrics:
            row.update(summarise(grp[m], bounds=UNIT).as_dict(f"{m}_"))
        if variant != "full" and len(full):
            mine = grp.set_index("split_id")["balanced_accuracy"]
            common = mine.index.intersection(full.index)
            row.update(summarise((mine[common] - full[common]).to_numpy(), bounds=(-1.0, 1.0))
                       .as_dict("delta_balanced_accuracy_"))
        else:
            row.update(summarise([]).as_dict("delta_balanced_accuracy_"))
        rows.append(row)
    return sort_variants(pd.DataFrame(rows), extra=()).reset_index(drop=True)


def verdict(table: pd.DataFrame, reference: str = "no_gate", singles_prefix: str = "only_") -> str:
    """The comparison the ablation exists for, in words: does ``full`` beat ``reference`` (uniform fusion)
    and every single-modality variant, by the paired difference of test balanced accuracy over the splits
    both ran (95 % t-interval of full - variant: "beats" only when the whole interval is above 0)? Empty
    when ``full`` is not in ``table``."""
    rows = table.set_index("variant")
    if "full" not in rows.index:
        return ""

    def diff(v: str) -> tuple[float, float, float, int]:  # full - v, from the table's v - full
        r = rows.loc[v]
        return (-r["delta_balanced_accuracy_mean"], -r["delta_balanced_accuracy_ci_high"],
                -r["delta_balanced_accuracy_ci_low"], int(r["delta_balanced_accuracy_n"]))

    def pts(d: tuple) -> str:
        mean, lo, hi, n = d
        return f"{100 * mean:+.1f} points" + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if n >= 2 else "")

    def beats(d: tuple) -> bool:
        return d[3] >= 2 and d[1] > 0

    diffs = {v: diff(v) for v in rows.index if v != "full" and rows.loc[v, "delta_balanced_accuracy_n"] > 0}
    out = []
    if reference in diffs:
        d = diffs[reference]
        why = "" if beats(d) else ("; one split gives no interval" if d[3] < 2 else "; the interval is not above 0")
        out.append(f"The full model {'beats' if beats(d) else 'does not beat'} {reference} (full - {reference}: "
                   f"{pts(d)}{why}, {d[3]} paired split{'s' if d[3] != 1 else ''}).")
    singles = [v for v in diffs if str(v).startswith(singles_prefix)]
    if singles:
        lost = [v for v in singles if not beats(diffs[v])]
        spread = ", ".join(f"{v} {pts(diffs[v])}" for v in singles)
        out.append(("It beats every single modality" if not lost else
                    f"It does not beat {', '.join(lost)}") + f" (full - variant: {spread}).")
    return " ".join(out)


def pooled_metrics(predictions: pd.DataFrame) -> pd.DataFrame:
    """Per variant and seed: metrics of the test predictions of all its folds concatenated.

    ``predictions`` is ``collect_predictions(...)`` (test rows). ``n_folds`` says how many runs were
    pooled; in CV each subject appears once per seed.
    """
    if predictions is None or predictions.empty:
        raise ValueError("no predictions to pool")
    test = predictions[predictions["part"] == "test"] if "part" in predictions.columns else predictions
    rows = []
    for (variant, seed), grp in test.groupby(["variant", "seed"], sort=False):
        cols = [c for c in grp.columns if not c.startswith(GATE_PREFIX) or grp[c].notna().any()]
        m = compute_metrics(grp[cols])
        rows.append({"variant": variant, "seed": seed, "n_folds": grp["split_id"].nunique(), "n": m["n"],
                     **{k: m[k] for k in SCALAR_METRICS},
                     **{k: v for k, v in m.items() if k.startswith(GATE_PREFIX)},
                     "auc_skipped": ",".join(m["auc_skipped"]), "confusion": json.dumps(m["confusion"])})
    return sort_variants(pd.DataFrame(rows), extra=("seed",)).reset_index(drop=True)


def pooled_table(pooled: pd.DataFrame) -> pd.DataFrame:
    """``pooled_metrics`` summarised over seeds: one row per variant, mean/sd/CI of each metric."""
    if pooled is None or pooled.empty:
        raise ValueError("no pooled metrics to tabulate")
    metrics = _metric_columns(pooled)
    rows = []
    for variant, grp in pooled.groupby("variant", sort=False):
        row = {"variant": variant, "n_seeds": len(grp), "n_per_seed": int(grp["n"].median())}
        for m in metrics:
            row.update(summarise(grp[m], bounds=UNIT).as_dict(f"{m}_"))
        rows.append(row)
    return sort_variants(pd.DataFrame(rows), extra=()).reset_index(drop=True)


def _fmt(table: pd.DataFrame, i: int, metric: str) -> str:
    from neuromoe.learn.metrics import Summary

    r = table.iloc[i]
    s = Summary(r[f"{metric}_mean"], r[f"{metric}_sd"], r[f"{metric}_ci_low"], r[f"{metric}_ci_high"],
                int(r[f"{metric}_n"]))
    if metric in _PERCENT:
        return s.format(100, 1)
    if metric.startswith("delta_"):
        return s.format(100, 1)
    return s.format(1, 3)


def _gate_cell(mean: float, sd: float) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean * 100:.0f}" if pd.isna(sd) else f"{mean * 100:.0f} ± {sd * 100:.0f}"


def markdown_table(table: pd.DataFrame, title: str | None = None) -> str:
    """An ablation (or pooled) table as Markdown: mean ± SD [95% CI] per metric, gates as mean ± SD (%)."""
    if table is None or table.empty:
        raise ValueError("empty table")
    metrics = [m for m in SCALAR_METRICS if f"{m}_mean" in table.columns]
    gates = sorted({c.removesuffix("_mean") for c in table.columns
                    if c.startswith(GATE_PREFIX) and c.endswith("_mean")}, key=_expert_key)
    delta = "delta_balanced_accuracy_mean"
    has_delta = delta in table.columns and bool(table[delta].notna().any())
    head = ["Variant", "Runs" if "n_runs" in table.columns else "Seeds"]
    head += [METRIC_LABELS[m] for m in metrics]
    if has_delta:
        head.append("Δ bal. acc. vs full (pts)")
    if gates:
        head.append("Gate weight, mean ± SD (%): " + " / ".join(g.removeprefix(GATE_PREFIX) for g in gates))
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                        "|" + "|".join(["---"] * len(head)) + "|"]
    for i in range(len(table)):
        r = table.iloc[i]
        cells = [f"**{r['variant']}**" if r["variant"] == "full" else str(r["variant"]),
                 str(int(r["n_runs"] if "n_runs" in table.columns else r["n_seeds"]))]
        cells += [_fmt(table, i, m) for m in metrics]
        if has_delta:
            cells.append("—" if r["variant"] == "full" else _fmt(table, i, "delta_balanced_accuracy"))
        if gates:
            vals = [(r[f"{g}_mean"], r[f"{g}_sd"]) for g in gates]
            absent = all(pd.isna(m) for m, _ in vals)
            cells.append("—" if absent else " / ".join(_gate_cell(m, s) for m, s in vals))
        lines.append("| " + " | ".join(cells) + " |")
    over = ("runs (folds x seeds)" if "n_runs" in table.columns
            else "seeds (each: all folds' test predictions pooled)")
    lines += ["", f"Mean ± SD [95% t-interval, clipped to the metric's range] over {over}. The interval is "
              "approximate: CV folds share training subjects, so runs are not independent samples. "
              + ("Δ: paired difference from `full` on the same splits. " if has_delta else "")
              + ("Gate weights: – for an expert the variant does not have." if gates else "")]
    return "\n".join(lines) + "\n"


def write_evaluation(runs: Sequence[Run] | str | Path | Iterable[str | Path], out_dir: str | Path, *,
                     figures: bool = True, focus: str = "full") -> dict[str, Path]:
    """Write every table (and figures) of an evaluation into ``out_dir``; returns name -> path.

    Files: ``per_run.tsv``, ``ablation.tsv``, ``ablation.md``, ``pooled.tsv`` (per variant and seed),
    ``pooled_summary.tsv``, ``subject_predictions.tsv`` (per subject, test rows of every run); with
    ``figures``:
    ``ablation_balanced_accuracy.png`` and, for the ``focus`` variant (or the first one), pooled
    ``confusion``, ``roc``, ``calibration``, ``gates`` (mixture variants) and ``training_curves``
    (when the runs have history.csv).
    """
    from neuromoe.results import figures as F

    runs = _runs(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_run = collect(runs)
    table = ablation_table(per_run)
    preds = collect_predictions(runs)
    pooled = pooled_metrics(preds)
    summary = pooled_table(pooled)
    out = {"per_run": out_dir / "per_run.tsv", "ablation": out_dir / "ablation.tsv",
           "ablation_md": out_dir / "ablation.md", "pooled": out_dir / "pooled.tsv",
           "pooled_summary": out_dir / "pooled_summary.tsv",
           "predictions": out_dir / "subject_predictions.tsv"}
    per_run.to_csv(out["per_run"], sep="\t", index=False, float_format="%.6g")
    table.to_csv(out["ablation"], sep="\t", index=False, float_format="%.6g")
    pooled.to_csv(out["pooled"], sep="\t", index=False, float_format="%.6g")
    summary.to_csv(out["pooled_summary"], sep="\t", index=False, float_format="%.6g")
    preds.to_csv(out["predictions"], sep="\t", index=False, float_format="%.6g")
    said = verdict(table)
    out["ablation_md"].write_text((f"**Verdict**: {said}\n\n" if said else "")
                                  + markdown_table(table, "Ablations (test metrics per run)") + "\n"
                                  + markdown_table(summary, "Pooled test predictions (all folds of a seed; "
                                                            "mean over seeds)"))
    if figures:
        n_classes = len(classes_of(preds))
        out["fig_ablation"] = F.ablation_figure(table, out_dir / "ablation_balanced_accuracy.png",
                                                chance=1.0 / n_classes)
        variant = focus if focus in set(preds["variant"]) else str(table["variant"].iloc[0])
        vp = preds[preds["variant"] == variant].dropna(axis=1, how="all")
        n_seeds = vp["seed"].nunique()
        note = f"{variant}, pooled test, {n_seeds} seed(s)"
        out["fig_confusion"] = F.confusion_figure(vp, out_dir / f"confusion_{variant}.png",
                                                  title=f"Confusion ({note})")
        out["fig_roc"] = F.roc_figure(vp, out_dir / f"roc_{variant}.png", title=f"ROC one-vs-rest ({note})")
        out["fig_calibration"] = F.calibration_figure(vp, out_dir / f"calibration_{variant}.png",
                                                      title=f"Calibration ({variant})")
        if any(c.startswith(GATE_PREFIX) for c in vp.columns):
            out["fig_gates"] = F.gate_figure(vp, out_dir / f"gates_{variant}.png",
                                             title=f"Gate weight per expert ({note})")
        hist = [r.run_dir / "history.csv" for r in runs
                if r.variant == variant and (r.run_dir / "history.csv").is_file()]
        if hist:
            out["fig_curves"] = F.training_curves(hist, out_dir / f"training_curves_{variant}.png",
                                                  title=f"Training curves ({variant})")
    return out
