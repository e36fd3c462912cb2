"""Dense depth completion: the Python API `complete(model, processor, rgb, sparse)`, `make_predictor(path)` for the
evaluation runner, and `vlm-depth complete` (`run_complete`).

A *readout* turns (model, processor, rgb, sparse) into a dense depth and uncertainty at the RGB resolution; it is
a small function registered in `READOUTS`:
- `query` (default): the image prefix is encoded once, one pixel per grid cell with missing input (plus optional
  edge/uncertainty-driven extra pixels) is asked "what is the distance?" through `QueryDecoder`, and `assemble`
  fills between the answers with RGB-guided filtering. A zero-depth input is monocular mode: every cell is asked.
- `mdm`: the dense MDM head (`vlm_depth.model.mdm_head`, checkpoints trained with `mdm_mode` head_only/joint): one
  vision-tower pass with the sparse depth, the head's map upsampled to the RGB grid; no per-pixel uncertainty (NaN).
`complete` then enforces "keep means keep" for every readout: valid input pixels are returned unchanged unless
`settings.refine_keep`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlm_depth.data.sample import RGBDSample
from vlm_depth.depth import keep_input, valid_mask
from vlm_depth.errors import ConfigError, DataError, ModelError
from vlm_depth.infer.answers import FLAG_CLIPPED, QueryAnswers
from vlm_depth.infer.assemble import assemble, cell_pixels, refinement_pixels, stride_for_budget
from vlm_depth.infer.config import CompleteConfig, ReadoutSettings
from vlm_depth.infer.decoder import QueryDecoder
from vlm_depth.prompts.chat import ChatLayout, QueryTokens

logger = logging.getLogger(__name__)


@dataclass
class ReadoutOutput:
    """What a readout returns: depth and uncertainty (H, W) float32 meters on the RGB grid, and statistics
    (counts, `timings` in seconds per stage)."""

    depth: np.ndarray
    uncertainty: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompletionResult:
    """Result of `complete`: depth and uncertainty (H, W) float32 meters at the input RGB resolution (uncertainty
    0 at kept input pixels), and statistics (queries, flags, `timings` per stage, `pixels_per_s`)."""

    depth: np.ndarray
    uncertainty: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


Readout = Callable[[Any, Any, np.ndarray, np.ndarray, ReadoutSettings, bool], ReadoutOutput]
READOUTS: dict[str, Readout] = {}


def register_readout(name: str) -> Callable[[Readout], Readout]:
    """Function decorator: make a readout `(model, processor, rgb, sparse, settings, progress) -> ReadoutOutput`
    available as `complete(..., readout=name)`; `sparse` is on the RGB grid, (H, W) meters, 0 = missing."""

    def wrap(fn: Readout) -> Readout:
        READOUTS[name] = fn
        return fn

    return wrap


def chat_layout(model, tokenizer) -> ChatLayout:
    """The `ChatLayout` of a DepthVLM checkpoint: its template, query mode, decimals and pointer token."""
    cfg = model.depth_cfg
    if cfg.query_mode == "pointer":
        token_id = tokenizer.convert_tokens_to_ids(cfg.pointer_token)
        if token_id is None or token_id != model.pointer_token_id:
            raise ModelError(
                f"pointer mode: the tokenizer's {cfg.pointer_token} ({token_id}) is not the model's pointer token "
                f"({model.pointer_token_id}); load the checkpoint with its own processor"
            )
    return ChatLayout.from_branch_config(tokenizer, cfg)


def pixel_queries(
    layout: ChatLayout, processor, sparse: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> list[QueryTokens]:
    """Query blocks for pixels (rows, cols) of an image with input depth `sparse` (H, W) meters: a keep query with
    the given depth where the input is valid, a fill query elsewhere."""
    from vlm_depth.prompts.textualize import Query

    queries = []
    for row, col in zip(rows.tolist(), cols.tolist()):
        given = float(sparse[row, col])
        query = Query(col, row, "keep", given) if given > 0 else Query(col, row, "fill")
        queries.append(layout.query_tokens(query, processor.to_grid_xy(col, row, sparse.shape)))
    return queries


@register_readout("query")
def query_readout(
    model, processor, rgb: np.ndarray, sparse: np.ndarray, settings: ReadoutSettings, progress: bool = False
) -> ReadoutOutput:
    """Pixel-query readout (see the module docstring). sparse: (H, W) meters on the RGB grid, 0 = missing."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    layout = chat_layout(model, processor.tokenizer)
    decoder = QueryDecoder(model, layout, max_queries_per_pass=settings.max_queries_per_pass, packing=settings.packing)
    valid = valid_mask(sparse)
    inputs = processor(rgb, sparse if valid.any() else None, text=layout.prefix_text())
    prefix = decoder.encode_prefix(inputs)
    timings["prefix_s"] = time.perf_counter() - start

    stride = settings.stride or stride_for_budget(sparse.shape, settings.num_queries)
    askable = np.ones_like(valid) if settings.refine_keep else ~valid

    def ask(rows: np.ndarray, cols: np.ndarray) -> QueryAnswers:
        queries = pixel_queries(layout, processor, sparse, rows, cols)
        return _within_range(decoder.decode(prefix, queries, progress), model)

    def fill(rows: np.ndarray, cols: np.ndarray, answers: QueryAnswers) -> tuple[np.ndarray, np.ndarray]:
        return assemble(rgb, sparse, rows, cols, answers.value, answers.spread, radius=stride)

    start = time.perf_counter()
    rows, cols = cell_pixels(askable, stride)
    answers = ask(rows, cols)
    timings["decode_s"] = time.perf_counter() - start
    start = time.perf_counter()
    depth, uncertainty = fill(rows, cols, answers)
    timings["assemble_s"] = time.perf_counter() - start
    if settings.refine_queries > 0:
        start = time.perf_counter()
        askable[rows, cols] = False
        extra_rows, extra_cols = refinement_pixels(
            rgb, uncertainty, depth, askable, stride, settings.refine_queries, settings.refine_by
        )
        answers = QueryAnswers.concat([answers, ask(extra_rows, extra_cols)])
        rows, cols = np.concatenate([rows, extra_rows]), np.concatenate([cols, extra_cols])
        timings["refine_decode_s"] = time.perf_counter() - start
        start = time.perf_counter()
        depth, uncertainty = fill(rows, cols, answers)
        timings["assemble_s"] += time.perf_counter() - start
    counts = answers.counts()
    if counts["unparseable"] or counts["clipped"]:
        logger.warning(
            "%d of %d answers unparseable (no prediction), %d clipped",
            counts["unparseable"],
            counts["queries"],
            counts["clipped"],
        )
    return ReadoutOutput(depth, uncertainty, {"stride": stride, **counts, "timings": timings})


