"""DepthProcessor: the real Qwen2.5-VL processor plus the depth path, so `(rgb, sparse depth)` becomes every model
input in one call. The depth follows the image path exactly: resized (without inventing values) to the grid the
image processor picks for the RGB, and kept as a map (`depth_maps`) that the model's depth branch reads; its output
is patchified once, in the processor's patch order, so it lies on the same pixels as `pixel_values`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature

from vlm_depth.depth import ASPECT_TOLERANCE, same_aspect
from vlm_depth.errors import DataError, ModelError
from vlm_depth.model.align import processor_grid, resize_depth
from vlm_depth.model.branch_config import DepthBranchConfig


def _as_list(value, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{name}: empty list")
        return list(value)
    return [value]


def _check_rgb(rgb: np.ndarray, index: int) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise DataError(f"rgb[{index}]: expected a (H, W, 3) uint8 array, got {got}")
    return rgb


def _check_depth(depth: np.ndarray | None, rgb_shape: tuple[int, int], index: int) -> np.ndarray:
    """(h, w) float32 meters; another resolution than the RGB is fine when the aspect ratios agree within 1 %."""
    if depth is None:
        return np.zeros(rgb_shape, dtype=np.float32)
    if not isinstance(depth, np.ndarray) or depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
        got = f"{depth.dtype} {depth.shape}" if isinstance(depth, np.ndarray) else type(depth).__name__
        raise DataError(f"depth[{index}]: expected a (H, W) array of meters, got {got}")
    (h, w), (rgb_h, rgb_w) = depth.shape, rgb_shape
    if not same_aspect(depth.shape, rgb_shape):
        raise DataError(
            f"depth[{index}] is {w}x{h} but rgb[{index}] is {rgb_w}x{rgb_h}: aspect ratios differ by more than "
            f"{ASPECT_TOLERANCE:.0%}; crop or pad one of them so they cover the same view"
        )
    return depth.astype(np.float32, copy=False)


class DepthProcessor:
    """A `Qwen2_5_VLProcessor` that also turns sparse depth into `depth_maps` on the grid of `pixel_values`."""

    def __init__(self, processor, template: str = DepthBranchConfig.template) -> None:
        image_processor = getattr(processor, "image_processor", None)
        needed = ("patch_size", "merge_size", "temporal_patch_size", "size")
        if image_processor is None or not all(hasattr(image_processor, a) for a in needed):
            raise ModelError(f"{type(processor).__name__} is not a Qwen2.5-VL style processor (needs {needed})")
        self.processor = processor
        self.template = template

    @classmethod
    def from_pretrained(cls, path: str | Path, template: str | None = None) -> DepthProcessor:
        """Load the processor of a vlm-depth or plain Qwen2.5-VL checkpoint folder (or hub name, if cached).

        `template` (prompt template name for the default prompt) defaults to the checkpoint's vlm-depth config, else
        the package default.
        """
        from transformers import AutoProcessor

        folder = Path(path)
        if folder.is_dir() and not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            raise ModelError(f"{path}: tokenizer files missing (tokenizer.json); save the processor into the folder")
        try:
            processor = AutoProcessor.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"{path}: cannot load a Qwen2.5-VL processor ({first_line})") from err
        if template is None:
            is_folder = Path(path).is_dir() and DepthBranchConfig.exists(path)
            template = DepthBranchConfig.load(path).template if is_folder else DepthBranchConfig.template
        return cls(processor, template=template)

    def save_pretrained(self, path: str | Path) -> None:
        """Write processor, tokenizer and chat template into the folder `path`."""
        self.processor.save_pretrained(str(path))

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') pixels of the processor's resized grid for a height x width image."""
        return processor_grid(height, width, self.image_processor)

    def to_grid_xy(self, x: float, y: float, rgb_shape: tuple[int, ...]) -> tuple[float, float]:
        """Position on the resized grid (pixel units, pixel centres at integers) of original pixel (x, y) = (column,
        row) of an image of shape `rgb_shape` (H, W[, 3]). `floor(g + 0.5)` is the grid pixel whose footprint holds
        the original pixel in `resize_depth`, so a depth at (x, y) lands there."""
        height, width = rgb_shape[:2]
        if not (0 <= x < width and 0 <= y < height):
            raise DataError(f"pixel ({x}, {y}) is outside the {width}x{height} image")
        grid_h, grid_w = self.grid_size(height, width)
        return (x + 0.5) * grid_w / width - 0.5, (y + 0.5) * grid_h / height - 0.5

    def default_prompt(self) -> str:
        """Chat text of one user turn: the image, then the template's shared instruction; ends with the assistant
        header (`add_generation_prompt=True`)."""
        from vlm_depth.prompts.template import PromptTemplate

        content = [{"type": "image"}]
        instruction = PromptTemplate.load(self.template).instruction
        if instruction:
            content.append({"type": "text", "text": instruction})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _depth_maps(self, depth: list[np.ndarray], grids: list[tuple[int, int]]) -> torch.Tensor:
        """`depth_maps`: each depth resized (without inventing values) to its image's grid, flattened row-major,
        images concatenated like `pixel_values`; float32 meters, 0 = missing."""
        return torch.cat([torch.from_numpy(resize_depth(d, grid)).flatten() for d, grid in zip(depth, grids)])

    def __call__(
        self,
        rgb: np.ndarray | list[np.ndarray],
        depth: np.ndarray | list[np.ndarray | None] | None = None,
        text: str | list[str] | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Model inputs for RGB images (H, W, 3) uint8 and sparse depth (h, w) float32 meters, 0 = missing.

        Returns the processor's own keys (`input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`,
        `mm_token_type_ids`) plus `depth_maps` (sum of H' x W' over the images,): each image's depth on the grid of
        its `pixel_values`, flattened row-major (see `vlm_depth.model.align.split_maps`). `depth` None (or all zero)
        is monocular input. `text` None gives one `default_prompt()` per image; given text must hold one image
        placeholder per image. Extra keyword arguments go to the Qwen2.5-VL processor (padding defaults to True).
        """
        if return_tensors != "pt":
            raise ValueError(
                f"DepthProcessor returns PyTorch tensors only (return_tensors='pt'), got {return_tensors!r}"
            )
        images = [_check_rgb(image, i) for i, image in enumerate(_as_list(rgb, "rgb"))]
        depths = [None] * len(images) if depth is None else _as_list(depth, "depth")
        if len(depths) != len(images):
            raise DataError(f"{len(images)} rgb images but {len(depths)} depth maps")
        depths = [_check_depth(d, image.shape[:2], i) for i, (d, image) in enumerate(zip(depths, images))]
        texts = [self.default_prompt()] * len(images) if text is None else _as_list(text, "text")
        kwargs.setdefault("padding", True)
        inputs = self.processor(images=images, text=texts, return_tensors="pt", **kwargs)
        grids = [self.grid_size(*image.shape[:2]) for image in images]
        p = self.image_processor.patch_size
        if [(h * p, w * p) for _, h, w in inputs["image_grid_thw"].tolist()] != grids:
            raise ModelError(
                f"the image processor's grids {inputs['image_grid_thw'].tolist()} differ from smart_resize"
            )
        inputs["depth_maps"] = self._depth_maps(depths, grids)
        return inputs
