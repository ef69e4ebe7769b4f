"""Preprocessing: the anat, dwi and func stages, each with two backends that write the same files.

``run_stage`` is the one place the backend (``preprocessing.backend``) is chosen; ``preproc_keys`` names the
config keys each (stage, backend) reads, which the workflow passes as the rule's params.

python backend (PyPI packages only): one module per stage, ``anat`` (brain extraction, T1w -> MNI), ``dwi``,
``func``, with realignment in ``motion``, the SimpleITK tools in ``registration``, mask building blocks in
``masks``, numpy time-series helpers in ``series`` and the QC figures in ``qc``. Each stage module also holds
the public tail both backends share (``write_outputs``; ``func.derive_maps`` for what FSL has no tool for).
fsl backend: ``fsl`` (FSL's tools, then those shared tails). ``sidecars``: every image's JSON sidecar, written
by ``run_stage`` after either backend. The contract both keep (outputs, spaces,
sidecars, QC, errors) is docs/preprocessing.md.

This package imports only the core modules and ``neuromoe.inputs`` (never cache, learn or results).
Submodules are not imported here: importing SimpleITK, dipy or matplotlib costs seconds, and a rule
should pay only for the stage it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STAGES = ("anat", "dwi", "func")
BACKENDS = ("python", "fsl")


def preproc_keys(stage: str, backend: str) -> list[str]:
    """The dotted config keys the ``stage`` reads under ``backend``: the rule's params, so that editing a key
    another backend (or stage) reads reruns nothing here.

    python: the backend and the stage's own section. fsl: also ``preprocessing.fsl``, and for dwi and func
    ``preprocessing.anat`` (its ``registration`` decides whether applywarp is needed).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown preprocessing stage {stage!r}; one of {list(STAGES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown preprocessing.backend {backend!r}; one of {list(BACKENDS)}")
    keys = ["preprocessing.backend", f"preprocessing.{stage}"]
    if backend == "fsl":
        keys += ["preprocessing.fsl"] + (["preprocessing.anat"] if stage != "anat" else [])
    return keys


def run_stage(stage: str, inputs: Mapping[str, Any], outputs: Mapping[str, str], subject: str,
              cfg: Mapping[str, Any], threads: int | None = 1) -> None:
    """Run one preprocessing stage for one subject with the backend ``cfg["preprocessing"]["backend"]`` names.

    ``inputs`` / ``outputs``: the rule's named inputs and outputs (neuromoe.paths keys; anat reads ``t1w``).
    ``cfg``: the workflow config, or a rule's params holding the keys ``preproc_keys`` names.
    Bad input raises ``StageError`` / ``InputError`` naming the subject (see docs/preprocessing.md).
    Then every image's JSON sidecar asked for is written (``neuromoe.preproc.sidecars``).
    """
    from neuromoe.preproc.sidecars import write_sidecars

    _run_backend(stage, inputs, outputs, subject, cfg, threads)
    write_sidecars(inputs, outputs, cfg)  # both backends' images described the same way


def _run_backend(stage: str, inputs: Mapping[str, Any], outputs: Mapping[str, str], subject: str,
                 cfg: Mapping[str, Any], threads: int | None) -> None:
    from neuromoe.config import AnatConfig, DwiConfig, FslConfig, FuncConfig

    backend = cfg["preprocessing"]["backend"]
    preproc_keys(stage, backend)  # ValueError on an unknown stage or backend
    if backend == "python":
        if stage == "anat":
            from neuromoe.preproc.anat import run_anat

            run_anat(inputs["t1w"], outputs, subject, AnatConfig.from_config(cfg), threads=threads)
        elif stage == "dwi":
            from neuromoe.preproc.dwi import run_dwi

            run_dwi(inputs, outputs, subject, DwiConfig.from_config(cfg), threads=threads)
        else:
            from neuromoe.preproc.func import run_func

            run_func(inputs, outputs, subject, FuncConfig.from_config(cfg), threads=threads)
        return
    from neuromoe.preproc.fsl import stages

    fsl, anat = FslConfig.from_config(cfg), AnatConfig.from_config(cfg)
    if stage == "anat":
        stages.run_anat_fsl(inputs["t1w"], outputs, subject, anat, fsl, threads=threads)
    elif stage == "dwi":
        stages.run_dwi_fsl(inputs, outputs, subject, DwiConfig.from_config(cfg), fsl, anat, threads=threads)
    else:
        stages.run_func_fsl(inputs, outputs, subject, FuncConfig.from_config(cfg), fsl, anat, threads=threads)
