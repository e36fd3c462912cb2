"""`vlm-depth` entry point: parses a command's config and calls one library function. The only module that prints.

Heavy imports (torch, transformers) happen inside the command, so `vlm-depth --help` is instant.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_depth.errors import VlmDepthError


@dataclass(frozen=True)
class Command:
    config: str  # "module:Class"
    runner: str  # "module:function", called with the parsed config(s), returns a JSON-able summary
    help: str
    kind: str = ""  # the shipped folder (vlm_depth.resources) in which `--config NAME` is looked up


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "vlm_depth.config:DemoConfig",
        "vlm_depth.eval.demo:run_demo",
        "main job on the embedded default: tiny model, synthetic sensor data, label-free training, "
        "evaluation against baselines, one completed sample, report.md",
    ),
    "tiny": Command(
        "vlm_depth.config:TinyConfig",
        "vlm_depth.model.tiny:build_tiny_checkpoint",
        "write the offline tiny Qwen2.5-VL checkpoint (random weights, local tokenizer, real processor)",
    ),
    "synth": Command(
        "vlm_depth.config:SynthConfig",
        "vlm_depth.data.synthetic:run_synth",
        "synthetic RGB-D scenes with simulated stereo-sensor failures (folder format)",
    ),
    "train": Command(
        "vlm_depth.train.config:TrainConfig",
        "vlm_depth.train.loop:run_train",
        "fine-tune on sparse labels (single process, or under `accelerate launch`)",
        kind="train",
    ),
    "complete": Command(
        "vlm_depth.infer.config:CompleteConfig",
        "vlm_depth.infer.complete:run_complete",
        "complete the depth of one RGB + depth pair or a folder",
        kind="infer",
    ),
    "eval": Command(
        "vlm_depth.eval.config:EvalConfig",
        "vlm_depth.eval.runner:run_eval",
        "evaluate a model or a baseline on a dataset and sparsity protocol (or a suite)",
    ),
    "bench": Command(
        "vlm_depth.config:BenchConfig",
        "vlm_depth.bench:run_bench",
        "speed ratios measured in one run (`bench decoder` or `bench train`), printed as JSON",
    ),
}


def _resolve(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vlm-depth COMMAND [--config FILE.yaml] [--key value ...] | vlm-depth --version", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "`vlm-depth COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def _shipped_config(argv: list[str], kind: str) -> list[str]:
    """`--config NAME` also names a shipped recipe or preset (`tiny-synthetic`, `fast`); a file path wins."""
    from vlm_depth.config import _split_config_arg
    from vlm_depth.resources import resource_path

    path, rest = _split_config_arg(argv)
    return argv if path is None or not kind else ["--config", str(resource_path(kind, path)), *rest]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    try:
        runner = _resolve(cmd.runner)
        config_class = _resolve(cmd.config)
    except (ImportError, AttributeError) as exc:
        print(f"error: `vlm-depth {name}` is not available in this build ({exc})", file=sys.stderr)
        return 2

    from vlm_depth.config import parse_config

    try:
        result = runner(parse_config(config_class, _shipped_config(rest, cmd.kind), prog=f"vlm-depth {name}"))
    except VlmDepthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
