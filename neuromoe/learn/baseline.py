"""The non-deep baseline: multinomial logistic regression on clinical features + regional image means.

Features per subject (one row of the cohort cache):

- the configured clinical columns, encoded as numbers (``neuromoe.learn.data.read_clinical``: sex M -> 0,
  F -> 1, NaN where missing);
- regional means of every cached map: the model grid is cut in ``regions`` = (2, 2, 2) blocks (the
  octants of the brain), and each channel of each modality is averaged over the grid brain mask inside
  each block (anat 1 x 8, DTI 2 x 8, fMRI 2 x 8 = 40 features at the defaults). A modality a subject
  lacks gives NaN features.

Model: ``Pipeline(SimpleImputer(median), StandardScaler(), LogisticRegression(lbfgs, multinomial,
class_weight="balanced", C=1))``. The imputer and the scaler are inside the pipeline, so they are fitted
on the training part only, as the deep model's clinical preprocessing is. ``class_weight="balanced"`` is
the weighting a_c = N / (C N_c) the deep model's loss uses. The validation part is not used for fitting
(nothing to stop early); the model is scored on it and on the test part.

``run_baseline`` writes ``predictions.tsv`` and ``metrics.json`` in the format of a deep run
(``neuromoe.learn.train``), with ``variant: "baseline"`` and no gate columns, so ``neuromoe.results.evaluate``
tabulates it beside the ablations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from neuromoe.cache.store import MODALITIES, id_columns
from neuromoe.config import ParticipantsConfig
from neuromoe.errors import InputError
from neuromoe.learn.metrics import compute_metrics
from neuromoe.learn.splits import split_rows

VARIANT = "baseline"
REGIONS = (2, 2, 2)
_CHUNK = 16  # subjects decoded to float32 at a time (bounds memory at large grids)


def region_labels(mask: np.ndarray, regions: Sequence[int] = REGIONS) -> np.ndarray:
    """(D, H, W) int: the block index (0 .. prod(regions)-1, C order) of each mask voxel, -1 outside.

    Block edges split each axis as evenly as ``np.array_split`` does.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3 or len(regions) != 3 or any(int(r) < 1 for r in regions):
        raise ValueError(f"need a 3D mask and three positive region counts, got {mask.shape} and {regions}")
    idx = [np.concatenate([np.full(len(a), k) for k, a in enumerate(np.array_split(np.arange(n), int(r)))])
           for n, r in zip(mask.shape, regions, strict=True)]
    lab = (idx[0][:, None, None] * regions[1] + idx[1][None, :, None]) * regions[2] + idx[2][None, None, :]
    return np.where(mask, lab, -1).astype(np.int64)


def regional_means(images: np.ndarray, labels: np.ndarray, n_regions: int) -> np.ndarray:
    """(N, C, D, H, W) float -> (N, C, n_regions) means over the voxels of each label (NaN if none)."""
    flat = images.reshape(images.shape[0], images.shape[1], -1)  # (N, C, V)
    lab = labels.reshape(-1)
    out = np.full((*images.shape[:2], n_regions), np.nan, dtype=np.float64)
    for r in range(n_regions):
        sel = lab == r
        if sel.any():
            out[:, :, r] = flat[:, :, sel].mean(axis=-1, dtype=np.float64)
    return out


def image_features(cohort: Any, regions: Sequence[int] = REGIONS) -> pd.DataFrame:
    """Regional means of every modality and channel of an opened ``CohortCache``; one row per cache row.

    Columns ``<modality>_<channel>_r<k>``; NaN for a modality the subject lacks.
    """
    from neuromoe.cache.store import decode

    labels = region_labels(cohort.mask, regions)
    n_regions = int(np.prod(regions))
    present = cohort.present  # (N, 3)
    cols: dict[str, np.ndarray] = {}
    n = len(cohort)
    for j, m in enumerate(MODALITIES):
        chans = cohort.channels[m]
        feats = np.full((n, len(chans), n_regions), np.nan)
        for start in range(0, n, _CHUNK):
            rows = np.asarray(cohort.arrays[m][start:start + _CHUNK])
            block = decode(rows, cohort.dtype)  # (b, C, D, H, W) float32
            feats[start:start + len(block)] = regional_means(block, labels, n_regions)
        feats[~present[:, j]] = np.nan
        for c, ch in enumerate(chans):
            for r in range(n_regions):
                cols[f"{m}_{ch}_r{r}"] = feats[:, c, r]
    return pd.DataFrame(cols, index=cohort.index["row"].to_numpy())


def baseline_features(cohort: Any, clinical_columns: Sequence[str],
                      regions: Sequence[int] = REGIONS) -> pd.DataFrame:
    """Clinical columns (numbers, NaN missing) then regional image means; index = cache row."""
    from neuromoe.learn.data import read_clinical

    try:
        clin = read_clinical(cohort.index, list(clinical_columns))
    except ValueError as err:
        raise InputError(str(err), path=Path(cohort.root) / "index.tsv",
                         fix="fix participants.tsv or participants.clinical_columns, then rebuild the cache"
                         ) from err
    clin.index = cohort.index["row"].to_numpy()
    return pd.concat([clin.astype(float), image_features(cohort, regions)], axis=1)


