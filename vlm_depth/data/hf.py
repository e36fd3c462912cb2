"""Hugging Face `datasets`: convert a reader's samples to a cached `datasets.Dataset` (`to_hf_dataset`), read any
dataset with RGB-D columns back as a reader (`hf:PATH`, in every command), and a torch view.

Row schema (`hf_features()`): `name` string; `rgb` Image (stored losslessly as PNG); `depth` and `gt` float32 2-D
arrays in meters (`gt` None when the dataset has none; `depth` None when it is the ground truth itself, stored once
as `gt`); `intrinsics` (fx, fy, cx, cy) or None; `meta` a JSON string of the sample's scalar metadata (`max_depth`,
`eval_crop`, `depth_is_gt`, ...). Per-pixel maps in `meta` (e.g. `material`) are not stored. `sample_from_row`
turns a row back into an `RGBDSample`.

Depth is a list of float32 rows, not `datasets.Array2D`: depth maps of one dataset may differ in size (KITTI frames,
low-resolution depth beside full-resolution RGB), and Array2D allows a variable first dimension only. Reading a
480x640 map this way took 2.6 ms against 0.5 ms as Array2D (measured here), nothing next to a model step.

    converted = to_hf_dataset(load("folder:scans"), cache_dir="hf-cache")   # a datasets.Dataset
    converted.save_to_disk("scans-hf")                                       # then: --dataset hf:scans-hf
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_depth.data.dataset import RGBDDataset, register_reader
from vlm_depth.data.depth_io import array_to_meters
from vlm_depth.data.sample import RGBDSample, scalar_meta
from vlm_depth.errors import ConfigError, DataError


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


def sample_from_row(row: dict[str, Any], index: int = 0, depth_scale: float | None = None) -> RGBDSample:
    """A row with `rgb` and `depth` and/or `gt` (the schema of `hf_features()` in any format, or another dataset's
    columns: arrays, nested lists or 16-bit images) -> `RGBDSample`. Integer depth is divided by `depth_scale`
    (units per meter); `name`, `intrinsics` and `meta` are optional (the name defaults to the row index)."""
    where = f"hf row {index}"
    # Copies: arrays of a numpy-formatted `datasets.Dataset` are read-only views of the Arrow cache.
    gt = None if row.get("gt") is None else array_to_meters(np.array(row["gt"]), depth_scale, f"{where} gt")
    depth = gt if row.get("depth") is None else array_to_meters(np.array(row["depth"]), depth_scale, where)
    if depth is None:
        raise DataError(f"{where}: neither `depth` nor `gt` holds a depth map")
    rgb = row["rgb"].convert("RGB") if hasattr(row["rgb"], "convert") else row["rgb"]
    intrinsics = row.get("intrinsics")
    return RGBDSample(
        rgb=np.array(rgb, dtype=np.uint8),
        depth=depth,
        gt=gt,
        intrinsics=None if intrinsics is None else tuple(float(v) for v in intrinsics),
        name=str(row.get("name") or f"{index:06d}"),
        meta=json.loads(row["meta"]) if row.get("meta") else {},
    )


def numpy_images(data: Any) -> Any:
    """`data` (a `datasets.Dataset`) returning its image and depth columns as NumPy arrays (fast) and every other
    column as Python values (`datasets`' NumPy format would turn float64 intrinsics into float32)."""
    arrays = [c for c in ("rgb", "depth", "gt") if c in data.column_names]
    return data.with_format("numpy", columns=arrays, output_all_columns=True)


def _looks_like_hub_id(path: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None and not Path(path).exists()


@register_reader("hf")
class HFDataset(RGBDDataset):
    """`hf:PATH`: a Hugging Face dataset with `rgb` and `depth` and/or `gt` columns: a folder written by
    `save_to_disk` (e.g. of `to_hf_dataset`'s result) or a Hub dataset id `owner/name` (`datasets.load_dataset`;
    from the local cache alone when HF_HUB_OFFLINE is set). `split`: one split of a dataset that has several (default
    `train`, or the only one); `depth_scale`: units per meter of integer depth columns (16-bit images).

    Random access, as training's data order needs: Arrow files are memory-mapped, so a large dataset is not held in
    memory (and `streaming`, which gives sequential access only, is not offered).
    """

    def __init__(self, root: str | Path, split: str | None = None, depth_scale: float | None = None) -> None:
        from datasets import DatasetDict, load_dataset, load_from_disk

        self.root, self.depth_scale = Path(str(root)), depth_scale
        if self.root.is_dir():
            data = load_from_disk(str(self.root))
        elif _looks_like_hub_id(str(root)):
            data = load_dataset(str(root))
        else:
            raise DataError(f"hf: {root} is neither a folder written by save_to_disk nor a Hub dataset id owner/name")
        if isinstance(data, DatasetDict):
            names = list(data)
            split = split or ("train" if "train" in data else names[0] if len(names) == 1 else None)
            if split not in data:
                raise ConfigError(f"hf: {root} has the splits {names}; choose one with split=")
            data = data[split]
        elif split not in (None, "all"):
            raise ConfigError(f"hf: {root} is one dataset without splits; drop split={split!r}")
        columns = set(data.column_names)
        if "rgb" not in columns or not columns & {"depth", "gt"}:
            raise DataError(
                f"hf: {root} needs an `rgb` column and a `depth` and/or `gt` column, has {sorted(columns)}"
            )
        self.split = split or "all"
        self._data = numpy_images(data)
        self.items = list(range(len(data)))
        self._require_items("rows")

    def read(self, item: int) -> RGBDSample:
        return sample_from_row(self._data[item], item, self.depth_scale)


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
            self.source = numpy_images(source)

    def __len__(self) -> int:
        return len(self.source)

    def sample(self, index: int) -> RGBDSample:
        """The `RGBDSample` at `index`."""
        return sample_from_row(self.source[index], index) if self._rows else self.source[index]

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
