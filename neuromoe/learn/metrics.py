"""Classification metrics from a predictions table, and a summary over runs.

A predictions table (``predictions.tsv`` of a run) has one row per subject with ``label`` (the true
class, as a class name or as its integer index in class order), one ``prob_<class>`` column per
class in class order, and, for a mixture-of-experts run, one ``gate_<expert>`` column per expert.
Metrics are computed over whatever rows are passed: select the test part first
(``pred[pred["part"] == "test"]``).

What ``compute_metrics`` returns (all plain floats / lists, JSON-serialisable):

- ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present in ``label``),
  ``macro_f1`` (over the classes present in ``label`` or predicted), as scikit-learn computes them;
- ``auc``: one-vs-rest ROC AUC averaged over classes (macro). A class absent from the rows (possible
  in a small test fold) has no ROC curve: it is skipped, listed in ``auc_skipped`` and reported in
  ``notes``; ``auc_<class>`` per class (NaN when skipped);
- ``ece``: expected calibration error with 10 equal-width bins of the top-class probability;
- ``confusion``: counts, rows = true class, columns = predicted class, in class order;
- ``gate_<expert>``: mean gate weight of each expert over the rows (mixture runs only).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

PROB_PREFIX = "prob_"
GATE_PREFIX = "gate_"
ECE_BINS = 10
# Scalar metrics that summarise and tabulate (confusion and per-class AUC are kept apart).
SCALAR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc", "ece")


def classes_of(pred: pd.DataFrame) -> list[str]:
    """Class names in class order, from the ``prob_<class>`` columns."""
    classes = [c[len(PROB_PREFIX):] for c in pred.columns if c.startswith(PROB_PREFIX)]
    if not classes:
        raise ValueError(f"predictions have no {PROB_PREFIX}<class> columns (columns: {list(pred.columns)})")
    return classes


def experts_of(pred: pd.DataFrame) -> list[str]:
    """Expert names in gate order, from the ``gate_<expert>`` columns (empty for non-mixture runs)."""
    return [c[len(GATE_PREFIX):] for c in pred.columns if c.startswith(GATE_PREFIX)]


def label_indices(pred: pd.DataFrame, classes: Sequence[str] | None = None) -> np.ndarray:
    """The true class of each row as an index into ``classes`` (default: from the prob columns).

    ``label`` may hold class names (``"PD"``) or integer indices (``1``, also ``"1"`` read as text).
    """
    classes = list(classes) if classes is not None else classes_of(pred)
    if "label" not in pred.columns:
        raise ValueError("predictions have no 'label' column")
    raw = pred["label"]
    as_text = raw.astype(str)
    if as_text.isin(classes).all():
        return as_text.map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=int)
    numeric = pd.to_numeric(raw, errors="coerce")
    whole = numeric.notna().all() and (numeric == numeric.round()).all()
    if whole and numeric.between(0, len(classes) - 1).all():
        return numeric.to_numpy(dtype=int)
    unknown = sorted(set(as_text) - set(classes))[:5]
    raise ValueError(f"labels {unknown} are neither class names {classes} nor indices 0..{len(classes) - 1}")


def probabilities(pred: pd.DataFrame, classes: Sequence[str] | None = None) -> np.ndarray:
    """(N, C) class probabilities in class order."""
    classes = list(classes) if classes is not None else classes_of(pred)
    return pred[[PROB_PREFIX + c for c in classes]].to_numpy(dtype=float)


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b| over equal-width bins of max prob.

    Bins are (0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1]; a confidence of exactly 0 falls in the first.
    """
    y = np.asarray(y)
    prob = np.asarray(prob, dtype=float)
    if len(y) == 0:
        return float("nan")
    conf = prob.max(axis=1)
    correct = (prob.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def reliability_table(pred: pd.DataFrame, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per confidence bin: ``bin_low``, ``bin_high``, ``n``, ``confidence`` (mean), ``accuracy``."""
    classes = classes_of(pred)
    y, prob = label_indices(pred, classes), probabilities(pred, classes)
    conf = prob.max(axis=1)
    correct = prob.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = which == b
        rows.append({"bin_low": edges[b], "bin_high": edges[b + 1], "n": int(sel.sum()),
                     "confidence": float(conf[sel].mean()) if sel.any() else float("nan"),
                     "accuracy": float(correct[sel].mean()) if sel.any() else float("nan")})
    return pd.DataFrame(rows)


def ovr_auc(y: np.ndarray, prob: np.ndarray,
            classes: Sequence[str]) -> tuple[float, dict[str, float], list[str]]:
    """One-vs-rest ROC AUC: (macro mean, per class, skipped classes).

    A class is skipped when the rows hold no subject of it, or only subjects of it (no negatives):
    its ROC curve is undefined. The macro mean is over the classes not skipped (NaN if none).
    """
    per_class: dict[str, float] = {}
    skipped: list[str] = []
    for k, cls in enumerate(classes):
        positive = y == k
        if positive.all() or not positive.any():
            per_class[cls] = float("nan")
            skipped.append(cls)
            continue
        per_class[cls] = float(roc_auc_score(positive, prob[:, k]))
    scored = [v for v in per_class.values() if not math.isnan(v)]
    return (float(np.mean(scored)) if scored else float("nan")), per_class, skipped


def compute_metrics(pred: pd.DataFrame, classes: Sequence[str] | None = None) -> dict:
    """All metrics over the rows of ``pred`` (see the module docstring for the keys)."""
    classes = list(classes) if classes is not None else classes_of(pred)
    n = len(pred)
    if n == 0:
        raise ValueError("no predictions to score (empty table: was the part selection right?)")
    y, prob = label_indices(pred, classes), probabilities(pred, classes)
    if not np.isfinite(prob).all():
        raise ValueError("predictions contain NaN or infinite probabilities")
    y_hat = prob.argmax(axis=1)
    present = sorted(set(y.tolist()) | set(y_hat.tolist()))
    auc, auc_per_class, skipped = ovr_auc(y, prob, classes)
    notes = []
    if skipped:
        notes.append(f"ROC AUC skips class(es) {', '.join(skipped)}: no positive or no negative subjects in "
                     f"these {n} rows; macro AUC is over the {len(classes) - len(skipped)} other(s)")
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected in a small fold; recall is over true classes.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        bal_acc = float(balanced_accuracy_score(y, y_hat))
    out: dict = {
        "n": n,
        "accuracy": float(accuracy_score(y, y_hat)),
        "balanced_accuracy": bal_acc,
        "macro_f1": float(f1_score(y, y_hat, labels=present, average="macro", zero_division=0)),
        "auc": auc,
        **{f"auc_{c}": v for c, v in auc_per_class.items()},
        "auc_skipped": skipped,
        "ece": expected_calibration_error(y, prob),
        "classes": classes,
        "confusion": confusion_matrix(y, y_hat, labels=list(range(len(classes)))).tolist(),
    }
    for e in experts_of(pred):
        out[GATE_PREFIX + e] = float(pred[GATE_PREFIX + e].astype(float).mean())
    out["notes"] = notes
    return out


@dataclass(frozen=True)
class Summary:
    """Mean, SD and a 95% t-interval of one metric over runs (folds x seeds).

    The interval treats runs as independent samples. CV folds share training subjects and seeds
    share the cohort, so they are not independent: the interval is approximate (typically too
    narrow) and is meant for comparing variants evaluated on the same splits, not as a population
    claim.
    """

    mean: float
    sd: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{prefix+"mean": ..., prefix+"sd": ..., ...}``."""
        return {prefix + k: v for k, v in asdict(self).items()}

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """``"82.5 ± 3.1 [79.0, 86.0]"`` (values times ``scale``; just the mean when n < 2)."""
        if math.isnan(self.mean):
            return "n/a"
        m = f"{self.mean * scale:.{digits}f}"
        if self.n < 2:
            return m
        return (f"{m} ± {self.sd * scale:.{digits}f} "
                f"[{self.ci_low * scale:.{digits}f}, {self.ci_high * scale:.{digits}f}]")


def summarise(values: Iterable[float], confidence: float = 0.95,
              bounds: tuple[float, float] | None = None) -> Summary:
    """Mean, sample SD (ddof=1) and ``confidence`` t-interval ``mean ± t(n-1) * sd / sqrt(n)``.

    NaNs are dropped. With one value the SD and interval are NaN; with none, everything is NaN.
    ``bounds`` clips the interval to the metric's range (e.g. (0, 1) for accuracy): with few runs a
    t-interval can reach past it. Approximate: see ``Summary`` (CV folds are not independent).
    """
    arr = np.asarray([float(v) for v in values], dtype=float)
    arr = arr[~np.isnan(arr)]
    n = len(arr)
    if n == 0:
        return Summary(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    mean = float(arr.mean())
    if n == 1:
        return Summary(mean, float("nan"), float("nan"), float("nan"), 1)
    sd = float(arr.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Summary(mean, sd, low, high, n)
