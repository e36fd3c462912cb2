"""`vlm-depth eval`: single runs and suites write metrics.json, CSVs, report.md and the density plot; cells are
reproducible, every method sees the same input, and label-free vs GT gaps are the metric differences."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from vlm_depth.cli import main
from vlm_depth.data import RGBDSample, load
from vlm_depth.data.folder import write_folder_sample
from vlm_depth.data.sparsify import image_seed, sparsify
from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.eval.baselines import BASELINES
from vlm_depth.eval.eval_config import EvalConfig
from vlm_depth.eval.metrics import METRIC_NAMES, compute_metrics, eval_mask
from vlm_depth.eval.runner import load_suite, run_eval
from vlm_depth.resources import REPO_ROOT

SCHEMA = ("dataset", "protocol", "method", "n_images", "mae", "rmse", "imae", "irmse", "absrel", "delta1")


def _rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _png_meters(path, scale: float) -> np.ndarray:
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16, path
    return raw.astype(np.float32) / scale


@pytest.fixture(scope="module")
def eval_only_folder(shared_data, tmp_path_factory):
    """The eval-only frames as one `folder` dataset (float32 meters .npy: nuScenes depths exceed 65.535 m, so
    millimetre PNGs would overflow). nyuv2_raw_kinect_open3d is left out: its depth is not registered to the RGB."""
    src = shared_data / "eval-only"
    k = np.load(src / "nyuv2_unidepth" / "intrinsics.npy", allow_pickle=False)
    samples = [
        RGBDSample(
            _rgb(src / "nyuv2_unidepth/rgb.png"),
            _png_meters(src / "nyuv2_unidepth/depth.png", 1000.0),
            intrinsics=(k[0, 0], k[1, 1], k[0, 2], k[1, 2]),
            name="nyuv2_unidepth",
        ),
        RGBDSample(
            _rgb(src / "sunrgbd_open3d/SUN_color.jpg"),
            np.load(src / "sunrgbd_open3d/SUN_depth_m.npy", allow_pickle=False),
            name="sunrgbd_open3d",
        ),
        RGBDSample(  # 256x192 LiDAR depth with a 1920x1440 image
            _rgb(src / "arkitscenes_promptda/image.jpg"),
            _png_meters(src / "arkitscenes_promptda/arkit_depth.png", 1000.0),
            name="arkitscenes_promptda",
        ),
        RGBDSample(
            _rgb(src / "omnidc_demo_indoor/demo_rgb.png"),
            np.load(src / "omnidc_demo_indoor/demo_sparse_depth.npy", allow_pickle=False),
            name="omnidc_demo_indoor",
        ),
        RGBDSample(
            _rgb(src / "nuscenes_mini_mmdet3d/cam_front.jpg"),
            _png_meters(src / "nuscenes_mini_mmdet3d/cam_front_sparse_depth_projected.png", 256.0),
            intrinsics=(1266.4172, 1266.4172, 816.2670, 491.5071),
            name="nuscenes_mini_mmdet3d",
        ),
    ]
    out = tmp_path_factory.mktemp("eval_only")
    for sample in samples:
        write_folder_sample(out, sample, depth_format="npy")
    return out


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_on_eval_only_frames_with_every_baseline_writes_metrics_csv_report_and_plot(eval_only_folder, tmp_path):
    out = tmp_path / "run"
    argv = ["eval", "--dataset", f"folder:{eval_only_folder}", "--protocol", "density:0.01,density:0.1"]
    assert main([*argv, "--baseline", "all", "--out", str(out), "--panels", "1"]) == 0

    report = (out / "report.md").read_text()
    root = out / f"folder-{eval_only_folder.name}"
    assert (out / "mae_vs_density.png").stat().st_size > 0 and "mae_vs_density.png" in report
    assert (out / "config.yaml").is_file() and (out / "suite.yaml").is_file()
    assert "No ground truth for 5 of 5 images" in report  # evaluated against the sensor depth, and it says so
    assert "256x192 depth grid" in report
    assert len(_read_csv(out / "results.csv")) == 2 * len(BASELINES)
    densities = {}
    for protocol in ("density_0.01", "density_0.1"):
        for name in BASELINES:
            cell = root / protocol / name
            metrics = json.loads((cell / "metrics.json").read_text())
            assert all(key in metrics for key in SCHEMA) and metrics["method"] == name
            assert metrics["n_images"] == 5 and metrics["gt_source"] == {"gt": 0, "sensor": 5}
            assert all(np.isfinite(metrics[m]) for m in METRIC_NAMES)
            assert metrics["keep"]["mae"] == 0.0  # keep means keep
            assert metrics["fill"]["mae"] > 0 and set(metrics["fill"]) >= set(METRIC_NAMES)
            rows = _read_csv(cell / "per_image.csv")
            assert len(rows) == 5 and (cell / "compare_00.png").is_file()
            # every method sees exactly the same input
            densities.setdefault(protocol, {row["name"]: row["input_density"] for row in rows})
            assert {row["name"]: row["input_density"] for row in rows} == densities[protocol]
        assert f"`{name}`" in report
    # the median is the floor; linear interpolation beats it everywhere
    for protocol in ("density_0.01", "density_0.1"):
        cells = {n: json.loads((root / protocol / n / "metrics.json").read_text()) for n in BASELINES}
        assert cells["linear"]["fill"]["mae"] < cells["median"]["fill"]["mae"]


def test_per_image_rows_match_an_independent_recomputation(eval_only_folder, tmp_path):
    out = tmp_path / "run"
    cfg = EvalConfig(
        dataset=f"folder:{eval_only_folder}", protocol="uniform:3000", baseline="ipbasic", out=str(out), panels=0
    )
    run_eval(cfg)
    cell = out / f"folder-{eval_only_folder.name}" / "uniform_3000" / "ipbasic"
    rows = {row["name"]: row for row in _read_csv(cell / "per_image.csv")}
    dataset = load(f"folder:{eval_only_folder}")
    index = [s.name for s in dataset].index("sunrgbd_open3d")
    sample = dataset[index]
    sparse = sparsify("uniform:3000", sample.depth, rgb=sample.rgb, seed=image_seed(0, index))
    pred = BASELINES["ipbasic"](sample.rgb, sparse)
    masks = eval_mask(sample.depth, sparse)
    expected = {region: compute_metrics(pred, sample.depth, mask) for region, mask in masks.items()}
    row = rows["sunrgbd_open3d"]
    for name in ("mae", "rmse", "imae", "absrel", "delta1"):
        assert float(row[name]) == pytest.approx(expected["all"][name], rel=1e-9)
        assert float(row[f"fill_{name}"]) == pytest.approx(expected["fill"][name], rel=1e-9)
    assert int(row["keep_pixels"]) == int(masks["keep"].sum()) and int(row["fill_pixels"]) == int(masks["fill"].sum())


@pytest.fixture()
def gt_folder(tmp_path):
    """Three 64x48 frames with ground truth: a sensor with a rectangular hole, one with an evaluation crop and a
    10 m cap, and one whose sensor returned nothing."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64].astype(np.float32)
    gt = 2.0 + 0.05 * xx + 0.05 * yy  # 2.0 to 7.5 m
    gt[10:20, 40:50] = 1.5  # a box in front of the slanted wall
    rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    sensor = gt.copy()
    sensor[5:15, 5:25] = 0.0  # 200 missing pixels
    far = gt.copy()
    far[:, 60:] = 12.0  # beyond the 10 m cap
    frames = [
        RGBDSample(rgb, sensor, gt=gt, name="a_hole"),
        RGBDSample(rgb, sensor, gt=far, name="b_crop", meta={"eval_crop": (4, 44, 2, 62), "max_depth": 10.0}),
        RGBDSample(rgb, np.zeros_like(gt), gt=gt, name="c_dead"),
    ]
    folder = tmp_path / "gt_frames"
    for frame in frames:
        write_folder_sample(folder, frame, depth_format="npy")
    return folder


