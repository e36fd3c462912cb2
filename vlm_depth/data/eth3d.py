"""ETH3D high-res multi-view (DSLR, 6048x4032): laser-scan ground truth with COLMAP SfM points as the sparse input.

Layout: the official archives `<scene>_dslr_jpg.7z` and `<scene>_dslr_depth.7z` unpacked under PATH, in one tree or
side by side (`<scene>_dslr_jpg/<scene>/...`), or Marigold's evaluation tar (`rgb/<scene>/...`, `depth/<scene>/...`):
    <scene>/images/dslr_images/DSC_XXXX.JPG                  distorted RGB
    <scene>/ground_truth_depth/dslr_images/DSC_XXXX.JPG      NOT a JPEG: raw little-endian float32 (H, W) meters of
                                                             the distorted image; inf/0 = no ground truth
    <scene>/dslr_calibration_jpg/{cameras,images,points3D}.txt   COLMAP text model of the distorted images
Sparse input (`sfm=True`, default): every SfM point observed in the image, placed at its observed keypoint (the
pixel COLMAP measured, so the lens distortion needs no model) with depth z = (R X + t)_z from the image pose; the
nearest point wins a pixel. With `sfm=False` depth is the ground truth (`depth_is_gt`). Intrinsics (when the COLMAP
model is present) are the first four camera parameters (fx, fy, cx, cy, shifted from COLMAP's pixel-corner origin);
the lens distortion is ignored there.
Splits: `all` (default; the 13 training scenes, 454 images), `indoor`, `outdoor` (the scene groups OMNI-DC uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import read_raw_float32, read_rgb
from vlm_depth.data.sample import Intrinsics, RGBDSample
from vlm_depth.errors import DataError

ETH3D_SCENES = {
    "indoor": ("delivery_area", "kicker", "office", "pipes", "relief", "relief_2", "terrains"),
    "outdoor": ("courtyard", "electro", "facade", "meadow", "playground", "terrace"),
}
SINGLE_FOCAL_MODELS = ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE")


def _data_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def quaternion_to_rotation(qw: float, qx: float, qy: float, qz: float) -> np.ndarray:
    """3x3 rotation matrix of a unit quaternion (Hamilton convention, as COLMAP stores it)."""
    q = np.array([qw, qx, qy, qz], dtype=np.float64)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


class ColmapModel:
    """A COLMAP text model (cameras.txt, images.txt, points3D.txt) reduced to what sparse depth needs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cameras: dict[int, Intrinsics] = {}
        for line in _data_lines(directory / "cameras.txt"):
            if line.strip():
                cam_id, model, _w, _h, *params = line.split()
                p = [float(v) for v in params]
                fx, fy, cx, cy = (p[0], p[0], p[1], p[2]) if model in SINGLE_FOCAL_MODELS else p[:4]
                # COLMAP puts the centre of the top-left pixel at (0.5, 0.5); this package puts it at (0, 0).
                self.cameras[int(cam_id)] = (fx, fy, cx - 0.5, cy - 0.5)
        ids, xyz = [], []
        for line in _data_lines(directory / "points3D.txt"):
            if line.strip():
                values = line.split(maxsplit=4)
                ids.append(int(values[0]))
                xyz.append(values[1:4])
        order = np.argsort(ids)
        self.point_ids = np.asarray(ids, dtype=np.int64)[order]
        self.point_xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)[order]
        self.images: dict[str, dict[str, Any]] = {}
        lines = iter(_data_lines(directory / "images.txt"))
        for header in lines:
            if not header.strip():
                continue
            observations = next(lines, "")  # the POINTS2D line follows its image line and may be empty
            image_id, qw, qx, qy, qz, tx, ty, tz, cam_id, name = header.split()
            obs = np.array(observations.split(), dtype=np.float64).reshape(-1, 3)
            self.images[Path(name).name] = {
                "R": quaternion_to_rotation(float(qw), float(qx), float(qy), float(qz)),
                "t": np.array([tx, ty, tz], dtype=np.float64),
                "camera": int(cam_id),
                "observations": obs[obs[:, 2] >= 0],
            }

    def sparse_depth(self, image_name: str, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) float32 planar depth (m) at the keypoints of `image_name` that have a 3D point; 0 elsewhere."""
        if image_name not in self.images:
            raise DataError(f"{self.directory / 'images.txt'}: no image {image_name!r}")
        image = self.images[image_name]
        obs = image["observations"]
        point_ids = obs[:, 2].astype(np.int64)
        pos = np.clip(np.searchsorted(self.point_ids, point_ids), 0, max(len(self.point_ids) - 1, 0))
        known = self.point_ids[pos] == point_ids if len(self.point_ids) else np.zeros(len(obs), dtype=bool)
        obs, pos = obs[known], pos[known]
        z = (self.point_xyz[pos] @ image["R"].T + image["t"])[:, 2]
        cols, rows = np.floor(obs[:, 0]).astype(np.int64), np.floor(obs[:, 1]).astype(np.int64)
        keep = (z > 0) & (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        rows, cols, z = rows[keep], cols[keep], z[keep]
        depth = np.full(shape, np.inf)
        np.minimum.at(depth, (rows, cols), z)
        depth[np.isinf(depth)] = 0
        return depth.astype(np.float32)

    def intrinsics(self, image_name: str) -> Intrinsics:
        """(fx, fy, cx, cy) of the camera that took `image_name`."""
        return self.cameras[self.images[image_name]["camera"]]


def _by_scene(root: Path, pattern: str, scene_level: int) -> dict[tuple[str, str], Path]:
    return {(p.parents[scene_level].name, p.name): p for p in sorted(root.rglob(pattern))}


@register_reader("eth3d")
class Eth3dDataset(RGBDDataset):
    """`eth3d:PATH` (see the module docstring)."""

    splits = ("all", "indoor", "outdoor")

    def __init__(self, root: str | Path, split: str | None = None, sfm: bool = True) -> None:
        super().__init__(root, split)
        self.sfm = sfm
        depths = _by_scene(self.root, "ground_truth_depth/dslr_images/*.JPG", 2)
        rgbs = _by_scene(self.root, "images/dslr_images/*.JPG", 2)
        self.calibrations = {
            p.parent.parent.name: p.parent for p in self.root.rglob("dslr_calibration_jpg/images.txt")
        }
        self._models: dict[str, ColmapModel] = {}
        scenes = None if self.split == "all" else ETH3D_SCENES[self.split]
        for (scene, name), depth in depths.items():
            if scenes is not None and scene not in scenes:
                continue
            if (scene, name) not in rgbs:
                raise DataError(f"{depth}: no RGB image {scene}/images/dslr_images/{name} under {self.root}")
            if sfm and scene not in self.calibrations:
                raise DataError(f"eth3d: no {scene}/dslr_calibration_jpg/images.txt under {self.root} (or sfm=False)")
            self.items.append({"scene": scene, "name": name, "rgb": rgbs[(scene, name)], "gt": depth})
        self._require_items("<scene>/ground_truth_depth/dslr_images/*.JPG")

    def _model(self, scene: str) -> ColmapModel:
        if scene not in self._models:
            self._models[scene] = ColmapModel(self.calibrations[scene])
        return self._models[scene]

    def read(self, item: dict[str, Any]) -> RGBDSample:
        rgb = read_rgb(item["rgb"])
        gt = read_raw_float32(item["gt"], rgb.shape[:2])
        gt[~np.isfinite(gt)] = 0  # inf is the format's "no ground truth"
        meta: dict[str, Any] = {}
        model = self._model(item["scene"]) if item["scene"] in self.calibrations else None
        if self.sfm and model is not None:
            depth = model.sparse_depth(item["name"], gt.shape)
        else:
            depth, meta["depth_is_gt"] = gt, True
        return build_sample(
            [item["rgb"], item["gt"]],
            rgb=rgb,
            depth=depth,
            gt=gt,
            intrinsics=model.intrinsics(item["name"]) if model is not None else None,
            name=f"{item['scene']}/{Path(item['name']).stem}",
            meta=meta,
        )
