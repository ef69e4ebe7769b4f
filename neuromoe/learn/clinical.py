"""Clinical feature preprocessing, fitted on the training fold only.

Per column: encode, impute the missing values with the training median, z-score with the training mean
and standard deviation. Kept deliberately simple (no missing-indicator columns): the synthetic cohort's
missingness is random, and the gate and the clinical expert see the imputed value.

Encoding: a column whose observed values are all numbers (or numeric strings) is numeric. A column with
text values is categorical (compared lower-cased and stripped) and must have exactly two levels in the
training fold: sex ``m``/``f`` (or ``male``/``female``) is coded m = 0, f = 1, as ``neuromoe.learn.data``
codes it; any other pair 0/1 in sorted order. The levels are stored with the fit, and a level unseen in
training raises ``InputError`` at transform time. Encoding is done here, not upstream, so the cohort cache
keeps participants.tsv's raw values and one object holds every rule that turns them into model input.

A constant training column gets scale 1 (it becomes 0 everywhere, instead of dividing by zero).

Example::

    pre = ClinicalPreprocessor(["age", "sex", "updrs3"]).fit(index.iloc[train_rows])
    X = pre.transform(index)                  # (N, 3) float32, no NaN
    json.dumps(pre.to_dict())                 # stored in model.json
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from neuromoe.errors import InputError
from neuromoe.inputs.bids import SEX_CODES  # one sex coding for the whole package


class ClinicalPreprocessor:
    """Median imputation + z-scoring (+ 0/1 coding of two-level text columns), per column."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = [str(c) for c in columns]
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"duplicate clinical columns in {self.columns}")
        self.levels: dict[str, list[str]] = {}  # categorical column -> [level coded 0, level coded 1]
        self.median: dict[str, float] = {}
        self.mean: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.fitted = False

    def _check_columns(self, frame: pd.DataFrame) -> None:
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise InputError(f"clinical column(s) {missing} not in the table "
                             f"(columns: {list(frame.columns)})", path="participants.tsv",
                             fix="add them to participants.tsv or change participants.clinical_columns")

    def _encode(self, col: str, values: pd.Series) -> np.ndarray:
        """Column values -> float64 (N,), NaN where missing."""
        if col not in self.levels:
            num = pd.to_numeric(values, errors="coerce")
            bad = values.notna() & num.isna()
            if bad.any():
                raise InputError(f"clinical column {col!r} was numeric in the training fold but has "
                                 f"value {values[bad].iloc[0]!r}", path="participants.tsv",
                                 fix="fix the value or leave it empty (n/a)")
            return num.to_numpy(dtype=np.float64)
        lv = self.levels[col]
        text = values.astype("string").str.strip().str.lower()
        unseen = sorted(set(text.dropna()) - set(lv))
        if unseen:
            raise InputError(f"clinical column {col!r} has level(s) {unseen} not seen in the training fold "
                             f"(levels {lv})", path="participants.tsv",
                             fix=f"use one of {lv} or leave the value empty (n/a)")
        return text.map({lv[0]: 0.0, lv[1]: 1.0}).astype("Float64").to_numpy(dtype=np.float64,
                                                                              na_value=np.nan)

    def fit(self, train: pd.DataFrame) -> ClinicalPreprocessor:
        """Learn levels, medians, means and scales from the training rows only; returns self."""
        self._check_columns(train)
        self.levels, self.median, self.mean, self.scale = {}, {}, {}, {}
        for col in self.columns:
            values = train[col]
            observed = values.dropna()
            if observed.empty:
                raise InputError(f"clinical column {col!r} has no observed value in the {len(train)} "
                                 "training subjects, so it cannot be imputed or scaled",
                                 path="participants.tsv",
                                 fix=f"fill in {col!r} for some subjects or drop it from "
                                     "participants.clinical_columns")
            if pd.to_numeric(observed, errors="coerce").isna().any():  # text -> two-level categorical
                levels = sorted(set(observed.astype(str).str.strip().str.lower()))
                if set(levels) <= set(SEX_CODES):
                    levels.sort(key=SEX_CODES.__getitem__)
                if len(levels) != 2:
                    raise InputError(f"clinical column {col!r} is text with {len(levels)} level(s) "
                                     f"{levels} in the training fold; only two-level text columns "
                                     "(e.g. sex F/M) are coded",
                                     path="participants.tsv",
                                     fix="code it numerically in participants.tsv or drop it")
                self.levels[col] = levels
            x = self._encode(col, values)
            x = x[~np.isnan(x)]
            self.median[col] = float(np.median(x))
            self.mean[col] = float(x.mean())
            sd = float(x.std())
            self.scale[col] = sd if sd > 0 else 1.0
        self.fitted = True
        return self

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows of ``frame`` -> (N, F) float32 features, F = len(columns), no NaN, in column order."""
        if not self.fitted:
            raise RuntimeError("ClinicalPreprocessor.transform called before fit (or from_dict)")
        self._check_columns(frame)
        out = np.empty((len(frame), len(self.columns)), dtype=np.float32)
        for j, col in enumerate(self.columns):
            x = self._encode(col, frame[col].reset_index(drop=True))
            x = np.where(np.isnan(x), self.median[col], x)
            out[:, j] = (x - self.mean[col]) / self.scale[col]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state."""
        if not self.fitted:
            raise RuntimeError("ClinicalPreprocessor.to_dict called before fit")
        return {"columns": list(self.columns), "levels": {k: list(v) for k, v in self.levels.items()},
                "median": dict(self.median), "mean": dict(self.mean), "scale": dict(self.scale)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClinicalPreprocessor:
        """Inverse of ``to_dict``."""
        pre = cls(d["columns"])
        pre.levels = {k: list(v) for k, v in d["levels"].items()}
        pre.median = {k: float(v) for k, v in d["median"].items()}
        pre.mean = {k: float(v) for k, v in d["mean"].items()}
        pre.scale = {k: float(v) for k, v in d["scale"].items()}
        missing = [c for c in pre.columns if c not in pre.median]
        if missing:
            raise ValueError(f"clinical preprocessor state lacks column(s) {missing}")
        pre.fitted = True
        return pre
