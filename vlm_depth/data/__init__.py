"""RGB-D data: `RGBDSample`, depth I/O, dataset readers (`load("kind:PATH")`) and conversion to `datasets`.

Depth inside the package is float32 meters, (H, W), 0 = missing; readers convert their encoding once, at the edge.
"""

from vlm_depth.data.dataset import READERS, RGBDDataset, load, parse_spec, register_reader
from vlm_depth.data.sample import RGBDSample, scale_intrinsics

__all__ = ["READERS", "RGBDDataset", "RGBDSample", "load", "parse_spec", "register_reader", "scale_intrinsics"]
