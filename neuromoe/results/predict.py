"""Prediction for new subjects with a trained run: probabilities, gate weights, explanation maps.

The subjects come from a cohort cache built by the same preprocessing and cache rules (``snakemake
predict``), so a new subject goes through exactly what the training subjects went through. The model's
own clinical preprocessor (fitted on its training fold, stored in ``model.safetensors``) scales the
clinical features; nothing is refitted. A subject lacking an MRI modality still gets a prediction: its
expert is masked and the gate renormalised over the experts present, and the row says which are missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from neuromoe.errors import InputError
from neuromoe.learn.model import MRI_MODALITIES


def _check_compatible(meta: dict, cohort, run_dir: Path, cache_dir: Path) -> None:
    """The cache must be on the model's grid, with its channels and classes."""
    mc = meta["model_config"]
    problems = []
    if list(mc["grid"]) != list(cohort.grid):
        problems.append(f"grid: model {list(mc['grid'])}, cache {list(cohort.grid)}")
    for m, n in mc["channels"].items():
        if m in cohort.channels and len(cohort.channels[m]) != n:
            problems.append(f"{m} channels: model {n}, cache {cohort.channels[m]}")
    if list(meta["classes"]) != list(cohort.labels):
        problems.append(f"classes: model {meta['classes']}, cache {cohort.labels}")
    if problems:
        raise InputError("the cache does not match the model: " + "; ".join(problems), path=cache_dir,
                         fix=f"build the cache with the config the model in {run_dir} was trained with "
                             "(cache.grid, cache.dwi_maps/func_maps, participants.labels)")


def predict_cohort(run_dir: str | Path, cache_dir: str | Path, out_dir: str | Path, *,
                   subjects: Sequence[str] | None = None, explain: bool = True,
                   device: str = "cpu") -> Path:
    """Predict every cached subject (or ``subjects``); write ``predictions.tsv`` (+ ``explain/``).

    Columns: participant_id, diagnosis (as recorded, n/a if unknown), pred_class, prob_<class>...,
    gate_<expert>..., missing (comma-separated absent modalities, empty if none), flagged (True when a
    modality was missing and its expert masked). Returns the TSV path.
    """
    from neuromoe.cache.store import id_columns, open_cohort
    from neuromoe.learn.clinical import ClinicalPreprocessor
    from neuromoe.learn.data import CohortDataset
    from neuromoe.learn.train import load_model, predict

    run_dir, cache_dir, out_dir = Path(run_dir), Path(cache_dir), Path(out_dir)
    model_path = run_dir / "model.safetensors"
    if not model_path.is_file():
        raise InputError("no trained model here", path=model_path,
                         fix="point to a finished run folder, e.g. results/model/runs/full/cv-s0-f0")
    dev = torch.device(device)
    model, meta = load_model(model_path, device=dev)
    cohort = open_cohort(cache_dir)
    _check_compatible(meta, cohort, run_dir, cache_dir)
    index = cohort.index
    ids = index["participant_id"].astype(str).str.removeprefix("sub-")
    if subjects is not None:
        want = {str(s).removeprefix("sub-") for s in subjects}
        unknown = sorted(want - set(ids))
        if unknown:
            raise InputError(f"subjects {unknown} are not in the cache", path=cache_dir,
                             fix="run `snakemake predict` on a dataset that contains them")
        rows = [int(r) for r, i in zip(index["row"], ids, strict=True) if i in want]
    else:
        rows = [int(r) for r in index["row"]]
    clinical = ClinicalPreprocessor.from_dict(meta["clinical"]).transform(index)  # (N, F), train-fold fit
    dataset = CohortDataset(cohort, rows, clinical)
    pred = predict(model, DataLoader(dataset, batch_size=8, shuffle=False), dev)

    classes, experts = list(meta["classes"]), list(model.cfg.experts)
    by_row = index.set_index("row")
    table = pd.DataFrame({**(id_columns(index, pred["row"]) if len(index) else {"participant_id": []}),
                          "diagnosis": by_row.loc[pred["row"], "diagnosis"].fillna("n/a").astype(str).to_numpy()})
    probs = np.exp(pred["log_probs"])
    table["pred_class"] = [classes[k] for k in probs.argmax(1)]
    for j, c in enumerate(classes):
        table[f"prob_{c}"] = probs[:, j]
    for j, e in enumerate(experts):
        table[f"gate_{e}"] = pred["gate"][:, j]
    missing = [",".join(m for m in MRI_MODALITIES if m in experts and not bool(by_row.at[r, f"has_{m}"]))
               for r in pred["row"]]
    table["missing"] = missing
    table["flagged"] = [bool(m) for m in missing]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "predictions.tsv"
    table.to_csv(out, sep="\t", index=False, float_format="%.6g")
    if explain:
        from neuromoe.results.explain import explain_cohort

        items = [dataset[k] for k in range(len(dataset))]
        units = list(table["participant_id"])
        if "session_id" in table.columns:  # one explanation per visit: sub-01_ses-2_...
            units = [f"{p}_{s}" for p, s in zip(units, table["session_id"], strict=True)]
        explain_cohort(model, items, units, cohort.affine, out_dir / "explain", classes=classes)
    return out
