"""Virtual KITTI 2 (Naver Labs, 1242x375 synthetic driving): dense planar depth as ground truth.

Layout (the official tar files unpacked into one tree):
    PATH/Scene{01,02,06,18,20}/<variation>/frames/rgb/Camera_{0,1}/rgb_%05d.jpg
    PATH/Scene../<variation>/frames/depth/Camera_{0,1}/depth_%05d.png
    PATH/Scene../<variation>/intrinsic.txt     header, then `frame cameraID fx fy cx cy` per line
Depth: uint16 PNG in centimetres (meters = value / 100); the code 65535 (655.35 m) marks sky/infinity and becomes 0.
There is no sensor input, so depth is the ground truth (`depth_is_gt`); `max_depth` (default 80 m, the KITTI cap) is
recorded for evaluation. Split: `all`; select with `scenes`, `variations` and `cameras` (default left camera only).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import UINT16_MAX, read_depth, read_rgb
from vlm_depth.data.sample import Intrinsics, RGBDSample
from vlm_depth.errors import DataError

VKITTI2_DEPTH_SCALE = 100.0
SKY = np.float32(UINT16_MAX / VKITTI2_DEPTH_SCALE)


def read_vkitti2_intrinsics(path: Path) -> dict[tuple[int, int], Intrinsics]:
    """{(frame, camera): (fx, fy, cx, cy)} from a Virtual KITTI 2 `intrinsic.txt`."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    table = {}
    for line in path.read_text().splitlines()[1:]:
        values = line.split()
        if len(values) != 6:
            raise DataError(f"{path}: expected `frame cameraID fx fy cx cy`, got {line!r}")
        table[(int(values[0]), int(values[1]))] = tuple(float(v) for v in values[2:])
    return table  # type: ignore[return-value]


@register_reader("vkitti2")
class VKitti2Dataset(RGBDDataset):
    """`vkitti2:PATH` (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        scenes: Sequence[str] | None = None,
        variations: Sequence[str] | None = None,
        cameras: Sequence[int] = (0,),
        max_depth: float = 80.0,
    ) -> None:
        super().__init__(root, split)
        self.max_depth = max_depth
        self._intrinsics: dict[Path, dict[tuple[int, int], Intrinsics]] = {}
        for rgb in sorted(self.root.glob("Scene*/*/frames/rgb/Camera_*/rgb_*.jpg")):
            scene, variation, camera = rgb.parents[4].name, rgb.parents[3].name, rgb.parent.name
            if (scenes and scene not in scenes) or (variations and variation not in variations):
                continue
            if int(camera.removeprefix("Camera_")) not in cameras:
                continue
            self.items.append(rgb)
        self._require_items("Scene*/<variation>/frames/rgb/Camera_k/rgb_%05d.jpg")

    def read(self, item: Path) -> RGBDSample:
        variation_dir, camera = item.parents[3], item.parent.name
        frame = int(re.fullmatch(r"rgb_(\d+)", item.stem).group(1))  # type: ignore[union-attr]
        depth_path = variation_dir / "frames" / "depth" / camera / f"depth_{frame:05d}.png"
        depth = read_depth(depth_path, VKITTI2_DEPTH_SCALE)
        depth[depth >= SKY] = 0
        if variation_dir not in self._intrinsics:
            self._intrinsics[variation_dir] = read_vkitti2_intrinsics(variation_dir / "intrinsic.txt")
        key = (frame, int(camera.removeprefix("Camera_")))
        if key not in self._intrinsics[variation_dir]:
            raise DataError(f"{variation_dir / 'intrinsic.txt'}: no line for frame {frame} camera {key[1]}")
        return build_sample(
            [item, depth_path],
            rgb=read_rgb(item),
            depth=depth,
            gt=depth,
            intrinsics=self._intrinsics[variation_dir][key],
            name=f"{variation_dir.parent.name}/{variation_dir.name}/{camera}/{frame:05d}",
            meta={"max_depth": self.max_depth, "depth_is_gt": True},
        )