def make_pipeline(C: float = 1.0, max_iter: int = 5000) -> Pipeline:  # noqa: N803 - scikit-learn's name
    """Median imputation -> standardisation -> multinomial logistic regression (balanced class weights)."""
    return Pipeline([
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("scale", StandardScaler()),
        ("logreg", LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter)),
    ])


def fit_predict(features: pd.DataFrame, y: np.ndarray, parts: Mapping[str, Sequence[int]],
                n_classes: int, C: float = 1.0) -> tuple[Pipeline, dict[str, np.ndarray]]:  # noqa: N803
    """Fit on ``parts["train"]`` rows (labels of ``features.index``), predict every other part.

    Returns the fitted pipeline and ``{part: (n, n_classes) probabilities}`` in the row order given.
    A class absent from the training part gets probability 0 (the model cannot predict it).
    """
    train = list(parts["train"])
    y_of = pd.Series(np.asarray(y), index=features.index)
    pipe = make_pipeline(C).fit(features.loc[train].to_numpy(), y_of.loc[train].to_numpy())
    seen = pipe.named_steps["logreg"].classes_
    out = {}
    for part, rows in parts.items():
        rows = list(rows)
        prob = np.zeros((len(rows), n_classes))
        if rows:
            prob[:, seen] = pipe.predict_proba(features.loc[rows].to_numpy())
        out[part] = prob
    return pipe, out


def run_baseline(cache_dir: str | Path, splits_tsv: str | Path, split_id: str, cfg: Mapping[str, Any],
                 out_dir: str | Path, *, regions: Sequence[int] = REGIONS, C: float = 1.0,  # noqa: N803
                 verify: bool = True) -> dict[str, Any]:
    """Fit and score the baseline on one split; write ``predictions.tsv`` and ``metrics.json``.

    Args:
        cache_dir: the cohort cache; opened and checked against ``cfg`` (``neuromoe.cache.store.open_cohort``).
        splits_tsv, split_id: the subjects of each part (``neuromoe.learn.splits``).
        cfg: the workflow config (reads ``participants``: clinical columns, missing_modality).
        out_dir: the run folder (``<model dir>/baseline/<split_id>`` in the workflow).
        regions: blocks per axis for the regional means.
        C: inverse L2 regularisation strength of the logistic regression.
        verify: sha256-check the cache files on open.

    Subjects missing a modality are left out when ``participants.missing_modality`` is ``exclude``, as
    the deep runs do; with ``keep`` their image features are imputed.

    Returns the metrics dict written to ``metrics.json`` (keys as a deep run's, ``val``/``test`` from
    ``neuromoe.learn.metrics.compute_metrics``).
    """
    from neuromoe.cache.store import open_cohort

    out_dir = Path(out_dir)
    cohort = open_cohort(cache_dir, expected=cfg if "cache" in cfg else None, verify=verify)
    participants = ParticipantsConfig.from_config(cfg)
    clin_cols = list(participants.clinical_columns)
    classes = cohort.labels
    rows = split_rows(cohort.index, splits_tsv, split_id)
    if participants.missing_modality == "exclude":
        complete = set(cohort.index.loc[cohort.present.all(axis=1), "row"].astype(int))
        excluded = {p: [r for r in rs if r not in complete] for p, rs in rows.items()}
        rows = {p: [r for r in rs if r in complete] for p, rs in rows.items()}
    else:
        excluded = {p: [] for p in rows}
    if not rows["train"]:
        raise InputError(f"split {split_id}: no training subject left for the baseline", path=cache_dir,
                         fix="set participants.missing_modality: keep, or check the cache's has_* columns")
    features = baseline_features(cohort, clin_cols, regions)
    y = cohort.y
    eval_parts = {p: rs for p, rs in rows.items() if p != "train" and rs}
    _, probs = fit_predict(features, y, {"train": rows["train"], **eval_parts}, len(classes), C)

    tables = []
    for part, rs in eval_parts.items():
        t = pd.DataFrame({**id_columns(cohort.index, rs), "part": part,
                          "label": [classes[int(k)] for k in y[rs]]})
        for j, c in enumerate(classes):
            t[f"prob_{c}"] = probs[part][:, j]
        tables.append(t)
    pred = pd.concat(tables, ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred.to_csv(out_dir / "predictions.tsv", sep="\t", index=False, float_format="%.6g")

    results = {p: compute_metrics(pred[pred["part"] == p], classes) for p in eval_parts}
    metrics = {"finished": True, "split_id": split_id, "variant": VARIANT, "model": "logreg",
               "description": f"multinomial logistic regression (balanced class weights, L2, C={C}) on "
                              "clinical features + regional means "
                              f"({'x'.join(map(str, regions))} blocks of the grid brain mask) of every "
                              "cached map; median imputation and standardisation fitted on the training part",
               "features": list(features.columns), "classes": list(classes),
               "n": {p: len(rs) for p, rs in rows.items()},
               "n_excluded": {p: len(rs) for p, rs in excluded.items()}, **results}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True))
    return metrics
