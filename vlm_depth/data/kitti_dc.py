"""KITTI depth completion (Uhrig et al. 2017): velodyne_raw as the sparse input, annotated ground truth as gt.

Encoding (both maps): uint16 PNG, meters = value / 256, 0 = no measurement. Splits:
- `val_selection_cropped` (default; 1000 frames, 1216x352): `depth_selection/val_selection_cropped/{image,
  velodyne_raw,groundtruth_depth,intrinsics}/` with names `<drive>_{image,velodyne_raw,groundtruth_depth}_<frame>_
  image_0X.png` and a one-line 3x3 K per frame. PATH may be the dataset root, `depth_selection/` or the split folder.
- `test_depth_completion_anonymous` (1000 frames, no ground truth): `{image,velodyne_raw,intrinsics}/%010d.*`.
- `train` / `val`: the raw layout `data_depth_velodyne/<split>/<drive>/proj_depth/velodyne_raw/image_0X/%010d.png` and
  `data_depth_annotated/<split>/<drive>/proj_depth/groundtruth/image_0X/%010d.png` (or both merged under `<split>/`),
  with RGB and calibration from KITTI raw under `raw_root` (default PATH):
  `<date>/<drive>/image_0X/data/%010d.png` and `<date>/calib_cam_to_cam.txt` (P_rect_0X).
No depth cap (the benchmark evaluates on every ground-truth pixel).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import intrinsics_from_matrix, read_depth, read_intrinsics, read_rgb
from vlm_depth.data.sample import Intrinsics, RGBDSample
from vlm_depth.errors import DataError

KITTI_DEPTH_SCALE = 256.0
SELECTION_NAME = re.compile(r"(?P<drive>.+_sync)_image_(?P<frame>\d{10})_image_(?P<cam>0[23])\.png")


def read_kitti_calib(path: Path, camera: str) -> Intrinsics:
    """(fx, fy, cx, cy) of rectified camera `camera` ("02"/"03") from a KITTI raw `calib_cam_to_cam.txt`."""
    key = f"P_rect_{camera}:"
    for line in path.read_text().splitlines():
        if line.startswith(key):
            return intrinsics_from_matrix(np.array(line[len(key) :].split(), dtype=np.float64), f"{path} {key}")
    raise DataError(f"{path}: no {key} line")


@register_reader("kitti_dc")
class KittiDCDataset(RGBDDataset):
    """`kitti_dc:PATH` (see the module docstring for layouts and splits)."""

    splits = ("val_selection_cropped", "test_depth_completion_anonymous", "train", "val")

    def __init__(self, root: str | Path, split: str | None = None, raw_root: str | Path | None = None) -> None:
        super().__init__(root, split)
        if self.split in ("train", "val"):
            self.raw_root = Path(raw_root) if raw_root else self.root
            self._list_raw_layout()
        else:
            self._list_selection()
        self._require_items(f"the {self.split} layout of KITTI depth completion")

    def _selection_dir(self) -> Path:
        for candidate in (self.root / "depth_selection" / self.split, self.root / self.split, self.root):
            if (candidate / "image").is_dir() and (candidate / "velodyne_raw").is_dir():
                return candidate
        raise DataError(f"kitti_dc: no {self.split}/image and velodyne_raw folders under {self.root}")

    def _list_selection(self) -> None:
        base = self._selection_dir()
        for image in sorted((base / "image").glob("*.png")):
            if self.split == "test_depth_completion_anonymous":
                stem = image.stem
                item = {
                    "rgb": image,
                    "depth": base / "velodyne_raw" / image.name,
                    "K": base / "intrinsics" / f"{stem}.txt",
                }
            else:
                m = SELECTION_NAME.fullmatch(image.name)
                if m is None:
                    raise DataError(
                        f"{image}: not a val_selection_cropped image name (<drive>_image_<frame>_image_0X)"
                    )
                drive, frame, cam = m["drive"], m["frame"], m["cam"]
                item = {
                    "rgb": image,
                    "depth": base / "velodyne_raw" / f"{drive}_velodyne_raw_{frame}_image_{cam}.png",
                    "gt": base / "groundtruth_depth" / f"{drive}_groundtruth_depth_{frame}_image_{cam}.png",
                    "K": base / "intrinsics" / f"{image.stem}.txt",
                }
            self.items.append(item)

    def _list_raw_layout(self) -> None:
        roots = [self.root / "data_depth_annotated" / self.split, self.root / self.split]
        for gt in sorted(p for r in roots for p in r.glob("*_sync/proj_depth/groundtruth/image_0[23]/*.png")):
            drive, cam = gt.parents[3].name, gt.parent.name
            velodyne_roots = [self.root / "data_depth_velodyne" / self.split, self.root / self.split]
            rel = Path(drive) / "proj_depth" / "velodyne_raw" / cam / gt.name
            depth = next((r / rel for r in velodyne_roots if (r / rel).is_file()), velodyne_roots[0] / rel)
            date = drive[:10]
            self.items.append(
                {
                    "rgb": self.raw_root / date / drive / cam / "data" / gt.name,
                    "depth": depth,
                    "gt": gt,
                    "calib": (self.raw_root / date / "calib_cam_to_cam.txt", cam[-2:]),
                    "name": f"{drive}/{cam}/{gt.stem}",
                }
            )

    def read(self, item: dict[str, Any]) -> RGBDSample:
        if "calib" in item:
            calib_path, camera = item["calib"]
            if not calib_path.is_file():
                raise DataError(f"file not found: {calib_path} (KITTI raw calibration; set raw_root=)")
            intrinsics = read_kitti_calib(calib_path, camera)
        else:
            intrinsics = read_intrinsics(item["K"])
        gt = read_depth(item["gt"], KITTI_DEPTH_SCALE) if "gt" in item else None
        return build_sample(
            [item["rgb"], item["depth"], *([item["gt"]] if gt is not None else [])],
            rgb=read_rgb(item["rgb"]),
            depth=read_depth(item["depth"], KITTI_DEPTH_SCALE),
            gt=gt,
            intrinsics=intrinsics,
            name=item.get("name", item["rgb"].stem),
        )
