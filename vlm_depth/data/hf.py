"""Training at scale: convert a reader's samples to a cached Hugging Face `datasets.Dataset`, and a torch view.

Row schema (`hf_features()`): `name` string; `rgb` Image (stored losslessly as PNG); `depth` and `gt` float32 2-D
arrays in meters (`gt` None when the dataset has none; `depth` None when it is the ground truth itself, stored once
as `gt`); `intrinsics` (fx, fy, cx, cy) or None; `meta` a JSON string of the sample's scalar metadata (`max_depth`,
`eval_crop`, `depth_is_gt`, ...). Per-pixel maps in `meta` (e.g. `material`) are not stored. `sample_from_row`
turns a row back into an `RGBDSample`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_depth.data.dataset import RGBDDataset
from vlm_depth.data.sample import RGBDSample, scalar_meta


def hf_features() -> Any:
    """The `datasets.Features` of a converted RGB-D dataset."""
    from datasets import Features, Image, List, Value

    depth = List(List(Value("float32")))
    return Features(
        {
            "name": Value("string"),
            "rgb": Image(),
            "depth": depth,
            "gt": depth,
            "intrinsics": List(Value("float64"), length=4),
            "meta": Value("string"),
        }
    )


def sample_to_row(sample: RGBDSample) -> dict[str, Any]:
    """One `RGBDSample` as a row of `hf_features()`."""
    return {
        "name": sample.name,
        "rgb": sample.rgb,
        "depth": None if sample.gt is sample.depth else sample.depth,  # stored once when depth is the GT
        "gt": sample.gt,
        "intrinsics": list(sample.intrinsics) if sample.intrinsics is not None else None,
        "meta": json.dumps(scalar_meta(sample.meta), sort_keys=True),
    }


def sample_from_row(row: dict[str, Any]) -> RGBDSample:
    """A row of a converted dataset (any format: python, numpy) -> `RGBDSample` (depth float32 meters)."""
    # Copies: arrays of a numpy-formatted `datasets.Dataset` are read-only views of the Arrow cache.
    gt = None if row["gt"] is None else np.array(row["gt"], dtype=np.float32)
    depth = gt if row["depth"] is None else np.array(row["depth"], dtype=np.float32)
    rgb = row["rgb"].convert("RGB") if hasattr(row["rgb"], "convert") else row["rgb"]
    return RGBDSample(
        rgb=np.array(rgb, dtype=np.uint8),
        depth=depth,
        gt=gt,
        intrinsics=None if row["intrinsics"] is None else tuple(float(v) for v in row["intrinsics"]),
        name=str(row["name"]),
        meta=json.loads(row["meta"]),
    )


def dataset_fingerprint(dataset: RGBDDataset) -> str:
    """A hash of what a reader would produce: its class, root, split, options and listed items (not file contents)."""
    from datasets.fingerprint import Hasher

    options = {k: v for k, v in vars(dataset).items() if not k.startswith("_") and k != "items"}
    return Hasher.hash([type(dataset).__qualname__, repr(sorted(options.items())), repr(dataset.items)])


def _rows(dataset: RGBDDataset, indices: list[int]) -> Iterator[dict[str, Any]]:
    for i in indices:  # `datasets` shows the progress bar
        yield sample_to_row(dataset[i])


def to_hf_dataset(dataset: RGBDDataset, cache_dir: str | Path, num_proc: int | None = None) -> Any:
    """Convert `dataset` into a `datasets.Dataset` (generator-based, written once as Arrow files under `cache_dir`).

    A second call for the same reader, root, split, options and file list reuses the cache without reading a file;
    change `cache_dir` to rebuild after editing files in place. num_proc > 1 converts shards in parallel.
    """
    from datasets import Dataset

    indices = list(range(len(dataset)))
    return Dataset.from_generator(
        _rows,
        features=hf_features(),
        cache_dir=str(cache_dir),
        gen_kwargs={"dataset": dataset, "indices": indices},
        num_proc=num_proc,
        fingerprint=dataset_fingerprint(dataset),
    )


class TorchRGBDDataset(torch.utils.data.Dataset):
    """A torch `Dataset` over an `RGBDDataset` or a converted `datasets.Dataset`.

    Items are dicts of tensors: `rgb` (H, W, 3) uint8, `depth` (h, w) float32 meters (0 = missing), and, when the
    source has them, `gt` (h, w) float32 meters and `intrinsics` (4,) float64; plus `name`. Sizes may differ between
    items, so batch with a collate function that keeps a list (or resizes) rather than the default stacking.
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self._rows = not isinstance(source, RGBDDataset)
        if self._rows:
            self.source = source.with_format("numpy")

    def __len__(self) -> int:
        return len(self.source)

    def sample(self, index: int) -> RGBDSample:
        """The `RGBDSample` at `index`."""
        return sample_from_row(self.source[index]) if self._rows else self.source[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.sample(index)
        item: dict[str, Any] = {
            "name": sample.name,
            "rgb": torch.from_numpy(sample.rgb.copy()),
            "depth": torch.from_numpy(sample.depth.copy()),
        }
        if sample.gt is not None:
            item["gt"] = torch.from_numpy(sample.gt.copy())
        if sample.intrinsics is not None:
            item["intrinsics"] = torch.tensor(sample.intrinsics, dtype=torch.float64)
        return item
