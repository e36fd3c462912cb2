"""Readouts: ways to turn (model, processor, rgb, sparse) into a dense depth and uncertainty on the RGB grid, each a
small function registered in `READOUTS` (`complete(..., readout=name)`), and their settings (`ReadoutSettings`).

- `query` (default): the image prefix is encoded once, one pixel per grid cell with missing input (plus optional
  edge/uncertainty-driven extra pixels) is asked "what is the distance?" through `QueryDecoder`, and `assemble`
  fills between the answers with RGB-guided filtering. A zero-depth input is monocular mode: every cell is asked.
- `mdm`: the dense MDM head (`vlm_depth.model.mdm_head`, checkpoints trained with `mdm_mode` head_only/joint): one
  vision-tower pass with the sparse depth, the head's map upsampled to the RGB grid; no per-pixel uncertainty (NaN).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from vlm_depth.config import check_options, option
from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.infer.answers import FLAG_CLIPPED, QueryAnswers
from vlm_depth.infer.assemble import assemble, cell_pixels, refinement_pixels, stride_for_budget
from vlm_depth.infer.decoder import Packing, QueryDecoder
from vlm_depth.model.measure import clock
from vlm_depth.prompts.chat import ChatLayout, QueryTokens

logger = logging.getLogger(__name__)


@dataclass
class ReadoutSettings:
    """How a dense map is read out of the model (`complete(..., settings=)`); the first options of `complete`."""

    query_budget: int = option("Grid query budget: the smallest stride with at most this many points.", default=4096)
    stride: int = option("Grid stride in pixels (overrides query_budget when > 0).", default=0)
    refine_queries: int = option("Extra queries at image edges / high uncertainty after the grid.", default=0)
    refine_by: Literal["edges", "uncertainty", "both"] = option(
        "What places the extra queries: edges, uncertainty or both.", default="both"
    )
    max_queries_per_pass: int = option(
        "Queries decoded together against the cached prefix (memory); -1 = the device's default: 128 on a CPU, on a "
        "GPU as many as fit half its free memory (128-4096).",
        default=-1,
    )
    packing: Packing = option("Decoder layout: batch (a query per row) or packed (a chunk per row).", default="batch")
    refine_keep: bool = option("Query valid input pixels too and smooth them (default: keep them).", default=False)
    check_forced: bool = option(
        "Also project every decoded position on the whole vocabulary to count answers whose number the grammar "
        "forced (stats `forced`); off: only the 11 number tokens are computed and `forced` is null.",
        default=False,
    )
    max_input_pixels: int = option(
        "Largest input image in pixels (0 = no limit). A completion needs about 250 bytes of memory per input pixel, "
        "so the default 16 MP (4K video frames, 12 MP photos) stays near 4 GB; downscale larger images.",
        default=16_000_000,
    )

    def __post_init__(self) -> None:
        minimums = {"query_budget": 1, "stride": 0, "refine_queries": 0, "max_queries_per_pass": -1}
        check_options(self, minimums | {"max_input_pixels": 0})
        if self.max_queries_per_pass == 0:
            raise ConfigError("--max_queries_per_pass must be >= 1, or -1 for the device's default; got 0")


@dataclass
class ReadoutOutput:
    """What a readout returns: depth and uncertainty (H, W) float32 meters on the RGB grid, and statistics
    (counts, `timings` in seconds per stage)."""

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
    device = model.device  # clock() waits for its queued kernels, so each phase is charged its own GPU work
    start = clock(device)
    layout = chat_layout(model, processor.tokenizer)
    decoder = QueryDecoder(
        model,
        layout,
        max_queries_per_pass=settings.max_queries_per_pass,
        packing=settings.packing,
        check_forced=settings.check_forced,
    )
    valid = valid_mask(sparse)
    inputs = processor(rgb, sparse if valid.any() else None, text=layout.prefix_text())
    prefix = decoder.encode_prefix(inputs)
    timings["prefix_s"] = clock(device) - start

    stride = settings.stride or stride_for_budget(sparse.shape, settings.query_budget)
    askable = np.ones_like(valid) if settings.refine_keep else ~valid

    def ask(rows: np.ndarray, cols: np.ndarray) -> QueryAnswers:
        queries = pixel_queries(layout, processor, sparse, rows, cols)
        return _within_range(decoder.decode(prefix, queries, progress), model)

    def fill(rows: np.ndarray, cols: np.ndarray, answers: QueryAnswers) -> tuple[np.ndarray, np.ndarray]:
        return assemble(rgb, sparse, rows, cols, answers.value, answers.spread, radius=stride)

    start = clock(device)
    rows, cols = cell_pixels(askable, stride)
    answers = ask(rows, cols)
    timings["decode_s"] = clock(device) - start
    start = clock(device)
    depth, uncertainty = fill(rows, cols, answers)
    timings["assemble_s"] = clock(device) - start
    if settings.refine_queries > 0:
        start = clock(device)
        askable[rows, cols] = False
        extra_rows, extra_cols = refinement_pixels(
            rgb, uncertainty, depth, askable, stride, settings.refine_queries, settings.refine_by
        )
        answers = QueryAnswers.concat([answers, ask(extra_rows, extra_cols)])
        rows, cols = np.concatenate([rows, extra_rows]), np.concatenate([cols, extra_cols])
        timings["refine_decode_s"] = clock(device) - start
        start = clock(device)
        depth, uncertainty = fill(rows, cols, answers)
        timings["assemble_s"] += clock(device) - start
    counts = answers.counts() | ({} if settings.check_forced else {"forced": None})
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
    keys = ("pixel_values", "image_grid_thw", "depth_maps")
    pixel_values, grid_thw, depth_maps = (inputs[k].to(model.device) for k in keys)
    with torch.no_grad():
        depth = model.mdm_depth(pixel_values, grid_thw, depth_maps, out_sizes=[rgb.shape[:2]])[0]
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
