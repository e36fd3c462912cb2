"""Dense assembly, the `complete` API and `vlm-depth complete` on real frames (NYUv2 640x480, KITTI 1242x375)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from trained_tiny import scene, train_tiny

from vlm_depth.cli import main
from vlm_depth.data.depth_io import read_depth, read_rgb
from vlm_depth.data.folder import write_folder_sample
from vlm_depth.data.sample import RGBDSample
from vlm_depth.depth import keep_input
from vlm_depth.infer.assemble import (
    assemble,
    cell_pixels,
    guided_fill,
    push_pull,
    query_grid,
    refinement_pixels,
    stride_for_budget,
)
from vlm_depth.infer.complete import complete, make_predictor
from vlm_depth.infer.outputs import intrinsics_from_fov
from vlm_depth.infer.readouts import ReadoutSettings
from vlm_depth.model.loading import load_model

NYU = "train-and-test/nyuv2_sync_metric3d"
NYU_K = (518.8579, 519.4696, 325.5824, 253.7362)
KITTI = "train-and-test/kitti_dc_gt_metric3d"


@pytest.fixture(scope="session")
def trained(tiny_ckpt, tmp_path_factory):
    """Folder of the briefly trained tiny coords-mode checkpoint (the one test_decoder.py uses)."""
    return train_tiny(tiny_ckpt, tmp_path_factory.getbasetemp() / "trained_tiny_coords", "coords")


def _two_regions(height=96, width=128, seed=0):
    """RGB with a slanted colour edge and depth 2 m / 5 m on either side of it (plus a gentle slope)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    left = xx < 0.55 * width + yy / 4
    gt = (np.where(left, 2.0, 5.0) + 0.002 * yy).astype(np.float32)
    rgb = np.where(left[..., None], (40, 60, 80), (200, 180, 150)) + rng.normal(0, 3, (height, width, 3))
    edge_band = np.abs(xx - (0.55 * width + yy / 4)) < 6
    return np.clip(rgb, 0, 255).astype(np.uint8), gt, edge_band


def test_grid_stride_is_the_smallest_within_the_budget():
    for shape, budget in (((480, 640), 4096), ((375, 1242), 1000), ((48, 64), 50), ((10, 10), 1)):
        stride = stride_for_budget(shape, budget)
        rows, cols = query_grid(shape, stride)
        assert len(rows) <= budget and len(set(zip(rows, cols))) == len(rows)
        assert rows.max() < shape[0] and cols.max() < shape[1]
        if stride > 1:
            assert len(query_grid(shape, stride - 1)[0]) > budget


