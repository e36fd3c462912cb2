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
