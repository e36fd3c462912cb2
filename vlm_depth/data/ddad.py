"""DDAD (TRI, 1936x1216 front camera), in the pre-generated layout of VPP4DC (Bartolomei et al.) that Marigold-DC
and other zero-shot completion papers evaluate on (the raw release needs TRI's dgp SDK):

    PATH/val/{rgb,hints,gt,intrinsics}/%010d.{png,png,png,txt}

rgb 8-bit PNG; hints (sparse LiDAR input, ~20 % of the projected scan) and gt (projected LiDAR with occlusions
filtered) uint16 PNG, meters = value / 256 (values were truncated, so up to 1/256 m low), 0 = none; intrinsics: 3x3 K
as numpy text. PATH may be the folder holding `val/` or `val/` itself. Split: `val` (3950 frames).
"""

from __future__ import annotations

from pathlib import Path

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import read_depth, read_intrinsics, read_rgb
from vlm_depth.data.sample import RGBDSample
from vlm_depth.errors import DataError

DDAD_DEPTH_SCALE = 256.0


@register_reader("ddad")
class DdadDataset(RGBDDataset):
    """`ddad:PATH` (see the module docstring); depth = hints, gt = filtered LiDAR."""

    splits = ("val",)

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        super().__init__(root, split)
        base = self.root / "val" if (self.root / "val" / "rgb").is_dir() else self.root
        if not (base / "rgb").is_dir():
            raise DataError(f"ddad: no val/rgb folder in {self.root} (expected the VPP4DC pre-generated layout)")
        self.base = base
        self.items = sorted(p.stem for p in (base / "rgb").glob("*.png"))
        self._require_items("val/rgb/%010d.png")

    def read(self, item: str) -> RGBDSample:
        rgb, hints, gt = (self.base / d / f"{item}.png" for d in ("rgb", "hints", "gt"))
        return build_sample(
            [rgb, hints, gt],
            rgb=read_rgb(rgb),
            depth=read_depth(hints, DDAD_DEPTH_SCALE),
            gt=read_depth(gt, DDAD_DEPTH_SCALE),
            intrinsics=read_intrinsics(self.base / "intrinsics" / f"{item}.txt"),
            name=item,
        )
