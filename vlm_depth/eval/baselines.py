"""Classical depth-completion baselines, each `(rgb, sparse) -> dense` in the registry `BASELINES`.

rgb: (H, W, 3) uint8 (checked, unused by these methods); sparse: (H, W) float32 meters, 0 or non-finite = missing;
dense: (H, W) float32 meters, finite and positive everywhere. Every baseline returns the valid input pixels
unchanged ("keep means keep") and raises `DataError` on an input without any valid pixel (there is nothing to
complete; that is monocular estimation, which these methods cannot do).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import cv2
import numpy as np
from scipy.ndimage import distance_transform_edt

from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Baseline = Callable[[np.ndarray, np.ndarray], np.ndarray]

NOTHING_TO_COMPLETE = (
    "input depth has no valid pixel: there is nothing to complete (classical completion needs at least one "
    "measurement; use a monocular method for depth-free input)"
)


def _check_inputs(rgb: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """Validate shapes and return the mask of valid input pixels."""
    if sparse.ndim != 2:
        raise DataError(f"sparse depth must be (H, W) meters, got shape {sparse.shape}")
    if rgb.shape != (*sparse.shape, 3):
        raise DataError(f"rgb {rgb.shape} does not match sparse depth {sparse.shape}: expected (H, W, 3)")
    valid = valid_mask(sparse)
    if not valid.any():
        raise DataError(NOTHING_TO_COMPLETE)
    return valid


def _with_input_kept(dense: np.ndarray, sparse: np.ndarray, valid: np.ndarray) -> np.ndarray:
    dense = dense.astype(np.float32)
    dense[valid] = sparse[valid]
    return dense


def _nearest_fill(sparse: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Every pixel takes the depth of its nearest valid pixel (Euclidean distance in pixels)."""
    rows, cols = distance_transform_edt(~valid, return_distances=False, return_indices=True)
    return sparse[rows, cols]


