"""`vlm-depth bench train`: labelled pixels per second of training steps, one query per sequence (K = 1, the paper's
setting) vs K queries packed per image, on the same images and query pixels, on the model's device.

K = 1 runs each query as its own sequence (prefix + one block) through the model's ordinary forward, `k1_batch`
sequences of one image per step; the packed run is `packed_forward` with all K queries of an image per step. A step
is timed in four parts, the device synchronised before every clock read: data (collate + copy to the device),
forward (+ answer CE), backward, optimiser (gradient clipping and AdamW, fused on CUDA, at learning rate 0, so every
step sees the same weights and the two settings' losses stay comparable). The model runs in train mode with LoRA
dropout 0: deterministic, and gradient checkpointing (which only acts in train mode) is measured as it trains.
Weights as in training (`vlm_depth.model.finetune.load_trainable`: frozen bf16 + autocast on a GPU, fp32 on a CPU).

Per setting: queries/s, tokens/s, the split of a step, peak memory (`vlm_depth.model.measure`), the step's model
FLOPs (`vlm_depth.model.flops`) and MFU against the device's bf16 peak. `loss_equal`: every query's answer CE
agrees between the two settings within 1e-4 (fp32) or 5e-2 (bf16 noise). Warm-up: one step of each (and the
compilation with `compile`). The images are processed at their own size (the pixel budget is raised to fit them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vlm_depth.errors import ConfigError
from vlm_depth.files import atomic_write
from vlm_depth.model import flops, measure
from vlm_depth.train.collator import Batch, ExampleBuilder, QuerySpec, collate_packed
from vlm_depth.train.losses import answer_losses, supervised_positions
from vlm_depth.train.packed import packed_forward
from vlm_depth.train.step import to_device

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
PARTS = ("data", "forward", "backward", "optimizer")


def _examples(
    builder: ExampleBuilder, num_images: int, seed: int, height: int, width: int, queries_per_image: int, k1: int
):
    """Per image: (the packed example with all K queries, K = 1 examples of its first `k1` queries)."""
    from vlm_depth.data.synthetic import generate_sample
    from vlm_depth.prompts.textualize import select_queries

    out = []
    for i in range(num_images):
        sample = generate_sample(i, seed, height, width)
        shown, queries = select_queries(
            sample.depth,
            None,
            label_source="sparse",
            queries_per_image=queries_per_image,
            keep_ratio=0.2,
            holdout_ratio=0.3,
            rng=np.random.default_rng([seed, i]),
        )
        if len(queries) < queries_per_image:
            raise ConfigError(f"bench image {i} has only {len(queries)} labelled pixels for K = {queries_per_image}")
        singles = [builder.pack(sample.rgb, shown, [q]) for q in queries[:k1]]
        out.append((builder.pack(sample.rgb, shown, queries), singles))
    return out


def _packed_logits(model, batch: Batch, flex: bool) -> torch.Tensor:
    return packed_forward(model, batch, supervised_positions(batch["labels"])[0], flex=flex)


def _plain_logits(model, batch: Batch, flex: bool) -> torch.Tensor:
    """Unpacked sequences through the ordinary forward (2-D padding mask, the model's own positions)."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=(batch["segment_ids"] >= 0).long(),
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        depth_maps=batch["depth_maps"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        logits_to_keep=supervised_positions(batch["labels"])[0],
        use_cache=False,
    ).logits


class _Stepper:
    """Timed training steps of one model: data, forward, backward, optimiser (see the module docstring)."""

    def __init__(self, model, device: torch.device, pad_token_id: int, digit_ids: torch.Tensor, flex: bool) -> None:
        self.model, self.device, self.pad, self.flex = model, device, pad_token_id, flex
        self.digit_ids = digit_ids.to(device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, fused=device.type == "cuda")
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(self, examples: list[Batch], forward) -> tuple[dict[str, float], torch.Tensor, int]:
        """One step on the collated `examples` with `forward` (packed or plain): (seconds per part, per-query CE,
        real tokens)."""
        times = [measure.clock(self.device)]
        batch = to_device(collate_packed(examples, self.pad), self.device)
        times.append(measure.clock(self.device))
        with self.autocast:
            losses = answer_losses(forward(self.model, batch, self.flex), batch, self.digit_ids)
            loss = losses.ce_sum()
        times.append(measure.clock(self.device))
        loss.backward()
        times.append(measure.clock(self.device))
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        times.append(measure.clock(self.device))
        split = {part: b - a for part, a, b in zip(PARTS, times, times[1:])}
        return split, losses.per_query_ce().detach().float().cpu(), int((batch["segment_ids"] >= 0).sum())


def _phase(stepper: _Stepper, steps: list[list[Batch]], forward, step_flops: float, peak) -> tuple[dict, list]:
    """Time `steps` (lists of examples) -> (the setting's summary, per-query CE of every step)."""
    measure.reset_peak_memory(stepper.device)
    split, losses, tokens = dict.fromkeys(PARTS, 0.0), [], 0
    for examples in steps:
        seconds, ce, n = stepper.step(examples, forward)
        split = {k: split[k] + seconds[k] for k in PARTS}
        losses.append(ce)
        tokens += n
    total = sum(split.values())
    queries = sum(sum(len(e["targets"]) for e in examples) for examples in steps)
    return {
        "queries_per_s": round(queries / total, 3),
        "tokens_per_s": round(tokens / total, 1),
        "seconds_per_step": round(total / len(steps), 4),
        "split_s": {k: round(v / len(steps), 4) for k, v in split.items()},
        "step_tflop": round(step_flops / 1e12, 4),
        "mfu": measure.mfu(step_flops * len(steps), total, peak),
        **measure.peak_memory(stepper.device),
    }, losses


def _profile(stepper: _Stepper, examples: list[Batch], path: str) -> None:
    """Write the torch.profiler table of the 30 most expensive ops/kernels of one packed step to `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = stepper.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        stepper.step(examples, _packed_logits)
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30)
    atomic_write(path, table + "\n")


def _step_flops(model, steps: list[list[Batch]], images: list[int], lora_r: int, branch: list[float]) -> float:
    """Mean model FLOPs of one step of `steps` (`vlm_depth.model.flops.train_step_flops`), the examples of step i
    showing image `images[i]`; `branch`: the depth branch's forward FLOPs per image."""
    shape = flops.ArchShape.of(model.config)
    total = 0.0
    for examples, image in zip(steps, images):
        rows = []
        for example in examples:
            segments = example["segment_ids"]
            blocks = [int((segments == k).sum()) for k in range(1, int(segments.max()) + 1)]
            rows.append(flops.PackedRow(example["image_grid_thw"][0].tolist(), int((segments == 0).sum()), blocks))
        answers = sum(int(supervised_positions(e["labels"][None])[0].sum()) for e in examples)
        total += flops.train_step_flops(shape, rows, answers, lora_r, branch[image])
    return total / len(steps)


def _branch_flops(model, examples: list[Batch], device: torch.device) -> list[float]:
    """Forward FLOPs of the depth branch per image (counted by torch on one call each)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for example in examples:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.depth_patches(
                example["pixel_values"].to(device),
                example["image_grid_thw"].to(device),
                example["depth_maps"].to(device),
            )
        counts.append(float(counter.get_total_flops()))
    return counts


def bench_train(
    model_path: str,
    *,
    height: int = 448,
    width: int = 448,
    seed: int = 0,
    num_images: int = 2,
    queries_per_image: int = 64,
    k1_queries: int = 16,
    k1_batch: int = 4,
    finetune: str = "lora",
    lora_r: int = 16,
    gradient_checkpointing: bool = False,
    packed_attention: str = "sdpa",
    compile: bool = False,
    peak_tflops: float = 0.0,
    profile: str = "",
) -> dict[str, Any]:
    """Measure K = 1 vs K = `queries_per_image` training steps of the checkpoint `model_path` on `num_images`
    synthetic height x width images (`k1_queries` per image timed at K = 1, 0 = all, `k1_batch` sequences per
    step); finetune lora | qlora with rank `lora_r`; the speed options of `vlm_depth.model.speed`; `peak_tflops`
    overrides the device's bf16 peak (TFLOP/s) for MFU; `profile`: a file for the torch.profiler table of the top
    kernels of one more packed step. Returns the JSON summary."""
    from vlm_depth.model.finetune import load_trainable
    from vlm_depth.model.loading import resolve_device, set_max_pixels
    from vlm_depth.model.speed import speed_options
    from vlm_depth.prompts.chat import ChatLayout

    if k1_queries > queries_per_image or k1_batch < 1 or queries_per_image < 1:
        raise ConfigError("bench train: need 1 <= k1_queries <= queries_per_image and k1_batch >= 1")
    if finetune not in ("lora", "qlora"):
        raise ConfigError(f"bench train: finetune must be lora or qlora, got {finetune!r}")
    device = resolve_device("auto")
    model, processor = load_trainable(model_path, finetune, lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0)
    if finetune == "lora":  # qlora: bitsandbytes placed the model at load time
        model.to(device)
    speed_options(
        model, gradient_checkpointing=gradient_checkpointing, packed_attention=packed_attention, compile=compile
    )
    model.train()
    set_max_pixels(processor, max(processor.image_processor.size["longest_edge"], height * width))
    layout = ChatLayout.from_branch_config(processor.tokenizer, model.depth_cfg)
    builder = ExampleBuilder(processor, layout, QuerySpec())
    data = _examples(builder, num_images, seed, height, width, queries_per_image, k1_queries or queries_per_image)
    packed_steps = [[full] for full, _ in data]
    k1_starts = [(image, i) for image, (_, s) in enumerate(data) for i in range(0, len(s), k1_batch)]
    k1_steps = [data[image][1][i : i + k1_batch] for image, i in k1_starts]
    branch = _branch_flops(model, [full for full, _ in data], device)
    k1_flops = _step_flops(model, k1_steps, [image for image, _ in k1_starts], lora_r, branch)
    packed_flops = _step_flops(model, packed_steps, list(range(num_images)), lora_r, branch)
    stepper = _Stepper(
        model, device, processor.tokenizer.pad_token_id, torch.tensor(layout.digit_ids), packed_attention == "flex"
    )
    peak, peak_source = measure.peak_tflops(device, peak_tflops)

    stepper.step(k1_steps[0], _plain_logits), stepper.step(packed_steps[0], _packed_logits)  # warm-up
    k1, losses1 = _phase(stepper, k1_steps, _plain_logits, k1_flops, peak)
    kk, lossesk = _phase(stepper, packed_steps, _packed_logits, packed_flops, peak)
    if profile:
        _profile(stepper, packed_steps[0], profile)
    per_image_k1 = torch.cat(losses1).split([len(s) for _, s in data])
    max_diff = float(max((a - b[: len(a)]).abs().max() for a, b in zip(per_image_k1, lossesk)))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prefix = int((data[0][0]["segment_ids"] == 0).sum())
    return {
        "k1_pixels_per_s": k1["queries_per_s"],
        f"k{queries_per_image}_pixels_per_s": kk["queries_per_s"],
        "ratio": round(kk["queries_per_s"] / k1["queries_per_s"], 2),
        "loss_equal": max_diff <= TOLERANCE[dtype],
        "max_loss_diff": max_diff,
        "loss_tolerance": TOLERANCE[dtype],
        "k1": k1,
        f"k{queries_per_image}": kk,
        "device": str(device),
        "device_name": measure.device_name(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "finetune": finetune,
        "lora_r": lora_r,
        "gradient_checkpointing": gradient_checkpointing,
        "packed_attention": packed_attention,
        "compile": compile,
        "image_size": [height, width],
        "num_images": num_images,
        "k1_batch": k1_batch,
        "prefix_tokens": prefix,
        "block_tokens_mean": round(float((data[0][0]["segment_ids"] > 0).sum()) / queries_per_image, 1),
        "k1_queries_timed": sum(len(s) for s in k1_steps),
        "torch_threads": torch.get_num_threads(),
    }
