"""The generic `folder` format: round trips through `write_folder_sample`, user folders made from the eval-only
frames, and clear errors (naming the file) for bad input."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest

from vlm_depth.data import READERS, RGBDSample, load, parse_spec
from vlm_depth.data.dataset import split_specs
from vlm_depth.data.depth_io import read_depth, read_intrinsics, read_rgb, write_depth_npy, write_depth_png, write_rgb
from vlm_depth.data.folder import write_folder_sample
from vlm_depth.errors import ConfigError, DataError

H, W = 48, 64


def _sample(name: str = "scene_0001", seed: int = 0) -> RGBDSample:
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.3, 12.0, (H, W)).astype(np.float32)
    depth = np.where(rng.random((H, W)) < 0.4, 0, gt * 1.01).astype(np.float32)
    return RGBDSample(
        rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        depth,
        gt=gt,
        intrinsics=(55.0, 56.0, 31.5, 23.5),
        name=name,
        meta={"max_depth": 10.0, "eval_crop": (2, 46, 3, 61), "material": rng.integers(0, 5, (H, W), dtype=np.uint8)},
    )


def test_every_benchmark_reader_is_registered():
    parse_spec("folder:x")  # the registry fills when a spec is first parsed
    expected = {"hypersim", "vkitti2", "nyuv2", "kitti_dc", "void", "ibims", "ddad", "eth3d", "folder", "pairs"}
    assert expected <= set(READERS)


@pytest.mark.parametrize("depth_format, tolerance", [("png", 0.5e-3 + 1e-6), ("npy", 0.0)])
def test_write_folder_sample_round_trips_through_the_folder_reader(tmp_path, depth_format, tolerance):
    original = _sample()
    written = write_folder_sample(tmp_path, original, depth_format=depth_format)
    assert {p.name for p in written} == {
        f"scene_0001_{s}"
        for s in (
            "rgb.png",
            f"depth.{depth_format}",
            f"gt.{depth_format}",
            "intrinsics.json",
            "material.png",
            "meta.json",
        )
    }
    (sample,) = list(load(f"folder:{tmp_path}"))
    assert sample.name == "scene_0001"
    np.testing.assert_array_equal(sample.rgb, original.rgb)
    assert np.abs(sample.depth - original.depth).max() <= tolerance
    assert np.abs(sample.gt - original.gt).max() <= tolerance
    assert ((sample.depth == 0) == (original.depth == 0)).all()
    assert sample.intrinsics == original.intrinsics
    assert sample.meta["max_depth"] == 10.0 and sample.meta["eval_crop"] == (2, 46, 3, 61)
    np.testing.assert_array_equal(sample.meta["material"], original.meta["material"])


def test_depth_scale_option_reads_other_png_encodings(tmp_path):
    original = _sample()
    write_folder_sample(tmp_path, original, depth_scale=256.0)
    (mm,) = list(load(f"folder:{tmp_path}"))
    (kitti,) = list(load(f"folder:{tmp_path}", depth_scale=256))
    assert np.abs(kitti.depth - original.depth).max() <= 0.5 / 256 + 1e-6
    np.testing.assert_allclose(mm.depth, kitti.depth * 256 / 1000, rtol=1e-6)


def test_integer_depth_read_with_a_too_small_scale_warns_once_naming_the_scale(tmp_path, caplog, monkeypatch):
    from vlm_depth.data import depth_io

    monkeypatch.setattr(depth_io, "_warned_scales", set())
    millimetres = np.full((24, 32), 2500, np.uint16)  # a room 2.5 m away
    millimetres[:4] = 0
    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), millimetres)
    with caplog.at_level(logging.WARNING, logger="vlm_depth.data.depth_io"):
        assert float(read_depth(tmp_path / "a.png", 1000).max()) == 2.5
        assert not caplog.records
        assert float(read_depth(tmp_path / "a.png", 10).max()) == 250.0  # plausible (< 1 km), but unlikely
        read_depth(tmp_path / "b.png", 10)
    (warning,) = caplog.records  # once per scale, not once per frame
    assert (
        "depth_scale 10 has a median of 250 m" in warning.getMessage()
        and "1000 for millimetres" in warning.getMessage()
    )


def test_reader_options_travel_in_the_spec_with_their_types(tmp_path):
    original = _sample()
    write_folder_sample(tmp_path / "f", original, depth_scale=256.0)
    (from_spec,) = list(load(f"folder:{tmp_path / 'f'}?depth_scale=256"))
    (from_kwargs,) = list(load(f"folder:{tmp_path / 'f'}", depth_scale=256))
    np.testing.assert_array_equal(from_spec.depth, from_kwargs.depth)
    (wins,) = list(load(f"folder:{tmp_path / 'f'}?depth_scale=1000", depth_scale=256))  # keyword arguments win
    np.testing.assert_array_equal(wins.depth, from_kwargs.depth)
    spec = f"pairs:{tmp_path / 'f'}?rgb=*_rgb.png&depth=*_depth.png&depth_scale=256&intrinsics=50,51,31.5,23.5"
    (pair,) = list(load(spec))
    assert pair.intrinsics == (50.0, 51.0, 31.5, 23.5)
    np.testing.assert_array_equal(pair.depth, from_spec.depth)
    assert split_specs(f"{spec},folder:{tmp_path / 'f'}") == [spec, f"folder:{tmp_path / 'f'}"]
    with pytest.raises(ConfigError, match="expected float"):
        load(f"folder:{tmp_path / 'f'}?depth_scale=mm")
    with pytest.raises(ConfigError, match=r"unknown reader options \['depth_sclae'\]"):
        load(f"folder:{tmp_path / 'f'}?depth_sclae=256")
    with pytest.raises(ConfigError, match=r"\?key=value"):
        load(f"folder:{tmp_path / 'f'}?depth_scale")


def test_depth_that_is_the_ground_truth_is_written_once_and_read_back_as_such(tmp_path):
    gt = np.full((H, W), 3.0, np.float32)
    sample = RGBDSample(np.zeros((H, W, 3), np.uint8), gt, gt=gt, name="dense", meta={"depth_is_gt": True})
    write_folder_sample(tmp_path, sample)
    assert not (tmp_path / "dense_gt.png").exists()
    (back,) = list(load(f"folder:{tmp_path}"))
    assert back.gt is back.depth and back.meta["depth_is_gt"]


def test_frames_in_subfolders_and_prefix_names_stay_separate(tmp_path):
    write_folder_sample(tmp_path / "a", _sample("x", 1))
    write_folder_sample(tmp_path / "a", _sample("x_2", 2))
    write_folder_sample(tmp_path / "b", _sample("x", 3))
    ds = load(f"folder:{tmp_path}")
    assert [s.name for s in ds] == ["a/x", "a/x_2", "b/x"]
    assert set(ds[0].meta) == {"max_depth", "eval_crop", "material"}, "x_2's files are not extras of x"
    np.testing.assert_array_equal(ds[1].rgb, _sample("x_2", 2).rgb)


def test_preview_images_beside_frames_are_not_read_as_maps(tmp_path):
    write_folder_sample(tmp_path, _sample())
    write_rgb(tmp_path / "scene_0001_preview.png", np.zeros((H, 5 * W, 3), np.uint8))
    (sample,) = list(load(f"folder:{tmp_path}"))
    assert "preview" not in sample.meta


@pytest.fixture(scope="module")
def eval_only(shared_data):
    return shared_data / "eval-only"


def test_eval_only_nyuv2_frame_converted_to_a_user_folder_keeps_its_stats(eval_only, tmp_path):
    src = eval_only / "nyuv2_unidepth"
    depth = read_depth(src / "depth.png", 1000)
    frame = RGBDSample(
        read_rgb(src / "rgb.png"), depth, intrinsics=read_intrinsics(src / "intrinsics.npy"), name="nyu"
    )
    write_folder_sample(tmp_path / "user", frame)
    (sample,) = list(load(f"folder:{tmp_path / 'user'}"))
    np.testing.assert_array_equal(sample.depth, depth)
    np.testing.assert_array_equal(sample.rgb, frame.rgb)
    valid = sample.depth[sample.depth > 0]
    # SOURCE.md: valid 68 %, 1.65-10.0 m, median 3.50 m, 0.9 % of pixels at the 10 m cap.
    assert valid.size / sample.depth.size == pytest.approx(0.68, abs=0.006)
    assert (valid.min(), np.median(valid), valid.max()) == pytest.approx((1.65, 3.50, 10.0), abs=0.006)
    assert (sample.depth == 10.0).mean() == pytest.approx(0.009, abs=0.0006)
    assert sample.intrinsics == pytest.approx((518.8579, 519.4696, 325.5825, 253.7362), abs=1e-3)


def test_eval_only_ipad_frame_keeps_its_low_resolution_depth_in_a_user_folder(eval_only, tmp_path):
    src = eval_only / "arkitscenes_promptda"
    (tmp_path / "ipad").mkdir()
    cv2.imwrite(str(tmp_path / "ipad" / "room_rgb.jpg"), cv2.imread(str(src / "image.jpg")))
    write_depth_png(tmp_path / "ipad" / "room_depth.png", read_depth(src / "arkit_depth.png", 1000), 1000)
    (sample,) = list(load(f"folder:{tmp_path / 'ipad'}"))
    assert sample.rgb.shape == (1440, 1920, 3) and sample.depth.shape == (192, 256)
    valid = sample.depth[sample.depth > 0]
    # SOURCE.md: valid 100 %, 1.57-3.51 m, median 2.65 m.
    assert valid.size == sample.depth.size
    assert (valid.min(), np.median(valid), valid.max()) == pytest.approx((1.57, 2.65, 3.51), abs=0.006)
    up = sample.depth_at_rgb_resolution()
    assert up.shape == (1440, 1920) and set(np.unique(up)) <= set(np.unique(sample.depth))
    # Each RGB pixel takes the depth pixel whose footprint holds its centre (7.5 RGB pixels per depth pixel).
    rows, cols = (
        np.floor((np.arange(1440) + 0.5) / 7.5).astype(int),
        np.floor((np.arange(1920) + 0.5) / 7.5).astype(int),
    )
    np.testing.assert_array_equal(up, sample.depth[rows[:, None], cols[None, :]])
    assert set(np.bincount(rows)) == {7, 8} and set(np.bincount(cols)) == {7, 8}


def test_eval_only_sparse_npy_is_accepted_as_depth(eval_only, tmp_path):
    src = eval_only / "omnidc_demo_indoor"
    write_rgb(tmp_path / "corridor_rgb.png", read_rgb(src / "demo_rgb.png"))
    write_depth_npy(tmp_path / "corridor_depth.npy", np.load(src / "demo_sparse_depth.npy", allow_pickle=False))
    (sample,) = list(load(f"folder:{tmp_path}"))
    # SOURCE.md: 2,148 points, 1.58-51.5 m.
    assert (sample.depth > 0).sum() == 2148
    valid = sample.depth[sample.depth > 0]
    assert (valid.min(), valid.max()) == pytest.approx((1.58, 51.5), abs=0.006)


# --- errors ---------------------------------------------------------------------------------------------------------


def test_empty_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=f"no frames found .* in {tmp_path}"):
        load(f"folder:{tmp_path}")


def test_missing_path_and_unknown_kind_and_bad_options(tmp_path):
    with pytest.raises(DataError, match="dataset path not found"):
        load(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="KIND:PATH"):
        load(f"kinect:{tmp_path}")
    with pytest.raises(ConfigError, match="KIND:PATH"):
        load(str(tmp_path))
    write_folder_sample(tmp_path, _sample())
    with pytest.raises(ConfigError, match="bad reader options"):
        load(f"folder:{tmp_path}", depth_sclae=256)
    with pytest.raises(ConfigError, match="unknown split"):
        load(f"folder:{tmp_path}", split="train")


def test_rgb_without_depth_and_depth_without_rgb_name_the_file(tmp_path):
    write_rgb(tmp_path / "lonely_rgb.png", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError, match="lonely_depth.png not found"):
        load(f"folder:{tmp_path}")
    (tmp_path / "lonely_rgb.png").unlink()
    write_depth_png(tmp_path / "orphan_depth.png", np.ones((H, W), np.float32))
    with pytest.raises(DataError, match="orphan_depth.png: depth file without a matching"):
        load(f"folder:{tmp_path}")


def test_both_png_and_npy_depth_is_ambiguous(tmp_path):
    write_folder_sample(tmp_path, _sample())
    write_depth_npy(tmp_path / "scene_0001_depth.npy", np.ones((H, W), np.float32))
    with pytest.raises(DataError, match="ambiguous"):
        load(f"folder:{tmp_path}")


def test_rgb_and_depth_of_different_aspect_are_refused_naming_both_files(tmp_path):
    write_rgb(tmp_path / "f_rgb.png", np.zeros((H, W, 3), np.uint8))
    write_depth_png(tmp_path / "f_depth.png", np.ones((40, 40), np.float32))
    ds = load(f"folder:{tmp_path}")
    with pytest.raises(DataError, match=r"different aspect ratios.*f_rgb\.png.*f_depth\.png"):
        ds[0]


@pytest.mark.parametrize(
    "image, match",
    [(np.full((H, W), 9, np.uint8), "8-bit"), (np.full((H, W, 3), 9, np.uint8), "3 channels")],
)
def test_visualisation_depth_images_are_refused_naming_the_file(tmp_path, image, match):
    write_rgb(tmp_path / "v_rgb.png", np.zeros((H, W, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "v_depth.png"), image)
    with pytest.raises(DataError, match=rf"v_depth\.png.*{match}"):
        load(f"folder:{tmp_path}")[0]


def test_nan_inf_negative_npy_depth_is_masked_with_a_warning_count(tmp_path, caplog):
    write_rgb(tmp_path / "n_rgb.png", np.zeros((H, W, 3), np.uint8))
    depth = np.full((H, W), 2.0, np.float32)
    depth[0, :4] = [np.nan, np.inf, -np.inf, -0.5]
    np.save(tmp_path / "n_depth.npy", depth)
    with caplog.at_level(logging.WARNING, logger="vlm_depth.data.sample"):
        sample = load(f"folder:{tmp_path}")[0]
    assert (sample.depth[0, :4] == 0).all() and (sample.depth[1:] == 2.0).all()
    assert any("n depth: 4 NaN/inf/negative" in r.getMessage() for r in caplog.records)


def test_intrinsics_json_with_missing_keys_names_the_file(tmp_path):
    write_folder_sample(tmp_path, _sample())
    (tmp_path / "scene_0001_intrinsics.json").write_text(json.dumps({"fx": 1.0, "fy": 1.0}))
    with pytest.raises(DataError, match=r"scene_0001_intrinsics\.json.*lacks \['cx', 'cy'\]"):
        load(f"folder:{tmp_path}")[0]


def test_writing_a_depth_beyond_the_png_range_raises(tmp_path):
    far = _sample()
    far.depth[0, 0] = 80.0
    with pytest.raises(DataError, match="uint16 range"):
        write_folder_sample(tmp_path, far)
    write_folder_sample(tmp_path, far, depth_format="npy")
    assert load(f"folder:{tmp_path}")[0].depth[0, 0] == 80.0
