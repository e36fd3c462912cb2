"""RGBDSample validation and resolution handling, and the depth/RGB/camera file I/O at the package edge."""

from __future__ import annotations

import json
import logging

import cv2
import h5py
import numpy as np
import pytest

from vlm_depth.data.depth_io import (
    depth_to_uint16,
    read_depth,
    read_intrinsics,
    read_raw_float32,
    read_rgb,
    write_depth_npy,
    write_depth_png,
    write_rgb,
)
from vlm_depth.data.sample import RGBDSample, scale_intrinsics
from vlm_depth.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


def _rgb(h: int = 48, w: int = 64) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- RGBDSample -----------------------------------------------------------------------------------------------------


def test_nan_inf_negative_depth_become_missing_with_a_logged_count(caplog):
    depth = np.full((48, 64), 2.0, np.float32)
    depth[0, :3] = [np.nan, np.inf, -1.0]
    gt = depth.copy()
    gt[5, 5] = -np.inf
    with caplog.at_level(logging.WARNING, logger="vlm_depth.data.sample"):
        sample = RGBDSample(_rgb(), depth, gt=gt, name="frame7")
    assert sample.depth[0, :3].tolist() == [0, 0, 0] and sample.depth.dtype == np.float32
    assert sample.gt[5, 5] == 0 and sample.gt[0, 0] == 0
    assert np.isfinite(depth).sum() == 48 * 64 - 2, "the caller's array must not be modified"
    messages = [r.getMessage() for r in caplog.records]
    assert any("frame7 depth: 3 NaN/inf/negative" in m for m in messages), messages
    assert any("frame7 gt: 4 NaN/inf/negative" in m for m in messages), messages


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rgb": np.zeros((48, 64, 3), np.float32)}, "rgb must be a"),
        ({"rgb": np.zeros((48, 64), np.uint8)}, "rgb must be a"),
        ({"depth": np.zeros((48, 64), np.uint16)}, "floating-point meters"),
        ({"depth": np.zeros((48, 64, 1), np.float32)}, "shape"),
        ({"gt": np.zeros((24, 32), np.float32)}, "gt shape"),
        ({"intrinsics": (0.0, 50.0, 32.0, 24.0)}, "intrinsics"),
        ({"meta": {"eval_crop": (0, 60, 0, 64)}}, "eval_crop"),
    ],
)
def test_invalid_sample_fields_raise_data_error(kwargs, match):
    fields = {"rgb": _rgb(), "depth": np.ones((48, 64), np.float32), "name": "bad"} | kwargs
    with pytest.raises(DataError, match=match):
        RGBDSample(**fields)


def test_depth_with_another_aspect_ratio_is_refused_without_depth_intrinsics():
    with pytest.raises(DataError, match="different aspect ratios"):
        RGBDSample(_rgb(48, 64), np.ones((48, 48), np.float32), name="square")


def test_low_resolution_depth_is_upsampled_by_nearest_and_invents_no_value():
    # An iPad-like pair: depth at 1/4 of the RGB resolution, same field of view (aspect 4:3).
    depth = RNG.uniform(0.5, 5.0, (12, 16)).astype(np.float32)
    depth[3, 4] = 0
    sample = RGBDSample(_rgb(48, 64), depth, intrinsics=(60.0, 60.0, 31.5, 23.5), name="ipad")
    assert sample.depth.shape == (12, 16), "depth stays at its own resolution"
    up = sample.depth_at_rgb_resolution()
    assert up.shape == (48, 64)
    np.testing.assert_array_equal(up, np.repeat(np.repeat(depth, 4, axis=0), 4, axis=1))
    fx, fy, cx, cy = sample.depth_intrinsics()
    assert (fx, fy, cx, cy) == pytest.approx((15.0, 15.0, 7.5, 5.5))


