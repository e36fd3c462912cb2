"""Every training recipe is a complete, runnable description: it parses into a TrainConfig, its header gives the
launch command, and every key carries its help text as a comment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vlm_depth.config import parse_config
from vlm_depth.resources import load_yaml
from vlm_depth.train.train_config import TrainConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "train").glob("*.yaml"))


def test_paper_and_ablation_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"tiny-synthetic", "qwen2.5-vl-3b-hypersim-vkitti-sd", "qwen2.5-vl-3b-hypersim-vkitti-gt"} <= names
    assert sum(name.startswith("ablation-") for name in names) == 6


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_documents_every_key_and_its_launch_command(recipe):
    cfg = parse_config(TrainConfig, ["--config", str(recipe)])
    text = recipe.read_text()
    header = text.split("\n\n", 1)[0]
    assert re.search(rf"vlm_depth train --config train/{re.escape(recipe.name)}|vlm-depth train --config", header)
    keys = load_yaml(recipe)
    for line in text.splitlines():
        if re.match(r"^\w+:", line):
            assert "#" in line, f"{recipe.name}: key without a comment: {line}"
    assert set(keys) <= {f for f in TrainConfig.__dataclass_fields__}
    if recipe.stem.startswith(("qwen2.5-vl-3b", "ablation-")):
        # the paper's setting: 20K images, 10 epochs, global batch 16 on 8 GPUs, one pixel per sample
        assert (cfg.num_images, cfg.epochs, cfg.batch_size * 8 * cfg.grad_accum, cfg.queries_per_image) == (
            20000,
            10,
            16,
            1,
        )


def test_ablations_differ_from_the_main_recipe_only_where_they_say():
    main = load_yaml(Path(RECIPES[0]).parent / "qwen2.5-vl-3b-hypersim-vkitti-sd.yaml")
    expected = {
        "a-hard-concat": {"fusion": "hard_concat", "template": "no_prompt"},
        "b-he-init": {"fusion": "he_init", "template": "no_prompt"},
        "c-zero-init": {"template": "no_prompt"},
        "d-mask-prompt": {"template": "mask_only"},
        "e-mask-value-prompt": {},
        "f-gt-labels": {"label_source": "gt"},
    }
    for suffix, changes in expected.items():
        recipe = load_yaml(Path(RECIPES[0]).parent / f"ablation-{suffix}.yaml")
        diff = {k: v for k, v in recipe.items() if main.get(k) != v and k != "out"}
        assert diff == changes, suffix
