"""Glue for the workflow's thin scripts: logs, thread counts, and readable failures.

Inside a rule's ``script:``, ``run(snakemake, fn)`` sends the library's log output and warnings to the
rule's log file, pins BLAS/ITK/torch threads to the rule's ``threads``, and turns a typed error
(``NeuroMoEError``: a bad input, a stage that cannot go on) into a short message that names the subject
and cause on the console *and* in the log, then exits non-zero. Snakemake removes that job's partial
outputs and keeps every other subject's finished outputs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any


def set_threads(n: int) -> None:
    n = max(int(n), 1)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
                "NEUROMOE_THREADS"):
        os.environ[var] = str(n)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    except ImportError:
        pass
    torch = sys.modules.get("torch")  # never imported for it: 2 s in every preprocessing job; imported later,
    if torch is not None:  # torch takes its thread count from OMP_NUM_THREADS, set above
        torch.set_num_threads(n)


def outputs(snakemake: Any) -> dict[str, str]:
    """The rule's named outputs as a plain dict key -> path."""
    return {k: str(v) for k, v in snakemake.output.items()}


def inputs(snakemake: Any) -> dict[str, str]:
    return {k: (str(v) if isinstance(v, str) else [str(x) for x in v]) for k, v in snakemake.input.items()}


def run(snakemake: Any, fn: Callable[[Any], Any]) -> None:
    """Run ``fn(snakemake)`` with logging to the rule's log and clean error reporting."""
    from neuromoe.errors import NeuroMoEError

    console = sys.stderr
    log_path = snakemake.log[0] if len(snakemake.log) else None
    log_fh = open(log_path, "w", buffering=1) if log_path else console  # noqa: SIM115 - lives for the job
    sys.stderr = log_fh
    logging.basicConfig(stream=log_fh, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        force=True)
    set_threads(snakemake.threads)
    label = f"rule {snakemake.rule}" + (f", sub-{snakemake.wildcards.subject}"
                                        if "subject" in snakemake.wildcards.keys() else "")
    t0 = time.time()
    logging.getLogger("neuromoe").info("%s: start (threads=%s)", label, snakemake.threads)
    try:
        fn(snakemake)
    except NeuroMoEError as exc:
        msg = f"\n*** {label} failed: {exc}\n"
        print(msg, file=log_fh)
        if log_fh is not console:
            print(msg + f"    (log: {log_path})", file=console)
        sys.exit(1)
    except Exception:
        traceback.print_exc(file=log_fh)
        if log_fh is not console:
            print(f"\n*** {label} failed with an unexpected error; the traceback is in {log_path}\n",
                  file=console)
        sys.exit(1)
    logging.getLogger("neuromoe").info("%s: done in %.1f s", label, time.time() - t0)