def test_depth_intrinsics_align_a_wider_depth_camera_with_the_rgb_grid():
    # Depth camera: 40x30 grid, wider field of view and shifted principal point; every depth pixel stores its index.
    h, w = 30, 40
    index_map = (1 + np.arange(h * w, dtype=np.float32).reshape(h, w)) / 100
    rgb_k, depth_k = (80.0, 80.0, 31.5, 23.5), (20.0, 20.0, 21.0, 14.0)
    sample = RGBDSample(_rgb(48, 64), index_map, intrinsics=rgb_k, name="wide", meta={"depth_intrinsics": depth_k})
    aligned = sample.depth_at_rgb_resolution()
    assert aligned.shape == (48, 64)
    for row, col in [(0, 0), (23, 31), (47, 63), (10, 50)]:
        # Same optical centre: the RGB pixel's ray hits the depth grid at the rescaled normalised coordinate.
        x_n, y_n = (col - rgb_k[2]) / rgb_k[0], (row - rgb_k[3]) / rgb_k[1]
        d_col, d_row = round(x_n * depth_k[0] + depth_k[2]), round(y_n * depth_k[1] + depth_k[3])
        assert aligned[row, col] == pytest.approx(index_map[d_row, d_col])


def test_depth_intrinsics_outside_the_depth_view_give_missing_pixels():
    depth = np.ones((12, 16), np.float32)
    narrow = (40.0, 40.0, 7.5, 5.5)  # a depth camera with a narrower view than the RGB one
    sample = RGBDSample(_rgb(48, 64), depth, intrinsics=(40.0, 40.0, 31.5, 23.5), meta={"depth_intrinsics": narrow})
    aligned = sample.depth_at_rgb_resolution()
    assert aligned[24, 32] == 1 and aligned[0, 0] == 0 and aligned[47, 63] == 0


def test_scale_intrinsics_keeps_a_projected_point_on_the_same_spot():
    k = (500.0, 510.0, 319.5, 239.5)
    point = np.array([0.3, -0.2, 2.0])
    u = k[0] * point[0] / point[2] + k[2]
    k2 = scale_intrinsics(k, (480, 640), (120, 160))
    u2 = k2[0] * point[0] / point[2] + k2[2]
    assert u2 == pytest.approx((u + 0.5) / 4 - 0.5)
    assert scale_intrinsics(k2, (120, 160), (480, 640)) == pytest.approx(k)


# --- depth_io -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1000.0, 256.0, 5000.0, 100.0])
def test_png_depth_round_trip_is_exact_to_half_a_quantisation_step(tmp_path, scale):
    depth = RNG.uniform(0.1, 60000 / scale, (48, 64)).astype(np.float32)
    depth[:4] = 0
    path = write_depth_png(tmp_path / "d.png", depth, scale)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.ndim == 2
    back = read_depth(path, scale)
    assert back.dtype == np.float32 and back.shape == depth.shape
    assert (back[:4] == 0).all()
    assert np.abs(back - depth).max() <= 0.5 / scale + 1e-6 * depth.max()


def test_png_encoding_keeps_missing_at_zero_and_refuses_overflow(tmp_path):
    codes = depth_to_uint16(np.array([[0.0, np.nan, -1.0, 1e-5, 2.5]]), 1000.0)
    assert codes.tolist() == [[0, 0, 0, 1, 2500]], "a tiny measured depth must not turn into 'missing'"
    with pytest.raises(DataError, match="exceeds the uint16 range"):
        write_depth_png(tmp_path / "far.png", np.array([[70.0]], np.float32), scale=1000.0)
    assert not (tmp_path / "far.png").exists()


def test_npy_and_hdf5_depth_are_float_meters(tmp_path):
    depth = RNG.uniform(0.5, 9.0, (48, 64)).astype(np.float32)
    np.testing.assert_array_equal(read_depth(write_depth_npy(tmp_path / "d.npy", depth)), depth)
    with h5py.File(tmp_path / "d.hdf5", "w") as f:
        f["dataset"] = depth.astype(np.float16)
    np.testing.assert_array_equal(read_depth(tmp_path / "d.hdf5"), depth.astype(np.float16).astype(np.float32))
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a"], f["b"] = depth, depth
    with pytest.raises(DataError, match="say which with key"):
        read_depth(tmp_path / "two.h5")
    np.testing.assert_array_equal(read_depth(tmp_path / "two.h5", key="b"), depth)
    np.save(tmp_path / "mm.npy", (depth * 1000).astype(np.uint16))
    assert np.abs(read_depth(tmp_path / "mm.npy", scale=1000) - depth).max() <= 1e-3


