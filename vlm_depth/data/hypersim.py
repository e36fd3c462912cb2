"""Hypersim (Apple, 1024x768 photorealistic indoor renders): tone-mapped RGB and exact planar depth.

Layout (one folder per scene `ai_VVV_NNN`, PATH is a scene folder or a folder of scenes):
    <scene>/images/scene_cam_XX_final_hdf5/frame.IIII.color.hdf5          linear HDR radiance (float16)
    <scene>/images/scene_cam_XX_final_preview/frame.IIII.tonemap.jpg      8-bit preview (`rgb_source="jpg"`)
    <scene>/images/scene_cam_XX_geometry_hdf5/frame.IIII.depth_meters.hdf5 distance to the optical centre (m)
    <scene>/images/scene_cam_XX_geometry_hdf5/frame.IIII.render_entity_id.hdf5 (-1 = no geometry; tone-map mask)
Per-scene camera: the scene's row of `metadata_camera_parameters.csv` (ml-hypersim contrib/mikeroberts3000), found
via `camera_csv=`, `PATH/metadata_camera_parameters.csv`, or `<scene>/metadata_camera_parameters[_<scene>].csv`.
Its `M_cam_from_uv` maps image coordinates (u right, v up, in [-1, 1] at pixel centres) to camera rays; planar depth
= distance * |r_z| / ||r||, exact also for the tilt-shift scenes (the 60 degree pinhole formula is off by up to
0.4 m there). Intrinsics are the pinhole part of that matrix (approximate for tilt-shift scenes).
RGB from `color.hdf5` is tone-mapped like the official `scene_generate_images_tonemap.py`. There is no sensor
input, so depth is the ground truth (`depth_is_gt`). Splits: `all` (default, every frame on disk), or
`train`/`val`/`test` from `metadata_images_split_scene_v1.csv` (`split_csv=` or in PATH; public frames only).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vlm_depth.data.dataset import RGBDDataset, build_sample, register_reader
from vlm_depth.data.depth_io import read_depth, read_rgb
from vlm_depth.data.sample import Intrinsics, RGBDSample
from vlm_depth.errors import ConfigError, DataError

DEPTH_NAME = re.compile(r"frame\.(\d+)\.depth_meters\.hdf5")
# Official tone map: the 90th-percentile brightness maps to 0.8 after gamma 1/2.2.
TONEMAP_GAMMA = 1.0 / 2.2
TONEMAP_PERCENTILE = 90
TONEMAP_TARGET = 0.8
TONEMAP_EPS = 1e-4


def read_hypersim_camera(csv_path: Path, scene: str) -> dict[str, Any]:
    """The scene's `M_cam_from_uv` (3x3) and image size from a `metadata_camera_parameters*.csv`."""
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["scene_name"] == scene:
                m = np.array([float(row[f"M_cam_from_uv_{i}{j}"]) for i in range(3) for j in range(3)])
                height, width = (
                    int(float(row["settings_output_img_height"])),
                    int(float(row["settings_output_img_width"])),
                )
                return {"M_cam_from_uv": m.reshape(3, 3), "height": height, "width": width}
    raise DataError(f"{csv_path}: no camera row for scene {scene!r}")


def _rays(m_cam_from_uv: np.ndarray, height: int, width: int) -> np.ndarray:
    u = np.linspace(-1 + 1 / width, 1 - 1 / width, width)
    v = np.linspace(1 - 1 / height, -1 + 1 / height, height)  # +v is up: row 0 sits at v ~ +1
    uu, vv = np.meshgrid(u, v)
    return np.stack([uu, vv, np.ones_like(uu)], axis=-1) @ np.asarray(m_cam_from_uv, dtype=np.float64).T


def hypersim_planar_depth(distance: np.ndarray, m_cam_from_uv: np.ndarray) -> np.ndarray:
    """(H, W) distance to the optical centre (m) -> (H, W) float32 planar depth z (m) for the scene's camera."""
    rays = _rays(m_cam_from_uv, *distance.shape)
    cos_to_axis = np.abs(rays[..., 2]) / np.linalg.norm(rays, axis=-1)
    return (distance.astype(np.float64) * cos_to_axis).astype(np.float32)


def hypersim_intrinsics(m_cam_from_uv: np.ndarray, height: int, width: int) -> Intrinsics:
    """Pinhole (fx, fy, cx, cy) in pixels from `M_cam_from_uv`, ignoring its tilt terms (row 2, columns 0-1)."""
    m = np.asarray(m_cam_from_uv, dtype=np.float64)
    depth_scale = abs(m[2, 2])
    fx = depth_scale * width / (2 * m[0, 0])
    fy = depth_scale * height / (2 * m[1, 1])
    cx = (1 - m[0, 2] / m[0, 0]) * width / 2 - 0.5
    cy = (1 + m[1, 2] / m[1, 1]) * height / 2 - 0.5
    return (float(fx), float(fy), float(cx), float(cy))


