"""Variant names -> (experts, gate, balance lambda), and which variants can share trained experts.

Torch-free, so the Snakefile can plan runs without importing torch. ``EXPERTS`` and ``MRI_MODALITIES`` are
the canonical orders (``neuromoe.learn.model`` re-exports them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

EXPERTS = ("anat", "dwi", "func", "clin")  # canonical expert order
MRI_MODALITIES = ("anat", "dwi", "func")  # order of the cohort cache's ``present`` vector


def variant_spec(name: str) -> tuple[tuple[str, ...], bool, float | None]:
    """Variant name -> (experts, use_gate, balance-lambda override or None).

    ``full``; ``no_gate`` (uniform weights); ``drop_<m>`` (all experts but m, gated); ``only_<m>`` (one
    expert, no gate); ``lambda_<value>`` (full model with balance lambda = value, e.g. ``lambda_0.0``),
    where m is one of anat, dwi, func, clin.
    """
    if name == "full":
        return EXPERTS, True, None
    if name == "no_gate":
        return EXPERTS, False, None
    kind, _, arg = name.partition("_")
    if kind == "drop" and arg in EXPERTS:
        return tuple(e for e in EXPERTS if e != arg), True, None
    if kind == "only" and arg in EXPERTS:
        return (arg,), False, None
    if kind == "lambda" and arg:
        try:
            lam = float(arg)
        except ValueError:
            lam = float("nan")
        if math.isfinite(lam) and lam >= 0:
            return EXPERTS, True, lam
    raise ValueError(f"unknown variant {name!r}; expected full, no_gate, drop_<m>, only_<m> "
                     f"(m in {', '.join(EXPERTS)}) or lambda_<value >= 0> (e.g. lambda_0.0)")


def expert_donor(variant: str, variants: Sequence[str], gate_fit: str) -> str | None:
    """The variant among ``variants`` whose trained experts ``variant`` can adopt, or None.

    Under ``gate_fit`` heldout or crossfit a gated variant's experts train under uniform weights (the gate
    out of the graph, the balance term constant), which is what the ungated variant of the same experts
    does: ``full`` and every ``lambda_<x>`` adopt ``no_gate``'s. Under ``joint`` the gate shapes the
    experts, so nothing is shared.
    """
    experts, use_gate, _ = variant_spec(variant)
    if not use_gate or gate_fit == "joint":
        return None
    return next((v for v in variants if variant_spec(v)[:2] == (experts, False)), None)
