"""Shipped templates, recipes, presets and suites are found by name; pyproject ships every package and data folder.

tests/test_wheel.py checks the same from an installed wheel, run outside the source tree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import vlm_depth
import vlm_depth.resources as resources
from vlm_depth.cli import main
from vlm_depth.errors import ConfigError
from vlm_depth.resources import KINDS, resource_files, resource_path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_of_the_top_level_folders_is_found_by_name(kind):
    files = sorted((REPO / kind).glob("*.yaml"))
    assert files and [p.resolve() for p in resource_files(kind)] == [p.resolve() for p in files]
    for path in files:
        for name in (path.stem, path.name, f"{kind}/{path.name}"):
            assert resource_path(kind, name).resolve() == path.resolve()


def test_a_path_that_exists_wins_and_an_unknown_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "tiny-synthetic.yaml").write_text("max_steps: 1\n")
    assert resource_path("train", "train/tiny-synthetic.yaml") == Path("train/tiny-synthetic.yaml")
    assert resource_path("train", "tiny-synthetic").resolve() == (REPO / "train" / "tiny-synthetic.yaml").resolve()
    with pytest.raises(ConfigError, match=r"no infer file named 'nope'.*'default', 'fast', 'quality'"):
        resource_path("infer", "nope")
    with pytest.raises(ConfigError, match="unknown resource kind"):
        resource_path("recipes", "tiny-synthetic")


def test_installed_package_data_is_read_first(tmp_path, monkeypatch):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "paper.yaml").write_text("name: paper\n")
    monkeypatch.setattr(resources, "files", lambda package: tmp_path)
    assert resource_path("prompts", "paper") == tmp_path / "prompts" / "paper.yaml"
    assert resource_files("prompts") == [tmp_path / "prompts" / "paper.yaml"]
    assert resources.resource_dir("train") == resources.REPO_ROOT / "train"  # not in the package data: the checkout


def test_config_by_name_finds_shipped_recipes_and_presets(tmp_path, monkeypatch):
    from vlm_depth.config import parse_config
    from vlm_depth.eval.eval_config import EvalConfig
    from vlm_depth.infer.complete_config import CompleteConfig
    from vlm_depth.train.train_config import TrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = parse_config(TrainConfig, ["--max_steps", "2", "--config", "tiny-synthetic"])
    assert (cfg.max_steps, cfg.finetune, cfg.query_mode) == (2, "full", "pointer")  # the recipe, then the override
    assert parse_config(CompleteConfig, ["--config=fast"]).query_budget == 1024
    (tmp_path / "fast.yaml").write_text("query_budget: 7\n")
    assert parse_config(CompleteConfig, ["--config", "fast.yaml"]).query_budget == 7  # a file path wins
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(EvalConfig, ["--config", "zero_shot"])  # eval configs are not shipped (suites are)
    assert main(["complete", "--config", "nope"]) == 2


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"vlm-depth {vlm_depth.__version__}\n"


def test_pyproject_ships_every_package_and_data_folder():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    code = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vlm_depth").rglob("__init__.py")}
    data = {f"vlm_depth.resources.{kind}" for kind in KINDS}
    assert set(setuptools["packages"]) == code | data
    assert setuptools["package-dir"] == {f"vlm_depth.resources.{kind}": kind for kind in KINDS}
    assert setuptools["package-data"] == {name: ["*.yaml"] for name in data}
    assert project["project"]["dynamic"] == ["version"] and "version" not in project["project"]
    assert setuptools["dynamic"]["version"] == {"attr": "vlm_depth.__version__"}
    requires = " ".join(project["project"]["dependencies"])
    assert "bitsandbytes" not in requires and "qwen-vl-utils" not in requires
    extras = project["project"]["optional-dependencies"]
    assert any(r.startswith("bitsandbytes") for r in extras["qlora"])
    assert {"pytest", "ruff", "bitsandbytes"} <= {r.split(">")[0].split("=")[0] for r in extras["dev"]}


def test_accelerate_configs_load_in_accelerate_and_name_their_engine():
    from accelerate.commands.config.config_args import load_config_from_file

    engines = {}
    for path in resource_files("launch"):
        config = load_config_from_file(str(path))  # accelerate's own reader: unknown keys are errors
        engines[path.stem] = (config.distributed_type.value, (config.deepspeed_config or {}).get("zero_stage"))
        assert config.fsdp_config in (None, {})  # vlm-depth shards itself (`--sharding fsdp`), never the plugin
    assert engines == {
        "ddp": ("MULTI_GPU", None),
        "fsdp": ("MULTI_GPU", None),
        "deepspeed_zero2": ("DEEPSPEED", 2),
        "deepspeed_zero3": ("DEEPSPEED", 3),
    }
