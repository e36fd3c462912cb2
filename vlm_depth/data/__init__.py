"""RGB-D data: `RGBDSample`, depth I/O, dataset readers (`load("kind:PATH?key=value")`) and conversion to `datasets`
(`to_hf_dataset`, imported lazily).

Depth inside the package is float32 meters, (H, W), 0 = missing; readers convert their encoding once, at the edge.
"""

from typing import Any

from vlm_depth.data.dataset import READERS, RGBDDataset, load, parse_spec, register_reader
from vlm_depth.data.sample import RGBDSample, scale_intrinsics


def __getattr__(name: str) -> Any:
    if name == "to_hf_dataset":
        from vlm_depth.data.hf import to_hf_dataset

        return to_hf_dataset
    raise AttributeError(f"module 'vlm_depth.data' has no attribute {name!r}")


__all__ = [
    "READERS",
    "RGBDDataset",
    "RGBDSample",
    "load",
    "parse_spec",
    "register_reader",
    "scale_intrinsics",
    "to_hf_dataset",
]
