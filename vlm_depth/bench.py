"""`vlm-depth bench decoder|train|all`: the config of the command, and the dispatch to the decoder or the training
benchmark (`vlm_depth.infer.bench`, `vlm_depth.train.bench`) or the prepared GPU check of both
(`vlm_depth.bench_all`); each returns a JSON summary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from vlm_depth.config import option, save_config
from vlm_depth.errors import ConfigError
from vlm_depth.files import atomic_write


@dataclass
class BenchConfig:
    """`vlm-depth bench decoder|train`: speed ratios measured in one run, printed as JSON."""

    renamed: ClassVar[dict[str, str]] = {"train_k": "queries_per_image", "num_queries": "query_pixels"}

    what: Literal["decoder", "train", "all"] = option(
        "What to benchmark: `decoder`, `train`, or `all` (the prepared GPU check into --out).", default="decoder"
    )
    model: str = option("Checkpoint folder (a vlm-depth or plain Qwen2.5-VL checkpoint).", default="")
    out: str = option("Optional folder for the JSON result and the resolved config.", default="")
    height: int = option("Height of the benchmark images in pixels.", default=448)
    width: int = option("Width of the benchmark images in pixels.", default=448)
    seed: int = option("Seed of the benchmark images and query pixels.", default=0)
    num_images: int = option("bench train: number of benchmark images.", default=2)
    queries_per_image: int = option("bench train: queries K packed per image, compared with K = 1.", default=64)
    k1_queries: int = option("bench train: queries per image timed one per sequence (K = 1); 0 = all.", default=16)
    k1_batch: int = option("bench train: sequences per K = 1 micro-batch.", default=4)
    finetune: str = option("bench train: lora or qlora (4-bit NF4 base).", default="lora")
    lora_r: int = option("bench train: LoRA rank (alpha = 2 r).", default=16)
    gradient_checkpointing: bool = option("bench train: recompute layers in backward (memory).", default=False)
    packed_attention: str = option("bench train: sdpa, or flex (CUDA only).", default="sdpa")
    compile: bool = option(
        "Regional torch.compile of the decoder layers (train steps; decoder passes).", default=False
    )
    query_pixels: int = option("bench decoder: query pixels (distinct grid cells) of the image.", default=512)
    max_queries_per_pass: int = option(
        "bench decoder: queries decoded together per pass (-1 = the device's default: 128 on a CPU, by free "
        "memory on a GPU).",
        default=-1,
    )
    packing: str = option("bench decoder: decoder layout, batch or packed.", default="batch")
    repeats: int = option("bench decoder: timed runs of the fast decoder and of the forward (best kept).", default=3)
    dtype: str = option(
        "bench decoder: weights' dtype: auto (bf16 on a GPU, fp32 on a CPU), float32 (exact agreement check) or "
        "bfloat16.",
        default="auto",
    )
    arch: str = option("bench all: the architecture to build (without --model).", default="qwen2.5-vl-3b")
    dry_run: bool = option(
        "bench all: 2 layers, 2 vision blocks, a small frame: a CPU run of every stage.", default=False
    )
    peak_tflops: float = option("The device's dense bf16 peak for MFU (0 = the table's, by device name).", default=0.0)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark `cfg.what` (`decoder` or `train`); writes `bench_WHAT.json` and the config to `cfg.out`."""
    if cfg.what == "all":
        from vlm_depth.bench_all import run_all

        if not cfg.out:
            raise ConfigError("bench all: --out DIR is required (the checkpoint, bench_all.json and profile.txt)")
        save_config(cfg.out, cfg)
        return run_all(cfg.out, model=cfg.model, arch=cfg.arch, dry_run=cfg.dry_run)
    if not cfg.model:
        raise ConfigError(f"bench {cfg.what}: --model CKPT is required")
    image = {"height": cfg.height, "width": cfg.width, "seed": cfg.seed}
    if cfg.what == "decoder":
        from vlm_depth.infer.bench import bench_decoder

        result = bench_decoder(
            cfg.model,
            **image,
            query_pixels=cfg.query_pixels,
            max_queries_per_pass=cfg.max_queries_per_pass,
            packing=cfg.packing,
            repeats=cfg.repeats,
            dtype=cfg.dtype,
            compile=cfg.compile,
            peak_tflops=cfg.peak_tflops,
        )
    elif cfg.what == "train":
        from vlm_depth.train.bench import bench_train

        result = bench_train(
            cfg.model,
            **image,
            num_images=cfg.num_images,
            queries_per_image=cfg.queries_per_image,
            k1_queries=cfg.k1_queries,
            k1_batch=cfg.k1_batch,
            finetune=cfg.finetune,
            lora_r=cfg.lora_r,
            gradient_checkpointing=cfg.gradient_checkpointing,
            packed_attention=cfg.packed_attention,
            compile=cfg.compile,
            peak_tflops=cfg.peak_tflops,
        )
    else:
        raise ConfigError(f"bench: unknown benchmark {cfg.what!r}; choose decoder, train or all")
    if cfg.out:
        save_config(cfg.out, cfg)
        atomic_write(Path(cfg.out) / f"bench_{cfg.what}.json", json.dumps(result, indent=2))
    return result
