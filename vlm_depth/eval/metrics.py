"""Depth-completion metrics as plain functions `(pred, target, valid_mask) -> float`, and the evaluation masks.

Definitions follow the KITTI depth-completion devkit and the zero-shot completion literature (Marigold-DC, OMNI-DC):
MAE and RMSE in meters, iMAE and iRMSE in 1/km (computed on 1000 / depth_m), AbsRel = mean |pred - gt| / gt,
and the threshold accuracies delta_t = share of pixels with max(pred / gt, gt / pred) < t (t = 1.25, 1.10, 1.05).
Every metric is computed per image over `valid_mask`; averaging over images is the caller's job
(`mean_over_images`). An empty mask gives NaN with a logged warning, never an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from vlm_depth.depth import valid_mask as measured  # `valid_mask` is the metrics' argument name

logger = logging.getLogger(__name__)

METRIC_NAMES = ("mae", "rmse", "imae", "irmse", "absrel", "delta1", "delta_110", "delta_105")
REGIONS = ("all", "fill", "keep")


def _masked(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray, name: str):
    if pred.shape != target.shape or valid_mask.shape != target.shape:
        raise ValueError(
            f"{name}: pred {pred.shape}, target {target.shape} and valid_mask {valid_mask.shape} must match"
        )
    mask = valid_mask.astype(bool)
    if not mask.any():
        logger.warning("%s: empty valid mask, returning NaN", name)
        return None, None
    return pred[mask].astype(np.float64), target[mask].astype(np.float64)


def mae(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray) -> float:
    """Mean absolute error in meters over `valid_mask`; pred, target (H, W) meters."""
    p, t = _masked(pred, target, valid_mask, "mae")
    return float("nan") if p is None else float(np.mean(np.abs(p - t)))


def rmse(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray) -> float:
    """Root mean squared error in meters over `valid_mask`; pred, target (H, W) meters."""
    p, t = _masked(pred, target, valid_mask, "rmse")
    return float("nan") if p is None else float(np.sqrt(np.mean((p - t) ** 2)))


def imae(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray) -> float:
    """Mean absolute error of inverse depth in 1/km: mean |1000/pred - 1000/target| with depths in meters."""
    p, t = _masked(pred, target, valid_mask, "imae")
    return float("nan") if p is None else float(np.mean(np.abs(1000.0 / p - 1000.0 / t)))


def irmse(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray) -> float:
    """Root mean squared error of inverse depth in 1/km (inverse depth = 1000 / depth_m)."""
    p, t = _masked(pred, target, valid_mask, "irmse")
    return float("nan") if p is None else float(np.sqrt(np.mean((1000.0 / p - 1000.0 / t) ** 2)))


def absrel(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray) -> float:
    """Mean absolute relative error: mean |pred - target| / target (unitless)."""
    p, t = _masked(pred, target, valid_mask, "absrel")
    return float("nan") if p is None else float(np.mean(np.abs(p - t) / t))


def _delta(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray, threshold: float, name: str) -> float:
    p, t = _masked(pred, target, valid_mask, name)
    if p is None:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.maximum(p / t, t / p)
    # A non-positive prediction is a miss, never a hit (its ratio would be negative or undefined).
    return float(np.mean((p > 0) & (ratio < threshold)))


def delta1(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray) -> float:
    """Share of pixels with max(pred/target, target/pred) < 1.25 (in [0, 1])."""
    return _delta(pred, target, valid_mask, 1.25, "delta1")


def delta_110(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray) -> float:
    """Share of pixels with max(pred/target, target/pred) < 1.10 (in [0, 1])."""
    return _delta(pred, target, valid_mask, 1.10, "delta_110")


def delta_105(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray) -> float:
    """Share of pixels with max(pred/target, target/pred) < 1.05 (in [0, 1])."""
    return _delta(pred, target, valid_mask, 1.05, "delta_105")


METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "mae": mae,
    "rmse": rmse,
    "imae": imae,
    "irmse": irmse,
    "absrel": absrel,
    "delta1": delta1,
    "delta_110": delta_110,
    "delta_105": delta_105,
}


def compute_metrics(pred: np.ndarray, target: np.ndarray, valid_mask: np.ndarray) -> dict[str, float]:
    """All metrics of one image over `valid_mask` (pred, target (H, W) meters); NaN for all if the mask is empty.

    `valid_mask` should already exclude pixels without ground truth (see `eval_mask`). A prediction that is missing
    (0 or non-finite) inside the mask is not dropped: it would make iMAE/iRMSE infinite, so it is an error.
    """
    mask = valid_mask.astype(bool)
    if not mask.any():
        logger.warning("compute_metrics: empty valid mask, every metric is NaN")
        return dict.fromkeys(METRIC_NAMES, float("nan"))
    bad = mask & ~measured(pred)
    if bad.any():
        raise ValueError(
            f"prediction is missing (0, negative or non-finite) at {int(bad.sum())} evaluated pixels; "
            "a completion method must return a positive depth everywhere it is evaluated"
        )
    return {name: fn(pred, target, mask) for name, fn in METRICS.items()}


def parse_crop(crop: str | Iterable[int] | None) -> tuple[int, int, int, int] | None:
    """An evaluation crop as (top, bottom, left, right) pixel bounds (Python slice ends, exclusive).

    Accepts None / "" / "none", a 4-sequence, or the string "top:bottom,left:right" (e.g. NYU Eigen "45:471,41:601").
    """
    if crop is None or (isinstance(crop, str) and crop.strip().lower() in ("", "none")):
        return None
    if isinstance(crop, str):
        try:
            rows, cols = crop.split(",")
            values = [int(v) for v in rows.split(":") + cols.split(":")]
        except ValueError as exc:
            raise ValueError(f"crop {crop!r}: expected 'top:bottom,left:right', e.g. '45:471,41:601'") from exc
    else:
        values = [int(v) for v in crop]
    if len(values) != 4:
        raise ValueError(f"crop {crop!r}: expected 4 bounds (top, bottom, left, right)")
    top, bottom, left, right = values
    if not (0 <= top < bottom and 0 <= left < right):
        raise ValueError(f"crop {crop!r}: bounds must satisfy 0 <= top < bottom and 0 <= left < right")
    return top, bottom, left, right


def eval_mask(
    gt: np.ndarray,
    input_depth: np.ndarray,
    *,
    max_depth: float | None = None,
    crop: str | Iterable[int] | None = None,
    min_depth: float | None = None,
) -> dict[str, np.ndarray]:
    """Evaluation masks of one image: `all` (GT valid, within [min_depth, max_depth] and the crop), `fill` (all &
    input missing: where the sensor failed) and `keep` (all & input valid). gt, input_depth: (H, W) meters, 0 =
    missing; the depth range is in meters (e.g. NYU caps at 10 m, VOID evaluates 0.2-5 m).

    crop: (top, bottom, left, right) or "top:bottom,left:right"; a crop larger than the image is an error.
    """
    if gt.shape != input_depth.shape:
        raise ValueError(f"gt {gt.shape} and input depth {input_depth.shape} must have the same shape")
    region = measured(gt, min_depth, max_depth)
    bounds = parse_crop(crop)
    if bounds is not None:
        top, bottom, left, right = bounds
        height, width = gt.shape
        if bottom > height or right > width:
            raise ValueError(f"crop {bounds} does not fit an image of {height}x{width} (H x W)")
        inside = np.zeros_like(region)
        inside[top:bottom, left:right] = True
        region &= inside
    has_input = measured(input_depth)
    return {"all": region, "fill": region & ~has_input, "keep": region & has_input}


def region_metrics(pred: np.ndarray, gt: np.ndarray, masks: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """`compute_metrics` for every region of `eval_mask` (pred, gt (H, W) meters); empty regions give NaN."""
    return {region: compute_metrics(pred, gt, mask) for region, mask in masks.items()}


def mean_over_images(per_image: Iterable[Mapping[str, float]]) -> dict[str, float | int]:
    """Average per-image metric dicts over images. Images whose metrics are NaN (empty mask) are excluded and
    counted: returns every metric plus `n_images` (averaged) and `n_excluded` (NaN images)."""
    rows = list(per_image)
    usable = [row for row in rows if not np.isnan(row["mae"])]
    out: dict[str, float | int] = {
        name: float(np.mean([row[name] for row in usable])) if usable else float("nan") for name in METRIC_NAMES
    }
    out["n_images"] = len(usable)
    out["n_excluded"] = len(rows) - len(usable)
    return out
