"""`vlm-depth bench all --out DIR`: the prepared GPU check of one folder. It builds the real architecture with random
weights (`vlm-depth tiny --arch`), then runs, in this order, each stage timed and recorded even when another fails:

1. `bench train` with LoRA r 64 at K = 64 (one image per step) against K = 1 (two sequences per step), plain, with
   gradient checkpointing, and the same two with QLoRA; the first also writes the torch.profiler table of one
   packed step (`profile.txt`);
2. `bench decoder` on 128 query pixels in the device's dtype (bf16 on a GPU: agreement as a share), then on 32 in
   fp32 (exact agreement), with the MDM readout's maps/s;
3. `complete()` of one monocular 640x480 frame with the default settings (4096-point budget: 3,888 queries).

Output: `bench_all.json` (every stage's result or error, seconds per stage, the total) and `profile.txt` in OUT,
plus the checkpoint in OUT/model. `dry_run`: the same stages at 2 text layers and 2 vision blocks, a small frame
and few queries, so a CPU runs it in minutes (tests/test_bench_all.py).
"""

from __future__ import annotations

import gc
import json
import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm_depth.errors import VlmDepthError
from vlm_depth.files import atomic_write

logger = logging.getLogger(__name__)

FULL = dict(height=480, width=640, k=64, k1_queries=8, query_pixels=128, agreement_pixels=32, budget=4096)
DRY = dict(height=96, width=128, k=4, k1_queries=2, query_pixels=6, agreement_pixels=3, budget=16)


class StagesFailed(VlmDepthError):
    """One or more stages of `bench all` raised; their errors are in bench_all.json."""


def _release() -> None:
    """Free the previous stage's model before the next one loads its own."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _complete_frame(model_path: str, height: int, width: int, budget: int) -> dict[str, Any]:
    """`complete()` of one synthetic frame (monocular, so every grid cell is a query) with the default readout
    settings but the grid `budget`: its stats and seconds (after a warm-up run)."""
    from vlm_depth.data.synthetic import generate_sample
    from vlm_depth.infer.complete import complete
    from vlm_depth.infer.readouts import ReadoutSettings
    from vlm_depth.model import measure
    from vlm_depth.model.loading import load_model

    model, processor = load_model(model_path)
    rgb = generate_sample(1, 0, height, width).rgb
    settings = ReadoutSettings(query_budget=budget)
    complete(model, processor, rgb, settings=settings)  # warm-up
    # monocular: every grid cell is asked; the stats' `seconds` ends on the depth map copied to the host
    result = complete(model, processor, rgb, settings=settings)
    return {"frame": [height, width], **result.stats, **measure.peak_memory(model.device)}


def run_all(out: str, *, model: str = "", arch: str = "qwen2.5-vl-3b", dry_run: bool = False) -> dict[str, Any]:
    """Run the check (see the module docstring) into the folder `out`; `model`: an existing checkpoint instead of
    building `arch`. Returns the summary (also written to OUT/bench_all.json); StagesFailed after writing it when a
    stage raised."""
    from vlm_depth.infer.bench import bench_decoder
    from vlm_depth.model.tiny import build_tiny_checkpoint
    from vlm_depth.train.bench import bench_train

    size = DRY if dry_run else FULL
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = model or str(folder / "model")
    image = {"height": size["height"], "width": size["width"]}
    train = dict(image, num_images=1, queries_per_image=size["k"], k1_queries=size["k1_queries"], k1_batch=2)
    stages: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if not model:
        depth = dict(arch_layers=2, arch_vision_depth=2) if dry_run else {}
        stages.append(("build", lambda: build_tiny_checkpoint(path, arch=arch, **depth)))
    for finetune in ("lora", "qlora"):
        for checkpointing in (False, True):
            profile = str(folder / "profile.txt") if (finetune, checkpointing) == ("lora", False) else ""
            name = f"train_{finetune}{'_ckpt' if checkpointing else ''}"
            stages.append(
                (
                    name,
                    lambda f=finetune, c=checkpointing, p=profile: bench_train(
                        path, **train, finetune=f, lora_r=64, gradient_checkpointing=c, profile=p
                    ),
                )
            )
    stages.append(("decoder", lambda: bench_decoder(path, **image, query_pixels=size["query_pixels"], repeats=2)))
    stages.append(
        (
            "decoder_fp32_agreement",
            lambda: bench_decoder(path, **image, query_pixels=size["agreement_pixels"], repeats=1, dtype="float32"),
        )
    )
    stages.append(("complete", lambda: _complete_frame(path, size["height"], size["width"], size["budget"])))

    summary: dict[str, Any] = {"out": str(folder), "model": path, "dry_run": dry_run, "stages": {}}
    total = time.perf_counter()
    for name, run in stages:
        logger.info("bench all: %s", name)
        start = time.perf_counter()
        try:
            result = run()
        except Exception as err:  # recorded, and the next stage still runs: one report of everything
            logger.error("bench all: %s failed: %s", name, err)
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        _release()
        summary["stages"][name] = {"wall_s": round(time.perf_counter() - start, 1), **result}
        summary["total_s"] = round(time.perf_counter() - total, 1)
        atomic_write(folder / "bench_all.json", json.dumps(summary, indent=2, default=str))
    failed = [name for name, stage in summary["stages"].items() if "error" in stage]
    if failed:
        raise StagesFailed(f"bench all: stages {failed} failed; see {folder / 'bench_all.json'}")
    return summary
