"""Packed training under gradient checkpointing: one packed sequence per model call, so transformers' own
checkpointing applies. Loss and gradients equal those without it, the peak memory of a step is lower (measured on
the CPU), the CUDA flex attention's mask gives the SDPA path's logits, and the training options reach a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlm_depth.model.finetune import apply_lora
from vlm_depth.train.collator import collate_packed
from vlm_depth.train.losses import answer_losses, supervised_positions
from vlm_depth.train.packed import packed_forward

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lora_batch(tiny_ckpt):
    """A tiny fp32 DepthVLM with LoRA (every trainable weight nudged off its zero init, so no gradient is trivially
    0), a batch of two images of different sizes with 3 queries each, and the digit ids."""
    from test_train_packing import _image_and_queries, _setup

    model, processor, builder, layout = _setup(tiny_ckpt, "coords")
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    examples = [builder.pack(*_image_and_queries(size, 3, seed=i)) for i, size in enumerate([(48, 64), (70, 90)])]
    return model, collate_packed(examples, processor.tokenizer.pad_token_id), torch.tensor(layout.digit_ids)


def _step(model, batch, digit_ids, checkpointing: bool):
    """Per-query CE, every trainable gradient and the bytes autograd kept for backward outside checkpoints."""
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    model.train()
    model.zero_grad(set_to_none=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        losses = answer_losses(
            packed_forward(model, batch, supervised_positions(batch["labels"])[0]), batch, digit_ids
        )
    losses.ce_sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return losses.per_query_ce().detach(), grads, sum(kept)


def test_checkpointing_gives_the_same_loss_and_gradients(lora_batch):
    model, batch, digit_ids = lora_batch
    ce, grads, kept = _step(model, batch, digit_ids, checkpointing=False)
    ce_ckpt, grads_ckpt, kept_ckpt = _step(model, batch, digit_ids, checkpointing=True)
    model.activation_checkpointing_disable()
    torch.testing.assert_close(ce_ckpt, ce, atol=1e-5, rtol=0)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 20
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-5, rtol=0)
    assert kept_ckpt < 0.8 * kept  # the layers' activations are recomputed, not kept


def test_flex_block_mask_gives_the_sdpa_logits(lora_batch):
    """The CUDA flex path's mask, through flex_attention's eager reference on the CPU (no backward there)."""
    model, batch, _ = lora_batch
    model.eval()
    with torch.no_grad():
        sdpa = packed_forward(model, batch)
        flex = packed_forward(model, batch, flex=True)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)


def _peak_step_memory(model: str, checkpointing: bool) -> dict:
    """Peak RSS of one packed LoRA forward + backward (K = 32, 96x128) in a fresh process, above the RSS before it;
    glibc returns freed blocks to the OS (MALLOC_MMAP_THRESHOLD_), so RSS follows the live tensors."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, __file__, model, str(int(checkpointing))]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_checkpointing_lowers_the_peak_memory_of_a_step(tmp_path):
    """Measured on the CPU with a wider tiny model (6 layers of width 256, 2,097 tokens): without checkpointing
    every layer keeps its activations (~300 MiB here), with it only each layer's input (~100 MiB)."""
    from vlm_depth.model.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(tmp_path / "wide", hidden_size=256, num_layers=6)
    plain = _peak_step_memory(str(tmp_path / "wide"), checkpointing=False)
    ckpt = _peak_step_memory(str(tmp_path / "wide"), checkpointing=True)
    assert plain["tokens"] == ckpt["tokens"] > 2000
    assert ckpt["peak_mib"] < 0.6 * plain["peak_mib"], (plain, ckpt)


@pytest.mark.slow
def test_speed_options_reach_a_training_run(tiny_ckpt, tmp_path):
    """`train --gradient_checkpointing true --compile true` (regional compilation of the decoder layers) trains
    like the plain run: the same first-step loss (fp32, 1e-5)."""
    from vlm_depth.cli import main

    recipe = str(REPO / "train" / "tiny-synthetic.yaml")
    common = ["train", "--config", recipe, "--model", str(tiny_ckpt), "--max_steps", "2", "--val_dataset", ""]
    common += ["--dataset", "synthetic:2?height=48&width=64", "--num_threads", "1"]
    losses = []
    for name, extra in (("plain", []), ("fast", ["--gradient_checkpointing", "true", "--compile", "true"])):
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0
        rows = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        losses.append([row["loss"] for row in rows if "loss" in row])
    assert len(losses[0]) == 2
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5, rtol=0)


if __name__ == "__main__":  # the child process of `_peak_step_memory`: python test_train_checkpointing.py MODEL 0|1
    import threading

    from vlm_depth.data.synthetic import generate_sample
    from vlm_depth.model.finetune import load_trainable
    from vlm_depth.prompts.chat import ChatLayout
    from vlm_depth.train.collator import ExampleBuilder, QuerySpec

    torch.set_num_threads(1)
    model, processor = load_trainable(sys.argv[1], "lora", lora_dropout=0.0)
    if sys.argv[2] == "1":
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    layout = ChatLayout.from_branch_config(processor.tokenizer, model.depth_cfg)
    builder = ExampleBuilder(processor, layout, QuerySpec(queries_per_image=32, holdout_ratio=0.3))
    example = builder(generate_sample(0, 0, 96, 128), np.random.default_rng(0), 0)
    batch = collate_packed([example], processor.tokenizer.pad_token_id)
    digit_ids = torch.tensor(layout.digit_ids)

    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def step() -> None:
        keep = supervised_positions(batch["labels"])[0]
        answer_losses(packed_forward(model, batch, keep), batch, digit_ids).ce_sum().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, lazily built state
    peak, done = [0.0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            done.wait(0.002)

    base = rss_mib()
    watcher = threading.Thread(target=watch)
    watcher.start()
    step()
    done.set()
    watcher.join()
    tokens = int((batch["segment_ids"] >= 0).sum())
    sys.stdout.write(json.dumps({"tokens": tokens, "peak_mib": max(peak[0], rss_mib()) - base}) + "\n")
