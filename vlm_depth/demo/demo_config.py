"""`vlm-depth demo` config."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_depth.config import option

PROTOCOL = (
    "sensor"  # the demo evaluates on the simulated sensor depth as input, the ray-cast ground truth as reference
)


@dataclass
class DemoConfig:
    """`vlm-depth demo`: the main job on the embedded default (tiny model + synthetic sensor data)."""

    out: str = option("Output folder for the whole demo run.", default="runs/demo")
    seed: int = option("Seed for data, training and evaluation.", default=0)
    recipe: str = option(
        "Training recipe (top-level train/); the demo sets its data, steps, seed and output.", default="tiny-synthetic"
    )
    train_steps: int = option("Optimiser steps of the label-free training.", default=200)
    num_train: int = option("Synthetic training frames.", default=48)
    num_eval: int = option("Held-out synthetic frames (another seed) for the evaluation.", default=8)
    height: int = option("Frame height in pixels.", default=96)
    width: int = option("Frame width in pixels.", default=128)
    mdm: bool = option("Also train the MDM head (jointly) and evaluate its dense `mdm` readout.", default=True)
    budget_minutes: float = option("Time budget the report checks the whole run against (minutes).", default=10.0)


def readouts(cfg: DemoConfig) -> list[str]:
    """The model readouts the demo trains and evaluates: `query`, plus `mdm` with `cfg.mdm`."""
    return ["query", "mdm"] if cfg.mdm else ["query"]


def model_name(readout: str) -> str:
    """Method name of the demo model with `readout` in the tables."""
    return f"tiny-vlm-{readout}"
