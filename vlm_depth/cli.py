"""`vlm-depth` entry point: parses a command's config and calls one library function. The only module that prints.

Command configs live beside the code that runs them; the two thin commands `tiny` and `synth` are defined here.

Heavy imports (torch, transformers) happen inside the command, so `vlm-depth --help` is instant.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_depth.config import option, parse_config
from vlm_depth.errors import ConfigError, VlmDepthError


@dataclass(frozen=True)
class Command:
    config: str  # "module:Class"
    runner: str  # "module:function", called with the parsed config(s), returns a JSON-able summary
    help: str


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "vlm_depth.demo.demo_config:DemoConfig",
        "vlm_depth.demo.run:run_demo",
        "main job on the embedded default: tiny model, synthetic sensor data, label-free training, "
        "evaluation against baselines, one completed sample, report.md",
    ),
    "tiny": Command(
        "vlm_depth.cli:TinyConfig",
        "vlm_depth.cli:run_tiny",
        "write the offline tiny Qwen2.5-VL checkpoint (random weights, local tokenizer, real processor)",
    ),
    "synth": Command(
        "vlm_depth.cli:SynthConfig",
        "vlm_depth.cli:run_synth",
        "synthetic RGB-D scenes with simulated stereo-sensor failures (folder format)",
    ),
    "train": Command(
        "vlm_depth.train.train_config:TrainConfig",
        "vlm_depth.train.trainer:run_train",
        "fine-tune on sparse labels (single process, or under `accelerate launch`)",
    ),
    "complete": Command(
        "vlm_depth.infer.complete_config:CompleteConfig",
        "vlm_depth.infer.run_complete:run_complete",
        "complete the depth of one RGB + depth pair or a folder",
    ),
    "eval": Command(
        "vlm_depth.eval.eval_config:EvalConfig",
        "vlm_depth.eval.runner:run_eval",
        "evaluate a model or a baseline on a dataset and sparsity protocol (or a suite)",
    ),
    "bench": Command(
        "vlm_depth.bench:BenchConfig",
        "vlm_depth.bench:run_bench",
        "speed ratios measured in one run (`bench decoder` or `bench train`), printed as JSON",
    ),
}


@dataclass
class TinyConfig:
    """`vlm-depth tiny`: write the offline tiny Qwen2.5-VL checkpoint, or a real architecture with random weights."""

    out: str = option("Output folder (an ordinary Hugging Face checkpoint folder).", default="runs/tiny")
    seed: int = option("Seed for the random weights.", default=0)
    arch: str = option(
        "tiny, or qwen2.5-vl-3b / qwen2.5-vl-7b: the published architecture (random bf16 weights, the tiny "
        "tokenizer, a pixel budget that keeps 640x480) for measurements without a download.",
        default="tiny",
    )
    arch_layers: int = option("With --arch: text layers (0 = the published depth; fewer keep the widths).", default=0)
    arch_vision_depth: int = option("With --arch: vision blocks (0 = the published 32).", default=0)
    hidden_size: int = option("Tiny text hidden size (multiple of num_heads; head_dim must be 32).", default=128)
    num_layers: int = option("Tiny: number of text decoder layers.", default=2)
    vision_depth: int = option("Tiny: number of vision transformer blocks.", default=2)
    max_pixels: int = option(
        "Image processor max_pixels (28*28 per visual token); 0 = 28*28*100 (tiny) or 28*28*1280 (--arch).", default=0
    )
    min_pixels: int = option("Image processor min_pixels.", default=28 * 28 * 4)

    def __post_init__(self) -> None:
        from vlm_depth.model.tiny import check_tiny_settings

        check_tiny_settings(
            self.hidden_size,
            self.num_layers,
            self.vision_depth,
            self.min_pixels,
            self.max_pixels,
            self.arch,
            self.arch_layers,
            self.arch_vision_depth,
        )


def run_tiny(cfg: TinyConfig) -> dict[str, Any]:
    """`vlm-depth tiny`: `vlm_depth.model.tiny.build_tiny_checkpoint` with the command's options."""
    from dataclasses import asdict

    from vlm_depth.model.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(**asdict(cfg))


