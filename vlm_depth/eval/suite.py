"""Evaluation suites: which methods (classical baselines or checkpoints with a readout) run on which datasets under
which sparsity protocols, read from a suite YAML (top-level `eval/`) or built from the command line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_depth.errors import ConfigError
from vlm_depth.eval.baselines import BASELINES, get_baseline
from vlm_depth.infer.complete_config import preset_settings
from vlm_depth.resources import load_yaml, resource_path


@dataclass(frozen=True)
class Method:
    """A method to evaluate: a classical baseline (`baseline`) or a checkpoint (`model` + `readout`, read out with the
    settings of the inference preset `preset`, e.g. `fast`; empty = the defaults)."""

    name: str
    baseline: str = ""
    model: str = ""
    readout: str = "query"
    preset: str = ""


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a suite with the protocols to run on it and its evaluation settings."""

    spec: str
    name: str
    protocols: tuple[str, ...]
    split: str = ""
    max_depth: float = 0.0
    crop: str = "dataset"
    max_images: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    """Datasets x protocols x methods, plus method pairs whose per-metric gaps the report lists."""

    datasets: list[DatasetEntry]
    methods: list[Method]
    compare: list[tuple[str, str]] = field(default_factory=list)


def split_list(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def baseline_methods(names: str | Sequence[str]) -> list[Method]:
    """Methods for baseline names (a comma-separated string or a list; `all` = every registered baseline)."""
    names = split_list(names) if isinstance(names, str) else list(names)
    if names == ["all"]:
        names = list(BASELINES)
    for name in names:
        get_baseline(name)
    return [Method(name=name, baseline=name) for name in names]


def model_method(model: str, readout: str = "query", name: str = "", preset: str = "") -> Method:
    """A checkpoint as a method, named `name` or `<folder>-<readout>`; `preset`: an inference preset (top-level
    `infer/`, e.g. `fast`) whose readout settings it uses."""
    if readout not in ("query", "mdm"):
        raise ConfigError(f"readout must be `query` or `mdm`, got {readout!r}")
    if preset:
        preset_settings(preset)  # a missing or malformed preset fails here, before anything runs
    return Method(name=name or f"{Path(model).name}-{readout}", model=model, readout=readout, preset=preset)


def dataset_name(spec: str) -> str:
    """`kind-FOLDER` of a `KIND:PATH?options` spec (the reader options are left out)."""
    kind, _, rest = spec.partition(":")
    path = rest.partition("?")[0]
    return f"{kind}-{Path(path).name}" if path else kind


DATASET_KEYS = {"dataset", "protocols", "name", "split", "max_depth", "crop", "max_images", "options"}


def _known_keys(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")


def load_suite(path: str | Path) -> Suite:
    """Read a suite YAML: `methods` (list of {baseline: NAME|all} or {model: CKPT, readout, name, preset}),
    `datasets` (list of {dataset: KIND:PATH, protocols: [...], name, split, max_depth, crop, max_images, options:
    {reader kwargs}}) and optional `compare` (list of [METHOD_A, METHOD_B] names). Relative dataset and model paths
    are relative to the working directory."""
    path = resource_path("eval", str(path))
    data = load_yaml(path)
    _known_keys(data, {"methods", "datasets", "compare", "description"}, str(path))
    methods: list[Method] = []
    for i, item in enumerate(data.get("methods") or []):
        where = f"{path}: methods[{i}]"
        if not isinstance(item, dict) or bool(item.get("model")) == bool(item.get("baseline")):
            raise ConfigError(f"{where}: expected a mapping with exactly one of `model` or `baseline`")
        _known_keys(item, {"model", "readout", "name", "preset", "baseline"}, where)
        if item.get("baseline"):
            methods += baseline_methods(item["baseline"])
        else:
            readout, name, preset = item.get("readout", "query"), item.get("name", ""), item.get("preset", "")
            methods.append(model_method(str(item["model"]), readout, name, str(preset)))
    datasets: list[DatasetEntry] = []
    for i, item in enumerate(data.get("datasets") or []):
        where = f"{path}: datasets[{i}]"
        if not isinstance(item, dict) or not item.get("dataset") or not item.get("protocols"):
            raise ConfigError(f"{where}: expected a mapping with `dataset: KIND:PATH` and `protocols: [...]`")
        _known_keys(item, DATASET_KEYS, where)
        if not isinstance(item.get("options") or {}, dict):
            raise ConfigError(f"{where}: `options` must be a mapping of reader keyword arguments")
        protocols = item["protocols"]
        protocols = split_list(protocols) if isinstance(protocols, str) else [str(p) for p in protocols]
        datasets.append(
            DatasetEntry(
                spec=str(item["dataset"]),
                name=str(item.get("name") or dataset_name(str(item["dataset"]))),
                protocols=tuple(protocols),
                split=str(item.get("split") or ""),
                max_depth=float(item.get("max_depth") or 0.0),
                crop=str(item.get("crop", "dataset")),
                max_images=int(item.get("max_images") or 0),
                options=dict(item.get("options") or {}),
            )
        )
    if not methods or not datasets:
        raise ConfigError(f"{path}: a suite needs at least one entry in `methods` and in `datasets`")
    compare = []
    for pair in data.get("compare") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"{path}: `compare` entries must be [METHOD_A, METHOD_B], got {pair!r}")
        compare.append((str(pair[0]), str(pair[1])))
    return Suite(datasets, methods, compare)


def check_names(suite: Suite, where: str) -> None:
    for what, names in (("method", [m.name for m in suite.methods]), ("dataset", [d.name for d in suite.datasets])):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{where}: duplicate {what} names {duplicates}; give each a distinct `name`")
    method_names = {m.name for m in suite.methods}
    for pair in suite.compare:
        missing = [n for n in pair if n not in method_names]
        if missing:
            raise ConfigError(f"{where}: compare names {missing} are not methods of the suite {sorted(method_names)}")
