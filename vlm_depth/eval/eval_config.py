"""`vlm-depth eval` config: one dataset x protocol(s) x method(s) from the command line, or a suite YAML file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from vlm_depth.config import check_options, option
from vlm_depth.errors import ConfigError


@dataclass
class EvalConfig:
    """`vlm-depth eval`: metrics of completion methods on datasets under sparsity protocols.

    Single run:  vlm-depth eval --dataset folder:my_scans --protocol uniform:500 --baseline all --out runs/eval/x
    Suite:       vlm-depth eval --suite eval/zero_shot.yaml --out runs/eval/zero_shot
    """

    dataset: str = option(
        "Dataset as KIND:PATH (e.g. `nyuv2:data/nyu_depth_v2_labeled.mat`, `folder:scans`).", default=""
    )
    split: str = option("Dataset split (empty = the reader's default split).", default="")
    options: str = option(
        "Reader options as a YAML mapping, e.g. `{depth_scale: 256}` for a folder of KITTI-encoded PNGs.", default=""
    )
    protocol: str = option(
        "Sparsity protocol(s), comma-separated (e.g. `uniform:500`, `lidar:64`, `sensor`, `blocks:hard`).",
        default="sensor",
    )
    model: str = option("vlm-depth checkpoint folder to evaluate (mutually exclusive with --baseline).", default="")
    readout: str = option("Model readout: `query` (pixel-query decoder) or `mdm` (MDM head).", default="query")
    baseline: str = option(
        "Classical baseline(s), comma-separated: nearest, linear, ipbasic, median, or `all`.", default=""
    )
    suite: str = option(
        "Suite YAML (datasets x protocols x methods), e.g. `eval/zero_shot.yaml` or a name in top-level `eval/`; "
        "replaces --dataset/--protocol/--model/--baseline.",
        default="",
    )
    out: str = option("Output folder: report.md, results.csv, plots, and one folder per cell.", default="runs/eval")
    seed: int = option("Seed of the sparsity protocols (image i uses a seed derived from (seed, i)).", default=0)
    max_images: int = option("Evaluate only the first N images of each dataset (0 = all).", default=0)
    max_depth: float = option(
        "Depth cap in meters for the evaluated GT pixels (0 = the dataset's own cap, or none).", default=0.0
    )
    crop: str = option(
        "Evaluation crop: `dataset` (the dataset's standard crop if it has one, e.g. NYU Eigen), `none`, or "
        "`top:bottom,left:right` in RGB pixels.",
        default="dataset",
    )
    panels: int = option("compare.png panels (RGB | input | prediction | error) per cell.", default=2)
    base_model: str = option(
        "Base model of LoRA checkpoints whose base_model.json names a local folder (a checkpoint never points weight "
        "loading at a path itself); empty = their Hub id or the run's own tiny base.",
        default="",
    )
    overwrite: bool = option(
        "Empty --out first when it holds an earlier evaluation (else that is an error).", default=False
    )

    def __post_init__(self) -> None:
        """Every option is checked here, before any file is read or written."""
        check_options(self, {"seed": 0, "max_images": 0, "max_depth": 0, "panels": 0})
        if self.readout not in ("query", "mdm"):
            raise ConfigError(f"--readout must be query or mdm, got {self.readout!r}")
        reader_options(self.options)


def reader_options(text: str) -> dict[str, Any]:
    """The reader keyword arguments of `--options` (a YAML mapping, e.g. `{depth_scale: 256}`); {} when empty."""
    try:
        options = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--options is not valid YAML ({err.problem if hasattr(err, 'problem') else err}); "
            "write a mapping such as '{depth_scale: 256}'"
        ) from err
    if not isinstance(options, dict):
        raise ConfigError(f"--options must be a YAML mapping such as '{{depth_scale: 256}}', got {text!r}")
    return options
