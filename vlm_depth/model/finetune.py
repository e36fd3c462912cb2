"""Which weights of a DepthVLM train: LoRA (peft, through transformers' `add_adapter`, so the model stays a DepthVLM
with all its methods), full fine-tuning, and the parameter groups a trainer gives separate learning rates.

PEFT freezes everything but the adapters; the depth branch (fusion, F_e2, pointer projection, heads) is switched back
to trainable right after injection. LoRA cannot target the Conv3d patch embedding; F_e2 is trained in full instead.
4-bit (NF4) loading is `DepthVLM.from_pretrained(..., quantization="nf4")`; LoRA then trains on top of it (QLoRA).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.model.checkpoint import cpu_repacked_4bit_layers
from vlm_depth.model.depth_vlm import DepthVLM, is_branch_key

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Linear layers of a Qwen2.5-VL vision block (attention and gated MLP).
VISION_TARGETS = ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def lora_target_pattern(target_modules: Sequence[str] = LLM_TARGETS, vision: bool = False) -> str:
    """Regex (peft full-matches it against module names) for `target_modules` in the language model's decoder
    layers, plus the vision blocks' linear layers when `vision`. The vision MLP shares names with the LLM's, hence
    the explicit prefixes."""
    if not target_modules:
        raise ModelError("LoRA needs at least one target module")
    names = "|".join(map(re.escape, target_modules))
    patterns = [rf"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"]
    if vision:
        patterns.append(rf"model\.visual\.blocks\.\d+\.(?:{'|'.join(map(re.escape, VISION_TARGETS))})")
    return "|".join(f"(?:{p})" for p in patterns)


def apply_lora(
    model: DepthVLM,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] = LLM_TARGETS,
    vision: bool = False,
) -> DepthVLM:
    """Inject a LoRA adapter (named `default`) into `model` in place and return it: base weights frozen, LoRA and
    depth branch trainable. `target_modules`: projection names in the language model; `vision`: also the vision
    blocks."""
    from peft import LoraConfig

    if model.depth_branch is None:
        raise ModelError("attach the depth branch before LoRA (DepthVLM.from_pretrained does)")
    if getattr(model, "_hf_peft_config_loaded", False):
        raise ModelError("the model already has a LoRA adapter")
    repacked = cpu_repacked_4bit_layers(model)
    if repacked:
        raise ModelError(
            f"bitsandbytes repacked {len(repacked)} 4-bit layers (e.g. {repacked[0]}) for CPU inference, which has "
            "no backward; load with DepthVLM.from_pretrained(..., quantization='nf4') to train on CPU"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_pattern(target_modules, vision),
        bias="none",
        task_type="CAUSAL_LM",  # peft's PeftModel.from_pretrained then builds a PeftModelForCausalLM
    )
    model.add_adapter(config)
    for name, param in model.named_parameters():
        if is_branch_key(name):
            param.requires_grad_(True)
    return model


def set_trainable(
    model: DepthVLM,
    finetune: str,
    *,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_targets: Sequence[str] = LLM_TARGETS,
    train_vision: bool = False,
) -> None:
    """Switch on the weights that `finetune` trains, in place. `lora` / `qlora`: LoRA adapters on `lora_targets`
    (unless the checkpoint already holds an adapter, which then continues); `full`: every language-model weight.
    `train_vision` adds the vision tower and merger (adapters or full weights). The depth branch always trains."""
    has_adapter = getattr(model, "_hf_peft_config_loaded", False)
    if finetune == "full":
        if has_adapter:
            raise ConfigError("the checkpoint holds a LoRA adapter; continue it with finetune lora, or merge it first")
        model.requires_grad_(True)
        if not train_vision:
            for name, param in model.model.visual.named_parameters(prefix="model.visual"):
                param.requires_grad_(name.startswith("model.visual.patch_embed.depth_proj"))
    elif not has_adapter:
        apply_lora(model, lora_r, lora_alpha, lora_dropout, lora_targets, vision=train_vision)


def trainable_parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters split into `branch` (depth branch, F_e2, pointer projection, heads) and `backbone`
    (LoRA weights, or the language model and vision tower in a full fine-tune), for separate learning rates."""
    groups: dict[str, list[nn.Parameter]] = {"branch": [], "backbone": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["branch" if is_branch_key(name) else "backbone"].append(param)
    return groups


def load_trainable(
    path: str,
    finetune: str = "lora",
    *,
    branch=None,
    max_pixels: int = 0,
    process_index: int = 0,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_targets: Sequence[str] = LLM_TARGETS,
    train_vision: bool = False,
):
    """(model, processor) of the checkpoint `path` for training `finetune` (see `set_trainable`), through the one
    loader, left on the CPU (or on GPU `process_index` for qlora, placed by bitsandbytes) for the trainer to place:
    frozen weights in bf16 when a GPU is there (halves memory; fp32 otherwise and for `full`), NF4 for qlora, the
    trainable weights in fp32. branch: the depth-branch config of a fresh branch; max_pixels: processor budget."""
    import torch

    from vlm_depth.model.loading import load_model

    cuda = torch.cuda.is_available()
    model, processor = load_model(
        path,
        device=None,
        dtype=torch.bfloat16 if cuda and finetune != "full" else torch.float32,
        branch=branch,
        quantization="nf4" if finetune == "qlora" else None,
        adapter_trainable=True,
        max_pixels=max_pixels,
        device_map={"": process_index} if finetune == "qlora" and cuda else None,
    )
    set_trainable(
        model,
        finetune,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_targets=lora_targets,
        train_vision=train_vision,
    )
    trainable_to_fp32(model)
    return model, processor


def trainable_to_fp32(model: nn.Module) -> None:
    """Keep every trainable weight in fp32 (optimiser updates in full precision over bf16 frozen weights)."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
