"""iBims-1 (Koch et al. 2018): 100 indoor 640x480 DSLR images with laser-scanner ground truth.

Layout: `imagelist.txt` (one name per line, at PATH or inside the mat folder) and `ibims1_core_mat/<name>.mat`
(`scipy.io.loadmat(p)["data"]`, a MATLAB struct with `rgb` (480, 640, 3) uint8, `depth` (480, 640) meters, `calib`
3x3, masks `mask_invalid`, `mask_transp` (1 = usable), `edges` and the planar masks `mask_{wall,table,floor}`).
Valid ground truth = depth > 0 and mask_invalid and mask_transp (as the benchmark and Marigold-DC define it); the
masks are kept in `meta`. There is no sensor input, so depth is the ground truth (`depth_is_gt`). Split: `test`.
`calib` is read as K whichever way MATLAB stored it (the principal point is found in the last column or last row).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import intrinsics_from_matrix
from vlm_depth.data.sample import Intrinsics, RGBDSample
from vlm_depth.errors import DataError

IBIMS_MASKS = ("mask_invalid", "mask_transp", "edges", "mask_wall", "mask_table", "mask_floor")


def ibims_intrinsics(calib: np.ndarray, source: str) -> Intrinsics:
    """(fx, fy, cx, cy) from iBims' 3x3 `calib`, stored as K or as its transpose."""
    calib = np.asarray(calib, dtype=np.float64)
    if calib.shape != (3, 3):
        raise DataError(f"{source}: calib must be 3x3, got {calib.shape}")
    if calib[2, 0] != 0 or calib[2, 1] != 0:
        calib = calib.T
    return intrinsics_from_matrix(calib, source)


@register_reader("ibims")
class IbimsDataset(RGBDDataset):
    """`ibims:PATH` (see the module docstring)."""

    splits = ("test",)

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        super().__init__(root, split)
        mat_dir = self.root / "ibims1_core_mat"
        if not mat_dir.is_dir():
            raise DataError(f"ibims: no ibims1_core_mat/ folder in {self.root}")
        listing = next((p for p in (self.root / "imagelist.txt", mat_dir / "imagelist.txt") if p.is_file()), None)
        if listing is None:
            raise DataError(f"ibims: imagelist.txt not found in {self.root} or {mat_dir}")
        self.items = [mat_dir / f"{name}.mat" for name in listing.read_text().split()]
        self._require_items("names in imagelist.txt")

    def read(self, item: Path) -> RGBDSample:
        if not item.is_file():
            raise DataError(f"file not found: {item}")
        data = scipy.io.loadmat(item)["data"][0, 0]
        fields = data.dtype.names
        missing = [k for k in ("rgb", "depth", "calib", "mask_invalid", "mask_transp") if k not in fields]
        if missing:
            raise DataError(f"{item}: not an iBims-1 core .mat (no {missing})")
        depth = np.asarray(data["depth"], dtype=np.float32)
        valid = (depth > 0) & (data["mask_invalid"] > 0) & (data["mask_transp"] > 0)
        gt = np.where(valid, depth, np.float32(0))
        meta = {k: np.asarray(data[k], dtype=np.uint8) for k in IBIMS_MASKS if k in fields}
        return build_sample(
            [item],
            rgb=np.ascontiguousarray(data["rgb"], dtype=np.uint8),
            depth=gt,
            gt=gt,
            intrinsics=ibims_intrinsics(data["calib"], str(item)),
            name=item.stem,
            meta={**meta, "depth_is_gt": True},
        )
