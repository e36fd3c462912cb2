"""The one model loader: a DepthVLM checkpoint (or a plain Qwen2.5-VL with a fresh depth branch) and its processor,
on a device, in the dtype that device wants, with the checkpoint's prompt template and its pointer token in place.
Training, inference and the benchmarks all load through `load_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.depth_vlm import DepthVLM
from vlm_depth.model.pointer import add_pointer_token
from vlm_depth.model.processor import DepthProcessor


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> cuda if available else cpu; anything else as given (e.g. `cuda:1`)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}") from err


def default_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype on `device`: bf16 on a GPU (halves memory), fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def set_max_pixels(processor: DepthProcessor, max_pixels: int) -> None:
    """Set the image processor's pixel budget (28*28 per visual token); it is saved with the processor."""
    processor.image_processor.size["longest_edge"] = max_pixels


def load_model(
    path: str,
    *,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    branch: DepthBranchConfig | None = None,
    quantization: str | None = None,
    adapter_trainable: bool = False,
    max_pixels: int = 0,
    device_map: dict | str | None = None,
) -> tuple[DepthVLM, DepthProcessor]:
    """(DepthVLM in eval mode, DepthProcessor) of the checkpoint folder (or Hub id) `path`.

    device: where the model goes (`auto`, `cpu`, `cuda[:N]`), or None to leave it where loading put it (a trainer
    that places it itself, or `device_map`); dtype: default `default_dtype(device)`. branch: the depth-branch config
    of a fresh branch (a plain Qwen2.5-VL; a vlm-depth checkpoint keeps its own). quantization / adapter_trainable /
    device_map: see `DepthVLM.from_pretrained`. max_pixels: the processor's pixel budget (0 = the checkpoint's).
    """
    if not path:
        raise ConfigError("--model is required: a vlm-depth or Qwen2.5-VL checkpoint folder")
    local = Path(path)
    if (local.exists() or local.is_absolute() or path.startswith(".")) and not local.is_dir():
        raise ModelError(f"{path}: checkpoint folder not found")
    target = None if device is None else resolve_device(device)
    extra = {} if device_map is None else {"device_map": device_map}
    model = DepthVLM.from_pretrained(
        path,
        depth_cfg=branch,
        quantization=quantization,
        adapter_trainable=adapter_trainable,
        dtype=dtype or default_dtype(target or torch.device("cpu")),
        **extra,
    )
    if target is not None and device_map is None:
        model = model.to(target)
    processor = DepthProcessor.from_pretrained(path, template=model.depth_cfg.template)
    if max_pixels:
        set_max_pixels(processor, max_pixels)
    if model.depth_cfg.query_mode == "pointer":
        add_pointer_token(model, processor.tokenizer)
    return model.eval(), processor
