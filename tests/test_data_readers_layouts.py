"""Readers on miniature trees built in tmp_path exactly in each benchmark's official layout and encoding, from known
float arrays: every reader must recover the meters to its encoding's quantisation step."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest
import scipy.io

from vlm_depth.data import load
from vlm_depth.data.depth_io import write_depth_png, write_rgb
from vlm_depth.data.eth3d import quaternion_to_rotation
from vlm_depth.errors import ConfigError, DataError

H, W = 48, 64


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _depth(seed: int, low: float = 0.5, high: float = 10.0, missing: float = 0.3) -> np.ndarray:
    rng = _rng(seed)
    depth = rng.uniform(low, high, (H, W)).astype(np.float32)
    depth[rng.random((H, W)) < missing] = 0
    return depth


def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return _rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_codes(path, codes: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), codes.astype(np.uint16))


# --- NYUv2 labeled .mat (MATLAB v7.3 = HDF5, axes reversed) ---------------------------------------------------------


def test_nyuv2_labeled_mat_recovers_raw_and_inpainted_depth_with_official_splits(tmp_path):
    n = 4
    rgb = np.stack([_rgb(i, 480, 640) for i in range(n)])
    gt = np.stack([_depth(10 + i, missing=0) for i in range(n)])
    gt = np.stack([cv2.resize(g, (640, 480), interpolation=cv2.INTER_NEAREST) for g in gt])
    raw = np.where(_rng(5).random(gt.shape) < 0.3, 0, gt).astype(np.float32)
    with h5py.File(tmp_path / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = rgb.transpose(0, 3, 2, 1)  # h5py sees MATLAB's (H, W, 3, N) as (N, 3, W, H)
        f["depths"] = gt.transpose(0, 2, 1)
        f["rawDepths"] = raw.transpose(0, 2, 1)
    scipy.io.savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [2], [4]]), "testNdxs": np.array([[3]])})

    test = load(f"nyuv2:{tmp_path / 'nyu_depth_v2_labeled.mat'}")
    train = load(f"nyuv2:{tmp_path / 'nyu_depth_v2_labeled.mat'}", split="train")
    assert (test.split, len(test), len(train)) == ("test", 1, 3)
    sample = test[0]
    assert sample.name == "0002", "testNdxs are 1-based MATLAB indices"
    np.testing.assert_array_equal(sample.rgb, rgb[2])
    np.testing.assert_array_equal(sample.depth, raw[2])
    np.testing.assert_array_equal(sample.gt, gt[2])
    assert sample.intrinsics == pytest.approx((518.8579, 519.4696, 325.5824, 253.7362))
    assert sample.meta["eval_crop"] == (45, 471, 41, 601) and sample.meta["max_depth"] == 10.0
    assert [s.name for s in train] == ["0000", "0001", "0003"]


def test_nyuv2_split_without_splits_mat_is_an_error(tmp_path):
    with h5py.File(tmp_path / "labeled.mat", "w") as f:
        f["images"] = np.zeros((1, 3, 640, 480), np.uint8)
        f["depths"] = f["rawDepths"] = np.zeros((1, 640, 480), np.float32)
    with pytest.raises(DataError, match="splits.mat"):
        load(f"nyuv2:{tmp_path / 'labeled.mat'}", split="test")
    assert len(load(f"nyuv2:{tmp_path / 'labeled.mat'}", split="all")) == 1


def test_nyuv2_sync_layout_in_one_folder_per_scene(tmp_path):
    depth = _depth(1)
    scene = tmp_path / "official_split" / "test" / "bathroom"
    write_rgb(scene / "rgb_00045.jpg", _rgb(1))
    write_depth_png(scene / "sync_depth_00045.png", depth, 1000)
    (sample,) = list(load(f"nyuv2:{tmp_path / 'official_split' / 'test'}"))
    assert sample.name == "bathroom/rgb_00045"
    assert np.abs(sample.depth - depth).max() <= 0.5e-3 + 1e-6


# --- KITTI depth completion -----------------------------------------------------------------------------------------


def test_kitti_val_selection_cropped_recovers_velodyne_and_groundtruth(tmp_path):
    base = tmp_path / "depth_selection" / "val_selection_cropped"
    lidar, gt = _depth(2, 1, 80, missing=0.95), _depth(3, 1, 80, missing=0.8)
    drive, frame = "2011_09_26_drive_0002_sync", "0000000005"
    write_rgb(base / "image" / f"{drive}_image_{frame}_image_02.png", _rgb(2))
    write_depth_png(base / "velodyne_raw" / f"{drive}_velodyne_raw_{frame}_image_02.png", lidar, 256)
    write_depth_png(base / "groundtruth_depth" / f"{drive}_groundtruth_depth_{frame}_image_02.png", gt, 256)
    k = np.array([721.5377, 0, 609.5593 - 13, 0, 721.5377, 172.854 - 23, 0, 0, 1])
    (base / "intrinsics").mkdir()
    (base / "intrinsics" / f"{drive}_image_{frame}_image_02.txt").write_text(" ".join(f"{v:.6e}" for v in k))
    for root in (tmp_path, tmp_path / "depth_selection", base):
        (sample,) = list(load(f"kitti_dc:{root}"))
        assert np.abs(sample.depth - lidar).max() <= 0.5 / 256 + 1e-5
        assert np.abs(sample.gt - gt).max() <= 0.5 / 256 + 1e-5
        assert (sample.depth == 0).sum() == (lidar == 0).sum()
        assert sample.intrinsics == pytest.approx((721.5377, 721.5377, 596.5593, 149.854))


def test_kitti_test_split_has_no_ground_truth(tmp_path):
    base = tmp_path / "test_depth_completion_anonymous"
    write_rgb(base / "image" / "0000000000.png", _rgb(4))
    write_depth_png(base / "velodyne_raw" / "0000000000.png", _depth(4, 1, 80, 0.95), 256)
    (base / "intrinsics").mkdir()
    (base / "intrinsics" / "0000000000.txt").write_text("700 0 600 0 700 170 0 0 1")
    (sample,) = list(load(f"kitti_dc:{tmp_path}", split="test_depth_completion_anonymous"))
    assert sample.gt is None and sample.intrinsics == (700, 700, 600, 170)


def test_kitti_raw_layout_uses_raw_rgb_and_p_rect_calibration(tmp_path):
    drive, cam = "2011_09_26_drive_0001_sync", "image_02"
    lidar, gt = _depth(5, 1, 80, missing=0.95), _depth(6, 1, 80, missing=0.8)
    velodyne = tmp_path / "data_depth_velodyne" / "train" / drive / "proj_depth" / "velodyne_raw" / cam
    annotated = tmp_path / "data_depth_annotated" / "train" / drive / "proj_depth" / "groundtruth" / cam
    write_depth_png(velodyne / "0000000005.png", lidar, 256)
    write_depth_png(annotated / "0000000005.png", gt, 256)
    raw = tmp_path / "raw"
    write_rgb(raw / "2011_09_26" / drive / cam / "data" / "0000000005.png", _rgb(5))
    (raw / "2011_09_26" / "calib_cam_to_cam.txt").write_text(
        "calib_time: 09-Jan-2012 13:57:47\n"
        "P_rect_02: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 1.728540e+02 "
        "2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03\n"
    )
    (sample,) = list(load(f"kitti_dc:{tmp_path}", split="train", raw_root=raw))
    assert sample.name == f"{drive}/{cam}/0000000005"
    assert np.abs(sample.depth - lidar).max() <= 0.5 / 256 + 1e-5 and np.abs(sample.gt - gt).max() <= 0.5 / 256 + 1e-5
    assert sample.intrinsics == pytest.approx((721.5377, 721.5377, 609.5593, 172.854))
    np.testing.assert_array_equal(sample.rgb, _rgb(5))


# --- VOID -----------------------------------------------------------------------------------------------------------


def test_void_applies_the_validity_map_and_reads_the_test_list(tmp_path):
    density = tmp_path / "void_release" / "void_150"
    seq = density / "data" / "birthplace_of_internet"
    sparse, gt = _depth(7, 0.2, 5, missing=0.995), _depth(8, 0.2, 5, missing=0.2)
    validity = (sparse > 0).astype(np.uint16) * 256
    outside = np.argwhere(sparse == 0)[0]
    sparse_codes = np.rint(sparse * 256)
    sparse_codes[tuple(outside)] = 300  # a stray code outside the validity map must be dropped
    for ts in ("1552097915.2364", "1552097915.5257"):
        write_rgb(seq / "image" / f"{ts}.png", _rgb(7))
        _write_codes(seq / "sparse_depth" / f"{ts}.png", sparse_codes)
        _write_codes(seq / "validity_map" / f"{ts}.png", validity)
        write_depth_png(seq / "ground_truth" / f"{ts}.png", gt, 256)
    np.savetxt(seq / "K.txt", np.array([[514.638, 0, 315.267], [0, 518.858, 247.358], [0, 0, 1]]))
    (density / "test_image.txt").write_text("void_150/data/birthplace_of_internet/image/1552097915.5257.png\n")

    test = load(f"void:{tmp_path / 'void_release'}", density=150)
    assert len(test) == 1 and len(load(f"void:{density}", split="all")) == 2
    sample = test[0]
    assert sample.name == "birthplace_of_internet/1552097915.5257"
    assert sample.depth[tuple(outside)] == 0
    assert np.abs(sample.depth - sparse).max() <= 0.5 / 256 + 1e-6
    assert np.abs(sample.gt - gt).max() <= 0.5 / 256 + 1e-6
    assert sample.intrinsics == pytest.approx((514.638, 518.858, 315.267, 247.358))
    assert (sample.meta["min_depth"], sample.meta["max_depth"]) == (0.2, 5.0)
    with pytest.raises(ConfigError, match="density"):
        load(f"void:{tmp_path / 'void_release'}", density=42)


# --- iBims-1 --------------------------------------------------------------------------------------------------------


def test_ibims_masks_invalid_and_transparent_pixels_and_reads_calib(tmp_path):
    rgb, depth = _rgb(9, 480, 640), _rng(9).uniform(0.5, 30, (480, 640))
    mask_invalid = np.ones((480, 640), np.uint8)
    mask_transp = np.ones((480, 640), np.uint8)
    mask_invalid[:10], mask_transp[:, :20] = 0, 0
    k = np.array([[559.62, 0, 326.2], [0, 559.62, 240.5], [0, 0, 1.0]])
    data = {
        "rgb": rgb,
        "depth": depth,
        "calib": k.T,  # MATLAB's convention: stored transposed
        "mask_invalid": mask_invalid,
        "mask_transp": mask_transp,
        "edges": np.zeros((480, 640), np.uint8),
    }
    (tmp_path / "ibims1_core_mat").mkdir()
    scipy.io.savemat(tmp_path / "ibims1_core_mat" / "corridor_01.mat", {"data": data})
    (tmp_path / "imagelist.txt").write_text("corridor_01\n")
    (sample,) = list(load(f"ibims:{tmp_path}"))
    expected = np.where((mask_invalid > 0) & (mask_transp > 0), depth, 0).astype(np.float32)
    np.testing.assert_array_equal(sample.gt, expected)
    assert sample.depth is sample.gt and sample.meta["depth_is_gt"]
    np.testing.assert_array_equal(sample.rgb, rgb)
    np.testing.assert_array_equal(sample.meta["mask_transp"], mask_transp)
    assert sample.intrinsics == pytest.approx((559.62, 559.62, 326.2, 240.5))


# --- DDAD (VPP4DC pre-generated) ------------------------------------------------------------------------------------


def test_ddad_pregenerated_layout_recovers_truncated_kitti_encoding(tmp_path):
    base = tmp_path / "pregenerated" / "val"
    hints, gt = _depth(11, 1, 200, 0.98), _depth(12, 1, 200, 0.9)
    write_rgb(base / "rgb" / "0000000000.png", _rgb(11))
    _write_codes(base / "hints" / "0000000000.png", (hints * 256.0).astype(np.uint16))  # as convert_ddad.py writes
    _write_codes(base / "gt" / "0000000000.png", (gt * 256.0).astype(np.uint16))
    (base / "intrinsics").mkdir()
    np.savetxt(base / "intrinsics" / "0000000000.txt", np.array([[2181.5, 0, 928.0], [0, 2181.5, 615.0], [0, 0, 1]]))
    (sample,) = list(load(f"ddad:{tmp_path / 'pregenerated'}"))
    for got, want in ((sample.depth, hints), (sample.gt, gt)):
        err = want - got
        assert err.min() >= -1e-5 and err.max() < 1 / 256 + 1e-5, "truncated codes lie at most one step below"
    assert sample.intrinsics == pytest.approx((2181.5, 2181.5, 928.0, 615.0))


# --- ETH3D ----------------------------------------------------------------------------------------------------------


def test_eth3d_reads_raw_float_ground_truth_and_projects_colmap_sfm_points(tmp_path):
    scene = tmp_path / "courtyard"
    gt = _depth(13, 2, 20, missing=0.1)
    gt_raw = gt.copy()
    gt_raw[gt == 0] = np.inf  # the format's "no ground truth"
    (scene / "ground_truth_depth" / "dslr_images").mkdir(parents=True)
    gt_raw.astype("<f4").tofile(scene / "ground_truth_depth" / "dslr_images" / "DSC_0286.JPG")
    write_rgb(scene / "images" / "dslr_images" / "DSC_0286.png", _rgb(13))
    (scene / "images" / "dslr_images" / "DSC_0286.png").rename(scene / "images" / "dslr_images" / "DSC_0286.JPG")

    # COLMAP model: pixel centres at +0.5, pose world->camera, points observed at chosen pixels.
    fx, fy, cx, cy = 50.0, 52.0, 32.5, 24.5
    q = np.array([0.9, 0.1, -0.2, 0.15])
    q /= np.linalg.norm(q)
    rot, t = quaternion_to_rotation(*q), np.array([0.3, -0.1, 1.2])
    rows, cols = np.nonzero(gt > 0)
    pick = _rng(13).choice(len(rows), 40, replace=False)
    rows, cols = rows[pick], cols[pick]
    x, y = cols + 0.5, rows + 0.5  # observed keypoints in COLMAP pixel coordinates
    z = gt[rows, cols].astype(np.float64)
    cam_points = np.stack([(x - cx) / fx * z, (y - cy) / fy * z, z], axis=1)
    world = (cam_points - t) @ rot  # inverse of X_cam = R X + t
    calib = scene / "dslr_calibration_jpg"
    calib.mkdir()
    (calib / "cameras.txt").write_text(
        f"# Camera list\n1 THIN_PRISM_FISHEYE {W} {H} {fx} {fy} {cx} {cy} 0 0 0 0 0 0 0 0\n"
    )
    observations = " ".join(f"{a} {b} {i}" for i, (a, b) in enumerate(zip(x, y))) + " 3.0 4.0 -1"
    (calib / "images.txt").write_text(
        "# Image list\n"
        + f"7 {' '.join(map(str, q))} {' '.join(map(str, t))} 1 dslr_images/DSC_0286.JPG\n{observations}\n"
    )
    (calib / "points3D.txt").write_text(
        "# 3D point list\n" + "".join(f"{i} {p[0]} {p[1]} {p[2]} 128 128 128 0.5 7 {i}\n" for i, p in enumerate(world))
    )

    (sample,) = list(load(f"eth3d:{tmp_path}"))
    assert sample.name == "courtyard/DSC_0286"
    np.testing.assert_array_equal(sample.gt, gt)
    assert (sample.depth > 0).sum() == 40
    np.testing.assert_allclose(sample.depth[rows, cols], z, rtol=1e-5)
    assert sample.intrinsics == pytest.approx((fx, fy, cx - 0.5, cy - 0.5))
    (dense,) = list(load(f"eth3d:{tmp_path}", sfm=False))
    assert dense.depth is dense.gt
    assert len(load(f"eth3d:{tmp_path}", split="outdoor")) == 1
    with pytest.raises(DataError, match="no frames"):
        load(f"eth3d:{tmp_path}", split="indoor")


# --- Virtual KITTI 2 ------------------------------------------------------------------------------------------------


def test_vkitti2_centimetre_depth_with_sky_as_missing_and_per_frame_intrinsics(tmp_path):
    variation = tmp_path / "Scene01" / "clone"
    depth = _depth(14, 1, 300, missing=0)
    codes = np.rint(depth * 100)
    codes[:5] = 65535  # sky
    for frame in (0, 1):
        write_rgb(variation / "frames" / "rgb" / "Camera_0" / f"rgb_{frame:05d}.jpg", _rgb(14))
        _write_codes(variation / "frames" / "depth" / "Camera_0" / f"depth_{frame:05d}.png", codes)
    (variation / "intrinsic.txt").write_text(
        "frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]\n"
        + "".join(f"{frame} {cam} 725.0087 725.0087 620.5 187\n" for frame in (0, 1) for cam in (0, 1))
    )
    ds = load(f"vkitti2:{tmp_path}")
    assert len(ds) == 2 and len(load(f"vkitti2:{tmp_path}", scenes=["Scene01"], variations=["clone"])) == 2
    sample = ds[1]
    assert sample.name == "Scene01/clone/Camera_0/00001"
    assert (sample.depth[:5] == 0).all()
    assert np.abs(sample.depth[5:] - depth[5:]).max() <= 0.005 + 1e-5
    assert sample.intrinsics == (725.0087, 725.0087, 620.5, 187.0) and sample.meta["max_depth"] == 80.0


def test_vkitti2_filters_select_nothing_is_an_error(tmp_path):
    variation = tmp_path / "Scene01" / "clone"
    write_rgb(variation / "frames" / "rgb" / "Camera_0" / "rgb_00000.jpg", _rgb(15))
    with pytest.raises(DataError, match="no frames"):
        load(f"vkitti2:{tmp_path}", variations=["fog"])


# --- Hypersim split csv ---------------------------------------------------------------------------------------------


def test_hypersim_split_csv_selects_public_frames_of_the_split(tmp_path):
    scene = tmp_path / "ai_001_001"
    geometry, final = scene / "images" / "scene_cam_00_geometry_hdf5", scene / "images" / "scene_cam_00_final_hdf5"
    geometry.mkdir(parents=True)
    final.mkdir(parents=True)
    distance = _rng(16).uniform(1, 5, (H, W)).astype(np.float16)
    distance[0, 0] = np.nan  # no geometry
    for frame in (0, 1, 2):
        with h5py.File(geometry / f"frame.{frame:04d}.depth_meters.hdf5", "w") as f:
            f["dataset"] = distance
        with h5py.File(final / f"frame.{frame:04d}.color.hdf5", "w") as f:
            f["dataset"] = _rng(frame).uniform(0, 1, (H, W, 3)).astype(np.float16)
    m = np.diag([np.tan(np.pi / 6), np.tan(np.pi / 6) * H / W, -1.0])
    header = ["scene_name", "settings_output_img_height", "settings_output_img_width"]
    header += [f"M_cam_from_uv_{i}{j}" for i in range(3) for j in range(3)]
    row = ["ai_001_001", str(float(H)), str(float(W)), *map(str, m.reshape(-1))]
    (tmp_path / "metadata_camera_parameters.csv").write_text(",".join(header) + "\n" + ",".join(row) + "\n")
    split_header = "scene_name,camera_name,frame_id,included_in_public_release,exclude_reason,split_partition_name\n"
    (tmp_path / "metadata_images_split_scene_v1.csv").write_text(
        split_header
        + "ai_001_001,cam_00,0,True,,train\nai_001_001,cam_00,1,False,bad,train\nai_001_001,cam_00,2,True,,val\n"
    )
    train = load(f"hypersim:{tmp_path}", split="train")
    assert [s.name for s in train] == ["ai_001_001/cam_00/0000"]
    assert len(load(f"hypersim:{tmp_path}")) == 3
    sample = train[0]
    f = W / 2 / np.tan(np.pi / 6)
    assert sample.intrinsics == pytest.approx((f, f, W / 2 - 0.5, H / 2 - 0.5))
    x, y = np.meshgrid(np.arange(W) - W / 2 + 0.5, np.arange(H) - H / 2 + 0.5)
    pinhole = distance.astype(np.float64) * f / np.sqrt(x**2 + y**2 + f**2)
    assert sample.depth[0, 0] == 0
    np.testing.assert_allclose(sample.depth[1:], pinhole[1:], rtol=1e-5)


def test_hypersim_without_camera_metadata_refuses_to_guess(tmp_path):
    geometry = tmp_path / "ai_002_002" / "images" / "scene_cam_00_geometry_hdf5"
    geometry.mkdir(parents=True)
    with h5py.File(geometry / "frame.0000.depth_meters.hdf5", "w") as f:
        f["dataset"] = np.ones((H, W), np.float16)
    ds = load(f"hypersim:{tmp_path}")
    with pytest.raises(DataError, match="metadata_camera_parameters"):
        ds[0]