def test_cell_pixels_put_one_query_in_every_cell_with_a_hole():
    rng = np.random.default_rng(0)
    holes = rng.random((45, 61)) < 0.1
    rows, cols = cell_pixels(holes, 8)
    hole_rows, hole_cols = np.nonzero(holes)
    hole_cells = set(zip(hole_rows // 8, hole_cols // 8))
    assert holes[rows, cols].all() and len(rows) == len(hole_cells) == len(set(zip(rows // 8, cols // 8)))
    for row, col in zip(rows, cols):  # the hole pixel nearest to its cell's grid point
        cell = (hole_rows // 8 == row // 8) & (hole_cols // 8 == col // 8)
        centre_r, centre_c = min(row // 8 * 8 + 4, 44), min(col // 8 * 8 + 4, 60)
        best = ((hole_rows[cell] - centre_r) ** 2 + (hole_cols[cell] - centre_c) ** 2).min()
        assert (row - centre_r) ** 2 + (col - centre_c) ** 2 == best
    full_rows, full_cols = cell_pixels(np.ones((45, 61), bool), 8)
    grid_rows, grid_cols = query_grid((45, 61), 8)
    assert sorted(zip(full_rows, full_cols)) == sorted(zip(grid_rows, grid_cols))


def test_push_pull_interpolates_constants_and_keeps_anchor_values():
    values = np.zeros((37, 53), np.float32)
    weights = np.zeros_like(values)
    values[5, 7], weights[5, 7] = 3.25, 1.0
    np.testing.assert_allclose(push_pull(values, weights), 3.25, rtol=1e-6)
    rows, cols = query_grid(values.shape, 6)
    values[rows, cols], weights[rows, cols] = 1.5, 1.0
    values[5, 7] = 1.5
    np.testing.assert_allclose(push_pull(values, weights), 1.5, rtol=1e-6)


def test_guided_fill_follows_the_image_edge_better_than_push_pull():
    rgb, gt, edge_band = _two_regions()
    stride = 8
    rows, cols = query_grid(gt.shape, stride)
    values, weights = np.zeros_like(gt), np.zeros_like(gt)
    values[rows, cols], weights[rows, cols] = gt[rows, cols], 1.0
    guided = guided_fill(rgb, values, weights, radius=stride)
    smooth = push_pull(values, weights)
    guided_err, smooth_err = np.abs(guided - gt)[edge_band].mean(), np.abs(smooth - gt)[edge_band].mean()
    assert guided_err < 0.6 * smooth_err, (guided_err, smooth_err)
    assert np.abs(guided - gt)[~edge_band].mean() < 0.05


def test_assembly_then_keep_returns_valid_input_pixels_exactly_and_ignores_unparseable_answers():
    rgb, gt, _ = _two_regions()
    rng = np.random.default_rng(1)
    sparse = np.where(rng.random(gt.shape) < 0.05, gt + 0.123, 0).astype(np.float32)
    rows, cols = query_grid(gt.shape, 8)
    values = gt[rows, cols].copy()
    values[:3] = np.nan  # unparseable answers give no prediction
    spreads = np.full(len(rows), 0.2, np.float32)
    refined, spread = assemble(rgb, sparse, rows, cols, values, spreads, radius=8)
    depth, uncertainty = keep_input(refined, sparse, spread)
    valid = sparse > 0
    np.testing.assert_array_equal(depth[valid], sparse[valid])
    assert (uncertainty[valid] == 0).all() and np.isfinite(depth).all() and (depth > 0).all()
    assert np.abs(uncertainty[~valid] - 0.2).max() <= 0.2 + 1e-6
    assert not np.array_equal(refined[valid], sparse[valid])  # assembly alone fills the input pixels too


def test_refinement_pixels_go_to_image_edges():
    rgb, gt, edge_band = _two_regions()
    candidates = np.ones(gt.shape, bool)
    rows, cols = refinement_pixels(rgb, np.zeros_like(gt), gt, candidates, stride=8, count=20, by="edges")
    assert len(rows) == 20 and edge_band[rows, cols].all()


def test_complete_keeps_input_handles_monocular_lower_resolution_and_refinement(trained):
    model, processor = load_model(str(trained), device="cpu")
    rgb, gt = scene(48, 64, seed=11)
    settings = ReadoutSettings(stride=4)
    sparse = np.where(np.random.default_rng(2).random(gt.shape) < 0.2, gt, 0).astype(np.float32)
    result = complete(model, processor, rgb, sparse, settings=settings)
    valid = sparse > 0
    assert result.depth.shape == result.uncertainty.shape == gt.shape
    np.testing.assert_array_equal(result.depth[valid], sparse[valid])
    assert (result.uncertainty[valid] == 0).all() and (result.uncertainty[~valid] >= 0).all()
    assert np.median(result.uncertainty[~valid]) > 0
    assert np.isfinite(result.depth).all() and (result.depth > 0).all()
    assert 0 < result.stats["queries"] <= len(query_grid(gt.shape, 4)[0])
    # Answers of the briefly trained model are metres of the scene's range, so the map is not the grammar's limits.
    assert 0.5 < np.median(result.depth[~valid]) < 10

    for monocular in (None, np.zeros_like(gt)):
        mono = complete(model, processor, rgb, monocular, settings=settings)
        assert mono.stats["queries"] == len(query_grid(gt.shape, 4)[0])
        assert np.isfinite(mono.depth).all() and (mono.depth > 0).all() and np.median(mono.uncertainty) > 0

    low = sparse[::2, ::2]  # 32x24 depth for a 64x48 image
    up = RGBDSample(rgb=rgb, depth=low).depth_at_rgb_resolution()
    lowres = complete(model, processor, rgb, low, settings=settings)
    assert lowres.depth.shape == gt.shape
    np.testing.assert_array_equal(lowres.depth[up > 0], up[up > 0])

    refined = complete(model, processor, rgb, sparse, settings=ReadoutSettings(stride=4, refine_queries=10))
    assert refined.stats["queries"] == result.stats["queries"] + 10 and "refine_decode_s" in refined.stats["timings"]
    np.testing.assert_array_equal(refined.depth[valid], sparse[valid])
    smoothed = complete(model, processor, rgb, sparse, settings=ReadoutSettings(stride=4, refine_keep=True))
    assert smoothed.stats["queries"] == len(query_grid(gt.shape, 4)[0])  # keep pixels are asked too
    assert not np.array_equal(smoothed.depth[valid], sparse[valid])

    predict = make_predictor(str(trained), settings=settings, device="cpu")
    depth, uncertainty = predict(rgb, sparse)
    np.testing.assert_array_equal(depth, result.depth)
    np.testing.assert_array_equal(uncertainty, result.uncertainty)


def _read_ply(path):
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii")
    count = int(header.split("element vertex ")[1].split("\n")[0])
    vertex = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    assert "format binary_little_endian 1.0" in header and len(raw) == end + count * vertex.itemsize
    return np.frombuffer(raw, dtype=vertex, offset=end)


def _check_outputs(out, name, rgb, sparse, intrinsics=None):
    """Every file of one completed image; PNG == npy to 1 mm; valid input pixels unchanged; PLY back-projection."""
    depth = np.load(out / f"{name}_depth.npy", allow_pickle=False)
    assert depth.dtype == np.float32 and depth.shape == rgb.shape[:2]
    png = read_depth(out / f"{name}_depth.png", scale=1000.0)
    fits = depth <= 65.535
    assert np.abs(png[fits] - depth[fits]).max() <= 0.0005 + 2e-5  # mm rounding + float32 error: within 1 mm
    assert (png[~fits] == 0).all()
    valid = sparse > 0
    np.testing.assert_array_equal(depth[valid], sparse[valid])
    assert np.isfinite(depth).all() and (depth > 0).all()
    uncertainty = np.load(out / f"{name}_uncertainty.npy", allow_pickle=False)
    assert uncertainty.dtype == np.float32 and uncertainty.shape == depth.shape and (uncertainty[valid] == 0).all()
    for kind in ("color", "uncertainty"):
        assert read_rgb(out / f"{name}_{kind}.png").shape == rgb.shape
    kept = read_rgb(out / f"{name}_uncertainty.png")[valid]
    assert (kept == 150).all(), "kept input pixels are gray, not black like missing ones"
    compare = read_rgb(out / f"{name}_compare.png")
    height, width = rgb.shape[:2]
    assert compare.shape[1] == 4 * width and compare.shape[0] > height  # a colour-bar strip under the tiles
    assert (
        np.abs(compare[40:height, :width].astype(int) - rgb[40:]).max() == 0
    )  # left tile is the RGB (below the label)
    summary = json.loads((out / "summary.json").read_text())
    (image,) = [i for i in summary["per_image"] if i["name"] == name]
    low, high = image["depth_range_m"]
    assert 0 <= low < high and image["uncertainty_range_m"][0] == 0 < image["uncertainty_range_m"][1]
    if intrinsics is not None:
        cloud = _read_ply(out / f"{name}.ply")
        assert len(cloud) == depth.size
        fx, fy, cx, cy = intrinsics
        i = len(cloud) // 3
        row, col = divmod(i, depth.shape[1])
        z = depth[row, col]
        np.testing.assert_allclose(
            [cloud["x"][i], cloud["y"][i], cloud["z"][i]], [(col - cx) / fx * z, (row - cy) / fy * z, z], rtol=1e-5
        )
    else:
        assert not (out / f"{name}.ply").exists()


def test_cli_completes_a_folder_of_nyu_frames(trained, shared_data, tmp_path):
    frames = sorted((shared_data / NYU / "rgb").glob("*.jpg"))[:2]
    folder = tmp_path / "nyu"
    samples = []
    for rgb_path in frames:
        index = rgb_path.stem.split("_")[-1]
        depth = read_depth(shared_data / NYU / "depth" / f"sync_depth_{index}.png", scale=1000.0)
        sample = RGBDSample(rgb=read_rgb(rgb_path), depth=depth, intrinsics=NYU_K, name=f"nyu_{index}")
        write_folder_sample(folder, sample)
        samples.append(sample)
    out = tmp_path / "out"
    code = main(
        [
            "complete",
            "--model",
            str(trained),
            "--dataset",
            f"folder:{folder}",
            "--out",
            str(out),
            "--query_budget",
            "300",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2 and summary["queries"] > 0 and summary["pixels_per_s"] > 0
    assert {"load_s", "prefix_s", "decode_s", "assemble_s", "write_s"} <= set(summary["timings"])
    for sample in samples:
        assert sample.rgb.shape == (480, 640, 3)
        _check_outputs(out, sample.name, sample.rgb, sample.depth, NYU_K)


def test_cli_completes_a_kitti_pair_and_a_lower_resolution_depth(trained, shared_data, tmp_path):
    rgb_path = shared_data / KITTI / "rgb" / "0000000005.png"
    depth_path = shared_data / KITTI / "gt_depth" / "0000000005.png"
    out = tmp_path / "kitti"
    args = ["complete", "--model", str(trained), "--rgb", str(rgb_path), "--depth", str(depth_path)]
    assert main([*args, "--depth_scale", "256", "--out", str(out), "--query_budget", "300", "--fov", "80"]) == 0
    rgb = read_rgb(rgb_path)
    assert rgb.shape == (375, 1242, 3)
    _check_outputs(out, "0000000005", rgb, read_depth(depth_path, scale=256.0), intrinsics_from_fov(1242, 375, 80))

    nyu_rgb = shared_data / NYU / "rgb" / "rgb_00050.jpg"
    nyu_depth = read_depth(shared_data / NYU / "depth" / "sync_depth_00050.png", scale=1000.0)
    np.save(tmp_path / "low.npy", nyu_depth[::2, ::2])  # 320x240 depth for the 640x480 image
    out = tmp_path / "low"
    args = ["complete", "--model", str(trained), "--rgb", str(nyu_rgb), "--depth", str(tmp_path / "low.npy")]
    assert main([*args, "--out", str(out), "--query_budget", "300"]) == 0
    rgb = read_rgb(nyu_rgb)
    up = RGBDSample(rgb=rgb, depth=nyu_depth[::2, ::2]).depth_at_rgb_resolution()
    _check_outputs(out, "rgb_00050", rgb, up)


@pytest.mark.parametrize("case", ["mismatched_sizes", "all_nan", "8bit_png", "missing_file", "bad_model"])
def test_cli_bad_inputs_give_one_clear_error_line(case, tiny_ckpt, tmp_path, capsys):
    rgb = np.zeros((48, 64, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb)
    depth_path, model = tmp_path / "depth.npy", str(tiny_ckpt)
    if case == "mismatched_sizes":
        np.save(depth_path, np.ones((50, 50), np.float32))
    elif case == "all_nan":
        np.save(depth_path, np.full((48, 64), np.nan, np.float32))
    elif case == "8bit_png":
        depth_path = tmp_path / "depth.png"
        cv2.imwrite(str(depth_path), np.full((48, 64), 7, np.uint8))
    elif case == "missing_file":
        depth_path = tmp_path / "nope.png"
    else:
        np.save(depth_path, np.ones((48, 64), np.float32))
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "config.json").write_text("{not json")
        model = str(tmp_path / "broken")
    argv = ["complete", "--model", model, "--rgb", str(tmp_path / "rgb.png"), "--depth", str(depth_path)]
    code = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    expected = {
        "mismatched_sizes": "aspect",
        "all_nan": "no finite value",
        "8bit_png": "8-bit",
        "missing_file": "not found",
        "bad_model": "broken",
    }[case]
    assert expected in err[0]
