"""Classical baselines: dense, finite, keep the input, and behave as their definitions say (on real KITTI frames)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vlm_depth.data.sparsify import sparsify
from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError, DataError
from vlm_depth.eval.baselines import BASELINES, get_baseline, ip_basic
from vlm_depth.eval.metrics import compute_metrics

H, W = 48, 64


def _random_sparse(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sparse = np.zeros((H, W), np.float32)
    idx = rng.choice(H * W, n, replace=False)
    sparse.flat[idx] = rng.uniform(0.5, 40.0, n)
    sparse.flat[idx[:3]] = [np.nan, np.inf, -1.0]  # non-measurements, not depths
    return np.zeros((H, W, 3), np.uint8), sparse


def _read_kitti_png(path) -> np.ndarray:
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw is not None and raw.dtype == np.uint16, path
    return raw.astype(np.float32) / 256.0


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_are_dense_finite_and_keep_valid_input_pixels(name):
    rgb, sparse = _random_sparse(0)
    dense = BASELINES[name](rgb, sparse)
    valid = valid_mask(sparse)
    assert dense.shape == (H, W) and dense.dtype == np.float32
    assert np.isfinite(dense).all() and (dense > 0).all()
    np.testing.assert_array_equal(dense[valid], sparse[valid])
    # interpolators cannot leave the range of the input
    assert sparse[valid].min() <= dense.min() and dense.max() <= sparse[valid].max()


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_refuse_input_without_any_valid_pixel(name):
    sparse = np.zeros((H, W), np.float32)
    sparse[0, 0] = np.nan
    with pytest.raises(DataError, match="nothing to complete"):
        BASELINES[name](np.zeros((H, W, 3), np.uint8), sparse)


def test_baselines_refuse_mismatched_rgb():
    _, sparse = _random_sparse(1)
    with pytest.raises(DataError, match="does not match"):
        BASELINES["nearest"](np.zeros((H, W + 1, 3), np.uint8), sparse)
    with pytest.raises(ConfigError, match="available"):
        get_baseline("bicubic")


def test_nearest_takes_the_closest_valid_pixel():
    sparse = np.zeros((H, W), np.float32)
    sparse[10, 10], sparse[10, 50] = 3.0, 9.0
    dense = BASELINES["nearest"](np.zeros((H, W, 3), np.uint8), sparse)
    assert dense[40, 5] == 3.0 and dense[0, 29] == 3.0 and dense[0, 31] == 9.0 and dense[47, 63] == 9.0


def test_linear_reproduces_a_plane_inside_the_hull_and_is_nearest_outside():
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    plane = 2.0 + 0.05 * xx + 0.1 * yy
    sparse = np.zeros((H, W), np.float32)
    sparse[5::9, 4::11] = plane[5::9, 4::11]  # grid spanning rows 5..41, cols 4..59
    dense = BASELINES["linear"](np.zeros((H, W, 3), np.uint8), sparse)
    inside = (yy >= 5) & (yy <= 41) & (xx >= 4) & (xx <= 59)
    np.testing.assert_allclose(dense[inside], plane[inside], atol=1e-4)
    assert dense[0, 0] == sparse[5, 4] and dense[47, 63] == sparse[41, 59]


def test_median_fills_with_the_median_of_the_input():
    sparse = np.zeros((H, W), np.float32)
    sparse[0, :5] = [1.0, 2.0, 3.0, 10.0, 50.0]
    dense = BASELINES["median"](np.zeros((H, W, 3), np.uint8), sparse)
    assert (dense[1:] == 3.0).all()


def test_ipbasic_fills_a_gap_between_near_and_far_with_the_near_depth():
    # IP-Basic inverts depth so that its max-dilations let the nearer surface win in the gap between two surfaces
    # (columns of points at 5 m and 50 m, 19 empty columns between): nearest splits the gap in half.
    sparse = np.zeros((H, W), np.float32)
    sparse[:, 20], sparse[:, 40] = 5.0, 50.0
    rgb = np.zeros((H, W, 3), np.uint8)
    near_share = {name: (BASELINES[name](rgb, sparse)[:, 21:40] < 10.0).mean() for name in ("ipbasic", "nearest")}
    assert 9 / 19 <= near_share["nearest"] <= 10 / 19  # the middle column is a tie
    assert near_share["ipbasic"] >= 13 / 19


def test_ipbasic_beyond_its_100m_inversion_range_keeps_far_points():
    sparse = np.zeros((H, W), np.float32)
    sparse[20, 20], sparse[30, 40] = 150.0, 20.0
    dense = ip_basic(sparse)
    assert np.isfinite(dense).all() and dense.min() >= 20.0 - 1e-3 and dense.max() <= 150.0 + 1e-3
    assert dense[20, 20] == pytest.approx(150.0, abs=1.0)


def test_ipbasic_on_a_real_kitti_lidar_scan_gives_a_dense_finite_map(shared_data):
    folder = shared_data / "train-and-test" / "kitti_object_lidar_mmdet3d"
    sparse = _read_kitti_png(folder / "000008_sparse_depth_projected.png")
    rgb = cv2.cvtColor(cv2.imread(str(folder / "000008.png")), cv2.COLOR_BGR2RGB)
    valid = valid_mask(sparse)
    assert 0.03 < valid.mean() < 0.045  # SOURCE.md: density 3.7 %
    dense = BASELINES["ipbasic"](rgb, sparse)
    assert dense.shape == sparse.shape and np.isfinite(dense).all()
    assert sparse[valid].min() - 1e-3 <= dense.min() and dense.max() <= sparse[valid].max() + 1e-3
    np.testing.assert_array_equal(dense[valid], sparse[valid])


def _rmse_on_fill(name: str, rgb: np.ndarray, sparse: np.ndarray, reference: np.ndarray) -> float:
    fill = valid_mask(reference) & ~valid_mask(sparse)
    return compute_metrics(BASELINES[name](rgb, sparse), reference, fill)["rmse"]


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_ipbasic_beats_nearest_on_held_out_points_of_a_real_lidar_scan(shared_data, keep):
    # IP-Basic was designed for real LiDAR scans: complete from a share of the scan, score on the held-out points.
    folder = shared_data / "train-and-test" / "kitti_object_lidar_mmdet3d"
    scan = _read_kitti_png(folder / "000008_sparse_depth_projected.png")
    rgb = cv2.cvtColor(cv2.imread(str(folder / "000008.png")), cv2.COLOR_BGR2RGB)
    for seed in range(3):
        sparse = sparsify(f"density:{keep}", scan, seed=seed)
        assert _rmse_on_fill("ipbasic", rgb, sparse, scan) < _rmse_on_fill("nearest", rgb, sparse, scan)


@pytest.mark.parametrize("protocol", ["uniform:5000", "lidar:64"])
def test_linear_beats_nearest_and_median_on_kitti_ground_truth(shared_data, protocol):
    folder = shared_data / "train-and-test" / "kitti_dc_gt_metric3d"
    intrinsics = (707.0493, 707.0493, 604.0814, 180.5066)  # SOURCE.md (approximate, shared by the three frames)
    for path in sorted((folder / "gt_depth").glob("*.png")):
        gt = _read_kitti_png(path)
        rgb = cv2.cvtColor(cv2.imread(str(folder / "rgb" / path.name)), cv2.COLOR_BGR2RGB)
        sparse = sparsify(protocol, gt, rgb=rgb, intrinsics=intrinsics, seed=0)
        rmse = {name: _rmse_on_fill(name, rgb, sparse, gt) for name in ("linear", "nearest", "median")}
        assert rmse["linear"] < rmse["nearest"] < rmse["median"], (path.name, rmse)
