"""Configuration: the one home of every key, its default and its checks.

``workflow/schemas/config.schema.yaml`` holds each key with its type, allowed values, default and meaning.
``validate_config`` checks a whole config against it once (every problem listed by dotted key, defaults
filled in) plus the few checks a schema cannot express. Code then reads typed sections (``DwiConfig``,
``FuncConfig``, ...): frozen dataclasses whose fields are the section's keys and whose defaults are the
schema's (tests/test_config.py holds them equal, and equal to the README's table).
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import jsonschema
import yaml

from neuromoe.errors import NeuroMoEError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO / "config.yaml"
PRESETS = REPO / "presets"

# Keys still read for a while, with the message that says where their meaning went.
DEPRECATED = {
    "preprocessing.fsl.nonlinear": "use preprocessing.anat.registration: nonlinear (one key for both backends)",
}


class ConfigError(NeuroMoEError):
    """config.yaml does not match the schema; the message names each key."""


@functools.cache
def schema(path: Path = SCHEMA) -> dict:
    return yaml.safe_load(path.read_text())


def _with_defaults(cls: type) -> type:
    """A jsonschema validator class that also writes schema defaults into the instance."""
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001 - jsonschema's signature
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


def _key(path: Any, prefix: str = "") -> str:
    out = prefix
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


_VALIDATOR = _with_defaults(jsonschema.Draft202012Validator)  # one class, built once


def _schema_problems(instance: Any, sub: dict, prefix: str = "") -> list[str]:
    validator = _VALIDATOR(sub)
    problems = []
    for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        if e.validator == "additionalProperties":
            allowed = sorted(e.schema.get("properties", {}))
            extra = sorted(set(e.instance) - set(allowed))
            problems.append(f"{_key(e.absolute_path, prefix)}: unknown key(s) {extra}; allowed: {allowed}")
        else:
            hint = ""
            if e.validator == "type" and isinstance(e.instance, str) and _is_number(e.instance):
                # YAML 1.1 reads 1e-3 (no dot) as text
                hint = f" (YAML read {e.instance} as text: write it as {float(e.instance)!r} or with a dot, 1.0e-3)"
            problems.append(f"{_key(e.absolute_path, prefix)}: {e.message}{hint}")
    return problems


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _migrate(cfg: dict) -> list[str]:
    """Rewrite deprecated keys into their new home (in place); return the messages to show."""
    notes = []
    fsl = _get(cfg, "preprocessing.fsl")
    if isinstance(fsl, dict) and "nonlinear" in fsl:
        nonlinear = fsl.pop("nonlinear")
        anat = cfg["preprocessing"].setdefault("anat", {})
        wanted = "nonlinear" if nonlinear else "affine"
        if anat.get("registration", wanted) != wanted:
            raise ConfigError(f"preprocessing.fsl.nonlinear: {nonlinear} contradicts preprocessing.anat.registration: "
                              f"{anat['registration']}; {DEPRECATED['preprocessing.fsl.nonlinear']}")
        anat["registration"] = wanted  # explicit: `nonlinear: false` meant affine, whatever the default
        notes.append(f"preprocessing.fsl.nonlinear is deprecated: {DEPRECATED['preprocessing.fsl.nonlinear']}")
    return notes


def semantic_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Checks a schema cannot express, on a config whose schema checks passed."""
    problems = grid_problems(cfg["cache"]["grid"], cfg["model"]["patch_size"])
    if cfg["model"]["dim"] % cfg["model"]["heads"]:
        problems.append(f"model.heads: {cfg['model']['heads']} does not divide model.dim {cfg['model']['dim']}")
    model = cfg["model"]
    stages = 2 ** len(model["cnn_channels"])
    if model["encoder"] == "cnn" and any(g % stages for g in cfg["cache"]["grid"]):
        problems.append(f"cache.grid: {list(cfg['cache']['grid'])} is not divisible by {stages}, which model.encoder "
                        f"cnn needs (it halves the grid once per model.cnn_channels entry: {model['cnn_channels']})")
    problems += _variant_problems(cfg["evaluation"]["variants"])
    problems += _band_problems(cfg["preprocessing"]["func"]["band_hz"])
    return problems


def grid_problems(grid: list[int] | tuple[int, ...], patch: int) -> list[str]:
    """The model grid must tile into patches: each of cache.grid's sizes divisible by model.patch_size."""
    if not any(g % patch for g in grid):
        return []
    return [f"cache.grid: {list(grid)} is not divisible by model.patch_size {patch}; "
            f"use multiples of {patch}, e.g. {[patch * 8] * 3}"]


def _band_problems(band: list[float]) -> list[str]:
    lo, hi = band
    return [] if lo < hi else [f"preprocessing.func.band_hz: [{lo}, {hi}] must be increasing"]


def validate_config(cfg: dict, schema_path: Path = SCHEMA) -> dict:
    """Validate ``cfg`` in place (defaults filled); raise ConfigError listing every problem by key."""
    for note in _migrate(cfg):
        print(f"neuromoe: warning: {note}", file=sys.stderr)
    problems = _schema_problems(cfg, schema(schema_path))
    if not problems:
        problems = semantic_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"- {p}" for p in problems)
                          + f"\n(schema: {schema_path})")
    return cfg