@register_readout("mdm")
def mdm_readout(
    model, processor, rgb: np.ndarray, sparse: np.ndarray, settings: ReadoutSettings, progress: bool = False
) -> ReadoutOutput:
    """MDM-head readout. sparse: (H, W) meters on the RGB grid, 0 = missing; no patch is masked at inference (the
    missing depth is the natural mask, all zero = monocular). Depth above the checkpoint's `max_depth` is clipped to
    it (counted as `clipped`); uncertainty is NaN (the head has none)."""
    start = time.perf_counter()
    inputs = processor(rgb, sparse)
    keys = ("pixel_values", "image_grid_thw", "depth_values")
    pixel_values, grid_thw, depth_values = (inputs[k].to(model.device) for k in keys)
    with torch.no_grad():
        depth = model.mdm_depth(pixel_values, grid_thw, depth_values, out_sizes=[rgb.shape[:2]])[0]
    depth = depth.float().cpu().numpy()
    limit = np.float32(model.depth_cfg.max_depth)
    stats = {"queries": 0, "clipped": int((depth > limit).sum()), "timings": {"mdm_s": time.perf_counter() - start}}
    return ReadoutOutput(np.minimum(depth, limit), np.full(depth.shape, np.nan, np.float32), stats)


def _within_range(answers: QueryAnswers, model) -> QueryAnswers:
    """Answers beyond the checkpoint's `max_depth` (meters) are clipped to it and flagged `FLAG_CLIPPED`."""
    limit = model.depth_cfg.max_depth
    far = answers.value > limit
    answers.flags[far] |= FLAG_CLIPPED
    answers.value = np.minimum(answers.value, np.float32(limit))
    answers.expected = np.minimum(answers.expected, np.float32(limit))
    return answers


