"""Readers on the real frames in ../shared/data/train-and-test: shapes, valid fractions and min/median/max meters as
listed in each folder's SOURCE.md, and Hypersim's exact planar depth against the derived .npy there."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from vlm_depth.data import load
from vlm_depth.data.hypersim import hypersim_planar_depth, hypersim_tonemap, read_hypersim_camera

# SOURCE.md quotes meters with two decimals; allow half a step plus float32 noise.
ROUNDED = 0.006


def _stats(depth: np.ndarray) -> tuple[float, float, float, float]:
    valid = depth[depth > 0]
    return valid.size / depth.size, float(valid.min()), float(np.median(valid)), float(valid.max())


@pytest.fixture(scope="module")
def frames(shared_data):
    return shared_data / "train-and-test"


def test_nyuv2_sync_export_matches_source_stats_and_annotations(frames):
    root = frames / "nyuv2_sync_metric3d"
    ds = load(f"nyuv2:{root}")
    assert len(ds) == 3
    annotations = json.loads((root / "test_annotations.json").read_text())["files"]
    stats = []
    for sample in ds:
        assert sample.rgb.shape == (480, 640, 3) and sample.depth.shape == (480, 640)
        assert sample.gt is sample.depth and sample.meta["depth_is_gt"]
        assert sample.meta["eval_crop"] == (45, 471, 41, 601) and sample.meta["max_depth"] == 10.0
        assert sample.intrinsics == pytest.approx(annotations[0]["cam_in"], abs=1e-3)
        assert sample.depth[:41].max() == 0 and sample.depth[472:].max() == 0, "unobserved border is missing"
        stats.append(_stats(sample.depth))
    valid, low, median, high = np.array(stats).T
    # SOURCE.md: valid 67-75 %, 0.71-8.27 m, medians 2.5-3.3 m.
    assert valid.min() == pytest.approx(0.67, abs=ROUNDED) and valid.max() == pytest.approx(0.75, abs=ROUNDED)
    assert low.min() == pytest.approx(0.71, abs=ROUNDED) and high.max() == pytest.approx(8.27, abs=ROUNDED)
    assert median.min() == pytest.approx(2.5, abs=0.05) and median.max() == pytest.approx(3.3, abs=0.05)


def test_kitti_annotated_ground_truth_matches_source_stats(frames):
    root = frames / "kitti_dc_gt_metric3d"
    ds = load(f"pairs:{root}", rgb="rgb/*.png", gt="gt_depth/*.png", depth_scale=256, intrinsics="intrinsics.txt")
    assert len(ds) == 3
    stats = []
    for sample in ds:
        assert sample.rgb.shape == (375, 1242, 3) and sample.gt.shape == (375, 1242)
        assert sample.depth is sample.gt and sample.meta["depth_is_gt"]
        assert sample.intrinsics == pytest.approx((707.0493, 707.0493, 604.0814, 180.5066))
        # The 1/256 m encoding: every value is a multiple of the quantisation step.
        np.testing.assert_allclose(sample.gt * 256, np.round(sample.gt * 256), atol=1e-3)
        stats.append(_stats(sample.gt))
    valid, low, median, high = np.array(stats).T
    # SOURCE.md: valid 18-21 %, depth 5.1-84.9 m, median ~13.5 m.
    assert valid.min() == pytest.approx(0.18, abs=ROUNDED) and valid.max() == pytest.approx(0.21, abs=ROUNDED)
    assert low.min() == pytest.approx(5.1, abs=0.05) and high.max() == pytest.approx(84.9, abs=0.05)
    assert np.all(np.abs(median - 13.5) < 0.4)


def test_kitti_lidar_projection_matches_source_stats(frames):
    ds = load(
        f"pairs:{frames / 'kitti_object_lidar_mmdet3d'}",
        rgb="000008.png",
        depth="*_sparse_depth_projected.png",
        depth_scale=256,
        intrinsics=(721.5377, 721.5377, 609.5593, 172.854),
    )
    (sample,) = list(ds)
    assert sample.rgb.shape == (375, 1242, 3) and sample.gt is None
    valid, low, _, high = _stats(sample.depth)
    # SOURCE.md: density 3.7 %, 2.6-76.6 m.
    assert valid == pytest.approx(0.037, abs=0.0005)
    assert low == pytest.approx(2.6, abs=0.05) and high == pytest.approx(76.6, abs=0.05)


def test_redwood_sequence_matches_source_stats(frames):
    root = frames / "redwood_open3d"
    ds = load(f"pairs:{root}", rgb="color/*.jpg", depth="depth/*.png", depth_scale=1000, intrinsics="intrinsics.txt")
    assert [s.name for s in ds] == [f"color/0000{i}" for i in range(5)]
    stats = np.array([_stats(s.depth) for s in ds])
    assert ds[0].intrinsics == (525.0, 525.0, 319.5, 239.5)
    # SOURCE.md: valid 87 %, 0.96-2.70 m, median 1.86 m.
    assert np.all(np.abs(stats[:, 0] - 0.87) < 0.01)
    assert stats[:, 1].min() == pytest.approx(0.96, abs=0.01) and stats[:, 3].max() == pytest.approx(2.70, abs=ROUNDED)
    assert np.all(np.abs(stats[:, 2] - 1.86) < 0.005)


def test_tum_frame_matches_source_stats(frames):
    ds = load(f"pairs:{frames / 'tum_rgbd_open3d'}", rgb="TUM_color.png", depth="TUM_depth.png", depth_scale=5000)
    (sample,) = list(ds)
    assert sample.rgb.shape == (480, 640, 3)
    valid, low, median, high = _stats(sample.depth)
    # SOURCE.md: valid 80.8 %, 1.46-9.33 m, median 2.42 m.
    assert valid == pytest.approx(0.808, abs=0.0005)
    assert (low, median, high) == pytest.approx((1.46, 2.42, 9.33), abs=ROUNDED)


@pytest.fixture()
def hypersim_scene(frames, tmp_path):
    """The real ai_037_002 depth and camera row, linked into the official layout with a known HDR color frame."""
    real = frames / "hypersim_ai_037_002"
    scene = tmp_path / "ai_037_002"
    geometry, final = scene / "images" / "scene_cam_00_geometry_hdf5", scene / "images" / "scene_cam_00_final_hdf5"
    geometry.mkdir(parents=True)
    final.mkdir(parents=True)
    os.symlink(
        real / "images/scene_cam_00_geometry_hdf5/frame.0000.depth_meters.hdf5",
        geometry.joinpath("frame.0000.depth_meters.hdf5"),
    )
    os.symlink(real / "metadata_camera_parameters_ai_037_002.csv", scene / "metadata_camera_parameters_ai_037_002.csv")
    color = np.random.default_rng(1).gamma(2.0, 0.3, (768, 1024, 3)).astype(np.float16)
    with h5py.File(final / "frame.0000.color.hdf5", "w") as f:
        f["dataset"] = color
    return scene, color


def test_hypersim_planar_depth_matches_the_derived_npy_to_a_millimetre(frames, hypersim_scene):
    scene, _ = hypersim_scene
    (sample,) = list(load(f"hypersim:{scene}"))
    reference = np.load(frames / "hypersim_ai_037_002" / "frame.0000.planar_depth_m.npy", allow_pickle=False)
    assert sample.depth.shape == reference.shape == (768, 1024)
    assert np.abs(sample.depth - reference).max() <= 1e-3
    valid, low, median, high = _stats(sample.depth)
    # SOURCE.md: planar 2.80-12.75 m (median 5.17).
    assert valid == 1.0 and (low, median, high) == pytest.approx((2.80, 5.17, 12.75), abs=ROUNDED)
    assert sample.gt is sample.depth and sample.name == "ai_037_002/cam_00/0000"


def test_hypersim_tilt_shift_scene_differs_from_the_60_degree_pinhole(frames, hypersim_scene):
    scene, _ = hypersim_scene
    with h5py.File(scene / "images/scene_cam_00_geometry_hdf5/frame.0000.depth_meters.hdf5") as f:
        distance = f["dataset"][()].astype(np.float32)
    camera = read_hypersim_camera(scene / "metadata_camera_parameters_ai_037_002.csv", "ai_037_002")
    exact = hypersim_planar_depth(distance, camera["M_cam_from_uv"])
    f = 512 / np.tan(np.pi / 6)
    x, y = np.meshgrid(np.arange(1024) - 511.5, np.arange(768) - 383.5)
    pinhole = distance * f / np.sqrt(x**2 + y**2 + f**2)
    # SOURCE.md: the plain pinhole formula is off by up to 0.38 m on this scene.
    assert np.abs(exact - pinhole).max() == pytest.approx(0.38, abs=0.02)
    standard = np.diag([np.tan(np.pi / 6), np.tan(np.pi / 6) * 0.75, -1.0])
    np.testing.assert_allclose(hypersim_planar_depth(distance, standard), pinhole, rtol=1e-5)


def test_hypersim_rgb_is_tone_mapped_like_the_official_script(hypersim_scene):
    scene, color = hypersim_scene
    (sample,) = list(load(f"hypersim:{scene}"))
    linear = color.astype(np.float64)
    brightness = 0.3 * linear[..., 0] + 0.59 * linear[..., 1] + 0.11 * linear[..., 2]
    scale = 0.8**2.2 / np.percentile(brightness, 90)
    expected = np.rint(np.clip((scale * linear) ** (1 / 2.2), 0, 1) * 255)
    np.testing.assert_array_equal(sample.rgb, expected.astype(np.uint8))
    # On a grey image the 90th-percentile brightness lands exactly at 0.8 after tone mapping.
    grey = np.repeat(color[..., :1], 3, axis=2)
    mapped = hypersim_tonemap(grey)[..., 0].astype(np.float64) / 255
    assert np.percentile(mapped, 90) == pytest.approx(0.8, abs=1 / 255)