def test_label_free_vs_gt_suite_reports_the_gap_per_metric(gt_folder, tmp_path):
    suite = tmp_path / "pair.yaml"
    suite.write_text(
        f"methods:\n  - baseline: nearest\n  - baseline: linear\ncompare:\n  - [nearest, linear]\n"
        f"datasets:\n  - dataset: folder:{gt_folder}\n    name: tiny\n    protocols: [sensor, uniform:300]\n"
    )
    out = tmp_path / "run"
    summary = run_eval(EvalConfig(suite=str(suite), out=str(out), panels=0))

    cells = {
        (p, m): json.loads((out / "tiny" / p / m / "metrics.json").read_text())
        for p in ("sensor", "uniform_300")
        for m in ("nearest", "linear")
    }
    gaps = {(g["protocol"], g["metric"]): g["gap"] for g in summary["gaps"]}
    for protocol, slug in (("sensor", "sensor"), ("uniform:300", "uniform_300")):
        a, b = cells[(slug, "nearest")], cells[(slug, "linear")]
        for metric in ("mae", "rmse", "imae", "irmse", "absrel", "delta1"):
            assert gaps[(protocol, metric)] == pytest.approx(a[metric] - b[metric])
        assert gaps[(protocol, "fill_mae")] == pytest.approx(a["fill"]["mae"] - b["fill"]["mae"])
    report = (out / "report.md").read_text()
    assert "Label-free vs GT supervision" in report and "A = `nearest`, B = `linear`" in report
    assert len(_read_csv(out / "comparison.csv")) == len(summary["gaps"])

    # the dead sensor leaves nothing to complete under `sensor`: skipped for every method, and counted
    assert cells[("sensor", "nearest")]["n_no_input"] == 1 and cells[("sensor", "nearest")]["n_images"] == 2
    assert cells[("uniform_300", "nearest")]["n_images"] == 3
    rows = {r["name"]: r for r in _read_csv(out / "tiny" / "sensor" / "nearest" / "per_image.csv")}
    assert int(rows["a_hole"]["fill_pixels"]) == 200 and int(rows["a_hole"]["keep_pixels"]) == 64 * 48 - 200
    # crop rows 4:44, cols 2:62 minus the two columns 60, 61 beyond the 10 m cap
    assert int(rows["b_crop"]["all_pixels"]) == 40 * 58
    # a plane with one box: interpolation is exact on the planar part, so linear beats nearest in the hole
    assert cells[("sensor", "linear")]["fill"]["mae"] < cells[("sensor", "nearest")]["fill"]["mae"]


