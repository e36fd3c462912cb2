"""`vlm-depth complete` config: the readout settings of `complete()` plus the command's inputs and outputs; presets
in the top-level `infer/` folder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlm_depth.config import check_options, load_config, option, pick
from vlm_depth.data.depth_io import check_depth_scale
from vlm_depth.depth import colormap
from vlm_depth.errors import ConfigError
from vlm_depth.infer.outputs import parse_range
from vlm_depth.infer.readouts import READOUTS, ReadoutSettings


@dataclass
class CompleteConfig(ReadoutSettings):
    """`vlm-depth complete`: complete the depth of one RGB + depth pair (`--rgb --depth`) or of a dataset.

    vlm-depth complete --model runs/tiny-synthetic --rgb room.jpg --depth room_depth.png --out runs/complete
    vlm-depth complete --config infer/default.yaml --model CKPT --dataset folder:scans --out runs/complete
    """

    shipped: ClassVar[str] = "infer"  # `--config NAME` finds a preset of the top-level infer/ folder
    renamed: ClassVar[dict[str, str]] = {"num_queries": "query_budget"}

    model: str = option("Checkpoint folder (a vlm-depth checkpoint, or a plain Qwen2.5-VL: fresh branch).", default="")
    rgb: str = option("RGB image of one pair (png/jpg).", default="")
    depth: str = option(
        "Depth of the pair: 16-bit PNG (see depth_scale) or float32 .npy in meters; empty = monocular.", default=""
    )
    depth_scale: float = option("Units per meter of integer depth PNGs (1000 = mm, 256 = KITTI).", default=1000.0)
    intrinsics: str = option("Camera of the pair: 'fx,fy,cx,cy' in RGB pixels, or a json/txt/npy file.", default="")
    dataset: str = option("Instead of a pair: a dataset KIND:PATH, e.g. folder:scans (every frame).", default="")
    limit: int = option("Complete at most this many frames of the dataset (0 = all).", default=0)
    out: str = option("Output folder.", default="runs/complete")
    readout: str = option(
        "query (pixel queries answered by the VLM) or mdm (dense head, if present).", default="query"
    )
    fov: float = option("Horizontal field of view (degrees) for NAME.ply when intrinsics are unknown.", default=0.0)
    color_range: str = option("Range of NAME_color.png: auto (per image) or MIN,MAX meters (fixed).", default="auto")
    colormap: str = option("matplotlib colormap of the depth images.", default="turbo")
    device: str = option("auto (cuda if available), cpu or cuda[:N].", default="auto")
    base_model: str = option(
        "Base model of a LoRA checkpoint whose base_model.json names a local folder (a checkpoint never points "
        "weight loading at a path itself); empty = its Hub id or the run's own tiny base.",
        default="",
    )
    overwrite: bool = option(
        "Empty --out first when it holds an earlier completion (else that is an error).", default=False
    )

    def __post_init__(self) -> None:
        """Every option is checked here, before any file is read or written."""
        super().__post_init__()
        check_options(self, {"limit": 0, "fov": 0})
        if self.readout not in READOUTS:
            raise ConfigError(f"--readout must be one of {sorted(READOUTS)}, got {self.readout!r}")
        if self.fov >= 180:
            raise ConfigError(f"--fov must be in (0, 180) degrees, or 0 for no point cloud, got {self.fov}")
        check_depth_scale(self.depth_scale, "--depth_scale")
        parse_range(self.color_range)
        colormap(self.colormap)
        if self.dataset and (self.depth or self.intrinsics):
            given = "--depth" if self.depth else "--intrinsics"
            raise ConfigError(f"{given} applies to an --rgb pair; a --dataset brings its own depth and intrinsics")


def preset_settings(preset: str) -> ReadoutSettings:
    """The readout settings (query budget, stride, refinement, ...) of the inference preset `preset` (a name in the
    top-level `infer/` folder, or a path)."""
    return pick(ReadoutSettings, load_config(CompleteConfig, preset))