def _refuse_all_nan(depth: np.ndarray, name: str) -> None:
    """An all-NaN/inf depth map is a broken file, not "no depth" (monocular input is all zeros): refuse it."""
    if depth.size and np.issubdtype(depth.dtype, np.floating) and not np.isfinite(depth).any():
        raise DataError(f"{name}: the depth map has no finite value (all NaN/inf); for monocular input pass zeros")


def _sparse_on_rgb_grid(rgb: np.ndarray, sparse: np.ndarray | None, name: str) -> np.ndarray:
    """(H, W) float32 meters on the RGB grid (0 = missing; None = monocular); another resolution is resized by
    `RGBDSample` (same aspect ratio only, nearest valid value, nothing invented)."""
    if sparse is None:
        return np.zeros(rgb.shape[:2], dtype=np.float32)
    sparse = np.asarray(sparse)
    _refuse_all_nan(sparse, name)
    return RGBDSample(rgb=rgb, depth=sparse, name=name).depth_at_rgb_resolution()


def complete(
    model,
    processor,
    rgb: np.ndarray,
    sparse: np.ndarray | None = None,
    readout: str = "query",
    *,
    settings: ReadoutSettings | None = None,
    progress: bool = False,
    name: str = "input",
) -> CompletionResult:
    """Dense metric depth for `rgb` (H, W, 3) uint8 from `sparse` (h, w) float32 meters (0 = missing; None or all
    zero = monocular; another resolution with the same aspect ratio is resized without inventing values).

    Returns depth and uncertainty (H, W) float32 meters at the RGB resolution; valid input pixels are returned
    unchanged (uncertainty 0) unless `settings.refine_keep`. `model`: a DepthVLM in eval mode; `processor`: its
    DepthProcessor; `readout`: a name in `READOUTS`.
    """
    if readout not in READOUTS:
        raise ConfigError(f"unknown readout {readout!r}; available: {sorted(READOUTS)}")
    settings = settings or ReadoutSettings()
    start = time.perf_counter()
    sparse = _sparse_on_rgb_grid(rgb, sparse, name)
    out = READOUTS[readout](model, processor, rgb, sparse, settings, progress)
    depth, uncertainty = out.depth.astype(np.float32), out.uncertainty.astype(np.float32)
    if not settings.refine_keep:
        depth, uncertainty = keep_input(depth, sparse, uncertainty)
    elapsed = time.perf_counter() - start
    stats = {**out.stats, "readout": readout, "seconds": elapsed, "pixels_per_s": depth.size / max(elapsed, 1e-9)}
    return CompletionResult(depth, uncertainty, stats)


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available else cpu; anything else as given (e.g. `cuda:1`)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}") from err


def load_checkpoint(path: str, device: str = "auto"):
    """(DepthVLM in eval mode, DepthProcessor) of a checkpoint folder, on `device` (bf16 on GPU, fp32 on CPU)."""
    from vlm_depth.model.depth_vlm import DepthVLM
    from vlm_depth.model.pointer import add_pointer_token
    from vlm_depth.model.processor import DepthProcessor

    if not path:
        raise ConfigError("--model is required: a vlm-depth or Qwen2.5-VL checkpoint folder")
    local = Path(path)
    if (local.exists() or local.is_absolute() or path.startswith(".")) and not local.is_dir():
        raise ModelError(f"{path}: checkpoint folder not found")
    target = resolve_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    model = DepthVLM.from_pretrained(path, dtype=dtype).to(target).eval()
    processor = DepthProcessor.from_pretrained(path, template=model.depth_cfg.template)
    if model.depth_cfg.query_mode == "pointer":
        add_pointer_token(model, processor.tokenizer)
    return model, processor