def test_sensor_protocol_without_ground_truth_is_refused(eval_only_folder, tmp_path):
    cfg = EvalConfig(dataset=f"folder:{eval_only_folder}", protocol="sensor", baseline="nearest", out=str(tmp_path))
    with pytest.raises(ConfigError, match="no separate ground truth"):
        run_eval(cfg)


def test_a_model_method_needs_an_existing_checkpoint_and_says_so(gt_folder, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        run_eval(EvalConfig(dataset=f"folder:{gt_folder}", model=str(tmp_path / "nope"), out=str(tmp_path / "o")))


def test_bad_requests_are_clear_config_errors(gt_folder, tmp_path):
    base = {"dataset": f"folder:{gt_folder}", "out": str(tmp_path)}
    with pytest.raises(ConfigError, match="exactly one of"):
        run_eval(EvalConfig(**base))
    with pytest.raises(ConfigError, match="unknown baseline"):
        run_eval(EvalConfig(**base, baseline="bicubic"))
    with pytest.raises(ConfigError, match="protocol"):
        run_eval(EvalConfig(**base, baseline="nearest", protocol="uniform:many"))
    with pytest.raises(ConfigError, match="crop"):
        run_eval(EvalConfig(**base, baseline="nearest", crop="10:5,0:4"))
    suite = tmp_path / "s.yaml"
    datasets = f"datasets:\n  - {{dataset: 'folder:{gt_folder}', protocols: [sensor]}}\n"
    for methods, error in [
        ("methods: [{baseline: nearest}]\ncompare: [[nearest, linear]]\n", "compare names"),
        ("methods: [{baseline: nearest}, {baseline: nearest}]\n", "duplicate method"),
        ("methods: [{baseline: nearest, checkpoint: x}]\n", "unknown keys"),
        ("methods: [{model: ckpt, preset: turbo}]\n", "no infer file named 'turbo'"),
    ]:
        suite.write_text(methods + datasets)
        with pytest.raises(ConfigError, match=error):
            run_eval(EvalConfig(suite=str(suite), out=str(tmp_path / "o")))


def test_a_suite_model_entry_reads_out_with_its_inference_preset(tmp_path):
    from vlm_depth.infer.complete_config import preset_settings

    suite = tmp_path / "s.yaml"
    suite.write_text(
        "methods: [{model: ckpt, readout: query, preset: fast}, {model: ckpt, readout: mdm, name: m}]\n"
        "datasets: [{dataset: 'folder:x', protocols: [sensor]}]\n"
    )
    fast, plain = load_suite(str(suite)).methods
    assert (fast.preset, plain.preset) == ("fast", "")
    assert preset_settings("fast").query_budget == 1024 and preset_settings("default").query_budget == 4096


@pytest.mark.parametrize("name", ["zero_shot", "label_free_vs_gt", "sample_frames"])
def test_benchmark_suites_parse_with_known_readers_and_protocols(name):
    from vlm_depth.data import parse_spec
    from vlm_depth.data.sparsify import parse_protocol

    suite = load_suite(name)
    for entry in suite.datasets:
        parse_spec(entry.spec)
        for protocol in entry.protocols:
            parse_protocol(protocol)
    models = {m.name: m.model for m in suite.methods if m.model}
    if name == "label_free_vs_gt":
        assert models == {
            "label-free": "runs/qwen2.5-vl-3b-hypersim-vkitti-sd/final",
            "gt-supervised": "runs/qwen2.5-vl-3b-hypersim-vkitti-gt/final",
        }
        assert suite.compare == [("label-free", "gt-supervised")]
    assert (REPO_ROOT / "eval" / f"{name}.yaml").is_file()


def test_sample_frames_suite_reads_every_listed_frame(shared_data, monkeypatch):
    from vlm_depth.depth import valid_mask

    if shared_data.resolve() != (REPO_ROOT.parent / "shared" / "data").resolve():
        pytest.skip("the suite points at ../shared/data relative to the repository root")
    monkeypatch.chdir(REPO_ROOT)
    suite = load_suite("sample_frames")
    assert [m.baseline for m in suite.methods] == list(BASELINES)
    for entry in suite.datasets:
        sample = load(entry.spec, split=entry.split or None, **entry.options)[0]
        assert valid_mask(sample.depth).mean() > 0.001, entry.name  # nuScenes, the sparsest, has 0.21 %
