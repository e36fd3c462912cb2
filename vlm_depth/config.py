"""Parsing and saving of command configs. Each command's dataclass lives beside the code that runs it (e.g.
`vlm_depth/train/train_config.py`); this module only reads them from YAML + command line and writes them back.

Every command accepts `--config FILE.yaml` followed by `--key value` overrides; the command line wins over the
file, the file wins over the dataclass defaults. `save_config` writes the resolved config next to an output.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vlm_depth.errors import ConfigError
from vlm_depth.resources import load_yaml, resource_path

T = TypeVar("T")


def option(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its `--help` text: `name: int = option("What it is, with units.", default=3)`."""
    return field(metadata={"help": text}, **kwargs)


def pick(cls: type[T], source: Any) -> T:
    """An instance of the dataclass `cls` with every field taken from the same-named attribute of `source` (e.g.
    the library settings that a command config carries among its options)."""
    return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})


def _split_config_arg(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def _renamed_hint(cls: type, names: Sequence[str]) -> str:
    """' (renamed: old -> new, ...)' for keys that `cls.renamed` ({old: new}) lists, else ''."""
    renamed: Mapping[str, str] = getattr(cls, "renamed", {})
    hits = [f"{name} -> {renamed[name]}" for name in names if name in renamed]
    return f" (renamed: {', '.join(hits)})" if hits else ""


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Parse `[--config FILE.yaml] [--key value ...]` into an instance of the dataclass `cls`.

    Unknown keys in the file or on the command line are errors, never silently ignored; a key that `cls.renamed`
    lists ({old name: new name}) is named with its new name. With `cls.shipped` (a kind of `vlm_depth.resources`),
    `--config NAME` also finds a shipped recipe or preset by name; a file path wins.
    """
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(cls, prog=prog)
    parser.add_argument("--config", default=None, help="YAML file with key: value pairs; CLI flags override it.")
    config_path, rest = _split_config_arg(argv)
    if config_path is not None:
        shipped = getattr(cls, "shipped", "")
        config_path = resource_path(shipped, config_path) if shipped else config_path
        values = load_yaml(config_path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hint = _renamed_hint(cls, unknown)
            raise ConfigError(f"{config_path}: unknown keys {unknown}{hint}; known keys: {sorted(known)}")
        parser.set_defaults(**values)
    # The parser also returns the namespace of non-dataclass arguments (our --config) before the leftover strings.
    config, _, remaining = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if remaining:
        hint = _renamed_hint(cls, [arg.lstrip("-").split("=")[0] for arg in remaining])
        raise ConfigError(f"unknown arguments: {' '.join(remaining)}{hint}")
    return config


def load_config(cls: type[T], path: str | Path) -> T:
    """The dataclass `cls` from a YAML file alone (as `--config path` with no overrides)."""
    return parse_config(cls, ["--config", str(path)])


def save_config(out_dir: str | Path, config: Any, name: str = "config.yaml") -> Path:
    """Write the resolved dataclass `config` as YAML into `out_dir` and return the file path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    with path.open("w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)
    return path
