"""torch Dataset over the cohort cache, and the clinical columns of its index as numbers.

Items (``CohortDataset[i]``)::

    {"anat": (1, D, H, W), "dwi": (Cd, D, H, W), "func": (Cf, D, H, W),   # stored dtype, see below
     "present": (3,) bool (anat, dwi, func), "clin": (F,) float32, "label": () int64, "row": () int64}

Images come back in the cache's *stored* dtype without a copy: ``float16`` as torch.float16, ``bfloat16``
(stored as uint16 bit patterns) reinterpreted as torch.bfloat16 with ``Tensor.view``. The conversion to
float32 happens after the batch reaches the device (``to_device``), so a DataLoader moves half the bytes.
An absent modality is the zero row the cache holds for it, with ``present`` False.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from neuromoe.cache.store import MODALITIES, CohortCache, open_cohort
from neuromoe.inputs.bids import SEX_CODES  # one sex coding for the whole package
from neuromoe.learn.model import MRI_MODALITIES, expert_presence


class CohortDataset(Dataset):
    """Subjects of a cohort cache as dicts of tensors (see the module docstring).

    cache: an opened ``CohortCache`` (check it against the config with ``open_cohort(dir, cfg)`` first)
        or a cache folder (opened with ``verify=False``: sizes only, no config check).
    rows: cache rows this dataset serves, in order (default all); item ``i`` is cache row ``rows[i]``.
    clinical: (N, F) float32 indexed by *cache row* (N = len(cache)), already imputed and scaled
        (``neuromoe.learn.clinical.ClinicalPreprocessor``); None gives ``clin`` of shape (0,).

    The arrays are memory-mapped copy-on-write (``mmap_mode='c'``): ``torch.from_numpy`` on a row is a
    zero-copy view of the page cache, and an in-place op on it can never reach the file. Maps are
    opened lazily per process, so the dataset pickles small for spawn-started DataLoader workers.
    """

    def __init__(self, cache: CohortCache | str | Path, rows: Sequence[int] | None = None,
                 clinical: np.ndarray | None = None) -> None:
        if not isinstance(cache, CohortCache):
            cache = open_cohort(cache, verify=False)
        n = len(cache)
        self.root = cache.root
        self.dtype = cache.dtype
        self.channels = cache.channels
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= n):
            raise ValueError(f"rows must be in 0..{n - 1}, got min {self.rows.min()} max {self.rows.max()}")
        self.labels = torch.tensor(cache.y, dtype=torch.int64)  # small copies (pandas arrays are read-only)
        self.present = torch.tensor(cache.present, dtype=torch.bool)
        if clinical is None:
            clinical = np.zeros((n, 0), np.float32)
        clinical = np.asarray(clinical, dtype=np.float32)
        if clinical.ndim != 2 or clinical.shape[0] != n:
            raise ValueError(f"clinical must be (N, F) with N = {n} cache rows, got {clinical.shape}")
        if not np.isfinite(clinical).all():
            raise ValueError("clinical features contain NaN/inf; impute them first "
                             "(neuromoe.learn.clinical.ClinicalPreprocessor)")
        self.clinical = torch.tensor(clinical)
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None  # never pickle a memmap (it would copy the data); reopen in the worker
        return state

    def _maps(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {m: np.load(self.root / f"{m}.npy", mmap_mode="c", allow_pickle=False)
                            for m in MODALITIES}
        return self._arrays

    def __len__(self) -> int:
        return int(self.rows.size)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        if self.dtype == "bfloat16":  # uint16 bit patterns -> bfloat16, same bytes
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[i])
        maps = self._maps()
        item = {m: self._tensor(maps[m][row]) for m in MODALITIES}
        item["present"] = self.present[row]
        item["clin"] = self.clinical[row]
        item["label"] = self.labels[row]
        item["row"] = torch.tensor(row, dtype=torch.int64)
        return item


def to_device(batch: Mapping[str, torch.Tensor], experts: Sequence[str], dev: torch.device
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A collated batch on ``dev`` in the model's terms: (images {m: (B,C,D,H,W) float32} for the MRI experts,
    clin (B,F) float32, present (B,E) bool over ``experts``, label (B,) int64). Images become float32 on the
    device, after the copy."""
    nb = dev.type == "cuda"
    images = {m: batch[m].to(dev, non_blocking=nb).float() for m in experts if m in MRI_MODALITIES}
    clin = batch["clin"].to(dev, non_blocking=nb).float()
    present = expert_presence(batch["present"].to(dev, non_blocking=nb), tuple(experts))
    return images, clin, present, batch["label"].to(dev, non_blocking=nb).long()


def read_clinical(index_df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Clinical columns of the cache index as float32 numbers, NaN where missing; (N, F) DataFrame.

    ``sex`` is encoded M -> 0, F -> 1 (also ``male``/``female``, any case); every other column must be
    numeric. Raises ValueError naming the column and the values it cannot read.
    """
    missing = [c for c in columns if c not in index_df.columns]
    if missing:
        raise ValueError(f"clinical columns {missing} are not in the index "
                         f"(columns: {list(index_df.columns)})")
    out = pd.DataFrame(index=index_df.index)
    for c in columns:
        col = index_df[c]
        if c == "sex":
            text = col.astype("string").str.strip().str.lower()
            bad = sorted(set(text.dropna()) - set(SEX_CODES))
            if bad:
                raise ValueError(f"column 'sex': values {bad} are not M/F (encoded M -> 0, F -> 1)")
            out[c] = text.map(SEX_CODES).astype("float32")
            continue
        num = pd.to_numeric(col, errors="coerce")
        bad = sorted(set(col[num.isna() & col.notna()].astype(str)))
        if bad:
            raise ValueError(f"column {c!r}: non-numeric values {bad[:5]}")
        out[c] = num.astype("float32")
    return out
