"""Locate the top-level data folders (`prompts/`, `train/`, `infer/`, `eval/`) of a source checkout, and read YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vlm_depth.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def resource_path(kind: str, name: str) -> Path:
    """Path of `name` inside the top-level folder `kind` (e.g. `prompts`, `paper`), adding `.yaml` if needed.

    A path that exists as given (absolute or relative to the working directory) wins, so users can pass their own.
    """
    given = Path(name)
    if given.is_file():
        return given
    for candidate in (REPO_ROOT / kind / name, REPO_ROOT / kind / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in (REPO_ROOT / kind).glob("*.yaml"))
    raise ConfigError(f"no {kind} file named {name!r}; available: {available}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (config file, recipe, suite); a clear error if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of key: value, got {type(data).__name__}")
    return data
