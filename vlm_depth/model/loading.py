"""The one model loader: a DepthVLM checkpoint (or a plain Qwen2.5-VL with a fresh depth branch) and its processor,
on a device, in the dtype that device wants, with the checkpoint's prompt template and its pointer token in place.
Training, inference and the benchmarks all load through `load_model`.
"""

from __future__ import annotations

import torch

from vlm_depth.errors import ConfigError, DeviceError
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.checkpoint import locate_checkpoint
from vlm_depth.model.depth_vlm import DepthVLM
from vlm_depth.model.pointer import add_pointer_token
from vlm_depth.model.processor import DepthProcessor
from vlm_depth.model.vision_attention import use_window_attention


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> cuda if available else cpu; anything else as given (e.g. `cuda:1`): ConfigError for a name that is
    no device, DeviceError for a CUDA/MPS device that this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu or cuda[:N]") from err
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            seen = f"{count} CUDA GPU(s) visible" if count else "no CUDA GPU is visible"
            raise DeviceError(f"--device {device}: {seen} on this machine; use --device cpu or auto")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {device}: MPS is not available on this machine; use --device cpu or auto")
    return resolved


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
    base_model: str | None = None,
) -> tuple[DepthVLM, DepthProcessor]:
    """(DepthVLM in eval mode, DepthProcessor) of the checkpoint folder (or Hub id) `path`.

    device: where the model goes (`auto`, `cpu`, `cuda[:N]`), or None to leave it where loading put it (a trainer
    that places it itself, or `device_map`); dtype: default `default_dtype(device)`. branch: the depth-branch config
    of a fresh branch (a plain Qwen2.5-VL; a vlm-depth checkpoint keeps its own). quantization / adapter_trainable /
    device_map / base_model: see `DepthVLM.from_pretrained` (base_model: the base of a LoRA checkpoint, see
    `vlm_depth.model.checkpoint`). max_pixels: the processor's pixel budget (0 = the checkpoint's).
    """
    locate_checkpoint(path)
    target = None if device is None else resolve_device(device)
    extra = {} if device_map is None else {"device_map": device_map}
    model = DepthVLM.from_pretrained(
        path,
        depth_cfg=branch,
        quantization=quantization,
        adapter_trainable=adapter_trainable,
        base_model=base_model,
        dtype=dtype or default_dtype(target or torch.device("cpu")),
        **extra,
    )
    if target is not None and device_map is None:
        model = model.to(target)
    use_window_attention(model)  # one attention call per vision block on CUDA; transformers' loop elsewhere
    processor = DepthProcessor.from_pretrained(path, template=model.depth_cfg.template)
    if max_pixels:
        set_max_pixels(processor, max_pixels)
    if model.depth_cfg.query_mode == "pointer":
        add_pointer_token(model, processor.tokenizer)
    return model.eval(), processor
