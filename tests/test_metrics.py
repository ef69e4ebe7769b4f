"""Metrics equal scikit-learn's on a fixed prediction file; ECE, AUC skipping, summaries."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from neuromoe.learn.metrics import (
    classes_of,
    compute_metrics,
    expected_calibration_error,
    experts_of,
    label_indices,
    reliability_table,
    summarise,
)

FIXTURE = Path(__file__).parent / "data" / "predictions_fixture.tsv"
CLASSES = ["HC", "PD", "iRBD"]


@pytest.fixture
def test_rows() -> pd.DataFrame:
    pred = pd.read_csv(FIXTURE, sep="\t", dtype={"participant_id": str})
    return pred[pred["part"] == "test"].reset_index(drop=True)


def sklearn_reference(pred: pd.DataFrame) -> dict:
    y = pred["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    prob = pred[[f"prob_{c}" for c in CLASSES]].to_numpy()
    y_hat = prob.argmax(1)
    return {"y": y, "prob": prob, "accuracy": accuracy_score(y, y_hat),
            "balanced_accuracy": balanced_accuracy_score(y, y_hat),
            "macro_f1": f1_score(y, y_hat, average="macro"),
            "auc": roc_auc_score(y, prob, multi_class="ovr", average="macro"),
            "confusion": confusion_matrix(y, y_hat, labels=[0, 1, 2])}


def test_metrics_equal_sklearn_on_fixture(test_rows: pd.DataFrame) -> None:
    m = compute_metrics(test_rows)
    ref = sklearn_reference(test_rows)
    assert classes_of(test_rows) == CLASSES and experts_of(test_rows) == ["anat", "dwi", "func", "clin"]
    assert m["n"] == 30
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc"):
        assert m[key] == pytest.approx(ref[key], abs=1e-12), key
    assert np.array_equal(np.array(m["confusion"]), ref["confusion"])
    for k, c in enumerate(CLASSES):
        assert m[f"auc_{c}"] == pytest.approx(roc_auc_score(ref["y"] == k, ref["prob"][:, k]), abs=1e-12)
    for e in ("anat", "dwi", "func", "clin"):
        assert m[f"gate_{e}"] == pytest.approx(test_rows[f"gate_{e}"].mean(), abs=1e-12)
    assert m["auc_skipped"] == [] and m["notes"] == []
    json.dumps(m)  # metrics.json-ready


def test_integer_labels_give_the_same_metrics(test_rows: pd.DataFrame) -> None:
    as_int = test_rows.assign(label=test_rows["label"].map({c: i for i, c in enumerate(CLASSES)}))
    assert np.array_equal(label_indices(as_int), label_indices(test_rows))
    a, b = compute_metrics(as_int), compute_metrics(test_rows)
    assert {k: a[k] for k in ("accuracy", "auc", "ece")} == {k: b[k] for k in ("accuracy", "auc", "ece")}
    with pytest.raises(ValueError, match="neither class names"):
        label_indices(test_rows.assign(label="ALS"))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_absent_class_is_skipped_in_auc_and_said(test_rows: pd.DataFrame) -> None:
    no_irbd = test_rows[test_rows["label"] != "iRBD"]
    m = compute_metrics(no_irbd)
    assert m["auc_skipped"] == ["iRBD"] and math.isnan(m["auc_iRBD"])
    assert "iRBD" in m["notes"][0]
    y = no_irbd["label"].map({"HC": 0, "PD": 1}).to_numpy()
    expected = np.mean([roc_auc_score(y == 0, no_irbd["prob_HC"]), roc_auc_score(y == 1, no_irbd["prob_PD"])])
    assert m["auc"] == pytest.approx(expected, abs=1e-12)
    # balanced accuracy equals sklearn's (recall over the classes in y_true)
    y_hat = no_irbd[[f"prob_{c}" for c in CLASSES]].to_numpy().argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, y_hat), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(y, y_hat, average="macro", zero_division=0), abs=1e-12)


def reference_ece(y: np.ndarray, prob: np.ndarray) -> float:
    """Straightforward loop over bins (lo, hi], written independently of the package."""
    conf, correct = prob.max(1), prob.argmax(1) == y
    total = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        sel = (conf > lo) & (conf <= hi) if b > 0 else (conf <= hi)
        if sel.any():
            total += sel.sum() / len(y) * abs(correct[sel].mean() - conf[sel].mean())
    return total


def test_ece_matches_reference_and_hand_example(test_rows: pd.DataFrame) -> None:
    ref = sklearn_reference(test_rows)
    assert compute_metrics(test_rows)["ece"] == pytest.approx(reference_ece(ref["y"], ref["prob"]), abs=1e-12)
    # Hand example: 4 subjects, confidences 0.95 (right), 0.95 (wrong), 0.55 (right), 0.55 (right).
    # bin (0.9,1]: acc 0.5 conf 0.95 -> 0.45 * 2/4 ; bin (0.5,0.6]: acc 1 conf 0.55 -> 0.45 * 2/4. ECE 0.45.
    prob = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    assert expected_calibration_error(y, prob) == pytest.approx(0.45)
    # perfectly confident and right -> 0
    assert expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]])) == 0.0
    table = reliability_table(test_rows)
    assert table["n"].sum() == len(test_rows) and len(table) == 10


def test_empty_or_bad_predictions_raise(test_rows: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(test_rows.iloc[:0])
    with pytest.raises(ValueError, match="prob_"):
        compute_metrics(test_rows[["participant_id", "label"]])
    bad = test_rows.copy()
    bad.loc[0, "prob_HC"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(bad)


def test_summarise_is_a_t_interval() -> None:
    values = [0.70, 0.75, 0.80, 0.72, 0.78, 0.74]
    s = summarise(values)
    sd = np.std(values, ddof=1)
    half = stats.t.ppf(0.975, 5) * sd / np.sqrt(6)
    assert s.n == 6 and s.mean == pytest.approx(np.mean(values)) and s.sd == pytest.approx(sd)
    assert s.ci_low == pytest.approx(np.mean(values) - half)
    assert s.ci_high == pytest.approx(np.mean(values) + half)
    assert s.format(100) == f"{np.mean(values) * 100:.1f} ± {sd * 100:.1f} " \
                           f"[{(np.mean(values) - half) * 100:.1f}, {(np.mean(values) + half) * 100:.1f}]"
    one = summarise([0.5, float("nan")])
    assert one.n == 1 and math.isnan(one.sd) and one.format(100) == "50.0"
    assert summarise([]).n == 0 and summarise([]).format() == "n/a"
    assert "approximate" in (summarise.__doc__ or "").lower()
