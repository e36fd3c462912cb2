"""The depth floor: validity, sanitising, keep means keep, same field of view and colouring mean one thing
everywhere."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from vlm_depth.depth import colorize, depth_range, keep_input, same_aspect, sanitize_depth, valid_mask
from vlm_depth.errors import ConfigError, DataError


def test_valid_mask_rejects_zero_nan_inf_negative_and_out_of_range():
    depth = np.array([[0.0, np.nan, np.inf, -np.inf], [-1.0, 0.3, 2.0, 90.0]], dtype=np.float32)
    assert valid_mask(depth).tolist() == [[False] * 4, [False, True, True, True]]
    assert valid_mask(depth, min_depth=0.5, max_depth=80.0).tolist() == [[False] * 4, [False, False, True, False]]
    assert valid_mask(depth, max_depth=2.0).tolist() == [[False] * 4, [False, True, True, False]]  # inclusive
    as_tensor = valid_mask(torch.from_numpy(depth), min_depth=0.5, max_depth=80.0)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.bool
    assert as_tensor.tolist() == valid_mask(depth, min_depth=0.5, max_depth=80.0).tolist()


def test_non_positive_bounds_are_not_applied():
    depth = np.array([0.3, 2.0, 90.0], dtype=np.float32)
    assert valid_mask(depth, min_depth=0.0, max_depth=-1.0).tolist() == [True, True, True]


def test_sanitize_sets_nan_inf_negative_to_missing_logs_and_refuses_integers(caplog):
    raw = np.array([[1.5, np.nan, -2.0], [np.inf, 0.0, 3.0]], dtype=np.float64)
    with caplog.at_level(logging.WARNING, logger="vlm_depth.depth"):
        clean = sanitize_depth(raw, "probe")
    assert clean.dtype == np.float32 and clean.tolist() == [[1.5, 0.0, 0.0], [0.0, 0.0, 3.0]]
    assert "3 NaN/inf/negative" in caplog.text and np.isnan(raw[0, 1])  # the input is left alone
    with pytest.raises(DataError, match="floating-point meters"):
        sanitize_depth(np.ones((2, 2), np.uint16), "probe")


def test_keep_input_restores_valid_input_and_zeroes_its_uncertainty():
    sparse = np.array([[0.0, 2.0], [np.nan, 4.0]], dtype=np.float32)
    depth = np.full((2, 2), 9.0, np.float32)
    kept, uncertainty = keep_input(depth, sparse, np.full((2, 2), 0.5, np.float32))
    assert kept.tolist() == [[9.0, 2.0], [9.0, 4.0]] and uncertainty.tolist() == [[0.5, 0.0], [0.5, 0.0]]
    assert keep_input(depth, sparse)[1] is None


def test_same_aspect_tolerates_one_percent():
    assert same_aspect((192, 256), (1440, 1920)) and same_aspect((100, 200), (100, 201))
    assert not same_aspect((100, 200), (100, 204)) and not same_aspect((480, 640), (375, 1242))


def test_colorize_blacks_out_missing_values_over_a_percentile_range():
    values = np.linspace(1.0, 10.0, 100, dtype=np.float32).reshape(10, 10)
    values[0, 0], values[0, 1] = 0.0, np.nan
    low, high = depth_range(values)
    assert 1.0 < low < 1.5 and 9.5 < high < 10.0 and depth_range(values, (0.0, 5.0)) == (0.0, 5.0)
    image = colorize(values, (low, high))
    assert image.dtype == np.uint8 and image.shape == (10, 10, 3)
    assert (image[0, :2] == 0).all() and (image[1:] > 0).any(axis=-1).all()
    assert depth_range(np.zeros((4, 4), np.float32)) == (0.0, 1.0)
    with pytest.raises(ConfigError, match="colormap"):
        colorize(values, (low, high), "no-such-map")
