"""`pairs`: a small glob-based reader for RGB-D exports that follow no benchmark layout (demo folders, TUM/Redwood
captures, projected LiDAR next to an image).

    load("pairs:DIR", rgb="color/*.jpg", depth="depth/*.png", depth_scale=1000, intrinsics=(525, 525, 319.5, 239.5))

`rgb`, `depth` and `gt` are glob patterns relative to DIR; files are paired by the last run of digits in their
names (`rgb_00050.jpg` <-> `sync_depth_00050.png`), or directly when each pattern matches exactly one file. Give
`depth` for the sensor input and/or `gt` for a reference; with only `gt`, the depth is the ground truth itself
(`depth_is_gt`). `depth_scale` converts integer PNGs (units per meter) and is unused for `.npy`; `intrinsics` is
(fx, fy, cx, cy), the text "fx,fy,cx,cy" or a file understood by `read_intrinsics`, applied to every frame.

`read_pair(rgb, depth, ...)` reads one pair of files the same way (the pair of `vlm-depth complete --rgb --depth`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import check_depth_scale, read_depth, read_intrinsics, read_rgb
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
        self.depth_scale = None if depth_scale is None else check_depth_scale(depth_scale, "pairs: depth_scale")
        self.max_depth = max_depth
        self.intrinsics = parse_intrinsics(intrinsics, self.root)
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

    def read(self, item: dict[str, Any]) -> RGBDSample:
        name = str(item["rgb"].relative_to(self.root).with_suffix(""))
        return _read(item, self.depth_scale, self.intrinsics, self.max_depth, name)


def parse_intrinsics(value: Sequence[float] | str | None, root: Path | None = None) -> Intrinsics | None:
    """(fx, fy, cx, cy) in pixels from 4 numbers, the text "fx,fy,cx,cy", or a file understood by `read_intrinsics`
    (a relative path that does not exist as given is looked up under `root`); None or "" -> None."""
    if value is None or (isinstance(value, str) and not value):
        return None
    if isinstance(value, str) and "," in value:
        try:
            value = [float(v) for v in value.split(",")]
        except ValueError as err:
            raise ConfigError(f"intrinsics must be 'fx,fy,cx,cy' or a file, got {value!r}") from err
    if isinstance(value, (str, Path)):
        path = Path(value)
        return read_intrinsics(path if root is None or path.is_absolute() or path.is_file() else root / path)
    if len(value) != 4:
        raise ConfigError(f"intrinsics must be (fx, fy, cx, cy), got {value}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def read_pair(
    rgb: str | Path,
    depth: str | Path | None = None,
    *,
    depth_scale: float | None = None,
    intrinsics: Sequence[float] | str | None = None,
) -> RGBDSample:
    """One RGB file with its depth file (None: monocular, depth all 0) as an `RGBDSample` named after the RGB
    file; `depth_scale` and `intrinsics` as for `pairs:` datasets."""
    item = {"rgb": Path(rgb)} | ({} if depth is None else {"depth": Path(depth)})
    return _read(item, depth_scale, parse_intrinsics(intrinsics), None, Path(rgb).stem)


def _read(
    item: dict[str, Path], depth_scale: float | None, intrinsics: Intrinsics | None, max_depth: float | None, name: str
) -> RGBDSample:
    rgb = read_rgb(item["rgb"])
    gt = read_depth(item["gt"], depth_scale) if "gt" in item else None
    depth = read_depth(item["depth"], depth_scale) if "depth" in item else gt
    meta: dict[str, Any] = {} if max_depth is None else {"max_depth": max_depth}
    if depth is None:
        depth = np.zeros(rgb.shape[:2], np.float32)
    elif "depth" not in item:
        meta["depth_is_gt"] = True
    return build_sample(list(item.values()), rgb=rgb, depth=depth, gt=gt, intrinsics=intrinsics, name=name, meta=meta)
