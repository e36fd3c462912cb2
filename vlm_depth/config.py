"""Parsing and saving of command configs. Each command's dataclass lives beside the code that runs it (e.g.
`vlm_depth/train/train_config.py`); this module only reads them from YAML + command line and writes them back.

Every command accepts `--config FILE.yaml` followed by `--key value` overrides; the command line wins over the
file, the file wins over the dataclass defaults. `save_config` writes the resolved config next to an output.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from vlm_depth.errors import ConfigError
from vlm_depth.files import atomic_write
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
    if sum(arg == "--config" or arg.startswith("--config=") for arg in argv) > 1:
        raise ConfigError("--config may be given once; merge the files or override single keys with --key value")
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


_TRUE, _FALSE = ("yes", "true", "t", "y", "1", "on"), ("no", "false", "f", "n", "0", "off")


def _typed(value: Any, kind: Any, what: str) -> Any:
    """`value` (read from a file) as the field type `kind` (int, float, bool, str or a Literal), converted like the
    same text on the command line; ConfigError naming `what` otherwise (argparse converts only text defaults and
    never checks Literal choices of defaults)."""
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            quote = " (YAML reads unquoted yes/no/on/off as true/false: quote it)" if isinstance(value, bool) else ""
            raise ConfigError(f"{what}: {value!r} is not one of {list(choices)}{quote}")
        return value
    name = getattr(kind, "__name__", str(kind))
    if value is None:
        raise ConfigError(f"{what}: null is not allowed; give a {name}")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
        elif kind is int and not isinstance(value, (bool, float)):
            return int(value)
        elif kind is float and not isinstance(value, bool):
            return float(value)
        elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{what}: expected {'an integer' if kind is int else f'a {name}'}, got {value!r}")


def typed_values(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The entries of `values` (keys must be fields of the dataclass `cls`) converted to the field types."""
    hints = typing.get_type_hints(cls)
    return {key: _typed(value, hints[key], f"{where}: {key}") for key, value in values.items()}


def check_options(config: Any, minimums: Mapping[str, float] | None = None) -> None:
    """ConfigError for an option of the dataclass instance `config` that cannot work: a value outside its Literal
    choices, a float that is NaN or infinite, or a number below its least value in `minimums` ({name: least})."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), hints[f.name]
        if typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
            raise ConfigError(f"--{f.name} must be one of {list(typing.get_args(kind))}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} must be a finite number, got {value}")
    for name, least in (minimums or {}).items():
        if getattr(config, name) < least:
            raise ConfigError(f"--{name} must be >= {least}, got {getattr(config, name)}")


def _parser(cls: type, prog: str):
    """`HfArgumentParser` for `cls` without prefix matching of options, whose errors are one ConfigError line (no
    usage block, no SystemExit)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):
            hint = ""
            if "expected one argument" in message:
                hint = " (a value that starts with '-' is written --name=VALUE, e.g. --intrinsics=-50,50,32,24)"
            raise ConfigError(f"{self.prog}: {message}{hint}")

    return Parser(cls, prog=prog, allow_abbrev=False)


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Parse `[--config FILE.yaml] [--key value ...]` into an instance of the dataclass `cls`.

    Unknown keys in the file or on the command line are errors, never silently ignored; a key that `cls.renamed`
    lists ({old name: new name}) is named with its new name. File values are converted and checked with the field
    types (choices included) as command-line values are; options are never prefix-matched. With `cls.shipped` (a
    kind of `vlm_depth.resources`), `--config NAME` also finds a shipped recipe or preset by name; a file path wins.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(cls, prog or "vlm-depth")
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
        parser.set_defaults(**typed_values(cls, values, str(config_path)))
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
    """Write the resolved dataclass `config` as YAML into `out_dir` (atomically) and return the file path."""
    return atomic_write(Path(out_dir) / name, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
