"""End-to-end training runs on the tiny checkpoint: the tiny recipe learns, checkpoints resume exactly, label-free
runs never touch ground truth, divergence stops cleanly, and two processes reproduce one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import launch_two, training_log
from safetensors.torch import load_file

from vlm_depth import cli
from vlm_depth.config import parse_config
from vlm_depth.data import register_reader
from vlm_depth.data.synthetic import SyntheticDataset
from vlm_depth.train.resume import WEIGHTS_FILE, list_checkpoints
from vlm_depth.train.step import TrainingDiverged
from vlm_depth.train.train_config import TrainConfig
from vlm_depth.train.trainer import run_train

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "train" / "tiny-synthetic.yaml"
SMALL = "synthetic:8?height=48&width=64&seed=0"


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine is shared: one intra-op thread is faster under contention (results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tiny_ckpt, out, *overrides: str) -> TrainConfig:
    args = ["--config", str(RECIPE), "--model", str(tiny_ckpt), "--out", str(out), "--val_dataset", ""]
    return parse_config(TrainConfig, args + list(overrides))


@pytest.mark.slow
def test_tiny_recipe_loss_and_mae_fall_and_checkpoint_loads(tiny_ckpt, tmp_path, capsys):
    from vlm_depth.model.depth_vlm import DepthVLM
    from vlm_depth.model.processor import DepthProcessor

    out = tmp_path / "run"
    args = ["train", "--config", str(RECIPE), "--model", str(tiny_ckpt), "--out", str(out), "--max_steps", "200"]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = training_log(out)
    assert [r["step"] for r in rows] == list(range(1, 201))
    first, last = rows[:20], rows[-20:]
    for key, factor in (("loss", 0.5), ("mae", 0.7)):
        before, after = np.mean([r[key] for r in first]), np.mean([r[key] for r in last])
        assert after < factor * before, f"{key}: first-20 mean {before:.3f}, last-20 mean {after:.3f}"

    # the final folder restores the trained model: same validation metrics as logged at the end of training
    from vlm_depth.prompts.chat import ChatLayout
    from vlm_depth.prompts.template import PromptTemplate
    from vlm_depth.prompts.textualize import Textualizer
    from vlm_depth.train.setup import build_val_batches
    from vlm_depth.train.validate import validate

    model = DepthVLM.from_pretrained(out / "final")
    processor = DepthProcessor.from_pretrained(out / "final")
    d = model.depth_cfg
    assert d.query_mode == "pointer"
    layout = ChatLayout(processor.tokenizer, Textualizer(PromptTemplate.load(d.template), d.query_mode, d.decimals))
    cfg = parse_config(TrainConfig, ["--config", str(RECIPE), "--out", str(out)])
    reloaded = validate(model, layout, build_val_batches(cfg, processor, layout), torch.tensor(layout.digit_ids))
    logged = summary["validation"]
    assert 0 < logged["val_parsed"] <= 1
    for key in ("val_ce", "val_tf_mae", "val_mae", "val_parsed"):
        assert reloaded[key] == pytest.approx(logged[key], abs=1e-4), key


def _trainable(out: Path, step: int) -> dict[str, torch.Tensor]:
    (folder,) = [p for p in list_checkpoints(out) if p.name.endswith(f"{step:07d}")]
    return load_file(str(folder / WEIGHTS_FILE))


def test_resume_after_interruption_matches_uninterrupted_run(tiny_ckpt, tmp_path):
    # LoRA with dropout: the resumed run must also restore the RNG that draws the dropout masks
    common = ["--dataset", SMALL, "--queries_per_image", "4", "--max_steps", "20", "--save_every", "10"]
    common += ["--finetune", "lora", "--lora_dropout", "0.1", "--lr_backbone", "1e-3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(_config(tiny_ckpt, straight, *common))
    first = run_train(_config(tiny_ckpt, split, *common, "--stop_at_step", "10"))
    assert first["final"] is None and first["steps"] == [0, 10]
    second = run_train(_config(tiny_ckpt, split, *common, "--resume_from", "latest"))
    assert second["steps"] == [10, 20]

    a, b = _trainable(straight, 20), _trainable(split, 20)
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    losses_a = [r["loss"] for r in training_log(straight)][10:]
    losses_b = [r["loss"] for r in training_log(split)][10:]
    assert [r["step"] for r in training_log(split)] == list(range(1, 21))
    np.testing.assert_allclose(losses_b, losses_a, rtol=0, atol=1e-6)
    assert any(not torch.equal(a[k], _trainable(straight, 10)[k]) for k in a)  # steps 11-20 did train


@register_reader("poisoned-synthetic")
class PoisonedSynthetic(SyntheticDataset):
    """Synthetic scenes whose ground truth is all NaN (set after validation, so nothing sanitises it)."""

    def read(self, item: int):
        sample = super().read(item)
        sample.gt = np.full_like(sample.gt, np.nan)
        return sample


def test_label_free_run_trains_with_nan_ground_truth(tiny_ckpt, tmp_path):
    out = tmp_path / "poisoned"
    spec = "poisoned-synthetic:4?height=48&width=64&seed=0"
    summary = run_train(_config(tiny_ckpt, out, "--dataset", spec, "--max_steps", "3", "--label_source", "sparse"))
    rows = training_log(out)
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert summary["final"] is not None


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_ckpt, tmp_path):
    out = tmp_path / "diverge"
    # an absurd learning rate overflows the weights after the first update
    cfg = _config(tiny_ckpt, out, "--dataset", SMALL, "--max_steps", "5", "--save_every", "1", "--lr_backbone", "1e38")
    with pytest.raises(TrainingDiverged, match="non-finite loss at step") as failure:
        run_train(cfg)
    failed = int(str(failure.value).split("at step ")[1].split()[0])
    assert failed > 1
    # every step before the failing one is checkpointed; the failing step's update was never applied or saved
    assert [p.name for p in list_checkpoints(out)][-1] == f"step-{failed - 1:07d}"
    assert not (out / "final").exists()


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_ckpt, tmp_path):
    common = ["train", "--config", str(RECIPE), "--model", str(tiny_ckpt), "--val_dataset", ""]
    common += ["--dataset", SMALL, "--max_steps", "2", "--save_every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    two = launch_two("ddp.yaml", [*common, "--out", str(tmp_path / "two"), "--batch_size", "1"], env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "vlm_depth", *common, "--out", str(tmp_path / "one"), "--batch_size", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    row_two, row_one = training_log(tmp_path / "two")[0], training_log(tmp_path / "one")[0]
    assert row_two["queries"] == row_one["queries"]
    assert row_two["loss"] == pytest.approx(row_one["loss"], abs=1e-4)
    assert row_two["mae"] == pytest.approx(row_one["mae"], abs=1e-4)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume_bit_identically(tiny_ckpt, tmp_path):
    common = ["train", "--config", str(RECIPE), "--model", str(tiny_ckpt), "--val_dataset", "", "--dataset", SMALL]
    common += ["--finetune", "full", "--max_steps", "2", "--save_every", "1", "--log_level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    sharded = [*common, "--sharding", "fsdp", "--batch_size", "1"]
    for args in (["--out", tmp_path / "fsdp"], ["--out", tmp_path / "cut", "--stop_at_step", "1"]):
        run = launch_two("fsdp.yaml", [*sharded, *map(str, args)], env)
        assert run.returncode == 0, run.stderr[-3000:]
    resumed = launch_two("fsdp.yaml", [*sharded, "--out", str(tmp_path / "cut"), "--resume_from", "latest"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert cli.main([*common, "--out", str(tmp_path / "one"), "--batch_size", "2"]) == 0

    fsdp, one = training_log(tmp_path / "fsdp"), training_log(tmp_path / "one")
    assert fsdp[0]["queries"] == one[0]["queries"]
    assert fsdp[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-4)  # same global batch, sharded over 2
    assert fsdp[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-0000002" / "optimizer.safetensors").is_file()
    # stopped after step 1 and resumed from its FSDP checkpoint: the same run
    assert training_log(tmp_path / "cut", timed=False) == training_log(tmp_path / "fsdp", timed=False)
    for name in ("model.safetensors", "depth_branch.safetensors"):
        a, b = load_file(tmp_path / "fsdp" / "final" / name), load_file(tmp_path / "cut" / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    from vlm_depth.model.depth_vlm import DepthVLM

    DepthVLM.from_pretrained(tmp_path / "fsdp" / "final")  # the gathered weights are a whole checkpoint
