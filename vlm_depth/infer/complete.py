"""Dense depth completion, the Python API: `complete(model, processor, rgb, sparse)` runs a readout
(`vlm_depth.infer.readouts`) and enforces "keep means keep" for every readout (valid input pixels are returned
unchanged unless `settings.refine_keep`); `make_predictor(path)` loads a checkpoint once for the evaluation runner.
The command `vlm-depth complete` is `vlm_depth.infer.run_complete`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlm_depth.data.sample import RGBDSample
from vlm_depth.depth import keep_input, require_finite
from vlm_depth.errors import ConfigError
from vlm_depth.infer.readouts import READOUTS, ReadoutSettings
from vlm_depth.model.loading import load_model


@dataclass
class CompletionResult:
    """Result of `complete`: depth and uncertainty (H, W) float32 meters at the input RGB resolution (uncertainty
    0 at kept input pixels), and statistics (queries, flags, `timings` per stage, `pixels_per_s`)."""

    depth: np.ndarray
    uncertainty: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def _sparse_on_rgb_grid(rgb: np.ndarray, sparse: np.ndarray | None, name: str) -> np.ndarray:
    """(H, W) float32 meters on the RGB grid (0 = missing; None = monocular); another resolution is resized by
    `RGBDSample` (same aspect ratio only, nearest valid value, nothing invented)."""
    if sparse is None:
        return np.zeros(rgb.shape[:2], dtype=np.float32)
    sparse = np.asarray(sparse)
    require_finite(sparse, name)
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


def make_predictor(
    model_path: str, readout: str = "query", settings: ReadoutSettings | None = None, device: str = "auto"
) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load a checkpoint once; return `predict(rgb, sparse) -> (depth, uncertainty)`, both (H, W) float32 meters at
    the RGB resolution (see `complete`)."""
    if readout not in READOUTS:
        raise ConfigError(f"unknown readout {readout!r}; available: {sorted(READOUTS)}")
    model, processor = load_model(model_path, device=device)

    def predict(rgb: np.ndarray, sparse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = complete(model, processor, rgb, sparse, readout, settings=settings)
        return result.depth, result.uncertainty

    return predict
