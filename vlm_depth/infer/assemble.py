"""Dense assembly: which pixels to query, and a dense depth map from the answers and the kept input pixels.

1. Queries: one per stride x stride cell (a stride, or the one that fits a query budget) that has missing input,
   at the missing pixel nearest the cell centre (`cell_pixels`), so every hole larger than a few pixels gets an
   answer inside it; optionally a second round on half-stride cells where image edges or the first round's
   uncertainty are highest (`refinement_pixels`).
2. Fill: anchors (answers at queried pixels, and the valid input pixels) are spread over the image by a
   normalised-convolution pyramid (`push_pull`, smooth, no edges), then an anchor-weighted guided filter with the
   RGB image as guide (`guided_fill`, He et al., TPAMI 2013) refits the depth locally as a linear function of colour,
   so depth edges follow image edges between anchors.

Depth is (H, W) float32 meters, 0 = missing, everywhere here; pixel (x, y) = (column, row).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError


def stride_for_budget(shape: tuple[int, int], budget: int) -> int:
    """The smallest grid stride (pixels) whose grid over an image of `shape` (H, W) has at most `budget` points."""
    if budget < 1:
        raise ConfigError(f"the query budget must be >= 1, got {budget}")
    height, width = shape
    stride = max(1, math.floor(math.sqrt(height * width / budget)))
    while math.ceil(height / stride) * math.ceil(width / stride) > budget:
        stride += 1
    return stride


def query_grid(shape: tuple[int, int], stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns (n,) of a grid with `stride` pixels over an image of `shape` (H, W): the centre pixel of
    every stride x stride cell (cells at the border may be cut)."""
    if stride < 1:
        raise ConfigError(f"the query stride must be >= 1, got {stride}")
    height, width = shape
    rows = np.minimum(np.arange(0, height, stride) + stride // 2, height - 1)
    cols = np.minimum(np.arange(0, width, stride) + stride // 2, width - 1)
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    return yy.ravel(), xx.ravel()


def cell_pixels(candidates: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """One pixel (rows, cols) per stride x stride cell holding any `candidates` (H, W) bool pixel: the candidate
    nearest to the cell's grid point (`query_grid`), ties to the first in raster order. With every pixel a
    candidate this is `query_grid`; with candidates = missing input, every cell with a hole gets one query inside
    the hole."""
    if stride < 1:
        raise ConfigError(f"the query stride must be >= 1, got {stride}")
    rows, cols = np.nonzero(candidates)
    if rows.size == 0:
        return rows, cols
    height, width = candidates.shape
    cell_r, cell_c = rows // stride, cols // stride
    centre_r = np.minimum(cell_r * stride + stride // 2, height - 1)
    centre_c = np.minimum(cell_c * stride + stride // 2, width - 1)
    distance = (rows - centre_r) ** 2 + (cols - centre_c) ** 2
    cell = cell_r * ((width + stride - 1) // stride) + cell_c
    order = np.lexsort((distance, cell))
    _, first = np.unique(cell[order], return_index=True)
    picked = order[first]
    return rows[picked], cols[picked]


def edge_strength(rgb: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1]: Sobel gradient magnitude of the luminance of `rgb` (H, W, 3) uint8, blurred over
    3x3 so that a pixel next to an edge counts as on it."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = cv2.blur(np.sqrt(gx * gx + gy * gy), (3, 3))
    return np.clip(magnitude / 4.0, 0.0, 1.0)  # 4 = the Sobel magnitude of a full black-to-white step


def refinement_pixels(
    rgb: np.ndarray,
    uncertainty: np.ndarray,
    depth: np.ndarray,
    candidates: np.ndarray,
    stride: int,
    count: int,
    by: str = "both",
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` extra query pixels (rows, cols), one per half-stride cell with `candidates` (H, W) bool,
    ranked by image edges (`edge_strength`), by relative uncertainty (`uncertainty / depth`, both (H, W) meters) or
    by the sum of both (`by`: edges | uncertainty | both)."""
    if by not in ("edges", "uncertainty", "both"):
        raise ConfigError(f"refine_by must be edges, uncertainty or both, got {by!r}")
    if count <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, cols = cell_pixels(candidates, max(1, stride // 2))
    score = np.zeros(rows.shape, dtype=np.float32)
    if by in ("edges", "both"):
        score += edge_strength(rgb)[rows, cols]
    if by in ("uncertainty", "both"):
        relative = uncertainty[rows, cols] / np.maximum(depth[rows, cols], 1e-3)
        score += np.clip(relative, 0.0, 1.0)
    best = np.argsort(-score, kind="stable")[:count]
    return rows[best], cols[best]


def _box(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2 radius + 1)^2 window (edges: mean over the part inside the image), per channel."""
    size = 2 * radius + 1
    return cv2.boxFilter(x, -1, (size, size), normalize=True, borderType=cv2.BORDER_REFLECT)


def push_pull(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Dense (H, W) float32 interpolation of scattered `values` with confidence `weights` (H, W) >= 0 (0 = no data)
    by a normalised-convolution pyramid (push: 2x2 weighted sums up to one pixel; pull: each level keeps its own
    estimate where it has full confidence and blends in the bilinearly upsampled coarser estimate elsewhere).
    Returns zeros when no weight is positive."""
    v = (values * weights).astype(np.float64)
    w = weights.astype(np.float64)
    levels = [(v, w)]
    while max(v.shape) > 1:
        pad = ((0, v.shape[0] % 2), (0, v.shape[1] % 2))
        v, w = np.pad(v, pad), np.pad(w, pad)
        v = v[0::2, 0::2] + v[1::2, 0::2] + v[0::2, 1::2] + v[1::2, 1::2]
        w = w[0::2, 0::2] + w[1::2, 0::2] + w[0::2, 1::2] + w[1::2, 1::2]
        levels.append((v, w))
    estimate = np.zeros((1, 1))
    for v, w in reversed(levels):
        up = cv2.resize(estimate, (v.shape[1], v.shape[0]), interpolation=cv2.INTER_LINEAR)
        confidence = np.clip(w, 0.0, 1.0)
        estimate = confidence * (v / np.maximum(w, 1e-12)) + (1.0 - confidence) * up
    return estimate.astype(np.float32)


def guided_fill(
    rgb: np.ndarray,
    values: np.ndarray,
    weights: np.ndarray,
    radius: int,
    eps: float = 1e-3,
    prior_weight: float = 0.02,
) -> np.ndarray:
    """Edge-aware dense depth (H, W) float32 from scattered anchors `values` with `weights` (H, W) (0 = none).

    In every (2 radius + 1)^2 window depth is fitted as a linear function of the RGB colour (in [0, 1]) by least
    squares weighted by the anchors' weights, plus `prior_weight` on every pixel towards the smooth `push_pull`
    interpolation (so windows without anchors follow it); `eps` regularises the colour covariance (contrasts below
    ~sqrt(eps) are treated as flat). As in the guided filter, the per-window coefficients are averaged over the
    windows covering a pixel and applied to its colour.
    """
    prior = push_pull(values, weights)
    if not (weights > 0).any():
        return prior
    guide = rgb.astype(np.float32) / 255.0
    c = weights.astype(np.float32) + np.float32(prior_weight)
    target = np.where(weights > 0, values, prior).astype(np.float32)
    total = _box(c, radius)
    mean_i = _box(guide * c[..., None], radius) / total[..., None]
    mean_t = _box(target * c, radius) / total
    cov_it = _box(guide * (target * c)[..., None], radius) / total[..., None] - mean_i * mean_t[..., None]
    outer = (guide[..., :, None] * guide[..., None, :]).reshape(*guide.shape[:2], 9)
    var_i = _box(outer * c[..., None], radius).reshape(*guide.shape[:2], 3, 3) / total[..., None, None]
    var_i = var_i - mean_i[..., :, None] * mean_i[..., None, :] + eps * np.eye(3, dtype=np.float32)
    a = np.linalg.solve(var_i, cov_it[..., None])[..., 0]
    b = mean_t - (a * mean_i).sum(-1)
    return ((_box(a, radius) * guide).sum(-1) + _box(b, radius)).astype(np.float32)


def assemble(
    rgb: np.ndarray,
    sparse: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    spreads: np.ndarray,
    *,
    radius: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense depth and uncertainty (H, W) float32 meters from answers and the input.

    rgb: (H, W, 3) uint8; sparse: (H, W) meters, 0 = missing; rows, cols, values, spreads: (n,) answered pixels,
    their depth and spread (non-finite values are ignored). Anchors: the answers, and the valid input pixels where no
    answer was given; every pixel, valid input included, is filled (`vlm_depth.depth.keep_input` then restores the
    input where "keep means keep"). Uncertainty is the answers' spread interpolated with `push_pull` (0 everywhere
    when there is no answer).
    """
    valid = valid_mask(sparse)
    ok = valid_mask(values)
    answer_rows, answer_cols = rows[ok], cols[ok]
    anchors = np.where(valid, sparse, 0).astype(np.float32)
    weights = valid.astype(np.float32)
    anchors[answer_rows, answer_cols] = values[ok]
    weights[answer_rows, answer_cols] = 1.0
    depth = guided_fill(rgb, anchors, weights, radius)
    # A local linear fit may overshoot past the range of its anchors near strong colour edges; clip to it.
    if (weights > 0).any():
        depth = np.clip(depth, anchors[weights > 0].min(), anchors[weights > 0].max())
    spread_anchor = np.zeros_like(anchors)
    spread_weight = np.zeros_like(anchors)
    spread_anchor[answer_rows, answer_cols] = np.nan_to_num(spreads[ok], nan=0.0)
    spread_weight[answer_rows, answer_cols] = 1.0
    return depth, push_pull(spread_anchor, spread_weight)
