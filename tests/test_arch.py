"""The real architectures without a download (`vlm-depth tiny --arch`), exercised on a CPU at the Qwen2.5-VL-3B widths
and reduced depth: published config values, the FLOP formula behind MFU against torch's own count, the vision
tower's one-call window attention against transformers' per-window loop, and the prepared GPU check's dry run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AttentionInterface

from vlm_depth.cli import main
from vlm_depth.model import flops
from vlm_depth.model.tiny import ARCH_MAX_PIXELS, ARCHS


def test_arch_checkpoint_has_the_published_widths_at_reduced_depth(arch3b_ckpt):
    config = json.loads((arch3b_ckpt / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    published = ARCHS["qwen2.5-vl-3b"]
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert text[key] == published["text"][key]
    assert (text["hidden_size"], text["intermediate_size"], text["vocab_size"]) == (2048, 11008, 151936)
    assert text["num_hidden_layers"] == 2 and vision["depth"] == 2 and vision["fullatt_block_indexes"] == [1]
    assert (vision["hidden_size"], vision["intermediate_size"], vision["out_hidden_size"]) == (1280, 3420, 2048)
    assert config["tie_word_embeddings"] is True and text["dtype"] == "bfloat16"
    settings = yaml.safe_load((arch3b_ckpt / "vlm_depth_tiny.yaml").read_text())
    assert settings["arch"] == "qwen2.5-vl-3b" and settings["max_pixels"] == ARCH_MAX_PIXELS
    from vlm_depth.model.processor import DepthProcessor

    processor = DepthProcessor.from_pretrained(arch3b_ckpt)
    rgb = np.zeros((480, 640, 3), np.uint8)
    grid = processor.image_processor(images=[rgb], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 34, 46]]  # 644 x 476: 640x480 at its own size, 391 merged tokens


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arch", "qwen2.5-vl-3b", "--num_layers", "3"], "arch_layers"),
        (["--arch_layers", "2"], "num_layers"),
        (["--arch", "qwen9"], "arch"),
    ],
)
def test_arch_options_are_checked(tmp_path, capsys, argv, message):
    assert main(["tiny", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_flop_formula_matches_torchs_count(arch3b_ckpt):
    """A LoRA forward of a packed batch counted by torch's FlopCounterMode (matrix products and convolutions; it
    does not count the CPU's fused attention) against the formula's parts without attention, for the tokens the
    packed sequence computes (MFU counts only the real ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlm_depth.data.synthetic import generate_sample
    from vlm_depth.model.finetune import load_trainable
    from vlm_depth.prompts.chat import ChatLayout
    from vlm_depth.train.collator import ExampleBuilder, QuerySpec, collate_packed
    from vlm_depth.train.losses import supervised_positions
    from vlm_depth.train.packed import BlockLayout, packed_forward

    model, processor = load_trainable(str(arch3b_ckpt), "lora", lora_r=64, lora_dropout=0.0)
    layout = ChatLayout.from_branch_config(processor.tokenizer, model.depth_cfg)
    builder = ExampleBuilder(processor, layout, QuerySpec(queries_per_image=4, holdout_ratio=0.3))
    example = builder(generate_sample(0, 0, 96, 128), np.random.default_rng(0), 0)
    batch = collate_packed([example], processor.tokenizer.pad_token_id)
    keep = supervised_positions(batch["labels"])[0]
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        packed_forward(model, batch, keep)
    with torch.no_grad(), FlopCounterMode(display=False) as branch:
        model.depth_patches(batch["pixel_values"], batch["image_grid_thw"], batch["depth_maps"])
    shape = flops.ArchShape.of(model.config)
    layout = BlockLayout.from_segments(batch["segment_ids"])
    executed = layout.prefix_length + layout.index.numel()  # the padded blocks are computed too
    text = flops.text_forward(shape, executed, 0, int(keep.sum()), lora_r=64)
    formula = flops.vision_forward(shape, example["image_grid_thw"][0].tolist())["linear"] + branch.get_total_flops()
    formula += text["linear"] + text["lora"] + text["head"]
    assert counted.get_total_flops() == pytest.approx(formula, rel=0.02)
    # the attention term: a block sees the prefix and itself causally, as in a sequence of its own
    assert flops.packed_pairs(3, [2]) == 5 * 6 / 2 and flops.packed_pairs(3, [2, 2]) == 6 + 2 * (5 * 6 / 2 - 6)


def test_one_call_window_attention_equals_transformers_loop(arch3b_ckpt):
    """Vision tower output and input gradient (the F_e2 path) with the windows as one padded SDPA call (the CUDA
    path, called directly here) against transformers' loop, two images of different sizes; the registered function
    is the loop itself on a CPU (bit-identical)."""
    from vlm_depth.model import vision_attention
    from vlm_depth.model.loading import load_model

    model, processor = load_model(str(arch3b_ckpt), device="cpu")
    visual = model.model.visual
    images = [
        np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)
        for i, size in enumerate([(168, 280, 3), (112, 140, 3)])
    ]
    inputs = [processor.image_processor(images=[rgb], return_tensors="pt") for rgb in images]
    pixels = torch.cat([i["pixel_values"] for i in inputs])
    grid = torch.cat([i["image_grid_thw"] for i in inputs])

    def padded(module, q, k, v, attention_mask=None, scaling=None, cu_seq_lens_q=None, max_length_q=None, **kw):
        return vision_attention.padded_window_attention(q, k, v, cu_seq_lens_q, int(max_length_q), scaling), None

    AttentionInterface.register("vlm_depth_flash_padded_test", padded)

    def run(name: str):
        visual.config._attn_implementation = name
        x = pixels.clone().requires_grad_(True)
        y = visual(x, grid_thw=grid).pooler_output
        y.square().mean().backward()
        return y.detach(), x.grad

    loop, loop_grad = run("sdpa")
    same, same_grad = run(vision_attention.NAME)
    one, one_grad = run("vlm_depth_flash_padded_test")
    assert torch.equal(loop, same) and torch.equal(loop_grad, same_grad)
    torch.testing.assert_close(one, loop, atol=1e-5 * float(loop.abs().max()), rtol=0)
    torch.testing.assert_close(one_grad, loop_grad, atol=1e-5 * float(loop_grad.abs().max()), rtol=0)


