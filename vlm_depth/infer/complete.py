"""Dense depth completion, the Python API: `complete(model, processor, rgb, sparse)` runs a readout
(`vlm_depth.infer.readouts`) and enforces "keep means keep" for every readout (valid input pixels are returned
unchanged unless `settings.refine_keep`); `make_predictor(path)` loads a checkpoint once for the evaluation runner.
The command `vlm-depth complete` is `vlm_depth.infer.run_complete`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlm_depth.data.sample import RGBDSample
from vlm_depth.depth import keep_input, valid_mask
from vlm_depth.errors import ConfigError, InputTooLargeError
from vlm_depth.infer.readouts import READOUTS, ReadoutSettings
from vlm_depth.model.loading import load_model

logger = logging.getLogger(__name__)


@dataclass
class CompletionResult:
    """Result of `complete`: depth and uncertainty (H, W) float32 meters at the input RGB resolution (uncertainty
    0 at kept input pixels), and statistics (queries, flags, `timings` per stage, `pixels_per_s`)."""

    depth: np.ndarray
    uncertainty: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def check_input_pixels(shape: tuple[int, ...], budget: int, what: str) -> None:
    """InputTooLargeError when an image of `shape` (H, W[, C]) has more than `budget` pixels (0 = no limit)."""
    if budget and len(shape) >= 2 and shape[0] * shape[1] > budget:
        height, width = shape[:2]
        raise InputTooLargeError(
            f"{what}: {width}x{height} = {height * width / 1e6:.1f} MP is above the input pixel budget "
            f"max_input_pixels = {budget / 1e6:.1f} MP (about 250 bytes of memory per pixel); downscale the image "
            "or raise --max_input_pixels"
        )


def _entered(rgb: np.ndarray, sparse: np.ndarray | None, name: str, budget: int) -> RGBDSample:
    """The inputs of `complete` as they enter the package: within the pixel budget, then checked and converted by
    `RGBDSample` (any strides; depth of another resolution with the same aspect ratio is resized later)."""
    check_input_pixels(np.shape(rgb), budget, name)
    rgb = np.asarray(rgb)
    depth = np.zeros(rgb.shape[:2], np.float32) if sparse is None else sparse
    return RGBDSample(rgb=rgb, depth=depth, name=name)


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
    zero = monocular, the latter with a warning; another resolution with the same aspect ratio is resized without
    inventing values). Arrays of any strides are accepted.

    Returns depth and uncertainty (H, W) float32 meters at the RGB resolution; valid input pixels are returned
    unchanged (uncertainty 0) unless `settings.refine_keep`. `model`: a DepthVLM in eval mode; `processor`: its
    DepthProcessor; `readout`: a name in `READOUTS`. Raises DataError (ImplausibleDepthError for depth that is not
    meters) for bad inputs and InputTooLargeError above `settings.max_input_pixels`.
    """
    if readout not in READOUTS:
        raise ConfigError(f"unknown readout {readout!r}; available: {sorted(READOUTS)}")
    settings = settings or ReadoutSettings()
    start = time.perf_counter()
    sample = _entered(rgb, sparse, name, settings.max_input_pixels)
    rgb, given = sample.rgb, sparse is not None
    sparse = sample.depth_at_rgb_resolution()
    if given and not valid_mask(sparse).any():
        logger.warning("%s: no valid depth pixel in the input: completing as monocular", name)
    out = READOUTS[readout](model, processor, rgb, sparse, settings, progress)
    depth, uncertainty = out.depth.astype(np.float32), out.uncertainty.astype(np.float32)
    if not settings.refine_keep:
        depth, uncertainty = keep_input(depth, sparse, uncertainty)
    elapsed = time.perf_counter() - start
    stats = {**out.stats, "readout": readout, "seconds": elapsed, "pixels_per_s": depth.size / max(elapsed, 1e-9)}
    return CompletionResult(depth, uncertainty, stats)


def make_predictor(
    model_path: str,
    readout: str = "query",
    settings: ReadoutSettings | None = None,
    device: str = "auto",
    base_model: str | None = None,
) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load a checkpoint once (`base_model`: the base of a LoRA checkpoint, see `load_model`); return
    `predict(rgb, sparse) -> (depth, uncertainty)`, both (H, W) float32 meters at the RGB resolution (see
    `complete`)."""
    if readout not in READOUTS:
        raise ConfigError(f"unknown readout {readout!r}; available: {sorted(READOUTS)}")
    model, processor = load_model(model_path, device=device, base_model=base_model or None)

    def predict(rgb: np.ndarray, sparse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = complete(model, processor, rgb, sparse, readout, settings=settings)
        return result.depth, result.uncertainty

    return predict
