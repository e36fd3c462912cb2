"""Metrics match hand-computed values and published definitions; masks split GT pixels into fill and keep."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from vlm_depth.eval.metrics import (
    METRICS,
    absrel,
    compute_metrics,
    delta1,
    delta_105,
    delta_110,
    eval_mask,
    imae,
    irmse,
    mae,
    mean_over_images,
    parse_crop,
    rmse,
)

PRED = np.array([[1.0, 2.0], [4.0, 8.0]], np.float32)
GT = np.array([[2.0, 2.0], [2.0, 4.0]], np.float32)
ALL = np.ones((2, 2), bool)


def test_metrics_match_hand_computed_values():
    # errors -1, 0, 2, 4 m; inverse errors (1/km) 500, 0, -250, -125; ratios 2, 1, 2, 2
    assert mae(PRED, GT, ALL) == pytest.approx(7 / 4)
    assert rmse(PRED, GT, ALL) == pytest.approx(math.sqrt(21 / 4))
    assert imae(PRED, GT, ALL) == pytest.approx(875 / 4)
    assert irmse(PRED, GT, ALL) == pytest.approx(math.sqrt((500**2 + 250**2 + 125**2) / 4))
    assert absrel(PRED, GT, ALL) == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    assert delta1(PRED, GT, ALL) == pytest.approx(1 / 4)


def test_metrics_use_only_masked_pixels():
    mask = np.array([[True, True], [False, False]])
    assert mae(PRED, GT, mask) == pytest.approx(0.5)
    assert rmse(PRED, GT, mask) == pytest.approx(math.sqrt(0.5))
    assert delta1(PRED, GT, mask) == pytest.approx(0.5)


def test_one_meter_error_everywhere_gives_mae_one_and_imae_in_per_km():
    gt = np.full((48, 64), 2.0, np.float32)
    pred = gt + 1.0
    mask = np.ones_like(gt, bool)
    assert mae(pred, gt, mask) == pytest.approx(1.0)
    assert rmse(pred, gt, mask) == pytest.approx(1.0)
    # 1/2 m - 1/3 m = 1/6 per meter = 1000/6 per km
    assert imae(pred, gt, mask) == pytest.approx(1000 / 2 - 1000 / 3, rel=1e-6)
    assert irmse(pred, gt, mask) == pytest.approx(1000 / 6, rel=1e-6)
    assert absrel(pred, gt, mask) == pytest.approx(0.5)


def test_delta_thresholds_are_strict_and_symmetric():
    gt = np.full((1, 4), 10.0)
    pred = np.array([[12.0, 10.0 / 1.2, 10.0 * 1.25, 10.8]])
    mask = np.ones_like(gt, bool)
    # ratios 1.2, 1.2, 1.25 (not < 1.25), 1.08
    assert delta1(pred, gt, mask) == pytest.approx(3 / 4)
    assert delta_110(pred, gt, mask) == pytest.approx(1 / 4)
    assert delta_105(pred, gt, mask) == pytest.approx(0.0)


def test_empty_mask_gives_nan_and_a_warning_not_a_crash(caplog):
    empty = np.zeros((2, 2), bool)
    with caplog.at_level(logging.WARNING, logger="vlm_depth.eval.metrics"):
        for fn in METRICS.values():
            assert math.isnan(fn(PRED, GT, empty))
        result = compute_metrics(PRED, GT, empty)
    assert all(math.isnan(v) for v in result.values())
    assert set(result) == set(METRICS)
    assert "empty valid mask" in caplog.text


def test_missing_prediction_inside_the_mask_is_an_error():
    pred = PRED.copy()
    pred[0, 0] = 0.0
    with pytest.raises(ValueError, match="missing"):
        compute_metrics(pred, GT, ALL)
    outside = ALL.copy()
    outside[0, 0] = False
    assert compute_metrics(pred, GT, outside)["mae"] == pytest.approx(6 / 3)


def test_eval_mask_splits_gt_pixels_into_fill_and_keep():
    gt = np.array([[1.0, 2.0, 0.0, 20.0], [np.nan, 3.0, 4.0, 5.0]], np.float32)
    sparse = np.array([[1.0, 0.0, 7.0, 20.0], [2.0, np.inf, 4.0, 0.0]], np.float32)
    masks = eval_mask(gt, sparse, max_depth=10.0)
    assert masks["all"].tolist() == [[True, True, False, False], [False, True, True, True]]
    assert masks["keep"].tolist() == [[True, False, False, False], [False, False, True, False]]
    assert masks["fill"].tolist() == [[False, True, False, False], [False, True, False, True]]
    assert not (masks["fill"] & masks["keep"]).any()
    assert ((masks["fill"] | masks["keep"]) == masks["all"]).all()


def test_eval_mask_applies_the_crop_as_python_slices():
    gt = np.ones((480, 640), np.float32)
    masks = eval_mask(gt, np.zeros_like(gt), crop="45:471,41:601")
    rows, cols = np.nonzero(masks["all"])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (45, 470, 41, 600)
    assert masks["all"].sum() == (471 - 45) * (601 - 41)
    with pytest.raises(ValueError, match="does not fit"):
        eval_mask(np.ones((48, 64)), np.zeros((48, 64)), crop=(0, 49, 0, 10))
    assert parse_crop("none") is None and parse_crop((1, 2, 3, 4)) == (1, 2, 3, 4)
    with pytest.raises(ValueError):
        parse_crop("45:471")


def test_mean_over_images_excludes_nan_images_with_a_count():
    rows = [dict.fromkeys(METRICS, 1.0), dict.fromkeys(METRICS, float("nan")), dict.fromkeys(METRICS, 3.0)]
    out = mean_over_images(rows)
    assert out["mae"] == pytest.approx(2.0) and out["delta1"] == pytest.approx(2.0)
    assert (out["n_images"], out["n_excluded"]) == (2, 1)
    assert math.isnan(mean_over_images([rows[1]])["rmse"])
