"""One dataclass config per command, parsed by `transformers.HfArgumentParser`.

Every command accepts `--config FILE.yaml` followed by `--key value` overrides; the command line wins over the
file, the file wins over the dataclass defaults. `save_config` writes the resolved config next to an output.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vlm_depth.errors import ConfigError
from vlm_depth.resources import load_yaml

T = TypeVar("T")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TinyConfig:
    """`vlm-depth tiny`: write the offline tiny Qwen2.5-VL checkpoint."""

    out: str = _help("Output folder (an ordinary Hugging Face checkpoint folder).", default="runs/tiny")
    seed: int = _help("Seed for the random weights.", default=0)
    hidden_size: int = _help("Text hidden size (multiple of num_heads; head_dim must be 32).", default=128)
    num_layers: int = _help("Number of text decoder layers.", default=2)
    vision_depth: int = _help("Number of vision transformer blocks.", default=2)
    max_pixels: int = _help("Image processor max_pixels (28*28*tokens).", default=28 * 28 * 100)
    min_pixels: int = _help("Image processor min_pixels.", default=28 * 28 * 4)


@dataclass
class SynthConfig:
    """`vlm-depth synth`: synthetic RGB-D scenes with simulated stereo-sensor failures."""

    out: str = _help("Output folder (the `folder` dataset format).", default="runs/synth")
    num: int = _help("Number of frames.", default=8)
    seed: int = _help("Seed; output is byte-for-byte reproducible for a seed.", default=0)
    height: int = _help("Image height in pixels.", default=240)
    width: int = _help("Image width in pixels.", default=320)
    preview: bool = _help("Also write a side-by-side preview PNG (RGB | GT | sensor | error).", default=False)
    scene: str = _help("Scene layouts: room, street, or mixed (4/5 rooms).", default="mixed")
    workers: int = _help("Worker processes (0 = one per CPU core); the output does not depend on it.", default=0)


@dataclass
class DemoConfig:
    """`vlm-depth demo`: the main job on the embedded default (tiny model + synthetic sensor data)."""

    out: str = _help("Output folder for the whole demo run.", default="runs/demo")
    seed: int = _help("Seed for data, training and evaluation.", default=0)
    recipe: str = _help(
        "Training recipe (top-level train/); the demo sets its data, steps, seed and output.", default="tiny-synthetic"
    )
    train_steps: int = _help("Optimiser steps of the label-free training.", default=200)
    num_train: int = _help("Synthetic training frames.", default=48)
    num_eval: int = _help("Held-out synthetic frames (another seed) for the evaluation.", default=8)
    height: int = _help("Frame height in pixels.", default=96)
    width: int = _help("Frame width in pixels.", default=128)
    mdm: bool = _help("Also train the MDM head (jointly) and evaluate its dense `mdm` readout.", default=True)
    budget_minutes: float = _help("Time budget the report checks the whole run against (minutes).", default=10.0)


@dataclass
class BenchConfig:
    """`vlm-depth bench decoder|train`: speed ratios measured in one run, printed as JSON."""

    what: str = _help("What to benchmark: `decoder` or `train`.", default="decoder")
    model: str = _help("Checkpoint folder (a vlm-depth or plain Qwen2.5-VL checkpoint).", default="")
    out: str = _help("Optional folder for the JSON result and the resolved config.", default="")
    height: int = _help("bench train: height of the benchmark images in pixels.", default=448)
    width: int = _help("bench train: width of the benchmark images in pixels.", default=448)
    num_images: int = _help("bench train: number of benchmark images.", default=2)
    train_k: int = _help("bench train: queries packed per image, compared with K = 1.", default=64)
    k1_queries: int = _help("bench train: queries per image timed one per sequence (K = 1); 0 = all.", default=16)
    k1_batch: int = _help("bench train: sequences per K = 1 micro-batch.", default=4)
    seed: int = _help("Seed of the benchmark images and query pixels.", default=0)
    num_queries: int = _help("bench decoder: query pixels (distinct grid cells) of the image.", default=512)
    max_queries_per_pass: int = _help("bench decoder: queries decoded together per pass.", default=128)
    packing: str = _help("bench decoder: decoder layout, batch or packed.", default="batch")
    repeats: int = _help("bench decoder: timed runs of the fast decoder and of the forward (best kept).", default=3)


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


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Parse `[--config FILE.yaml] [--key value ...]` into an instance of the dataclass `cls`.

    Unknown keys in the file or on the command line are errors, never silently ignored.
    """
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(cls, prog=prog)
    parser.add_argument("--config", default=None, help="YAML file with key: value pairs; CLI flags override it.")
    config_path, rest = _split_config_arg(argv)
    if config_path is not None:
        values = load_yaml(config_path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{config_path}: unknown keys {unknown}; known keys: {sorted(known)}")
        parser.set_defaults(**values)
    # The parser also returns the namespace of non-dataclass arguments (our --config) before the leftover strings.
    config, _, remaining = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if remaining:
        raise ConfigError(f"unknown arguments: {' '.join(remaining)}")
    return config


def save_config(out_dir: str | Path, config: Any, name: str = "config.yaml") -> Path:
    """Write the resolved dataclass `config` as YAML into `out_dir` and return the file path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    with path.open("w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)
    return path