@dataclass
class SynthConfig:
    """`vlm-depth synth`: synthetic RGB-D scenes with simulated stereo-sensor failures."""

    out: str = option("Output folder (the `folder` dataset format).", default="runs/synth")
    num: int = option("Number of frames.", default=8)
    seed: int = option("Seed; output is byte-for-byte reproducible for a seed.", default=0)
    height: int = option("Image height in pixels.", default=240)
    width: int = option("Image width in pixels.", default=320)
    preview: bool = option("Also write a side-by-side preview PNG (RGB | GT | sensor | error).", default=False)
    scene: str = option("Scene layouts: room, street, or mixed (4/5 rooms).", default="mixed")
    workers: int = option("Worker processes (0 = one per CPU core); the output does not depend on it.", default=0)
    overwrite: bool = option(
        "Empty --out first when it holds an earlier synth run (else that is an error).", default=False
    )


def run_synth(cfg: SynthConfig) -> dict[str, Any]:
    """`vlm-depth synth`: `vlm_depth.data.synthetic.write_synthetic` with the command's options into a claimed
    output folder (see `vlm_depth.files.claim_output`); the resolved config is saved beside the frames."""
    from dataclasses import asdict

    from vlm_depth.config import save_config
    from vlm_depth.data.synthetic import check_synth_options, write_synthetic
    from vlm_depth.files import claim_output

    options = {k: v for k, v in asdict(cfg).items() if k != "overwrite"}
    check_synth_options(cfg.num, cfg.height, cfg.width, cfg.scene, cfg.workers, cfg.seed)
    with claim_output(cfg.out, "synth", ["config.yaml", "*_rgb.png"], overwrite=cfg.overwrite):
        save_config(cfg.out, cfg)
        return write_synthetic(**options)


def _resolve(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vlm-depth COMMAND [--config FILE.yaml] [--key value ...] | vlm-depth --version", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "`vlm-depth COMMAND --help` lists a command's options; any command takes --log_level LEVEL"]
    lines += [f"({'|'.join(LOG_LEVELS)}, default info: progress lines, warnings)."]
    return "\n".join(lines)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _pop_log_level(argv: list[str]) -> tuple[str, list[str]]:
    """`--log_level LEVEL` (or `=LEVEL`) anywhere in `argv` -> (level, the other arguments)."""
    level, rest, args = "info", [], iter(argv)
    for arg in args:
        if arg == "--log_level":
            level = next(args, "")
        elif arg.startswith("--log_level="):
            level = arg.partition("=")[2]
        else:
            rest.append(arg)
    return level, rest


def _configure_logging(level: str) -> logging.Handler:
    """One console handler (stderr) for the package's loggers at `level` on the main process; the other processes
    of a distributed run show warnings and errors only."""
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log_level must be one of {list(LOG_LEVELS)}, got {level!r}")
    package = logging.getLogger("vlm_depth")
    for handler in [h for h in package.handlers if getattr(h, "vlm_depth_console", False)]:
        package.removeHandler(handler)  # a second main() in the same process replaces it
    handler = logging.StreamHandler()
    handler.vlm_depth_console = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    package.addHandler(handler)
    main_process = int(os.environ.get("RANK", "0") or 0) == 0
    package.setLevel(level.upper() if main_process else logging.WARNING)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    level, argv = _pop_log_level(list(sys.argv[1:] if argv is None else argv))
    try:
        _configure_logging(level)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from vlm_depth import __version__

        print(f"vlm-depth {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    if name == "bench" and rest and not rest[0].startswith("-"):
        rest = ["--what", rest[0], *rest[1:]]
    runner, config_class = _resolve(cmd.runner), _resolve(cmd.config)
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("vlm_depth")]):  # log lines above progress bars
            result = runner(parse_config(config_class, rest, prog=f"vlm-depth {name}"))
    except VlmDepthError as exc:  # bad input: one line that says what to do; any other exception is a bug
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
