"""VOID (Wong et al. 2020): RealSense D435i RGB with 150/500/1500 sparse VIO points, 640x480.

Layout (`void_release/void_{150,500,1500}/`): `data/<sequence>/{image,sparse_depth,validity_map,ground_truth}/
<timestamp>.png` and `data/<sequence>/K.txt` (3x3, numpy text), plus `{train,test}_image.txt` path lists.
Encoding: sparse_depth and ground_truth uint16, meters = value / 256, 0 = none; validity_map uint16 {0, 256}: a sparse
point exists only where it is non-zero (points outside the validity map are dropped). PATH is `void_release/` (pick the
density with `density=150|500|1500`, default 1500) or a `void_N/` folder itself. Splits: `test` (default; the 800
benchmark frames), `train`, `all` (every frame under data/). Evaluation range 0.2-5 m (`min_depth`, `max_depth`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import read_depth, read_intrinsics, read_label_png, read_rgb
from vlm_depth.data.sample import RGBDSample
from vlm_depth.errors import ConfigError, DataError

VOID_DEPTH_SCALE = 256.0
VOID_DENSITIES = (150, 500, 1500)
VOID_EVAL_RANGE = (0.2, 5.0)


@register_reader("void")
class VoidDataset(RGBDDataset):
    """`void:PATH` (see the module docstring); depth = sparse VIO points, gt = active-stereo depth."""

    splits = ("test", "train", "all")

    def __init__(self, root: str | Path, split: str | None = None, density: int = 1500) -> None:
        super().__init__(root, split)
        if density not in VOID_DENSITIES:
            raise ConfigError(f"void: density must be one of {VOID_DENSITIES}, got {density}")
        base = self.root / f"void_{density}" if (self.root / f"void_{density}").is_dir() else self.root
        if not (base / "data").is_dir():
            raise DataError(f"void: no data/ folder in {base} (expected void_release/void_{density}/data/<sequence>)")
        self.base = base
        if self.split == "all":
            images = sorted(base.glob("data/*/image/*.png"))
        else:
            images = self._listed_images(base / f"{self.split}_image.txt")
        self.items = images
        self._require_items(f"data/<sequence>/image/<timestamp>.png in {base}")

    def _listed_images(self, listing: Path) -> list[Path]:
        if not listing.is_file():
            raise DataError(f"{listing} not found: split {self.split!r} needs VOID's official path list")
        images = []
        for line in listing.read_text().split():
            # Lines are written relative to different folders across releases ("void_1500/data/...", "data/...").
            parts = Path(line).parts
            if "data" not in parts:
                raise DataError(f"{listing}: cannot place path {line!r} (no data/ component)")
            images.append(self.base.joinpath(*parts[parts.index("data") :]))
        return images

    def read(self, item: Path) -> RGBDSample:
        sequence, stem = item.parents[1], item.name
        sparse_path, validity_path = sequence / "sparse_depth" / stem, sequence / "validity_map" / stem
        gt_path = sequence / "ground_truth" / stem
        sparse = read_depth(sparse_path, VOID_DEPTH_SCALE)
        validity = read_label_png(validity_path)
        if validity.shape != sparse.shape:
            raise DataError(f"{validity_path}: shape {validity.shape} differs from {sparse_path} {sparse.shape}")
        return build_sample(
            [item, sparse_path, gt_path],
            rgb=read_rgb(item),
            depth=np.where(validity > 0, sparse, np.float32(0)),
            gt=read_depth(gt_path, VOID_DEPTH_SCALE),
            intrinsics=read_intrinsics(sequence / "K.txt"),
            name=f"{sequence.name}/{item.stem}",
            meta={"min_depth": VOID_EVAL_RANGE[0], "max_depth": VOID_EVAL_RANGE[1]},
        )
