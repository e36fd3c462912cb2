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

from vlm_depth.config import BenchConfig
from vlm_depth.errors import ConfigError
from vlm_depth.train.collator import Batch, ExampleBuilder, QuerySpec, collate_packed
from vlm_depth.train.losses import answer_losses, supervised_positions
from vlm_depth.train.packed import packed_forward

TOLERANCE = 1e-4


def _examples(cfg: BenchConfig, builder: ExampleBuilder):
    """Per image: (the packed example with all K queries, K = 1 examples of its first k1_queries queries)."""
    from vlm_depth.data.synthetic import generate_sample
    from vlm_depth.prompts.textualize import select_queries

    out = []
    for i in range(cfg.num_images):
        sample = generate_sample(i, cfg.seed, cfg.height, cfg.width)
        shown, queries = select_queries(
            sample.depth,
            None,
            label_source="sparse",
            n_queries=cfg.train_k,
            keep_ratio=0.2,
            holdout_ratio=0.3,
            rng=np.random.default_rng([cfg.seed, i]),
        )
        if len(queries) < cfg.train_k:
            raise ConfigError(f"bench image {i} has only {len(queries)} labelled pixels for K = {cfg.train_k}")
        n1 = cfg.k1_queries or cfg.train_k
        singles = [builder.pack(sample.rgb, shown, [q]) for q in queries[:n1]]
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
        depth_values=batch["depth_values"],
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


def bench_train(cfg: BenchConfig) -> dict[str, Any]:
    """Measure K = 1 vs K = `train_k` training throughput on `cfg.model`; returns the JSON summary."""
    from vlm_depth.prompts.chat import ChatLayout
    from vlm_depth.train.config import TrainConfig
    from vlm_depth.train.loop import load_model, set_max_pixels

    if not cfg.model:
        raise ConfigError("bench train: --model CKPT is required")
    if cfg.k1_queries > cfg.train_k or cfg.k1_batch < 1 or cfg.train_k < 1:
        raise ConfigError("bench train: need 1 <= k1_queries <= train_k and k1_batch >= 1")
    model, processor = load_model(TrainConfig(model=cfg.model, finetune="lora", seed=cfg.seed))
    model.eval()
    set_max_pixels(processor, max(processor.image_processor.size["longest_edge"], cfg.height * cfg.width))
    layout = ChatLayout.from_branch_config(processor.tokenizer, model.depth_cfg)
    builder = ExampleBuilder(processor, layout, QuerySpec())
    digit_ids = torch.tensor(layout.digit_ids)
    pad = processor.tokenizer.pad_token_id
    data = _examples(cfg, builder)
    packed = [collate_packed([full], pad) for full, _ in data]
    singles = [collate_packed(s[i : i + cfg.k1_batch], pad) for _, s in data for i in range(0, len(s), cfg.k1_batch)]

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
        f"k{cfg.train_k}_pixels_per_s": round(ratek, 3),
        "ratio": round(ratek / rate1, 2),
        "loss_equal": max_diff <= TOLERANCE,
        "max_loss_diff": max_diff,
        "image_size": [cfg.height, cfg.width],
        "num_images": cfg.num_images,
        "prefix_tokens": prefix,
        "block_tokens_mean": round(float((packed[0]["segment_ids"] > 0).sum()) / cfg.train_k, 1),
        "k1_queries_timed": n1,
        "seconds": {"k1": round(t1, 2), f"k{cfg.train_k}": round(tk, 2)},
        "torch_threads": torch.get_num_threads(),
    }