def make_predictor(
    model_path: str, readout: str = "query", settings: ReadoutSettings | None = None, device: str = "auto"
) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load a checkpoint once; return `predict(rgb, sparse) -> (depth, uncertainty)`, both (H, W) float32 meters at
    the RGB resolution (see `complete`)."""
    if readout not in READOUTS:
        raise ConfigError(f"unknown readout {readout!r}; available: {sorted(READOUTS)}")
    model, processor = load_checkpoint(model_path, device)

    def predict(rgb: np.ndarray, sparse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = complete(model, processor, rgb, sparse, readout, settings=settings)
        return result.depth, result.uncertainty

    return predict


# ---------------------------------------------------------------------------------------------- `vlm-depth complete`
def _parse_intrinsics(text: str) -> tuple[float, float, float, float] | None:
    """`fx,fy,cx,cy` in pixels, or a file understood by `read_intrinsics`; empty -> None."""
    from vlm_depth.data.depth_io import read_intrinsics

    if not text:
        return None
    parts = text.split(",")
    if len(parts) == 1:
        return read_intrinsics(text)
    try:
        values = tuple(float(v) for v in parts)
    except ValueError as err:
        raise ConfigError(f"intrinsics must be 'fx,fy,cx,cy' or a file, got {text!r}") from err
    if len(values) != 4:
        raise ConfigError(f"intrinsics must be 'fx,fy,cx,cy' or a file, got {text!r}")
    return values  # type: ignore[return-value]


def _pair_sample(cfg: CompleteConfig) -> RGBDSample:
    """The `--rgb/--depth` pair as an RGBDSample (depth read once at the edge: PNG / depth_scale, or .npy meters)."""
    from vlm_depth.data.depth_io import read_depth, read_rgb

    rgb = read_rgb(cfg.rgb)
    depth = np.zeros(rgb.shape[:2], np.float32)
    if cfg.depth:
        depth = read_depth(cfg.depth, scale=cfg.depth_scale)
        _refuse_all_nan(depth, cfg.depth)
    return RGBDSample(rgb=rgb, depth=depth, intrinsics=_parse_intrinsics(cfg.intrinsics), name=Path(cfg.rgb).stem)


def _samples(cfg: CompleteConfig) -> tuple[int, Iterator[RGBDSample]]:
    """Number of frames to complete and an iterator over them: one pair, or a dataset's frames (read lazily)."""
    from vlm_depth.data import load

    if bool(cfg.rgb) == bool(cfg.dataset):
        raise ConfigError("give either --rgb (with --depth, or none for monocular) or --dataset KIND:PATH")
    if cfg.rgb:
        return 1, iter([_pair_sample(cfg)])
    options = {"depth_scale": cfg.depth_scale} if cfg.dataset.partition(":")[0] == "folder" else {}
    dataset = load(cfg.dataset, **options)
    indices = range(len(dataset))[: cfg.limit or None]
    return len(indices), (dataset[i] for i in indices)


def run_complete(cfg: CompleteConfig) -> dict[str, Any]:
    """`vlm-depth complete`: complete every frame, write its files (see `outputs.write_completion`) and
    `summary.json` (timings per stage, queries, pixels/s) into `cfg.out`; returns the summary."""
    import json

    from vlm_depth.config import save_config
    from vlm_depth.infer.outputs import intrinsics_from_fov, parse_range, write_completion

    color_range = parse_range(cfg.color_range)
    count, samples = _samples(cfg)
    start = time.perf_counter()
    model, processor = load_checkpoint(cfg.model, cfg.device)
    load_s = time.perf_counter() - start
    out = Path(cfg.out)
    save_config(out, cfg)
    images, totals = [], {"seconds": 0.0, "write_s": 0.0, "pixels": 0, "queries": 0}
    for sample in tqdm(samples, total=count, desc="complete", unit="image"):
        sparse = sample.depth_at_rgb_resolution()
        result = complete(model, processor, sample.rgb, sparse, cfg.readout, settings=cfg, name=sample.name)
        start = time.perf_counter()
        intrinsics = sample.intrinsics
        if intrinsics is None and cfg.fov > 0:
            intrinsics = intrinsics_from_fov(sample.width, sample.height, cfg.fov)
        files = write_completion(
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
        images.append({"name": sample.name, **result.stats, "write_s": write_s, "files": files})
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
