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


def compare_panel(
    rgb: np.ndarray,
    sparse: np.ndarray,
    depth: np.ndarray,
    uncertainty: np.ndarray,
    vrange: tuple[float, float],
    cmap: str = "turbo",
) -> np.ndarray:
    """(H, 4 W, 3) uint8: RGB | input depth | completed depth (same colour range) | uncertainty, labelled."""
    unc_range = depth_range(uncertainty)
    tiles = [
        ("RGB", rgb),
        ("input depth", colorize(sparse, vrange, cmap)),
        ("completed depth", colorize(depth, vrange, cmap)),
        ("uncertainty", colorize(uncertainty, (0.0, unc_range[1]), "magma")),
    ]
    scale = max(0.4, rgb.shape[0] / 480)
    labelled = []
    for label, tile in tiles:
        tile = np.ascontiguousarray(tile)
        for color, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
            cv2.putText(tile, label, (8, int(24 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.7 * scale, color, thickness)
        labelled.append(tile)
    return np.concatenate(labelled, axis=1)


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
) -> dict[str, str]:
    """Write NAME_depth.png (uint16 mm), NAME_depth.npy (float32 m), NAME_color.png, NAME_uncertainty.png,
    NAME_compare.png and, with `intrinsics`, NAME.ply into `out_dir`; returns {kind: path}.

    rgb (H, W, 3) uint8; sparse, depth, uncertainty (H, W) meters on the RGB grid. color_range: fixed (min, max)
    meters, or None for the image's own range (2nd-98th percentile of the completed depth). Depth beyond 65.535 m
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
    unc_range = (0.0, depth_range(uncertainty)[1])
    paths = {
        "depth_png": write_depth_png(out / f"{name}_depth.png", np.where(beyond, 0, depth), scale=PNG_SCALE),
        "depth_npy": write_depth_npy(out / f"{name}_depth.npy", depth),
        "color": write_rgb(out / f"{name}_color.png", colorize(depth, vrange, cmap)),
        "uncertainty": write_rgb(out / f"{name}_uncertainty.png", colorize(uncertainty, unc_range, "magma")),
        "compare": write_rgb(
            out / f"{name}_compare.png", compare_panel(rgb, sparse, depth, uncertainty, vrange, cmap)
        ),
    }
    if intrinsics is not None:
        paths["ply"] = write_ply(out / f"{name}.ply", *point_cloud(depth, rgb, intrinsics))
    return {kind: str(path) for kind, path in paths.items()}