def test_bench_all_dry_run_covers_every_stage(arch3b_ckpt, tmp_path, capsys):
    """The prepared GPU check at reduced depth on a CPU: LoRA and QLoRA steps at K = 4 and K = 1 with and without
    gradient checkpointing, both benchmarks, a completion and the profiler table, with what each must report."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "check"
    assert main(["bench", "all", "--out", str(out), "--model", str(arch3b_ckpt), "--dry_run", "true"]) == 0
    summary = json.loads((out / "bench_all.json").read_text())
    assert json.loads(capsys.readouterr().out) == summary
    stages = summary["stages"]
    assert set(stages) == {
        "train_lora",
        "train_lora_ckpt",
        "train_qlora",
        "train_qlora_ckpt",
        "decoder",
        "decoder_fp32_agreement",
        "complete",
    }
    for name in ("train_lora", "train_lora_ckpt", "train_qlora", "train_qlora_ckpt"):
        train = stages[name]
        assert train["loss_equal"] is True and train["finetune"] == name.split("_")[1]
        assert train["gradient_checkpointing"] == name.endswith("ckpt")
        for setting in ("k1", "k4"):
            assert set(train[setting]["split_s"]) == {"data", "forward", "backward", "optimizer"}
            assert train[setting]["step_tflop"] > 0 and train[setting]["peak_memory_gib"] > 0
            assert "mfu" in train[setting] and train[setting]["tokens_per_s"] > 0
    for name in ("decoder", "decoder_fp32_agreement"):
        assert stages[name]["identical"] is True and stages[name]["agreement"]["identical_share"] == 1.0
        assert stages[name]["decode_tflop"] > 0 and stages[name]["mdm"]["maps_per_s"] > 0
    assert stages["complete"]["queries"] > 0 and stages["complete"]["frame"] == [96, 128]
    assert "aten::mm" in (out / "profile.txt").read_text()
