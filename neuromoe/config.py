"""Configuration: load config.yaml, validate it against the JSON schema, fill in defaults.

Errors list every problem at once with the key's dotted path, the value and what is allowed,
instead of jsonschema's raw dump of the whole instance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from neuromoe.errors import NeuroMoEError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO / "config.yaml"


class ConfigError(NeuroMoEError):
    """config.yaml does not match the schema; the message names each key."""


def _with_defaults(cls: type) -> type:
    """A jsonschema validator class that also writes schema defaults into the instance."""
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001 - jsonschema's signature
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = yaml.safe_load(yaml.safe_dump(sub["default"]))  # deep copy
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


def _key(path: Any) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def validate_config(cfg: dict, schema_path: Path = SCHEMA) -> dict:
    """Validate ``cfg`` in place (defaults filled); raise ConfigError listing every problem by key."""
    schema = yaml.safe_load(schema_path.read_text())
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    problems = []
    for e in errors:
        if e.validator == "additionalProperties":
            allowed = sorted(e.schema.get("properties", {}))
            extra = sorted(set(e.instance) - set(allowed))
            problems.append(f"{_key(e.absolute_path)}: unknown key(s) {extra}; allowed: {allowed}")
        else:
            problems.append(f"{_key(e.absolute_path)}: {e.message}")
    # Checks a schema cannot express.
    if not problems:
        grid, patch = cfg["cache"]["grid"], cfg["model"]["patch_size"]
        if any(g % patch for g in grid):
            problems.append(f"cache.grid: {grid} is not divisible by model.patch_size {patch}; "
                            f"use multiples of {patch}, e.g. [32, 32, 32]")
        if cfg["model"]["dim"] % cfg["model"]["heads"]:
            problems.append(f"model.heads: {cfg['model']['heads']} does not divide model.dim {cfg['model']['dim']}")
        if "full" not in cfg["evaluation"]["variants"]:
            problems.append("evaluation.variants: must include 'full' (the report and explanations use it)")
        lo, hi = cfg["preprocessing"]["func"]["band_hz"]
        if not lo < hi:
            problems.append(f"preprocessing.func.band_hz: [{lo}, {hi}] must be increasing")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"- {p}" for p in problems)
                          + f"\n(schema: {schema_path})")
    return cfg


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a config YAML (default: the repository's config.yaml), apply overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    for k, v in (overrides or {}).items():
        cfg[k] = v
    return validate_config(cfg)
