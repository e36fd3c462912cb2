"""NYU Depth v2 (Kinect v1, 640x480): the labeled `.mat` and the BTS/AdaBins `sync` PNG export.

`nyuv2:PATH/nyu_depth_v2_labeled.mat` (MATLAB v7.3 = HDF5, read with h5py; axes are stored reversed):
    depth = `rawDepths` (raw Kinect depth registered to RGB, meters, 0 = missing), gt = `depths` (in-painted, dense).
    Splits from `splits.mat` next to the file (or `splits_mat=`): `test` (654, default), `train` (795), `all` (1449).
`nyuv2:DIR` (sync export): every `rgb_XXXXX.jpg` under DIR with `sync_depth_XXXXX.png` (uint16 millimetres) in the
    same folder or in a sibling `depth/` folder (the Metric3D demo layout). The PNG is the benchmark's only depth map,
    so depth and gt are the same array (`depth_is_gt`). Split: `all` (the folder you point at is the split).
Both: intrinsics of the NYU RGB camera (toolbox camera_params.m), `max_depth` 10 m and the Eigen crop.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import read_depth, read_rgb
from vlm_depth.data.sample import RGBDSample
from vlm_depth.errors import ConfigError, DataError

NYU_INTRINSICS = (518.8579, 519.4696, 325.5824, 253.7362)
NYU_MAX_DEPTH = 10.0
# Eigen et al. evaluation crop on the 480x640 grid: rows 45:471, cols 41:601 (top, bottom, left, right).
EIGEN_CROP = (45, 471, 41, 601)
SYNC_DEPTH_SCALE = 1000.0


def _nyu_meta(shape: tuple[int, int]) -> dict[str, Any]:
    meta: dict[str, Any] = {"max_depth": NYU_MAX_DEPTH}
    if shape == (480, 640):
        meta["eval_crop"] = EIGEN_CROP
    return meta


@register_reader("nyuv2")
class NYUv2Dataset(RGBDDataset):
    """`nyuv2:FILE.mat` (labeled set, splits test/train/all) or `nyuv2:DIR` (sync PNG export, split all)."""

    splits = ("test", "train", "all")

    def __init__(self, root: str | Path, split: str | None = None, splits_mat: str | Path | None = None) -> None:
        path = Path(root)
        self.layout = "mat" if path.suffix.lower() == ".mat" else "sync"
        if self.layout == "sync":
            if split not in (None, "all"):
                raise ConfigError(f"nyuv2: the sync export {path} has no splits (point at the split's folder)")
            split = "all"
        super().__init__(root, split)
        if self.layout == "mat":
            self._list_mat(Path(splits_mat) if splits_mat else self.root.parent / "splits.mat")
            self._require_items("frames in the labeled .mat")
        else:
            self._list_sync()
            self._require_items("rgb_XXXXX.jpg + sync_depth_XXXXX.png")

    def _list_mat(self, splits_mat: Path) -> None:
        with h5py.File(self.root, "r") as f:
            missing = [k for k in ("images", "depths", "rawDepths") if k not in f]
            if missing:
                raise DataError(f"{self.root}: not the NYUv2 labeled .mat (no {missing})")
            n = f["images"].shape[0]
        if self.split == "all":
            self.items = list(range(n))
            return
        if not splits_mat.is_file():
            raise DataError(f"{splits_mat} not found: split {self.split!r} needs the official splits.mat")
        key = {"train": "trainNdxs", "test": "testNdxs"}[self.split]
        one_based = scipy.io.loadmat(splits_mat)[key].reshape(-1).astype(np.int64)
        if one_based.min() < 1 or one_based.max() > n:
            raise DataError(f"{splits_mat}: {key} indices outside 1..{n}")
        self.items = [int(i) - 1 for i in one_based]

    def _list_sync(self) -> None:
        for rgb in sorted(self.root.rglob("rgb_*.jpg")):
            frame = re.fullmatch(r"rgb_(\d+)", rgb.stem)
            if frame is None:
                continue
            name = f"sync_depth_{frame.group(1)}.png"
            candidates = [rgb.parent / name, rgb.parent.parent / "depth" / name]
            depth = next((p for p in candidates if p.is_file()), None)
            if depth is None:
                raise DataError(f"{rgb}: no matching {name} (looked in {[str(c.parent) for c in candidates]})")
            self.items.append((rgb, depth))

    def read(self, item: Any) -> RGBDSample:
        if self.layout == "sync":
            rgb_path, depth_path = item
            depth = read_depth(depth_path, SYNC_DEPTH_SCALE)
            return build_sample(
                [rgb_path, depth_path],
                rgb=read_rgb(rgb_path),
                depth=depth,
                gt=depth,
                intrinsics=NYU_INTRINSICS,
                name=str(rgb_path.relative_to(self.root).with_suffix("")),
                meta={**_nyu_meta(depth.shape), "depth_is_gt": True},
            )
        with h5py.File(self.root, "r") as f:
            rgb = np.ascontiguousarray(f["images"][item].transpose(2, 1, 0))
            gt = np.ascontiguousarray(f["depths"][item].T, dtype=np.float32)
            raw = np.ascontiguousarray(f["rawDepths"][item].T, dtype=np.float32)
        return build_sample(
            [self.root],
            rgb=rgb,
            depth=raw,
            gt=gt,
            intrinsics=NYU_INTRINSICS,
            name=f"{item:04d}",
            meta={**_nyu_meta(raw.shape), "index": item},
        )
