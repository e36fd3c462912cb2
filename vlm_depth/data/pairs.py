"""`pairs`: a small glob-based reader for RGB-D exports that follow no benchmark layout (demo folders, TUM/Redwood
captures, projected LiDAR next to an image).

    load("pairs:DIR", rgb="color/*.jpg", depth="depth/*.png", depth_scale=1000, intrinsics=(525, 525, 319.5, 239.5))

`rgb`, `depth` and `gt` are glob patterns relative to DIR; files are paired by the last run of digits in their
names (`rgb_00050.jpg` <-> `sync_depth_00050.png`), or directly when each pattern matches exactly one file. Give
`depth` for the sensor input and/or `gt` for a reference; with only `gt`, the depth is the ground truth itself
(`depth_is_gt`). `depth_scale` converts integer PNGs (units per meter) and is unused for `.npy`; `intrinsics` is
(fx, fy, cx, cy) or a file understood by `read_intrinsics`, applied to every frame.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import read_depth, read_intrinsics, read_rgb
from vlm_depth.data.sample import Intrinsics, RGBDSample
from vlm_depth.errors import ConfigError, DataError


def _frame_key(path: Path) -> str:
    digits = re.findall(r"\d+", path.stem)
    return digits[-1] if digits else ""


def _index(root: Path, pattern: str) -> dict[str, Path]:
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise DataError(f"pairs: no files match {pattern!r} in {root}")
    by_key: dict[str, Path] = {}
    for path in files:
        key = "" if len(files) == 1 else _frame_key(path)
        if key in by_key:
            raise DataError(f"pairs: {by_key[key]} and {path} have the same frame number {key!r}; narrow the pattern")
        by_key[key] = path
    return by_key


@register_reader("pairs")
class PairsDataset(RGBDDataset):
    """`pairs:DIR` with glob patterns for rgb/depth/gt (see the module docstring). Split: `all`."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        rgb: str = "rgb/*",
        depth: str | None = None,
        gt: str | None = None,
        depth_scale: float | None = None,
        intrinsics: Sequence[float] | str | None = None,
        max_depth: float | None = None,
    ) -> None:
        super().__init__(root, split)
        if depth is None and gt is None:
            raise ConfigError("pairs: give a `depth` and/or a `gt` glob pattern")
        self.depth_scale = depth_scale
        self.max_depth = max_depth
        self.intrinsics = self._intrinsics(intrinsics)
        rgbs = _index(self.root, rgb)
        maps = {role: _index(self.root, pattern) for role, pattern in (("depth", depth), ("gt", gt)) if pattern}
        for role, files in maps.items():
            unmatched = sorted(set(files) ^ set(rgbs))
            if unmatched:
                key = unmatched[0]
                raise DataError(
                    f"pairs: frame {key!r} has no partner: {rgbs.get(key) or files.get(key)} ({role} vs rgb patterns)"
                )
        self.items = [
            {"rgb": path, **{role: files[key] for role, files in maps.items()}} for key, path in rgbs.items()
        ]
        self._require_items(f"files matching {rgb!r}")

    def _intrinsics(self, intrinsics: Sequence[float] | str | None) -> Intrinsics | None:
        if intrinsics is None:
            return None
        if isinstance(intrinsics, (str, Path)):
            path = Path(intrinsics)
            return read_intrinsics(path if path.is_absolute() or path.is_file() else self.root / path)
        if len(intrinsics) != 4:
            raise ConfigError(f"pairs: intrinsics must be (fx, fy, cx, cy), got {intrinsics}")
        return tuple(float(v) for v in intrinsics)  # type: ignore[return-value]

    def read(self, item: dict[str, Any]) -> RGBDSample:
        gt = read_depth(item["gt"], self.depth_scale) if "gt" in item else None
        depth = read_depth(item["depth"], self.depth_scale) if "depth" in item else gt
        meta: dict[str, Any] = {} if self.max_depth is None else {"max_depth": self.max_depth}
        if "depth" not in item:
            meta["depth_is_gt"] = True
        return build_sample(
            list(item.values()),
            rgb=read_rgb(item["rgb"]),
            depth=depth,
            gt=gt,
            intrinsics=self.intrinsics,
            name=str(item["rgb"].relative_to(self.root).with_suffix("")),
            meta=meta,
        )
