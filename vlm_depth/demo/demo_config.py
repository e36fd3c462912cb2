"""`vlm-depth demo` config, and the names the demo gives its models and stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlm_depth.config import option

PROTOCOL = (
    "sensor"  # the demo evaluates on the simulated sensor depth as input, the ray-cast ground truth as reference
)
Supervision = Literal["sparse", "gt"]


@dataclass
class DemoConfig:
    """`vlm-depth demo`: the main job on the embedded default (tiny model + synthetic sensor data)."""

    out: str = option("Output folder for the whole demo run.", default="runs/demo")
    seed: int = option("Seed for data, training and evaluation.", default=0)
    recipe: str = option(
        "Training recipe (top-level train/); the demo sets its data, steps, seed and output.", default="tiny-synthetic"
    )
    train_steps: int = option("Optimiser steps of each training.", default=200)
    num_train: int = option("Synthetic training frames.", default=48)
    num_eval: int = option("Held-out synthetic frames (another seed) for the evaluation.", default=8)
    height: int = option("Frame height in pixels.", default=96)
    width: int = option("Frame width in pixels.", default=128)
    mdm: bool = option("Also train the MDM head (jointly) and evaluate its dense `mdm` readout.", default=True)
    gt_labels: bool = option(
        "Also train the same recipe with ground-truth labels (label_source gt) and report the label-free minus GT "
        "gap per metric.",
        default=True,
    )
    real_data: str = option(
        "Folder holding train-and-test/ of the real sample frames (NYUv2 Kinect, KITTI LiDAR) for the zero-shot "
        "table: auto = $VLM_DEPTH_SHARED_DATA, else ../shared/data; empty = no real frames.",
        default="auto",
    )
    readme: str = option(
        "Also write the report's Results section into this README, between its demo-results markers.", default=""
    )
    budget_minutes: float = option("Time budget the report checks the whole run against (minutes).", default=10.0)


def readouts(cfg: DemoConfig) -> list[str]:
    """The model readouts the demo trains and evaluates: `query`, plus `mdm` with `cfg.mdm`."""
    return ["query", "mdm"] if cfg.mdm else ["query"]


def supervisions(cfg: DemoConfig) -> list[Supervision]:
    """The trainings of the demo: label-free (`sparse`), plus ground truth (`gt`) with `cfg.gt_labels`."""
    return ["sparse", "gt"] if cfg.gt_labels else ["sparse"]


def model_name(readout: str, supervision: Supervision = "sparse") -> str:
    """Method name of a demo model in the tables: `tiny-vlm-READOUT` (label-free), `tiny-vlm-gt-READOUT`."""
    return f"tiny-vlm-{readout}" if supervision == "sparse" else f"tiny-vlm-gt-{readout}"


def train_folder(supervision: Supervision) -> str:
    """Folder of a demo training under OUT: `train` (label-free) or `train-gt`."""
    return "train" if supervision == "sparse" else "train-gt"
