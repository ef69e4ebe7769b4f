"""Checkpoints as safetensors only: nothing is ever unpickled.

One ``.safetensors`` file holds every tensor under a prefix::

    model/<param name>              model state_dict
    optim/<param id>/<key>          optimizer per-parameter state (AdamW: step, exp_avg, exp_avg_sq)
    rng/torch, rng/cuda/<i>         torch CPU / CUDA generator states (uint8, as torch gives them)
    rng/numpy, rng/python           numpy MT19937 key and Python's random state, as uint8 bytes

and, in the safetensors header's ``__metadata__["neuromoe"]``, one JSON document with everything else:
``meta`` (epoch, configs, metrics, clinical preprocessor, scheduler state: whatever the caller passes),
the optimizer's param_groups and non-tensor state, and the non-tensor parts of the RNG states. The loader
reads that embedded copy, so a checkpoint is a single file that is replaced atomically (temporary file in
the same folder, fsync, ``os.replace``): an interrupted save leaves the previous checkpoint intact.
A readable copy of the JSON is written beside it (``last.safetensors`` -> ``last.json``) for people and
tools; it is never read back.

Loading checks the safetensors framing (8-byte little-endian header length, JSON header) before anything
else and raises ``CheckpointError`` for any other file: a pickle, a ``torch.save`` zip, a truncated file.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from neuromoe.errors import NeuroMoEError

FORMAT = "neuromoe-checkpoint/1"
_META_KEY = "neuromoe"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class CheckpointError(NeuroMoEError):
    """A file that is not a readable NeuroMoE safetensors checkpoint (or one from another run)."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns; tensors are on the requested device."""

    model_state: dict[str, Tensor]
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None  # ready for ``optimizer.load_state_dict``
    rng_state: dict[str, Any] | None = None  # ready for ``restore_rng_state``


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and, if initialised, CUDA), numpy and Python RNG states of this process."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state`` (CUDA states only restored where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _bytes_tensor(a: np.ndarray) -> Tensor:
    """Any numpy array -> (nbytes,) uint8 tensor of its raw little-endian bytes."""
    return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8).copy())


def _rng_to_file(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    name, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    tensors = {"rng/torch": state["torch"].contiguous(),
               "rng/numpy": _bytes_tensor(np.asarray(keys, dtype="<u4")),
               "rng/python": _bytes_tensor(np.asarray(internal, dtype="<u4"))}
    for i, t in enumerate(state.get("cuda", [])):
        tensors[f"rng/cuda/{i}"] = t.contiguous()
    info = {"numpy": [name, int(pos), int(has_gauss), float(cached)],
            "python": [int(version), gauss_next], "cuda": len(state.get("cuda", []))}
    return tensors, info


def _rng_from_file(tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
    name, pos, has_gauss, cached = info["numpy"]
    version, gauss_next = info["python"]
    keys = tensors["rng/numpy"].cpu().numpy().view("<u4").astype(np.uint32)
    internal = tuple(int(v) for v in tensors["rng/python"].cpu().numpy().view("<u4"))
    return {"torch": tensors["rng/torch"].cpu(),
            "cuda": [tensors[f"rng/cuda/{i}"].cpu() for i in range(info["cuda"])],
            "numpy": (name, keys, pos, has_gauss, cached),
            "python": (version, internal, gauss_next)}


def _optimizer_to_file(sd: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    ids = [str(p) for p in sd["state"]]
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "ids": ids}


def _optimizer_from_file(tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(info["scalars"].get(pid, {})) for pid in info["ids"]}
    for name, t in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            state[int(pid)][key] = t
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, fsync, then ``os.replace`` onto ``path``; the tmp file never survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (tmp + os.replace)."""
    path = Path(path)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))
    return path


def sidecar_path(path: str | Path) -> Path:
    """``x/last.safetensors`` -> ``x/last.json``."""
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | Path, model_state: Mapping[str, Tensor], meta: Mapping[str, Any],
                    optimizer_state: Mapping[str, Any] | None = None,
                    rng_state: Mapping[str, Any] | None = None, sidecar: bool = True) -> Path:
    """Write a checkpoint atomically.

    Args:
        path: the ``.safetensors`` file.
        model_state: ``model.state_dict()``.
        meta: JSON-serialisable dict (epoch, configs, metrics, clinical preprocessor, scheduler state, ...).
        optimizer_state: ``optimizer.state_dict()`` or None.
        rng_state: ``capture_rng_state()`` or None.
        sidecar: also write a readable ``<stem>.json`` copy of the JSON part (never read back).
    """
    path = Path(path)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    doc: dict[str, Any] = {"format": FORMAT, "meta": dict(meta)}
    if optimizer_state is not None:
        t, doc["optimizer"] = _optimizer_to_file(optimizer_state)
        tensors.update(t)
    if rng_state is not None:
        t, doc["rng"] = _rng_to_file(rng_state)
        tensors.update(t)
    text = json.dumps(doc)
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={_META_KEY: text}))
    if sidecar:
        write_json_atomic(sidecar_path(path), doc["meta"])
    return path


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header, after checking the framing; CheckpointError otherwise."""
    fix = "pass a .safetensors checkpoint written by neuromoe (pickled .pt/.pth/.ckpt files are never loaded)"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (bad or truncated header)\n  fix: {fix}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)\n  fix: {fix}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)\n  fix: {fix}")
    return header


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` dict of a checkpoint, reading only its header (cheap)."""
    return _read_doc(Path(path))["meta"]


def _read_doc(path: Path) -> dict[str, Any]:
    header = _read_header(path)
    text = (header.get("__metadata__") or {}).get(_META_KEY)
    if text is None:
        raise CheckpointError(f"{path}: a safetensors file but not a NeuroMoE checkpoint (no "
                              f"'{_META_KEY}' metadata)\n  fix: pass a model.safetensors written by neuromoe")
    doc = json.loads(text)
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {doc.get('format')!r}; this version reads "
                              f"{FORMAT!r}")
    return doc


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; CheckpointError for anything else."""
    path = Path(path)
    doc = _read_doc(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises its own types for a corrupt body
        raise CheckpointError(f"{path}: corrupt safetensors body ({err})") from err
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    optim = _optimizer_from_file(tensors, doc["optimizer"]) if "optimizer" in doc else None
    rng = _rng_from_file(tensors, doc["rng"]) if "rng" in doc else None
    return Checkpoint(model_state=model_state, meta=doc["meta"], optimizer_state=optim, rng_state=rng)
