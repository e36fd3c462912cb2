"""`vlm-depth complete`: complete one RGB + depth pair (read by `vlm_depth.data.pairs.read_pair`) or every frame of a
dataset through `vlm_depth.infer.complete.complete`, and write each frame's files and a `summary.json`.

Order: every option is checked (`CompleteConfig`), the device, checkpoint and a pair's files too, before `--out`
is claimed (`vlm_depth.files.claim_output`: locked, refused when it holds an earlier completion unless
`--overwrite`) and the config is written; only then is the model loaded."""

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
from vlm_depth.files import atomic_write, claim_output
from vlm_depth.infer.complete import check_input_pixels, complete
from vlm_depth.infer.complete_config import CompleteConfig
from vlm_depth.infer.outputs import intrinsics_from_fov, parse_range, write_completion
from vlm_depth.infer.readouts import ReadoutSettings
from vlm_depth.model.checkpoint import locate_checkpoint
from vlm_depth.model.loading import load_model, resolve_device

# What marks a folder as holding a completion (config.yaml is written first, summary.json last).
MARKERS = ("config.yaml", "summary.json", "*_depth.npy")


def _samples(cfg: CompleteConfig) -> tuple[int, Iterator[RGBDSample]]:
    """Number of frames to complete and an iterator over them: one pair, or a dataset's frames (read lazily)."""
    from vlm_depth.data import load
    from vlm_depth.data.pairs import read_pair

    if bool(cfg.rgb) == bool(cfg.dataset):
        raise ConfigError("give either --rgb (with --depth, or none for monocular) or --dataset KIND:PATH")
    if cfg.rgb:
        pair = read_pair(cfg.rgb, cfg.depth or None, depth_scale=cfg.depth_scale, intrinsics=cfg.intrinsics)
        check_input_pixels(pair.rgb.shape, cfg.max_input_pixels, cfg.rgb)
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
    resolve_device(cfg.device)
    locate_checkpoint(cfg.model)
    count, samples = _samples(cfg)
    with claim_output(cfg.out, "complete", MARKERS, overwrite=cfg.overwrite) as out:
        save_config(out, cfg)
        return _run(cfg, settings, color_range, count, samples, out)


def _run(
    cfg: CompleteConfig,
    settings: ReadoutSettings,
    color_range: tuple[float, float] | None,
    count: int,
    samples: Iterator[RGBDSample],
    out: Path,
) -> dict[str, Any]:
    start = time.perf_counter()
    model, processor = load_model(cfg.model, device=cfg.device, base_model=cfg.base_model or None)
    load_s = time.perf_counter() - start
    images, totals = [], {"seconds": 0.0, "write_s": 0.0, "pixels": 0, "queries": 0}
    for sample in tqdm(samples, total=count, desc="complete", unit="image"):
        sparse = sample.depth_at_rgb_resolution()
        given = None if cfg.rgb and not cfg.depth else sparse  # no --depth: monocular by request, not a warning
        result = complete(model, processor, sample.rgb, given, cfg.readout, settings=settings, name=sample.name)
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
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    return summary
