"""Options of dense completion (`ReadoutSettings`) and of `vlm-depth complete` (`CompleteConfig`; presets in the
top-level `infer/` folder)."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_depth.config import _help


@dataclass
class ReadoutSettings:
    """How a dense map is read out of the model (`complete(..., settings=)`); the first options of `complete`."""

    num_queries: int = _help("Grid query budget: the smallest stride with at most this many points.", default=4096)
    stride: int = _help("Grid stride in pixels (overrides num_queries when > 0).", default=0)
    refine_queries: int = _help("Extra queries at image edges / high uncertainty after the grid.", default=0)
    refine_by: str = _help("What places the extra queries: edges, uncertainty or both.", default="both")
    max_queries_per_pass: int = _help("Queries decoded together against the cached prefix (memory).", default=128)
    packing: str = _help("Decoder layout: batch (a query per row) or packed (a chunk per row).", default="batch")
    refine_keep: bool = _help("Query valid input pixels too and smooth them (default: keep them).", default=False)


@dataclass
class CompleteConfig(ReadoutSettings):
    """`vlm-depth complete`: complete the depth of one RGB + depth pair (`--rgb --depth`) or of a dataset.

    vlm-depth complete --model runs/tiny-synthetic --rgb room.jpg --depth room_depth.png --out runs/complete
    vlm-depth complete --config infer/default.yaml --model CKPT --dataset folder:scans --out runs/complete
    """

    model: str = _help("Checkpoint folder (a vlm-depth checkpoint, or a plain Qwen2.5-VL: fresh branch).", default="")
    rgb: str = _help("RGB image of one pair (png/jpg).", default="")
    depth: str = _help(
        "Depth of the pair: 16-bit PNG (see depth_scale) or float32 .npy in meters; empty = monocular.", default=""
    )
    depth_scale: float = _help("Units per meter of integer depth PNGs (1000 = mm, 256 = KITTI).", default=1000.0)
    intrinsics: str = _help("Camera of the pair: 'fx,fy,cx,cy' in RGB pixels, or a json/txt/npy file.", default="")
    dataset: str = _help("Instead of a pair: a dataset KIND:PATH, e.g. folder:scans (every frame).", default="")
    limit: int = _help("Complete at most this many frames of the dataset (0 = all).", default=0)
    out: str = _help("Output folder.", default="runs/complete")
    readout: str = _help("query (pixel queries answered by the VLM) or mdm (dense head, if present).", default="query")
    fov: float = _help("Horizontal field of view (degrees) for NAME.ply when intrinsics are unknown.", default=0.0)
    color_range: str = _help("Range of NAME_color.png: auto (per image) or MIN,MAX meters (fixed).", default="auto")
    colormap: str = _help("matplotlib colormap of the depth images.", default="turbo")
    device: str = _help("auto (cuda if available), cpu or cuda[:N].", default="auto")
