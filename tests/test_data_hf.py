"""Conversion to a cached Hugging Face `datasets.Dataset` and the torch view: exact round trips, cache reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm_depth.data import RGBDSample, load
from vlm_depth.data.folder import write_folder_sample
from vlm_depth.data.hf import TorchRGBDDataset, dataset_fingerprint, sample_from_row, to_hf_dataset

H, W = 48, 64


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        gt = rng.uniform(0.5, 9.0, (H, W)).astype(np.float32)
        sparse = np.where(rng.random((H, W)) < 0.9, 0, gt).astype(np.float32)
        meta = {"max_depth": 10.0, "material": rng.integers(0, 5, (H, W), dtype=np.uint8)}
        sample = RGBDSample(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), sparse, gt=gt, name=f"f{i}", meta=meta)
        write_folder_sample(tmp_path / "data", sample, depth_format="npy")
    dense = np.full((12, 16), 2.5, np.float32)
    write_folder_sample(
        tmp_path / "data",
        RGBDSample(np.zeros((H, W, 3), np.uint8), dense, gt=dense, intrinsics=(50, 50, 31.5, 23.5), name="g0"),
        depth_format="npy",
    )
    return tmp_path / "data"


def test_converted_rows_reproduce_the_samples_exactly(folder, tmp_path):
    ds = load(f"folder:{folder}")
    converted = to_hf_dataset(ds, tmp_path / "cache")
    assert len(converted) == len(ds) == 4
    assert set(converted.features) == {"name", "rgb", "depth", "gt", "intrinsics", "meta"}
    for i, original in enumerate(ds):
        back = sample_from_row(converted.with_format("numpy")[i])
        assert back.name == original.name
        np.testing.assert_array_equal(back.rgb, original.rgb)
        np.testing.assert_array_equal(back.depth, original.depth)
        np.testing.assert_array_equal(back.gt, original.gt)
        assert back.depth.dtype == np.float32 and back.intrinsics == original.intrinsics
        assert back.meta.get("max_depth") == original.meta.get("max_depth")
    low_res = sample_from_row(converted[3])  # python format: PIL image, nested lists
    assert low_res.depth.shape == (12, 16) and low_res.gt is low_res.depth and low_res.meta["depth_is_gt"]
    assert converted[3]["depth"] is None, "depth that is the ground truth is stored once"


def test_second_conversion_reuses_the_cache_without_reading_files(folder, tmp_path):
    first = to_hf_dataset(load(f"folder:{folder}"), tmp_path / "cache")
    reopened = load(f"folder:{folder}")
    for path in folder.glob("*_depth.npy"):
        path.write_bytes(b"corrupt")  # any read of the files would now fail
    again = to_hf_dataset(reopened, tmp_path / "cache")
    assert again.cache_files[0]["filename"] == first.cache_files[0]["filename"]
    np.testing.assert_array_equal(np.asarray(again[0]["gt"]), np.asarray(first[0]["gt"]))


def test_reader_options_change_the_fingerprint(folder):
    assert dataset_fingerprint(load(f"folder:{folder}")) == dataset_fingerprint(load(f"folder:{folder}"))
    assert dataset_fingerprint(load(f"folder:{folder}")) != dataset_fingerprint(
        load(f"folder:{folder}", depth_scale=256)
    )


@pytest.mark.parametrize("source", ["reader", "converted"])
def test_torch_view_yields_tensors_in_meters(folder, tmp_path, source):
    ds = load(f"folder:{folder}")
    view = TorchRGBDDataset(ds if source == "reader" else to_hf_dataset(ds, tmp_path / "cache"))
    assert isinstance(view, torch.utils.data.Dataset) and len(view) == 4
    item = view[0]
    assert item["name"] == "f0"
    assert item["rgb"].dtype == torch.uint8 and item["rgb"].shape == (H, W, 3)
    assert item["depth"].dtype == torch.float32 and item["gt"].shape == (H, W)
    torch.testing.assert_close(item["gt"], torch.from_numpy(ds[0].gt))
    assert "intrinsics" not in item and view[3]["intrinsics"].tolist() == [50, 50, 31.5, 23.5]
    loader = torch.utils.data.DataLoader(view, batch_size=2, collate_fn=list)
    assert [len(batch) for batch in loader] == [2, 2]


def test_train_and_eval_read_a_saved_hf_dataset_of_the_sample_frames(shared_data, tiny_ckpt, tmp_path):
    from vlm_depth.cli import main

    frames = shared_data / "train-and-test" / "nyuv2_sync_metric3d"
    spec = f"pairs:{frames}?rgb=rgb/*.jpg&depth=depth/*.png&depth_scale=1000&intrinsics=intrinsics.txt"
    original = load(spec)
    to_hf_dataset(original, tmp_path / "cache").save_to_disk(str(tmp_path / "nyu-hf"))
    converted = load(f"hf:{tmp_path / 'nyu-hf'}")
    assert len(converted) == len(original) == 3
    np.testing.assert_array_equal(converted[1].depth, original[1].depth)
    assert converted[1].intrinsics == original[1].intrinsics and converted[1].name == original[1].name
    hf = f"hf:{tmp_path / 'nyu-hf'}"
    train = ["train", "--config", "tiny-synthetic", "--model", str(tiny_ckpt), "--dataset", hf, "--val_dataset", ""]
    assert main([*train, "--max_steps", "1", "--queries_per_image", "4", "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "final" / "depth_branch.safetensors").is_file()
    evaluate = ["eval", "--dataset", hf, "--protocol", "uniform:500", "--baseline", "nearest"]
    assert main([*evaluate, "--out", str(tmp_path / "eval")]) == 0
    assert "`nearest`" in (tmp_path / "eval" / "report.md").read_text()


def test_hf_reader_refuses_what_is_not_an_rgbd_dataset(tmp_path):
    from datasets import Dataset

    from vlm_depth.errors import ConfigError, DataError

    with pytest.raises(DataError, match="neither a folder"):
        load(f"hf:{tmp_path / 'missing' / 'deeper'}")
    Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(DataError, match="needs an `rgb`"):
        load(f"hf:{tmp_path / 'text'}")
    with pytest.raises(ConfigError, match="without splits"):
        load(f"hf:{tmp_path / 'text'}", split="test")
