"""`RGBDSample`: one RGB image with its depth input, optional ground truth and camera, in the package's units.

Depth is float32 meters, shape (h, w), 0 = no measurement. The depth grid may differ from the RGB grid (e.g. a
256x192 iPad LiDAR map with a 1920x1440 image); it stays at its own resolution until something asks for it at the
RGB resolution, and that request never stretches it silently.

Pixel-coordinate convention: pixel (i, j) has its centre at (x, y) = (j, i) (OpenCV), so an image of width W spans
x in [-0.5, W - 0.5].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlm_depth.depth import check_depth_values, same_aspect, sanitize_depth
from vlm_depth.errors import DataError

Intrinsics = tuple[float, float, float, float]

MIN_IMAGE_SIDE = 28  # one 2x2 merge of 14-pixel patches: the smallest image a Qwen2.5-VL grid holds
MAX_ASPECT = 200  # Qwen2.5-VL's smart_resize refuses more elongated images


def scalar_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """JSON-able copy of the non-array entries of a sample's `meta` (numpy scalars -> Python, tuples -> lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in meta.items() if not isinstance(v, np.ndarray)}


def scale_intrinsics(intrinsics: Intrinsics, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Intrinsics:
    """(fx, fy, cx, cy) in pixels of an image of size `from_hw` -> the same camera on a resized grid `to_hw`.

    Uses the pixel-centre convention of this module: cx' = (cx + 0.5) * sx - 0.5.
    """
    fx, fy, cx, cy = intrinsics
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return (fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5)


def _check_image_size(shape: tuple[int, ...], what: str) -> None:
    """DataError for an RGB image that Qwen2.5-VL cannot take: empty, a side below `MIN_IMAGE_SIDE` pixels, or an
    aspect ratio above `MAX_ASPECT`."""
    height, width = shape[:2]
    if not height or not width:
        raise DataError(f"{what}: the image is empty ({width}x{height} pixels)")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise DataError(
            f"{what}: the image is {width}x{height} pixels, an aspect ratio above {MAX_ASPECT}:1, which Qwen2.5-VL "
            "does not take; crop it"
        )
    if min(height, width) < MIN_IMAGE_SIDE:
        raise DataError(
            f"{what}: the image is {width}x{height} pixels, too small: at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
        )


def _check_intrinsics(intrinsics: Any, what: str) -> Intrinsics | None:
    if intrinsics is None:
        return None
    values = tuple(float(v) for v in np.asarray(intrinsics, dtype=np.float64).reshape(-1))
    if len(values) != 4 or not all(np.isfinite(values)) or values[0] <= 0 or values[1] <= 0:
        raise DataError(f"{what}: intrinsics must be 4 finite numbers (fx, fy, cx, cy) with fx, fy > 0, got {values}")
    return values  # type: ignore[return-value]


@dataclass
class RGBDSample:
    """One RGB-D frame.

    rgb: (H, W, 3) uint8. depth: (h, w) float32 meters, the sensor/sparse input, 0 = missing; may differ in size
    from `rgb`. For datasets that ship no separate sensor input, `depth` is the ground truth itself (the same array
    as `gt`) and `meta["depth_is_gt"]` is True, so sparsity protocols know to subsample it.
    gt: (h, w) float32 meters or None, the reference for evaluation, 0 = no ground truth.
    intrinsics: (fx, fy, cx, cy) in pixels of the RGB image, or None when unknown.
    meta: dataset-specific extras; keys in use: `max_depth` (evaluation cap, m), `eval_crop` (top, bottom, left,
    right) rows/cols of the RGB grid, end-exclusive), `depth_intrinsics` (fx, fy, cx, cy of the depth grid when it is
    not simply the RGB camera resized), `depth_is_gt`, and per-pixel label maps such as `material` ((h, w) uint8).

    `__post_init__` is where every frame enters the package: it validates types, shapes and image size (at least
    28x28 pixels, aspect ratio up to 200:1), refuses depth that is not plausible meters (`check_depth_values`) and
    a depth grid whose aspect ratio differs from the RGB one unless `meta["depth_intrinsics"]` says how they align,
    replaces NaN/inf/negative depth by 0 with a logged count, and stores C-ordered arrays.
    """

    rgb: np.ndarray
    depth: np.ndarray
    gt: np.ndarray | None = None
    intrinsics: Intrinsics | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        what = self.name or "RGBDSample"
        rgb = np.asarray(self.rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DataError(f"{what}: rgb must be a (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
        _check_image_size(rgb.shape, what)
        self.rgb = np.ascontiguousarray(rgb)  # any strides in (e.g. a flipped view), C order out
        self.meta = dict(self.meta)  # normalised below; never the caller's dict
        same = self.gt is not None and self.gt is self.depth
        self.depth = self._entered(self.depth, f"{what} depth")
        if self.gt is not None:
            self.gt = self.depth if same else self._entered(self.gt, f"{what} gt")
            if self.gt.shape != self.depth.shape:
                raise DataError(f"{what}: gt shape {self.gt.shape} differs from depth shape {self.depth.shape}")
        self.intrinsics = _check_intrinsics(self.intrinsics, what)
        if "depth_intrinsics" in self.meta:
            self.meta["depth_intrinsics"] = _check_intrinsics(self.meta["depth_intrinsics"], f"{what} depth")
        if not self.depth_matches_rgb and self.meta.get("depth_intrinsics") is None:
            self._check_same_aspect()
        if "eval_crop" in self.meta:
            top, bottom, left, right = (int(v) for v in self.meta["eval_crop"])
            if not (0 <= top < bottom <= self.height and 0 <= left < right <= self.width):
                raise DataError(
                    f"{what}: eval_crop {self.meta['eval_crop']} outside the {self.height}x{self.width} image"
                )
            self.meta["eval_crop"] = (top, bottom, left, right)

    @staticmethod
    def _entered(depth: np.ndarray, what: str) -> np.ndarray:
        """A depth map as it enters the package: plausible meters (`check_depth_values`), sanitised, C order."""
        depth = np.asarray(depth)
        check_depth_values(depth, what)
        depth = np.ascontiguousarray(sanitize_depth(depth, what))
        if not depth.size:
            raise DataError(f"{what}: the depth map is empty ({depth.shape[1]}x{depth.shape[0]} pixels)")
        return depth

    @property
    def height(self) -> int:
        """RGB height in pixels."""
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        """RGB width in pixels."""
        return int(self.rgb.shape[1])

    @property
    def depth_matches_rgb(self) -> bool:
        """True when depth (and gt) are on the RGB pixel grid."""
        return self.depth.shape == self.rgb.shape[:2]

    def depth_intrinsics(self) -> Intrinsics | None:
        """(fx, fy, cx, cy) of the depth grid: `meta["depth_intrinsics"]` if given, else the RGB camera resized."""
        if self.meta.get("depth_intrinsics") is not None:
            return self.meta["depth_intrinsics"]
        if self.intrinsics is None:
            return None
        return scale_intrinsics(self.intrinsics, self.rgb.shape[:2], self.depth.shape)

    def _check_same_aspect(self) -> None:
        (h_rgb, w_rgb), (h, w) = self.rgb.shape[:2], self.depth.shape
        if not same_aspect(self.depth.shape, self.rgb.shape):
            aspect_rgb, aspect_depth = w_rgb / h_rgb, w / h
            raise DataError(
                f"{self.name or 'RGBDSample'}: depth {w}x{h} and RGB {w_rgb}x{h_rgb} have different aspect ratios "
                f"({aspect_depth:.4f} vs {aspect_rgb:.4f}); give meta['depth_intrinsics'] to say how they align"
            )

    def _rgb_to_depth_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every RGB pixel, the depth-grid (row, col) it sees and whether that lies inside the depth grid."""
        (h_rgb, w_rgb), (h, w) = self.rgb.shape[:2], self.depth.shape
        depth_k = self.meta.get("depth_intrinsics")
        if depth_k is not None:
            if self.intrinsics is None:
                raise DataError(f"{self.name}: meta['depth_intrinsics'] given but the RGB intrinsics are unknown")
            fx, fy, cx, cy = self.intrinsics
            fxd, fyd, cxd, cyd = depth_k
            cols = np.rint((np.arange(w_rgb) - cx) / fx * fxd + cxd).astype(np.int64)
            rows = np.rint((np.arange(h_rgb) - cy) / fy * fyd + cyd).astype(np.int64)
        else:
            self._check_same_aspect()
            # Nearest source pixel by pixel centres (cv2.INTER_NEAREST_EXACT): never invents a depth value.
            cols = np.floor((np.arange(w_rgb) + 0.5) * w / w_rgb).astype(np.int64)
            rows = np.floor((np.arange(h_rgb) + 0.5) * h / h_rgb).astype(np.int64)
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        return np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1), inside

    def _at_rgb_resolution(self, depth: np.ndarray) -> np.ndarray:
        if self.depth_matches_rgb and self.meta.get("depth_intrinsics") is None:
            return depth
        rows, cols, inside = self._rgb_to_depth_index()
        return np.where(inside, depth[rows[:, None], cols[None, :]], np.float32(0))

    def depth_at_rgb_resolution(self) -> np.ndarray:
        """Depth on the RGB grid, (H, W) float32 meters, by nearest-neighbour lookup (no invented values).

        Same-aspect grids are resized; otherwise `meta["depth_intrinsics"]` must say how the grids align (pixels of
        the RGB image outside the depth field of view become 0). Raises DataError when neither holds.
        """
        return self._at_rgb_resolution(self.depth)

    def gt_at_rgb_resolution(self) -> np.ndarray | None:
        """Ground truth on the RGB grid, like `depth_at_rgb_resolution`; None when there is no ground truth."""
        return None if self.gt is None else self._at_rgb_resolution(self.gt)

    def on_rgb_grid(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(depth, gt) on the RGB grid, (H, W) float32 meters (gt None without ground truth); when the dataset's
        depth is its ground truth, the returned gt is the returned depth (the same array)."""
        depth = self.depth_at_rgb_resolution()
        if self.gt is self.depth:
            return depth, depth
        return depth, self.gt_at_rgb_resolution()