def hypersim_tonemap(color: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Linear HDR (H, W, 3) -> (H, W, 3) uint8 sRGB-like, as ml-hypersim's official tone mapping.

    valid: pixels that count for the brightness percentile (render_entity_id != -1); all finite pixels if None.
    """
    color = np.nan_to_num(color.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    valid = np.ones(color.shape[:2], dtype=bool) if valid is None else valid
    if not valid.any():
        scale = 1.0
    else:
        brightness = 0.3 * color[..., 0] + 0.59 * color[..., 1] + 0.11 * color[..., 2]
        current = np.percentile(brightness[valid], TONEMAP_PERCENTILE)
        scale = 0.0 if current < TONEMAP_EPS else TONEMAP_TARGET ** (1 / TONEMAP_GAMMA) / current
    mapped = np.clip(np.power(np.maximum(scale * color, 0), TONEMAP_GAMMA), 0, 1)
    return np.rint(mapped * 255).astype(np.uint8)


def _read_hdf5(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    with h5py.File(path, "r") as f:
        return np.asarray(f["dataset"][()])


def _read_split_csv(path: Path, split: str) -> set[tuple[str, str, int]]:
    if not path.is_file():
        raise DataError(f"{path} not found: split {split!r} needs Hypersim's metadata_images_split_scene_v1.csv")
    with path.open(newline="") as f:
        return {
            (row["scene_name"], row["camera_name"], int(row["frame_id"]))
            for row in csv.DictReader(f)
            if row["split_partition_name"] == split and row["included_in_public_release"].strip().lower() == "true"
        }


@register_reader("hypersim")
class HypersimDataset(RGBDDataset):
    """`hypersim:PATH` (see the module docstring)."""

    splits = ("all", "train", "val", "test")

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        camera_csv: str | Path | None = None,
        split_csv: str | Path | None = None,
        rgb_source: str = "hdf5",
    ) -> None:
        super().__init__(root, split)
        if rgb_source not in ("hdf5", "jpg"):
            raise ConfigError(f"hypersim: rgb_source must be 'hdf5' or 'jpg', got {rgb_source!r}")
        self.rgb_source = rgb_source
        self.camera_csv = Path(camera_csv) if camera_csv else None
        self._cameras: dict[str, dict[str, Any]] = {}
        scene_dirs = [self.root] if (self.root / "images").is_dir() else sorted(self.root.glob("ai_*_*"))
        keep = None
        if self.split != "all":
            keep = _read_split_csv(
                Path(split_csv) if split_csv else self.root / "metadata_images_split_scene_v1.csv", self.split
            )
        for scene_dir in scene_dirs:
            for depth in sorted(scene_dir.glob("images/scene_cam_*_geometry_hdf5/frame.*.depth_meters.hdf5")):
                frame = int(DEPTH_NAME.fullmatch(depth.name).group(1))  # type: ignore[union-attr]
                camera = depth.parent.name.removeprefix("scene_").removesuffix("_geometry_hdf5")
                if keep is None or (scene_dir.name, camera, frame) in keep:
                    self.items.append({"scene_dir": scene_dir, "camera": camera, "frame": frame, "depth": depth})
        self._require_items("<scene>/images/scene_cam_XX_geometry_hdf5/frame.IIII.depth_meters.hdf5")

    def _camera(self, scene_dir: Path) -> dict[str, Any]:
        scene = scene_dir.name
        if scene not in self._cameras:
            candidates = [
                self.camera_csv,
                self.root / "metadata_camera_parameters.csv",
                scene_dir / "metadata_camera_parameters.csv",
                scene_dir / f"metadata_camera_parameters_{scene}.csv",
            ]
            path = next((p for p in candidates if p is not None and p.is_file()), None)
            if path is None:
                raise DataError(
                    f"hypersim: no metadata_camera_parameters.csv for {scene} (looked for "
                    f"{[str(p) for p in candidates if p is not None]}); planar depth needs the per-scene camera"
                )
            self._cameras[scene] = read_hypersim_camera(path, scene)
        return self._cameras[scene]

    def _rgb(self, item: dict[str, Any]) -> tuple[np.ndarray, Path]:
        images, camera, frame = item["scene_dir"] / "images", item["camera"], item["frame"]
        if self.rgb_source == "jpg":
            path = images / f"scene_{camera}_final_preview" / f"frame.{frame:04d}.tonemap.jpg"
            return read_rgb(path), path
        path = images / f"scene_{camera}_final_hdf5" / f"frame.{frame:04d}.color.hdf5"
        entity = item["depth"].parent / f"frame.{frame:04d}.render_entity_id.hdf5"
        valid = _read_hdf5(entity) != -1 if entity.is_file() else None
        return hypersim_tonemap(_read_hdf5(path), valid), path

    def read(self, item: dict[str, Any]) -> RGBDSample:
        camera = self._camera(item["scene_dir"])
        distance = read_depth(item["depth"], key="dataset")
        distance[~np.isfinite(distance)] = 0  # NaN/inf is the format's "no geometry"
        if distance.shape != (camera["height"], camera["width"]):
            raise DataError(f"{item['depth']}: shape {distance.shape} differs from the camera's image size")
        planar = hypersim_planar_depth(distance, camera["M_cam_from_uv"])
        rgb, rgb_path = self._rgb(item)
        return build_sample(
            [rgb_path, item["depth"]],
            rgb=rgb,
            depth=planar,
            gt=planar,
            intrinsics=hypersim_intrinsics(camera["M_cam_from_uv"], camera["height"], camera["width"]),
            name=f"{item['scene_dir'].name}/{item['camera']}/{item['frame']:04d}",
            meta={"depth_is_gt": True},
        )
