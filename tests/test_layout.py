"""The package's structure, as docs/architecture.md draws it: imports go one way (down the layers), command configs
are imported only by the code that runs their command, modules stay small enough to read, and only the CLI prints.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlm_depth"

# Lower number = lower layer; a module may import from its own layer or below, never above.
LAYERS = {
    "errors": 0,
    "resources": 1,
    "files": 1,
    "config": 2,
    "depth": 2,
    "prompts": 3,
    "data": 3,
    "model": 4,
    "train": 5,
    "infer": 5,
    "eval": 5,
    "demo": 6,
    "bench": 6,
    "bench_all": 6,
    "cli": 6,
    "__main__": 7,
    "__init__": 7,
}

# Command config class -> the modules allowed to import it (its own module, the command's runner, the demo).
COMMAND_CONFIGS = {
    "TrainConfig": {"train.train_config", "train.trainer", "train.setup", "demo.run"},
    "CompleteConfig": {"infer.complete_config", "infer.run_complete", "demo.run"},
    "EvalConfig": {"eval.eval_config", "eval.runner", "demo.run"},
    "DemoConfig": {"demo.demo_config", "demo.run", "demo.report"},
    "BenchConfig": {"bench"},
    "TinyConfig": {"cli"},
    "SynthConfig": {"cli"},
}
MAX_LINES = 450
LONGER = {"data.synthetic_scene"}  # the ray tracer: one algorithm, read as a whole


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name.removesuffix(".__init__") if name != "__init__" else name] = ast.parse(path.read_text())
    return out


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module inside vlm_depth, imported names) of every import in `tree`, lazy ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlm_depth."):
            found.append((node.module.removeprefix("vlm_depth."), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("vlm_depth."), []) for a in node.names if a.name.startswith("vlm_depth.")]
    return found


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    upward = [target for target, _ in _imports(MODULES[module]) if _layer(target) > _layer(module)]
    assert not upward, f"{module} (layer {_layer(module)}) imports from higher layers: {upward}"


def test_command_configs_are_imported_only_by_their_command():
    for module, tree in MODULES.items():
        for _, names in _imports(tree):
            for name in set(names) & set(COMMAND_CONFIGS):
                assert module in COMMAND_CONFIGS[name], f"{module} imports the command config {name}"


def test_no_module_is_longer_than_a_screenful_of_screens():
    too_long = {
        name: len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
        if (name := ".".join(path.relative_to(PACKAGE).with_suffix("").parts)) not in LONGER
        and len(path.read_text().splitlines()) > MAX_LINES
    }
    assert not too_long, too_long


def test_only_the_cli_prints():
    printing = [
        module
        for module, tree in MODULES.items()
        if module != "cli"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    assert not printing, printing
