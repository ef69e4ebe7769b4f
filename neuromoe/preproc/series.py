"""Time-series helpers of the func stage, numpy only: a linear detrend and tie-averaged ranks per row.

They replace ``scipy.signal.detrend`` and ``scipy.stats.rankdata``, whose imports alone cost ~0.8 CPU s of
every func job (tests compare the values with scipy's).
"""

from __future__ import annotations

import numpy as np


def detrend(y: np.ndarray) -> np.ndarray:
    """(V, T) float64 -> each row minus its least-squares line (``scipy.signal.detrend(type="linear")``, whose
    import alone costs a second per job)."""
    t = np.arange(y.shape[1], dtype=np.float64)
    t -= t.mean()
    centred = y - y.mean(axis=1, keepdims=True)
    slope = centred @ t / (t @ t)
    return centred - slope[:, None] * t


def rank_rows(a: np.ndarray) -> np.ndarray:
    """(V, T) -> float64 ranks 1..T along each row, ties sharing their average rank
    (``scipy.stats.rankdata(a, axis=1)``; a constant series ranks (T + 1) / 2 everywhere)."""
    a = np.asarray(a)
    v, n = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    srt = np.take_along_axis(a, order, axis=1)
    new = np.ones((v, n), bool)  # first element of each run of equal values
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    run_id = np.cumsum(new, axis=1) - 1  # run index per sorted position
    pos = np.arange(1, n + 1, dtype=np.float64)
    flat_run = run_id + (np.arange(v) * n)[:, None]  # runs numbered over the whole array
    total = np.bincount(flat_run.ravel(), weights=np.broadcast_to(pos, (v, n)).ravel(), minlength=v * n)
    count = np.bincount(flat_run.ravel(), minlength=v * n)
    avg = total[flat_run] / count[flat_run]
    out = np.empty((v, n))
    np.put_along_axis(out, order, avg, axis=1)
    return out
