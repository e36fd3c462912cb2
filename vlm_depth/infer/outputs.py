"""Files written by `vlm-depth complete` for one image: depth (16-bit PNG in millimetres and float32 .npy in meters),
colour maps, a comparison panel and a point cloud.

Depth files go through `vlm_depth.data.depth_io` (the one place of depth encodings); colours come from
`vlm_depth.depth.colorize` (matplotlib colormaps; missing depth is black).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from vlm_depth.data.depth_io import UINT16_MAX, write_depth_npy, write_depth_png, write_rgb
from vlm_depth.depth import colorize, depth_range, valid_mask
from vlm_depth.errors import ConfigError
from vlm_depth.files import atomic_write

Intrinsics = tuple[float, float, float, float]

logger = logging.getLogger(__name__)

PNG_SCALE = 1000.0  # NAME_depth.png holds millimetres


def parse_range(text: str) -> tuple[float, float] | None:
    """`"auto"` (or empty) -> None (per-image range); `"MIN,MAX"` meters -> a fixed range."""
    if text in ("", "auto"):
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as err:
        raise ConfigError(f"color_range must be 'auto' or 'MIN,MAX' in meters, got {text!r}") from err
    if not 0 <= low < high:
        raise ConfigError(f"color_range needs 0 <= MIN < MAX, got {text!r}")
    return low, high


UNCERTAINTY_CMAP = "viridis"  # its low end is not black, so certain pixels never read as missing ones
KEPT_GRAY = (150, 150, 150)  # uncertainty images: input pixels returned as given


def uncertainty_range(uncertainty: np.ndarray, sparse: np.ndarray) -> tuple[float, float]:
    """Colour range (meters) of an uncertainty map: 0 to the 98th percentile over the completed (not kept) pixels."""
    spread = uncertainty[np.isfinite(uncertainty) & ~_kept(uncertainty, sparse)]
    top = float(np.percentile(spread, 98)) if spread.size else 0.0
    return 0.0, max(top, 1e-3)


def _kept(uncertainty: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    return valid_mask(sparse) & (uncertainty == 0)


def uncertainty_image(uncertainty: np.ndarray, sparse: np.ndarray, urange: tuple[float, float]) -> np.ndarray:
    """(H, W, 3) uint8: the uncertainty (meters) over `urange` in `UNCERTAINTY_CMAP`, kept input pixels gray,
    pixels without an uncertainty (NaN, e.g. the MDM readout) black."""
    image = colorize(uncertainty, urange, UNCERTAINTY_CMAP, valid=np.isfinite(uncertainty))
    image[_kept(uncertainty, sparse)] = KEPT_GRAY
    return image


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float, outline: bool = True) -> None:
    colors = (((0, 0, 0), 3), ((255, 255, 255), 1)) if outline else (((0, 0, 0), 1),)
    for color, thickness in colors:
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, color, thickness, cv2.LINE_AA)


def _colour_bar(
    width: int, height: int, vrange: tuple[float, float], cmap: str, scale: float, note: str = ""
) -> np.ndarray:
    """A white strip (height, width, 3) with a horizontal colour bar over `vrange` (meters) and its end values."""
    strip = np.full((height, width, 3), 255, np.uint8)
    left, right, top = width // 20, width - width // 20, height // 8
    low, high = vrange
    ramp = np.linspace(low, high, right - left, dtype=np.float32)[None].repeat(height // 3, axis=0)
    strip[top : top + ramp.shape[0], left:right] = colorize(ramp, vrange, cmap, valid=np.ones(ramp.shape, bool))
    baseline = min(height - 4, top + ramp.shape[0] + int(20 * scale))
    _text(strip, f"{low:.2f} m", (left, baseline), scale, outline=False)
    label = f"{high:.2f} m" + (f"  {note}" if note else "")
    size = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, 1)[0][0]
    _text(strip, label, (max(left, right - size), baseline), scale, outline=False)
    return strip


def compare_panel(
    rgb: np.ndarray,
    sparse: np.ndarray,
    depth: np.ndarray,
    uncertainty: np.ndarray,
    vrange: tuple[float, float],
    cmap: str = "turbo",
    urange: tuple[float, float] | None = None,
) -> np.ndarray:
    """(H + bar, 4 W, 3) uint8: RGB | input depth | completed depth (one colour range) | uncertainty at full
    resolution, labelled, with a colour bar (range in meters) under each map; kept input pixels are gray in the
    uncertainty tile."""
    urange = urange or uncertainty_range(uncertainty, sparse)
    tiles = [rgb, colorize(sparse, vrange, cmap), colorize(depth, vrange, cmap)]
    tiles.append(uncertainty_image(uncertainty, sparse, urange))
    labels = ("RGB", "input depth", "completed depth", "uncertainty")
    scale = max(0.4, rgb.shape[0] / 480)
    height, width = rgb.shape[:2]
    bar = max(36, int(64 * scale))
    bars = [np.full((bar, width, 3), 255, np.uint8)]
    bars += [_colour_bar(width, bar, vrange, cmap, scale) for _ in range(2)]
    bars.append(_colour_bar(width, bar, urange, UNCERTAINTY_CMAP, scale, note="gray: kept"))
    columns = []
    for label, tile, strip in zip(labels, tiles, bars):
        tile = np.ascontiguousarray(tile)
        _text(tile, label, (8, int(24 * scale)), scale)
        columns.append(np.concatenate([tile, strip], axis=0))
    return np.concatenate(columns, axis=1)


def _write_npy(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, values, allow_pickle=False)
    return path


def intrinsics_from_fov(width: int, height: int, fov_deg: float) -> Intrinsics:
    """Pinhole intrinsics (fx, fy, cx, cy) of a width x height image with horizontal field of view `fov_deg`,
    square pixels and the principal point at the image centre (pixel centres at integers)."""
    if not 0 < fov_deg < 180:
        raise ConfigError(f"fov must be in (0, 180) degrees, got {fov_deg}")
    f = (width / 2) / np.tan(np.radians(fov_deg) / 2)
    return float(f), float(f), (width - 1) / 2, (height - 1) / 2


def point_cloud(depth: np.ndarray, rgb: np.ndarray, intrinsics: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Back-project valid depth (H, W) meters with (fx, fy, cx, cy): points (n, 3) float32 in meters in the camera
    frame (x right, y down, z forward) and their colours (n, 3) uint8."""
    fx, fy, cx, cy = intrinsics
    rows, cols = np.nonzero(valid_mask(depth))
    z = depth[rows, cols].astype(np.float32)
    points = np.stack([(cols - cx) / fx * z, (rows - cy) / fy * z, z], axis=1).astype(np.float32)
    return points, rgb[rows, cols]


