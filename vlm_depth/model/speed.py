"""Speed and memory options of a loaded model for training: gradient checkpointing, the packed attention kernel, and
regional compilation of the decoder layers.

Regional compilation compiles each language-model decoder layer rather than the whole model: the layers share one
graph (compiled once: about a minute for the tiny model on our CPU; not yet measured on a GPU), which fuses the
small elementwise kernels that make a step launch-bound (RMSNorm upcasts, rotary, SiLU x up, LoRA dropout / scale /
add); everything else stays eager, so new shapes cost no whole-model recompilation (`dynamic=True`: lengths change
every step).
"""

from __future__ import annotations

import torch

from vlm_depth.errors import ConfigError


def compile_decoder_layers(model) -> None:
    """torch.compile every decoder layer of the language model of `model` (a Qwen2.5-VL) in place."""
    for layer in model.model.language_model.layers:
        layer.compile(dynamic=True)


def speed_options(
    model, *, gradient_checkpointing: bool = False, packed_attention: str = "sdpa", compile: bool = False
) -> None:
    """Apply the training speed / memory options to `model`: non-reentrant gradient checkpointing of every decoder
    layer and vision block (transformers' own), regional compilation; ConfigError for flex attention without a
    CUDA GPU (torch has no flex backward on CPU)."""
    if packed_attention not in ("sdpa", "flex"):
        raise ConfigError(f"packed_attention must be sdpa or flex, got {packed_attention!r}")
    if packed_attention == "flex" and not torch.cuda.is_available():
        raise ConfigError("packed_attention flex needs a CUDA GPU (torch has no flex backward on CPU); use sdpa")
    if gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if compile:
        compile_decoder_layers(model)
