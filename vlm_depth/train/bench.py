"""`vlm-depth bench train`: labelled pixels per second of a training forward + backward, one query per sequence
(K = 1, the paper's setting) vs K queries packed per image, on the same images and query pixels.

K = 1 runs each query as its own sequence (prefix + one block) through the model's ordinary forward, `k1_batch`
sequences of the same image per micro-batch; the packed run is `packed_forward` with all K queries of an image. Both
compute the per-query answer CE; `loss_equal` says the two agree within 1e-4 for every query timed in both. The
model runs in eval mode with gradients on: BatchNorm and dropout are then deterministic (so the losses are
comparable) and the cost of forward + backward is that of training. Optimiser steps are not timed (the same work
per step for both). The images are processed at their own size (the pixel budget is raised to fit them), as the
real Qwen2.5-VL processor does for 448 x 448.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from vlm_depth.errors import ConfigError
from vlm_depth.train.collator import Batch, ExampleBuilder, QuerySpec, collate_packed
from vlm_depth.train.losses import answer_losses, supervised_positions
from vlm_depth.train.packed import packed_forward

TOLERANCE = 1e-4


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


def _packed_losses(model, batch: Batch, digit_ids: torch.Tensor) -> torch.Tensor:
    predict_mask, _ = supervised_positions(batch["labels"])
    losses = answer_losses(packed_forward(model, batch, predict_mask), batch, digit_ids)
    losses.ce_sum().backward()
    return losses.per_query_ce().detach()


def _plain_losses(model, batch: Batch, digit_ids: torch.Tensor) -> torch.Tensor:
    """Unpacked sequences through the ordinary forward (2-D padding mask, the model's own positions)."""
    predict_mask, _ = supervised_positions(batch["labels"])
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=(batch["segment_ids"] >= 0).long(),
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        depth_maps=batch["depth_maps"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        logits_to_keep=predict_mask,
    ).logits
    losses = answer_losses(logits, batch, digit_ids)
    losses.ce_sum().backward()
    return losses.per_query_ce().detach()


def _timed(fn, batches: list[Batch]) -> tuple[float, list[torch.Tensor]]:
    tic = time.perf_counter()
    results = [fn(b) for b in batches]
    return time.perf_counter() - tic, results


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
) -> dict[str, Any]:
    """Measure K = 1 vs K = `queries_per_image` training throughput of the checkpoint `model_path` on `num_images`
    synthetic height x width images (`k1_queries` per image timed at K = 1, 0 = all, `k1_batch` sequences per
    micro-batch); returns the JSON summary."""
    from vlm_depth.model.finetune import set_trainable
    from vlm_depth.model.loading import load_model, set_max_pixels
    from vlm_depth.prompts.chat import ChatLayout

    if k1_queries > queries_per_image or k1_batch < 1 or queries_per_image < 1:
        raise ConfigError("bench train: need 1 <= k1_queries <= queries_per_image and k1_batch >= 1")
    model, processor = load_model(model_path, device="cpu", adapter_trainable=True)
    set_trainable(model, "lora")
    model.eval()
    set_max_pixels(processor, max(processor.image_processor.size["longest_edge"], height * width))
    layout = ChatLayout.from_branch_config(processor.tokenizer, model.depth_cfg)
    builder = ExampleBuilder(processor, layout, QuerySpec())
    digit_ids = torch.tensor(layout.digit_ids)
    pad = processor.tokenizer.pad_token_id
    data = _examples(builder, num_images, seed, height, width, queries_per_image, k1_queries or queries_per_image)
    packed = [collate_packed([full], pad) for full, _ in data]
    singles = [collate_packed(s[i : i + k1_batch], pad) for _, s in data for i in range(0, len(s), k1_batch)]

    def k1(batch: Batch) -> torch.Tensor:
        return _plain_losses(model, batch, digit_ids)

    def kk(batch: Batch) -> torch.Tensor:
        return _packed_losses(model, batch, digit_ids)

    k1(singles[0]), kk(packed[0])  # warm-up (allocator, kernels)
    model.zero_grad(set_to_none=True)
    t1, losses1 = _timed(k1, singles)
    model.zero_grad(set_to_none=True)
    tk, lossesk = _timed(kk, packed)
    n1 = sum(len(b["targets"]) for b in singles)
    nk = sum(len(b["targets"]) for b in packed)
    per_image_k1 = torch.cat(losses1).split([len(s) for _, s in data])
    diffs = [(a - b[: len(a)]).abs().max() for a, b in zip(per_image_k1, lossesk)]
    max_diff = float(torch.stack(diffs).max())
    prefix = int((packed[0]["segment_ids"] == 0).sum())
    rate1, ratek = n1 / t1, nk / tk
    return {
        "k1_pixels_per_s": round(rate1, 3),
        f"k{queries_per_image}_pixels_per_s": round(ratek, 3),
        "ratio": round(ratek / rate1, 2),
        "loss_equal": max_diff <= TOLERANCE,
        "max_loss_diff": max_diff,
        "image_size": [height, width],
        "num_images": num_images,
        "prefix_tokens": prefix,
        "block_tokens_mean": round(float((packed[0]["segment_ids"] > 0).sum()) / queries_per_image, 1),
        "k1_queries_timed": n1,
        "seconds": {"k1": round(t1, 2), f"k{queries_per_image}": round(tk, 2)},
        "torch_threads": torch.get_num_threads(),
    }
