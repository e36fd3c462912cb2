"""Sparsity protocols: parsing, exact counts, subsets of GT, reproducibility, scan-line structure on a real KITTI
frame, monotone block severities, and value preservation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vlm_depth.data.sparsify import (
    BLOCK_SEVERITIES,
    PROTOCOL_FORMS,
    Protocol,
    lidar_pixels,
    parse_protocol,
    sparsify,
)
from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError

H, W = 96, 128
KITTI = "train-and-test/kitti_dc_gt_metric3d"
KITTI_K = (707.0493, 707.0493, 604.0814, 180.5066)  # from the folder's SOURCE.md


@pytest.fixture(scope="module")
def scene() -> dict:
    """Semi-dense GT (a slanted plane with a hole and NaN / negative pixels) and a textured RGB."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:H, 0:W]
    gt = (1.0 + 0.05 * rows + 0.02 * cols + rng.uniform(0, 0.01, (H, W))).astype(np.float32)
    gt[10:40, 20:60] = 0.0
    gt[rng.random((H, W)) < 0.05] = np.nan
    gt[rng.random((H, W)) < 0.02] = -1.0
    tiles = rng.integers(0, 256, (H // 8, W // 8, 3), dtype=np.uint8)
    rgb = np.kron(tiles, np.ones((8, 8, 1), dtype=np.uint8))
    return {"gt": gt, "rgb": rgb, "valid": valid_mask(gt)}


@pytest.fixture(scope="module")
def kitti_gt(shared_data) -> np.ndarray:
    path = shared_data / KITTI / "gt_depth" / "0000000005.png"
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw is not None and raw.dtype == np.uint16, path
    return raw.astype(np.float32) / 256.0


ALL_SPECS = [
    "uniform:300",
    "density:0.05",
    "density:0.01~0.1",
    "lidar:16",
    "lidar:8:-10:5",
    "sfm:sift",
    "sfm:orb",
    "blocks:easy",
    "blocks:extreme",
    "perlin:0.2",
    "noise:0.1",
    "sensor",
    "uniform:2000+noise:0.05",
]
VALUE_PRESERVING = [s for s in ALL_SPECS if "noise" not in s and not s.startswith("blocks")]


def _run(spec: str, scene: dict, seed: int = 0) -> np.ndarray:
    return sparsify(spec, scene["gt"], rgb=scene["rgb"], sensor=scene["gt"], seed=seed)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_every_documented_form_parses_and_its_spec_round_trips(spec):
    protocol = parse_protocol(spec)
    assert isinstance(protocol, Protocol)
    assert parse_protocol(protocol.spec) == protocol


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "uniform",
        "uniform:abc",
        "uniform:0",
        "uniform:1.5",
        "density:0",
        "density:1.5",
        "density:0.2~0.1",
        "lidar:64:5",
        "lidar:64:10:-10",
        "sfm:surf",
        "blocks:insane",
        "perlin:2",
        "noise:-0.1",
        "noise:0.1+noise:0.1",
        "uniform:5+lidar:4",
        "uniform:5+noise:0.1+noise:0.1",
        "sensor:1",
        "poisson:3",
    ],
)
def test_malformed_spec_raises_config_error_listing_valid_forms(spec):
    with pytest.raises(ConfigError) as info:
        parse_protocol(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert all(form in message for form in PROTOCOL_FORMS)


@pytest.mark.parametrize("n", [5, 100, 500, 3000])
def test_uniform_returns_exactly_the_scaled_count_as_a_subset_of_gt(scene, n):
    out = _run(f"uniform:{n}", scene)
    n_valid = int(scene["valid"].sum())
    expected = max(round(n_valid * n / (H * W)), 5)  # OMNI-DC: N at full coverage, scaled by the valid share
    kept = out > 0
    assert out.dtype == np.float32 and out.shape == (H, W)
    assert kept.sum() == expected
    assert scene["valid"][kept].all()
    np.testing.assert_array_equal(out[kept], scene["gt"][kept])


def test_uniform_keeps_at_least_five_points_and_never_more_than_exist():
    gt = np.zeros((H, W), dtype=np.float32)
    gt.flat[[3, 50, 700]] = [1.0, 2.0, 3.0]
    assert (sparsify("uniform:10000", gt) > 0).sum() == 3
    gt.flat[:400] = 2.0
    assert (sparsify("uniform:10", gt) > 0).sum() == 5


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_protocols_are_reproducible_by_seed(scene, spec):
    np.testing.assert_array_equal(_run(spec, scene, seed=7), _run(spec, scene, seed=7))
    if spec.split(":")[0] in ("uniform", "density", "blocks", "perlin", "noise"):
        assert not np.array_equal(_run(spec, scene, seed=7), _run(spec, scene, seed=8))


@pytest.mark.parametrize("spec", VALUE_PRESERVING)
def test_every_protocol_but_noise_keeps_gt_values_of_kept_points_unchanged(scene, spec):
    out = _run(spec, scene)
    kept = out > 0
    assert kept.any(), spec
    assert np.isfinite(out).all() and (out >= 0).all()
    assert scene["valid"][kept].all()
    np.testing.assert_array_equal(out[kept], scene["gt"][kept])


@pytest.mark.parametrize("spec,share", [("density:0.05", 0.05), ("perlin:0.2", 0.2), ("density:1", 1.0)])
def test_density_and_perlin_keep_the_given_share_of_valid_pixels(scene, spec, share):
    assert (_run(spec, scene) > 0).sum() == round(share * scene["valid"].sum())


def _kept_neighbour_share(kept: np.ndarray) -> float:
    """Share of right/down neighbours of kept pixels that are kept too (1 = solid regions, density = random)."""
    pairs = np.concatenate([(kept[:, :-1] & kept[:, 1:]).ravel(), (kept[:-1, :] & kept[1:, :]).ravel()])
    base = np.concatenate([kept[:, :-1].ravel(), kept[:-1, :].ravel()])
    return pairs.sum() / base.sum()


def test_perlin_keeps_contiguous_blobs_unlike_random_sampling():
    gt = np.full((H, W), 3.0, dtype=np.float32)
    perlin = _kept_neighbour_share(sparsify("perlin:0.3", gt, seed=1) > 0)
    random = _kept_neighbour_share(sparsify("density:0.3", gt, seed=1) > 0)
    assert random < 0.4 and perlin > 0.85


def test_density_range_draws_shares_inside_the_range(scene):
    n_valid = scene["valid"].sum()
    shares = [(_run("density:0.01~0.2", scene, seed=s) > 0).sum() / n_valid for s in range(40)]
    assert 0.01 - 1 / n_valid <= min(shares) and max(shares) <= 0.2 + 1 / n_valid
    assert max(shares) / min(shares) > 4  # log-uniform over a 20x range spreads out


def test_lidar_64_on_a_kitti_frame_gives_scan_lines(kitti_gt):
    out = sparsify("lidar:64", kitti_gt, intrinsics=KITTI_K)
    kept = out > 0
    assert valid_mask(kitti_gt)[kept].all()
    np.testing.assert_array_equal(out[kept], kitti_gt[kept])
    # Near the principal column the scan lines are nearly horizontal: the occupied rows come in runs of at most
    # two (a line's curvature can straddle a row boundary) separated by empty rows (~375 rows / 64 lines ~ 6),
    # and each run is densely filled.
    cx = int(KITTI_K[2])
    runs = _row_runs(kept[:, cx - 40 : cx + 40])
    assert 20 <= len(runs) <= 64
    assert max(len(run) for run in runs) <= 2
    assert np.diff([run[0] for run in runs]).min() >= 4
    assert np.mean([kept[run, cx - 40 : cx + 40].sum() for run in runs]) > 10
    # The same number of points drawn uniformly has no such structure (so this check can fail).
    uniform = sparsify(f"density:{kept.sum() / valid_mask(kitti_gt).sum()}", kitti_gt, seed=0) > 0
    assert max(len(run) for run in _row_runs(uniform[:, cx - 40 : cx + 40])) > 2


def _row_runs(kept: np.ndarray) -> list[np.ndarray]:
    """Runs of consecutive rows of `kept` that hold at least one point."""
    rows = np.flatnonzero(kept.any(axis=1))
    return np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)