def write_ply(path: str | Path, points: np.ndarray, colors: np.ndarray) -> Path:
    """Binary little-endian PLY with float32 x, y, z and uint8 red, green, blue per vertex."""
    path = Path(path)
    vertex = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    data = np.empty(len(points), dtype=vertex)
    for i, axis in enumerate("xyz"):
        data[axis] = points[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        data[channel] = colors[:, i]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(points)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    return atomic_write(path, header.encode("ascii") + data.tobytes())


def write_completion(
    out_dir: str | Path,
    name: str,
    rgb: np.ndarray,
    sparse: np.ndarray,
    depth: np.ndarray,
    uncertainty: np.ndarray,
    *,
    intrinsics: Intrinsics | None = None,
    color_range: tuple[float, float] | None = None,
    cmap: str = "turbo",
) -> tuple[dict[str, str], dict[str, list[float]]]:
    """Write NAME_depth.png (uint16 mm), NAME_depth.npy (float32 m), NAME_uncertainty.npy (float32 m, 0 at kept
    input pixels, NaN without an uncertainty), NAME_color.png, NAME_uncertainty.png, NAME_compare.png and, with
    `intrinsics`, NAME.ply into `out_dir`; returns ({kind: path}, the colour ranges in meters of the depth and the
    uncertainty images).

    rgb (H, W, 3) uint8; sparse, depth, uncertainty (H, W) meters on the RGB grid. color_range: fixed (min, max)
    meters, or None for the image's own range (2nd-98th percentile of the completed depth); the uncertainty image
    runs from 0 to the 98th percentile of the completed pixels' uncertainty. Depth beyond 65.535 m
    does not fit the 16-bit millimetre PNG: it is 0 (missing) there, with a logged warning; the .npy keeps it.
    """
    out = Path(out_dir)
    beyond = depth * PNG_SCALE > UINT16_MAX
    if beyond.any():
        logger.warning(
            "%s: %d pixels beyond %.3f m are 0 (missing) in the 16-bit PNG; the .npy keeps them",
            name,
            int(beyond.sum()),
            UINT16_MAX / PNG_SCALE,
        )
    vrange = depth_range(depth, color_range)
    urange = uncertainty_range(uncertainty, sparse)
    paths = {
        "depth_png": write_depth_png(out / f"{name}_depth.png", np.where(beyond, 0, depth), scale=PNG_SCALE),
        "depth_npy": write_depth_npy(out / f"{name}_depth.npy", depth),
        "uncertainty_npy": _write_npy(out / f"{name}_uncertainty.npy", uncertainty.astype(np.float32)),
        "color": write_rgb(out / f"{name}_color.png", colorize(depth, vrange, cmap)),
        "uncertainty": write_rgb(out / f"{name}_uncertainty.png", uncertainty_image(uncertainty, sparse, urange)),
        "compare": write_rgb(
            out / f"{name}_compare.png", compare_panel(rgb, sparse, depth, uncertainty, vrange, cmap, urange)
        ),
    }
    if intrinsics is not None:
        paths["ply"] = write_ply(out / f"{name}.ply", *point_cloud(depth, rgb, intrinsics))
    ranges = {"depth_range_m": list(vrange), "uncertainty_range_m": list(urange)}
    return {kind: str(path) for kind, path in paths.items()}, ranges