def read_config_file(path: str | Path) -> dict:
    """The settings of one config YAML, not yet validated; ConfigError naming the file when it cannot be read."""
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping of settings (key: value), not a {type(cfg).__name__}")
    return cfg


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a config YAML (default: the repository's config.yaml), apply overrides, validate."""
    cfg = read_config_file(path or DEFAULT_CONFIG)
    for k, v in (overrides or {}).items():
        cfg[k] = v
    return validate_config(cfg)


# ---------------------------------------------------------------------------------------------------------
# Typed sections
# ---------------------------------------------------------------------------------------------------------
def subschema(dotted: str) -> dict:
    """The schema of one section, e.g. ``subschema("preprocessing.dwi")``."""
    node = schema()
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def schema_defaults(dotted: str) -> dict[str, Any]:
    """{key: default} of one section, as the schema states them."""
    return {k: copy.deepcopy(v["default"]) for k, v in subschema(dotted)["properties"].items() if "default" in v}


def _frozen(v: Any) -> Any:
    return tuple(_frozen(x) for x in v) if isinstance(v, list) else v


S = TypeVar("S", bound="Section")


class Section:
    """A typed view of one config section: ``KEY`` is its dotted path in config.yaml."""

    KEY: ClassVar[str]
    CHECKS: ClassVar[tuple] = ()  # functions values -> [problems] beyond the schema

    @classmethod
    def of(cls: type[S], values: Mapping[str, Any] | None = None) -> S:
        """The section from its keys (absent keys take the schema's defaults); ConfigError on bad values."""
        vals = copy.deepcopy(dict(values or {}))
        problems = _schema_problems(vals, subschema(cls.KEY), cls.KEY)
        if not problems:
            problems = [p for check in cls.CHECKS for p in check(vals)]
        if problems:
            raise ConfigError(f"invalid {cls.KEY}:\n" + "\n".join(f"- {p}" for p in problems))
        return cls(**{f.name: _frozen(vals[f.name]) for f in fields(cls)})

    @classmethod
    def from_config(cls: type[S], cfg: Mapping[str, Any]) -> S:
        """The section of a workflow config (the whole config, or a rule's params holding this section)."""
        return cls.of(_get(cfg, cls.KEY, {}))


@dataclass(frozen=True)
class AnatConfig(Section):
    KEY: ClassVar[str] = "preprocessing.anat"
    registration: str = "nonlinear"


@dataclass(frozen=True)
class DwiConfig(Section):
    KEY: ClassVar[str] = "preprocessing.dwi"
    b0_threshold: float = 50
    fit_method: str = "WLS"


@dataclass(frozen=True)
class FuncConfig(Section):
    KEY: ClassVar[str] = "preprocessing.func"
    CHECKS: ClassVar[tuple] = (lambda v: _band_problems(v["band_hz"]),)
    dummy_scans: int = 4
    band_hz: tuple[float, float] = (0.01, 0.08)
    nuisance: tuple[str, ...] = ("motion", "wm", "csf")


@dataclass(frozen=True)
class ParticipantsConfig(Section):
    KEY: ClassVar[str] = "participants"
    diagnosis_column: str = "diagnosis"
    labels: tuple[str, ...] = ("HC", "PD", "iRBD")
    clinical_columns: tuple[str, ...] = ("age", "sex", "updrs3", "moca", "rbdsq", "serum_nfl", "serum_asyn")
    missing_modality: str = "exclude"


@dataclass(frozen=True)
class FslConfig(Section):
    KEY: ClassVar[str] = "preprocessing.fsl"
    bet_frac: float = 0.5
    bet_gradient: float = 0.0
    bet_robust: bool = True
    dwi_correction: str = "eddy_correct"


def _lr_problems(v: Mapping[str, Any]) -> list[str]:
    return [] if v["min_lr"] <= v["lr"] else [f"train.min_lr: {v['min_lr']} is above train.lr {v['lr']}"]


def _variant_problems(variants: list[str]) -> list[str]:
    return [] if "full" in variants else ["evaluation.variants: must include 'full' (the report and "
                                          "explanations use it)"]


@dataclass(frozen=True)
class CacheConfig(Section):
    KEY: ClassVar[str] = "cache"
    grid: tuple[int, int, int] = (64, 64, 64)
    dtype: str = "float16"
    dwi_maps: tuple[str, ...] = ("FA", "MD")
    func_maps: tuple[str, ...] = ("fALFF", "ReHo")


@dataclass(frozen=True)
class TrainConfig(Section):
    """The ``train:`` section: optimisation, schedule, gate fitting and which weights a run keeps."""

    KEY: ClassVar[str] = "train"
    CHECKS: ClassVar[tuple] = (_lr_problems,)
    # Field order is the order of the train_config written into checkpoints: append new keys at the end.
    epochs: int = 150
    batch_size: int = 8
    lr: float = 0.0001
    weight_decay: float = 0.01
    warmup_epochs: int = 5
    patience: int = 20
    balance_lambda: float = 0.1
    num_workers: int = 0
    device: str = "auto"
    seed: int = 0
    min_lr: float = 0.0
    grad_clip: float = 1.0
    flip_lr: float = 0.0
    gate_fit: str = "joint"
    gate_fit_steps: int = 300
    crossfit_folds: int = 3
    select: str = "val_loss"
    screen_refits: int = 0


@dataclass(frozen=True)
class EvaluationConfig(Section):
    KEY: ClassVar[str] = "evaluation"
    CHECKS: ClassVar[tuple] = (lambda v: _variant_problems(v["variants"]),)
    protocol: str = "cv"
    folds: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    val_fraction: float = 0.2
    variants: tuple[str, ...] = ("full", "no_gate", "drop_anat", "drop_dwi", "drop_func", "only_anat", "only_dwi",
                                 "only_func", "only_clin")
    lambda_sweep: tuple[float, ...] = (0.0, 1.0)
    baseline: str = "logreg"