def test_lidar_lines_follow_the_beam_elevations():
    hit = lidar_pixels((H, W), 8, intrinsics=(100.0, 100.0, 63.5, 47.5), elevation_deg=(-20.0, 20.0))
    expected_rows = np.rint(47.5 - 100.0 * np.tan(np.radians(np.linspace(-20.0, 20.0, 8))))
    centre_rows = np.flatnonzero(hit[:, 63])
    np.testing.assert_array_equal(np.sort(centre_rows), np.sort(expected_rows[(expected_rows >= 0)]))


@pytest.mark.parametrize("seed", range(5))
def test_blocks_severities_are_monotone_in_missing_fraction(scene, kitti_gt, seed):
    for gt in (scene["gt"], kitti_gt):
        n_valid = valid_mask(gt).sum()
        missing = [1 - (sparsify(f"blocks:{s}", gt, seed=seed) > 0).sum() / n_valid for s in BLOCK_SEVERITIES]
        assert list(BLOCK_SEVERITIES) == ["easy", "medium", "hard", "extreme"]
        assert all(a < b for a, b in zip(missing, missing[1:])), missing


@pytest.mark.parametrize("severity", list(BLOCK_SEVERITIES))
def test_blocks_add_bounded_relative_gaussian_noise_to_kept_points(scene, severity):
    sigma = BLOCK_SEVERITIES[severity].sigma
    out = _run(f"blocks:{severity}", scene)
    kept = out > 0
    assert scene["valid"][kept].all()
    relative = out[kept] / scene["gt"][kept] - 1
    assert np.abs(relative).max() <= 3 * sigma + 1e-6
    assert 0.8 * sigma < relative.std() < 1.1 * sigma and abs(relative.mean()) < 0.1 * sigma


def test_noise_replaces_the_given_share_of_points_with_depths_inside_the_gt_range(scene):
    out = _run("uniform:2000+noise:0.1", scene)
    clean = _run("uniform:2000", scene)
    np.testing.assert_array_equal(out > 0, clean > 0)  # noise changes values, not the point set
    changed = out != clean
    assert changed.sum() == round(0.1 * (clean > 0).sum())
    low, high = np.percentile(scene["gt"][scene["valid"]], [10, 90])
    assert (out[changed] >= low).all() and (out[changed] <= high).all()
    alone = _run("noise:0.1", scene)
    assert (alone > 0).sum() == scene["valid"].sum()
    assert (alone != np.where(scene["valid"], scene["gt"], 0)).sum() == round(0.1 * scene["valid"].sum())


def test_sensor_returns_the_sensor_depth_with_invalid_pixels_as_zero(scene):
    sensor = scene["gt"].copy()
    sensor[0, :5] = [np.inf, -3.0, np.nan, 0.0, 4.25]
    out = sparsify("sensor", np.ones((H, W), np.float32), sensor=sensor)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.where(valid_mask(sensor), sensor, 0))
    with pytest.raises(ConfigError, match="sensor"):
        sparsify("sensor", scene["gt"])


def test_sfm_needs_the_rgb_image(scene):
    with pytest.raises(ConfigError, match="rgb"):
        sparsify("sfm:sift", scene["gt"])
    assert (_run("sfm:sift", scene) > 0).sum() >= 20
