"""The data folders: prompt templates (`prompts/`), training recipes (`train/`), inference presets (`infer/`),
evaluation suites (`eval/`) and `accelerate launch` configs (`launch/`), found by name; and the one YAML reader of
configs, recipes, templates and suites.

The repository's top-level folders are the single source of truth. A wheel carries them as package data under
`vlm_depth/resources/<kind>/` (pyproject.toml maps each folder there), read with `importlib.resources`; a source
checkout or an editable install reads the top-level folders themselves.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from vlm_depth.errors import ConfigError

KINDS = ("prompts", "train", "infer", "eval", "launch")
REPO_ROOT = Path(__file__).resolve().parents[2]


def resource_dir(kind: str) -> Path:
    """Folder of the `kind` files: the installed package data, else the source checkout's top-level folder."""
    if kind not in KINDS:
        raise ConfigError(f"unknown resource kind {kind!r}; the kinds are {list(KINDS)}")
    shipped = files(__name__) / kind  # a plain Path: pip installs wheels unpacked
    if isinstance(shipped, Path) and shipped.is_dir():
        return shipped
    return REPO_ROOT / kind


def resource_files(kind: str) -> list[Path]:
    """Every shipped `kind` file (`*.yaml`), sorted by name."""
    return sorted(resource_dir(kind).glob("*.yaml"))


def resource_path(kind: str, name: str) -> Path:
    """Path of `name` among the `kind` files (e.g. `prompts`, `paper`), adding `.yaml` if needed.

    A path that exists as given (absolute or relative to the working directory) wins, so users can pass their own;
    `train/NAME.yaml` (as written from the repository root) also finds the shipped `NAME.yaml` from anywhere.
    """
    given = Path(name)
    if given.is_file():
        return given
    folder = resource_dir(kind)
    stem = given.name if given.parent == Path(kind) else name
    for candidate in (folder / stem, folder / f"{stem}.yaml"):
        if candidate.is_file():
            return candidate
    available = [p.stem for p in resource_files(kind)]
    raise ConfigError(f"no {kind} file named {name!r}; available: {available}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (config file, recipe, suite); a clear error if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open() as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:  # syntax errors and tags such as !!python/object (safe_load refuses them)
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{line} not plain YAML ({problem}); only plain values, lists and mappings") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of key: value, got {type(data).__name__}")
    return data
