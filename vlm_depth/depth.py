"""The depth floor: what a depth value means, decided once for the whole package.

Inside vlm-depth depth is float32 meters, shape (H, W); 0, negative or non-finite = "no measurement". Every module
asks this one for validity (`valid_mask`), cleaning (`sanitize_depth`), plausibility at the edge where depth enters
(`check_depth_values`: meters, not another unit), "keep means keep" (`keep_input`), whether a
depth grid covers the RGB field of view (`same_aspect`), and how depth is coloured for people (`depth_range`,
`colorize`). Conversions from file encodings happen at the I/O edge (`vlm_depth.data.depth_io`), never here.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vlm_depth.errors import ConfigError, DataError, ImplausibleDepthError

logger = logging.getLogger(__name__)

Array = np.ndarray | torch.Tensor

# Largest relative difference between two aspect ratios that still counts as "the same field of view" (a depth grid
# of another resolution than the RGB is resized onto it only then).
ASPECT_TOLERANCE = 0.01

# Plausible metric depth: no sensor or benchmark measures beyond MAX_PLAUSIBLE_M, and no camera sees a scene whose
# every point is nearer than MIN_PLAUSIBLE_M (that is a unit error, e.g. a whole-meter PNG of a room divided by 1000).
MAX_PLAUSIBLE_M = 1000.0
MIN_PLAUSIBLE_M = 0.01
UNIT_HINT = (
    "not meters? Integer depth files are divided by --depth_scale (units per meter: 1000 for millimetres, 256 for "
    "KITTI); float .npy/HDF5 files and arrays must hold meters"
)


def valid_mask(depth: Array, min_depth: float | None = None, max_depth: float | None = None) -> Array:
    """Measured pixels of `depth` (any shape, meters): finite, > 0 and inside [min_depth, max_depth] (inclusive;
    a bound that is None or <= 0 is not applied).

    0, NaN, +-inf and negative values are "no measurement". Returns a bool array of the same type (NumPy or torch,
    same device) and shape.
    """
    if isinstance(depth, torch.Tensor):
        valid = torch.isfinite(depth) & (depth > 0)
    else:
        depth = np.asarray(depth)
        with np.errstate(invalid="ignore"):
            valid = np.isfinite(depth) & (depth > 0)
    if min_depth is not None and min_depth > 0:
        valid &= depth >= min_depth
    if max_depth is not None and max_depth > 0:
        valid &= depth <= max_depth
    return valid


def sanitize_depth(depth: np.ndarray, what: str) -> np.ndarray:
    """`depth` as float32 meters with NaN/inf/negative values set to 0 (missing), logging how many.

    depth: (h, w) floating array in meters. Integer arrays are refused: they are raw sensor units, not meters, and
    must be converted at the I/O edge (`vlm_depth.data.depth_io.read_depth` with a scale). Never modifies the input.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise DataError(f"{what}: depth must have shape (H, W), got {depth.shape}")
    if not np.issubdtype(depth.dtype, np.floating):
        raise DataError(
            f"{what}: depth must be floating-point meters, got {depth.dtype} "
            "(raw sensor units; convert with read_depth(path, scale=...))"
        )
    depth = depth.astype(np.float32, copy=False)
    bad = ~valid_mask(depth) & (depth != 0)
    n_bad = int(bad.sum())
    if n_bad:
        logger.warning("%s: %d NaN/inf/negative depth values set to 0 (missing)", what, n_bad)
        depth = np.where(bad, np.float32(0), depth)
    return depth


def check_depth_values(depth: np.ndarray, what: str) -> None:
    """Refuse a (floating-point, meters) depth map whose values cannot be metric depth, naming `what`:
    DataError when it has values but none is finite (all NaN/inf) or none is positive but some are negative (a
    broken file, sign or encoding, not "no depth": monocular input is all zeros); ImplausibleDepthError when a
    value exceeds `MAX_PLAUSIBLE_M` or every valid value is below `MIN_PLAUSIBLE_M` (a wrong unit or scale)."""
    depth = np.asarray(depth)
    if not depth.size or not np.issubdtype(depth.dtype, np.floating):
        return  # shapes and dtypes are checked where the arrays are typed (`sanitize_depth`)
    finite = np.isfinite(depth)
    if not finite.any():
        raise DataError(f"{what}: the depth map has no finite value (all NaN/inf); for monocular input pass zeros")
    valid = finite & (depth > 0)
    if not valid.any():
        if (depth[finite] < 0).any():
            raise DataError(
                f"{what}: no positive depth (every measured value is negative): a wrong sign or encoding; for "
                "monocular input pass zeros"
            )
        return
    top = float(depth[valid].max())
    if top > MAX_PLAUSIBLE_M:
        raise ImplausibleDepthError(f"{what}: depth up to {top:.4g} m (> {MAX_PLAUSIBLE_M:,.0f} m): {UNIT_HINT}")
    if top < MIN_PLAUSIBLE_M:
        raise ImplausibleDepthError(f"{what}: every depth is below 1 cm (at most {top:.3g} m): {UNIT_HINT}")


def keep_input(
    depth: np.ndarray, sparse: np.ndarray, uncertainty: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """ "Keep means keep": the valid pixels of the input `sparse` (H, W) meters replace those of a completed `depth`
    (H, W) meters, and the `uncertainty` (H, W) meters there becomes 0. Returns float32 (depth, uncertainty)."""
    valid = valid_mask(sparse)
    depth = np.where(valid, sparse, depth).astype(np.float32)
    if uncertainty is not None:
        uncertainty = np.where(valid, np.float32(0), uncertainty).astype(np.float32)
    return depth, uncertainty


def same_aspect(shape: tuple[int, ...], other: tuple[int, ...]) -> bool:
    """True when two (H, W[, ...]) grids have aspect ratios within `ASPECT_TOLERANCE` (same field of view)."""
    (h, w), (h2, w2) = shape[:2], other[:2]
    return abs((w / h) / (w2 / h2) - 1) <= ASPECT_TOLERANCE


def depth_range(values: np.ndarray, fixed: tuple[float, float] | None = None) -> tuple[float, float]:
    """Colour range (meters) of a depth map: `fixed` if given, else the 2nd-98th percentile of its valid values."""
    if fixed is not None:
        return fixed
    valid = values[valid_mask(values)]
    if valid.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(valid, [2, 98])
    return float(low), float(max(high, low + 1e-3))


def colormap(name: str):
    """The matplotlib colormap `name`; ConfigError naming `--colormap` when there is none."""
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError as err:
        raise ConfigError(f"--colormap: unknown matplotlib colormap {name!r} (e.g. turbo, viridis, magma)") from err


def colorize(
    values: np.ndarray, vrange: tuple[float, float], cmap: str = "turbo", valid: np.ndarray | None = None
) -> np.ndarray:
    """(H, W) values -> (H, W, 3) uint8 RGB through the matplotlib colormap `cmap` over `vrange`; pixels outside
    `valid` (default: `valid_mask(values)`, i.e. missing depth) are black."""
    colors = colormap(cmap)
    low, high = vrange
    valid = valid_mask(values) if valid is None else valid
    scaled = np.clip((np.where(valid, values, low) - low) / (high - low), 0.0, 1.0)
    rgb = (colors(scaled)[..., :3] * 255.0 + 0.5).astype(np.uint8)
    rgb[~valid] = 0
    return rgb