def nearest(rgb: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """Nearest valid input pixel (Euclidean distance transform). (H, W) float32 meters."""
    valid = _check_inputs(rgb, sparse)
    return _with_input_kept(_nearest_fill(sparse, valid), sparse, valid)


def linear(rgb: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """Barycentric interpolation on the Delaunay triangulation of the valid pixels; nearest valid pixel outside
    their convex hull (or everywhere if the points are fewer than 3 or collinear). (H, W) float32 meters."""
    valid = _check_inputs(rgb, sparse)
    dense = _nearest_fill(sparse, valid).astype(np.float64)
    rows, cols = np.nonzero(valid)
    if len(rows) >= 3:
        # matplotlib's triangulation is qhull's Delaunay like scipy's, but its trapezoid-map point location stays
        # fast on scan lines and pixel lattices, where scipy's simplex walk can be 10-30x slower.
        import matplotlib.tri as mtri

        try:
            triangulation = mtri.Triangulation(cols.astype(np.float64), rows.astype(np.float64))
        except (ValueError, RuntimeError):
            logger.info("linear: valid points are degenerate (collinear); using nearest everywhere")
        else:
            interpolate = mtri.LinearTriInterpolator(triangulation, sparse[valid].astype(np.float64))
            miss_rows, miss_cols = np.nonzero(~valid)
            values = np.ma.filled(interpolate(miss_cols.astype(np.float64), miss_rows.astype(np.float64)), np.nan)
            inside = np.isfinite(values)
            dense[miss_rows[inside], miss_cols[inside]] = values[inside]
    return _with_input_kept(dense, sparse, valid)


def median(rgb: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """Global median of the valid input everywhere else: the trivial floor. (H, W) float32 meters."""
    valid = _check_inputs(rgb, sparse)
    return _with_input_kept(np.full(sparse.shape, np.median(sparse[valid])), sparse, valid)


# IP-Basic kernels (Ku et al. 2018): the 5x5 diamond was their best custom dilation kernel on KITTI.
_DIAMOND_5 = np.array(
    [
        [0, 0, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 0, 0],
    ],
    dtype=np.uint8,
)
_EMPTY = 0.1  # IP-Basic's "empty" threshold on the inverted map (meters)


def _fill_empty(inverted: np.ndarray, size: int) -> None:
    """Fill empty pixels of an inverted map in place with a full size x size dilation (the nearest depth wins)."""
    empty = inverted < _EMPTY
    inverted[empty] = cv2.dilate(inverted, np.ones((size, size), np.uint8))[empty]


def ip_basic(sparse: np.ndarray, *, max_depth: float = 100.0, blur: str = "gaussian") -> np.ndarray:
    """IP-Basic "fill_in_fast" (J. Ku, A. Harakeh, S. L. Waslander, "In Defense of Classical Image Processing:
    Fast Depth Completion on the CPU", CRV 2018; reference code github.com/kujason/ip_basic).

    sparse: (H, W) meters, 0 = missing. Steps as in the paper: inversion d' = max_depth - d (so a max-dilation
    prefers near points and empty stays 0), 5x5 diamond dilation, 5x5 hole closing, 7x7 fill of empty pixels,
    extension of each column's highest value to the top of the image, 31x31 large-hole fill, 5x5 median blur,
    then a 5x5 Gaussian blur of the filled pixels (`blur="gaussian"`, the paper's KITTI result) or a bilateral
    filter (`blur="bilateral"`, the code's structure-preserving option), and re-inversion.
    Two additions for inputs far sparser than a KITTI scan: the 31x31 fill is repeated until no pixel is empty
    (the paper's version leaves holes wider than ~60 px at 0), and max_depth grows to cover inputs beyond 100 m.
    Returns (H, W) float32 meters, dense; the caller restores the input pixels (the blurs move them).
    """
    valid = valid_mask(sparse)
    if not valid.any():
        raise DataError(NOTHING_TO_COMPLETE)
    offset = max(max_depth, float(sparse[valid].max()) + 1.0)
    inverted = np.zeros(sparse.shape, np.float32)
    inverted[valid] = offset - sparse[valid]

    inverted = cv2.dilate(inverted, _DIAMOND_5)
    inverted = cv2.morphologyEx(inverted, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    _fill_empty(inverted, 7)

    filled = inverted >= _EMPTY
    top = np.argmax(filled, axis=0)  # 0 for columns without any value: nothing to extend there
    above = np.arange(inverted.shape[0])[:, None] < top[None, :]
    inverted = np.where(above, inverted[top, np.arange(inverted.shape[1])][None, :], inverted)

    for _ in range(max(inverted.shape) // 15 + 1):
        if not (inverted < _EMPTY).any():
            break
        _fill_empty(inverted, 31)

    inverted = cv2.medianBlur(inverted, 5)
    if blur == "gaussian":
        blurred = cv2.GaussianBlur(inverted, (5, 5), 0)
        filled = inverted >= _EMPTY
        inverted[filled] = blurred[filled]
    elif blur == "bilateral":
        inverted = cv2.bilateralFilter(inverted, 5, 1.5, 2.0)
    else:
        raise ValueError(f"ip_basic: blur must be 'gaussian' or 'bilateral', got {blur!r}")
    return (offset - inverted).astype(np.float32)


def ipbasic(rgb: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """IP-Basic fill_in_fast with the paper's settings (Gaussian blur, extension to the top); input pixels kept.
    (H, W) float32 meters."""
    valid = _check_inputs(rgb, sparse)
    return _with_input_kept(ip_basic(np.where(valid, sparse, 0).astype(np.float32)), sparse, valid)


BASELINES: dict[str, Baseline] = {"nearest": nearest, "linear": linear, "ipbasic": ipbasic, "median": median}


def get_baseline(name: str) -> Baseline:
    """The baseline registered as `name`; a clear error listing the available ones otherwise."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; available: {sorted(BASELINES)}")
    return BASELINES[name]