def test_pickled_npy_is_never_loaded(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"depth": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy"):
        read_depth(tmp_path / "obj.npy")


def test_8bit_and_colour_depth_images_are_refused_naming_the_file(tmp_path):
    cv2.imwrite(str(tmp_path / "vis8.png"), RNG.integers(0, 255, (48, 64), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "turbo.png"), RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"vis8\.png.*8-bit"):
        read_depth(tmp_path / "vis8.png", 1000)
    with pytest.raises(DataError, match=r"turbo\.png.*3 channels.*visualisation"):
        read_depth(tmp_path / "turbo.png", 1000)


def test_integer_depth_without_a_scale_is_a_config_error(tmp_path):
    path = write_depth_png(tmp_path / "d.png", np.ones((4, 4), np.float32), 1000)
    with pytest.raises(ConfigError, match="needs a scale"):
        read_depth(path)


def test_missing_depth_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.png"):
        read_depth(tmp_path / "nope.png", 1000)


def test_raw_float32_buffer_has_the_stated_shape(tmp_path):
    values = RNG.uniform(0, 10, (6, 8)).astype("<f4")
    values.tofile(tmp_path / "DSC_0001.JPG")
    np.testing.assert_array_equal(read_raw_float32(tmp_path / "DSC_0001.JPG", (6, 8)), values)
    with pytest.raises(DataError, match="expected 8x8"):
        read_raw_float32(tmp_path / "DSC_0001.JPG", (8, 8))


def test_rgb_reading_returns_rgb_order_and_three_channels(tmp_path):
    rgb = _rgb()
    np.testing.assert_array_equal(read_rgb(write_rgb(tmp_path / "c.png", rgb)), rgb)
    cv2.imwrite(str(tmp_path / "gray.png"), rgb[..., 0])
    np.testing.assert_array_equal(read_rgb(tmp_path / "gray.png"), np.repeat(rgb[..., :1], 3, axis=2))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([rgb[..., ::-1], np.full((48, 64), 7, np.uint8)]))
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png"), rgb)
    write_depth_png(tmp_path / "depth.png", np.ones((48, 64), np.float32), 1000)
    with pytest.raises(DataError, match="must be 8-bit"):
        read_rgb(tmp_path / "depth.png")


def test_intrinsics_files_in_every_supported_form(tmp_path):
    k = (518.8579, 519.4696, 325.5824, 253.7362)
    (tmp_path / "k.json").write_text(json.dumps(dict(zip(("fx", "fy", "cx", "cy"), k))))
    (tmp_path / "k4.txt").write_text("fx fy cx cy (a header line)\n" + " ".join(map(str, k)) + "\n")
    mat = np.array([[k[0], 0, k[2]], [0, k[1], k[3]], [0, 0, 1]])
    np.savetxt(tmp_path / "K.txt", mat)
    (tmp_path / "line.txt").write_text(" ".join(map(str, mat.reshape(-1))))
    (tmp_path / "P.txt").write_text(" ".join(map(str, np.hstack([mat, [[44.9], [0.2], [0.003]]]).reshape(-1))))
    np.save(tmp_path / "K.npy", mat)
    for name in ("k.json", "k4.txt", "K.txt", "line.txt", "P.txt", "K.npy"):
        assert read_intrinsics(tmp_path / name) == pytest.approx(k), name
    (tmp_path / "bad.json").write_text('{"fx": 1}')
    with pytest.raises(DataError, match="lacks"):
        read_intrinsics(tmp_path / "bad.json")
