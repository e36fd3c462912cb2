"""The generic `folder` format (DESIGN.md) for new sensors, and `write_folder_sample` to produce it.

Per frame NAME (files may sit in sub-folders; NAME is then the relative path):
    NAME_rgb.png|.jpg          (H, W, 3) 8-bit RGB
    NAME_depth.png|.npy        sensor/sparse depth: uint16 PNG = meters * depth_scale (default 1000, millimetres),
                               or float32 meters .npy; 0 = missing; may be smaller than the RGB (same aspect ratio)
    NAME_gt.png|.npy           optional ground truth, same encoding and size as the depth
    NAME_intrinsics.json       optional {"fx", "fy", "cx", "cy"} in pixels of the RGB image
    NAME_meta.json             optional scalar metadata (`max_depth`, `eval_crop`, `depth_intrinsics`, `depth_is_gt`)
    NAME_<key>.png|.npy        optional single-channel per-pixel maps (e.g. `material`) -> `sample.meta[key]`
Multi-channel PNGs with other suffixes (previews) are ignored. With `depth_is_gt: true` in the meta file and no gt
file, the depth is also the ground truth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import (
    check_depth_scale,
    read_depth,
    read_intrinsics,
    read_label_png,
    read_npy,
    read_rgb,
    write_depth_npy,
    write_depth_png,
    write_intrinsics_json,
    write_label_png,
    write_rgb,
)
from vlm_depth.data.sample import RGBDSample, scalar_meta
from vlm_depth.errors import ConfigError, DataError
from vlm_depth.files import atomic_path, atomic_write

RGB_SUFFIXES = (".png", ".jpg", ".jpeg")
DEPTH_SUFFIXES = (".png", ".npy")
ROLES = ("rgb", "depth", "gt", "intrinsics", "meta")


def _one_file(base: Path, role: str, files: list[Path], suffixes: tuple[str, ...], required: bool) -> Path | None:
    found = sorted(p for p in files if p.suffix.lower() in suffixes)
    if len(found) > 1:
        raise DataError(f"ambiguous: both {found[0]} and {found[1]} exist; keep one")
    if not found and required:
        raise DataError(f"{base}_{role}{suffixes[0]} not found (expected one of {list(suffixes)})")
    return found[0] if found else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc


@register_reader("folder")
class FolderDataset(RGBDDataset):
    """`folder:PATH`: the generic per-frame file format above. Split: `all` (every frame, sorted by NAME).

    depth_scale: units per meter of integer depth/gt PNGs (1000 = millimetres).
    """

    def __init__(self, root: str | Path, split: str | None = None, depth_scale: float = 1000.0) -> None:
        super().__init__(root, split)
        self.depth_scale = check_depth_scale(depth_scale, "folder: depth_scale")
        # One directory walk: group `<base>_<role>.<ext>` files by base (roles and map keys contain no "_").
        frames: dict[Path, dict[str, list[Path]]] = {}
        for path in sorted(self.root.rglob("*_*")):
            base, _, role = path.stem.rpartition("_")
            if path.is_file() and base:
                frames.setdefault(path.parent / base, {}).setdefault(role, []).append(path)
        for base, roles in frames.items():
            rgb = _one_file(base, "rgb", roles.get("rgb", []), RGB_SUFFIXES, required=False)
            if rgb is None:
                depth = _one_file(base, "depth", roles.get("depth", []), DEPTH_SUFFIXES, required=False)
                if depth is not None:
                    raise DataError(f"{depth}: depth file without a matching NAME_rgb.png/.jpg")
                continue
            self.items.append(
                {
                    "name": str(base.relative_to(self.root)),
                    "rgb": rgb,
                    "depth": _one_file(base, "depth", roles.get("depth", []), DEPTH_SUFFIXES, required=True),
                    "gt": _one_file(base, "gt", roles.get("gt", []), DEPTH_SUFFIXES, required=False),
                    "intrinsics": _one_file(base, "intrinsics", roles.get("intrinsics", []), (".json",), False),
                    "meta": _one_file(base, "meta", roles.get("meta", []), (".json",), required=False),
                    "extras": {
                        key: path
                        for key, paths in roles.items()
                        if key not in ROLES
                        for path in paths
                        if path.suffix.lower() in DEPTH_SUFFIXES
                    },
                }
            )
        self.items.sort(key=lambda item: item["name"])
        self._require_items("NAME_rgb.png + NAME_depth.png files")

    def read(self, item: dict[str, Any]) -> RGBDSample:
        depth = read_depth(item["depth"], self.depth_scale)
        meta: dict[str, Any] = _read_json(item["meta"]) if item["meta"] else {}
        gt = read_depth(item["gt"], self.depth_scale) if item["gt"] else None
        if gt is None and meta.get("depth_is_gt"):
            gt = depth
        for key, path in item["extras"].items():
            values = read_npy(path) if path.suffix.lower() == ".npy" else _read_map_png(path)
            if values is not None:
                meta[key] = values
        files = [p for p in (item["rgb"], item["depth"], item["gt"]) if p is not None]
        return build_sample(
            files,
            rgb=read_rgb(item["rgb"]),
            depth=depth,
            gt=gt,
            intrinsics=read_intrinsics(item["intrinsics"]) if item["intrinsics"] else None,
            name=item["name"],
            meta=meta,
        )


def _read_map_png(path: Path) -> np.ndarray | None:
    """A single-channel per-pixel map, or None for a multi-channel image (a preview, not a map)."""
    try:
        return read_label_png(path)
    except DataError:
        return None


def write_folder_sample(
    out_dir: str | Path,
    sample: RGBDSample,
    depth_scale: float = 1000.0,
    extra: dict[str, np.ndarray] | None = None,
    depth_format: str = "png",
) -> list[Path]:
    """Write `sample` into `out_dir` in the folder format and return the written paths.

    depth/gt: uint16 PNG holding meters * depth_scale (`depth_format="png"`; raises DataError if a value would not
    fit in 16 bits) or float32 meters `.npy` (`depth_format="npy"`, lossless). extra: per-pixel maps, (h, w) uint8
    or uint16 -> `NAME_<key>.png` (other dtypes -> `.npy`); array-valued `sample.meta` entries are written the same
    way and scalar ones to `NAME_meta.json`, so `FolderDataset` reads the sample back.
    """
    if depth_format not in ("png", "npy"):
        raise ConfigError(f"depth_format must be 'png' or 'npy', got {depth_format!r}")
    if not sample.name or sample.name.endswith("/") or any(sample.name.endswith(f"_{r}") for r in ROLES):
        raise DataError(f"cannot write a sample named {sample.name!r} (needs a name not ending in _rgb, _depth, ...)")
    base = Path(out_dir) / sample.name

    def depth_file(role: str, values: np.ndarray) -> Path:
        if depth_format == "png":
            return write_depth_png(f"{base}_{role}.png", values, depth_scale)
        return write_depth_npy(f"{base}_{role}.npy", values)

    written = [write_rgb(f"{base}_rgb.png", sample.rgb), depth_file("depth", sample.depth)]
    depth_is_gt = sample.gt is not None and sample.gt is sample.depth
    if sample.gt is not None and not depth_is_gt:
        written.append(depth_file("gt", sample.gt))
    if sample.intrinsics is not None:
        written.append(write_intrinsics_json(f"{base}_intrinsics.json", sample.intrinsics))
    maps = {k: v for k, v in sample.meta.items() if isinstance(v, np.ndarray)}
    maps.update(extra or {})
    scalars = {k: v for k, v in scalar_meta(sample.meta).items() if k not in maps}
    if depth_is_gt:
        scalars["depth_is_gt"] = True
    for key, values in maps.items():
        if key in ROLES or "_" in key:
            raise DataError(f"{sample.name}: extra map name {key!r} is reserved or contains '_'")
        values = np.asarray(values)
        if values.dtype in (np.uint8, np.uint16) and values.ndim == 2:
            written.append(write_label_png(f"{base}_{key}.png", values))
        else:
            with atomic_path(f"{base}_{key}.npy") as tmp:
                np.save(tmp, values, allow_pickle=False)
            written.append(Path(f"{base}_{key}.npy"))
    if scalars:
        written.append(atomic_write(f"{base}_meta.json", json.dumps(scalars, sort_keys=True) + "\n"))
    return written
