"""`vlm-depth complete`: complete one RGB + depth pair (read by `vlm_depth.data.pairs.read_pair`) or every frame of a
dataset through `vlm_depth.infer.complete.complete`, and write each frame's files and a `summary.json`."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vlm_depth.config import pick, save_config
from vlm_depth.data.dataset import READERS, parse_spec
from vlm_depth.data.sample import RGBDSample
from vlm_depth.errors import ConfigError, DataError
from vlm_depth.infer.complete import complete
from vlm_depth.infer.complete_config import CompleteConfig
from vlm_depth.infer.outputs import intrinsics_from_fov, parse_range, write_completion
from vlm_depth.infer.readouts import ReadoutSettings
from vlm_depth.model.loading import load_model


def _samples(cfg: CompleteConfig) -> tuple[int, Iterator[RGBDSample]]:
    """Number of frames to complete and an iterator over them: one pair, or a dataset's frames (read lazily)."""
    from vlm_depth.data import load
    from vlm_depth.data.pairs import read_pair

    if bool(cfg.rgb) == bool(cfg.dataset):
        raise ConfigError("give either --rgb (with --depth, or none for monocular) or --dataset KIND:PATH")
    if cfg.rgb:
        pair = read_pair(cfg.rgb, cfg.depth or None, depth_scale=cfg.depth_scale, intrinsics=cfg.intrinsics)
        return 1, iter([pair])
    dataset = load(cfg.dataset, **_scale_option(cfg))
    indices = range(len(dataset))[: cfg.limit or None]
    return len(indices), (dataset[i] for i in indices)


def _scale_option(cfg: CompleteConfig) -> dict[str, float]:
    """`--depth_scale` for a dataset whose reader takes one and whose spec does not set it (`?depth_scale=` wins);
    a ConfigError when it was changed for a reader that reads its own encoding."""
    kind, _, given = parse_spec(cfg.dataset)
    if "depth_scale" in inspect.signature(READERS[kind]).parameters:
        return {} if "depth_scale" in given else {"depth_scale": cfg.depth_scale}
    if cfg.depth_scale != CompleteConfig.depth_scale:
        raise ConfigError(f"--depth_scale: the {kind} reader converts its own depth encoding; drop the option")
    return {}


def run_complete(cfg: CompleteConfig) -> dict[str, Any]:
    """`vlm-depth complete`: complete every frame, write its files (see `outputs.write_completion`) and
    `summary.json` (timings per stage, queries, pixels/s) into `cfg.out`; returns the summary."""

    color_range = parse_range(cfg.color_range)
    settings = pick(ReadoutSettings, cfg)
    count, samples = _samples(cfg)
    start = time.perf_counter()
    model, processor = load_model(cfg.model, device=cfg.device)
    load_s = time.perf_counter() - start
    out = Path(cfg.out)
    save_config(out, cfg)
    images, totals = [], {"seconds": 0.0, "write_s": 0.0, "pixels": 0, "queries": 0}
    for sample in tqdm(samples, total=count, desc="complete", unit="image"):
        sparse = sample.depth_at_rgb_resolution()
        result = complete(model, processor, sample.rgb, sparse, cfg.readout, settings=settings, name=sample.name)
        start = time.perf_counter()
        intrinsics = sample.intrinsics
        if intrinsics is None and cfg.fov > 0:
            intrinsics = intrinsics_from_fov(sample.width, sample.height, cfg.fov)
        files, ranges = write_completion(
            out,
            sample.name,
            sample.rgb,
            sparse,
            result.depth,
            result.uncertainty,
            intrinsics=intrinsics,
            color_range=color_range,
            cmap=cfg.colormap,
        )
        write_s = time.perf_counter() - start
        totals["seconds"] += result.stats["seconds"]
        totals["write_s"] += write_s
        totals["pixels"] += result.depth.size
        totals["queries"] += result.stats.get("queries", 0)
        images.append({"name": sample.name, **result.stats, **ranges, "write_s": write_s, "files": files})
    if not images:
        raise DataError(f"{cfg.dataset}: no frames to complete")
    stages: dict[str, float] = {}
    for image in images:
        for stage, seconds in image.get("timings", {}).items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    summary = {
        "out": str(out),
        "model": cfg.model,
        "readout": cfg.readout,
        "images": len(images),
        "queries": totals["queries"],
        "timings": {"load_s": load_s, **stages, "complete_s": totals["seconds"], "write_s": totals["write_s"]},
        "pixels_per_s": totals["pixels"] / max(totals["seconds"], 1e-9),
        "per_image": images,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
