"""The checkpoint format of a DepthVLM: an ordinary Hugging Face folder, written and read here.

    config.json + model.safetensors          full fine-tune (the Qwen2.5-VL weights under their original names)
    adapter_config.json + adapter_model.safetensors + base_model.json     LoRA (the base is referenced, not copied)
    depth_branch.safetensors                 the depth branch, F_e2, pointer projection and heads
    vlm_depth_config.json                    `DepthBranchConfig`, everything needed to rebuild the branch

`DepthVLM.save_pretrained` / `from_pretrained` call `save_depth_vlm` / `load_depth_vlm`. Safetensors only; 4-bit
(NF4) loading goes through bitsandbytes (`quantization="nf4"`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.pointer import init_pointer_embedding

logger = logging.getLogger(__name__)

BRANCH_FILE = "depth_branch.safetensors"
BASE_REF_FILE = "base_model.json"
ADAPTER_CONFIG = "adapter_config.json"
# Weights bitsandbytes must leave in full precision: the vision tower (incl. patch embedding) and the output head.
NF4_SKIP_MODULES = ["model.visual", "lm_head"]


def load_exact_state(module: nn.Module, path: Path, expected: set[str], mismatch: str) -> None:
    """Load the safetensors file `path` into `module` (non-strict); its tensor names must be exactly `expected`,
    else ModelError naming the file, `mismatch` saying what it should have matched."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path.parent}: no {path.name}")
    state = load_file(str(path))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelError(f"{path}: {mismatch} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    module.load_state_dict(state, strict=False)


def save_depth_vlm(model, out: Path, save_base: Callable[..., None], **kwargs: Any) -> None:
    """Write the DepthVLM `model` into the folder `out`; `save_base` is Hugging Face's `save_pretrained` bound to
    it (the base weights or the LoRA adapter), `kwargs` go to it."""
    from safetensors.torch import save_file

    if model.depth_branch is None:
        raise ModelError("no depth branch to save; save a plain Qwen2.5-VL with Qwen2_5_VLForConditionalGeneration")
    out.mkdir(parents=True, exist_ok=True)
    if getattr(model, "_hf_peft_config_loaded", False):
        base = _resolved_reference(model.name_or_path)
        save_base(out, **kwargs)
        adapter = json.loads((out / ADAPTER_CONFIG).read_text())
        adapter["base_model_name_or_path"] = base  # the same base as base_model.json, for peft's own loaders
        (out / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2, sort_keys=True))
        reference = {"base_model": base, "pointer_token_id": model.pointer_token_id}
        (out / BASE_REF_FILE).write_text(json.dumps(reference, indent=2))
    else:
        if getattr(model, "hf_quantizer", None) is not None:
            raise ModelError(f"{out}: a quantized model is saved as a LoRA adapter only (apply_lora first)")
        save_base(out, state_dict=model.base_state_dict(), **kwargs)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.branch_state_dict().items()}, out / BRANCH_FILE)
    model.depth_cfg.save(out)


def load_depth_vlm(
    load: Callable[..., Any],
    path: str,
    *model_args: Any,
    depth_cfg: DepthBranchConfig | None = None,
    quantization: str | None = None,
    base_model: str | None = None,
    adapter_trainable: bool = False,
    **kwargs: Any,
):
    """A DepthVLM from the folder (or Hub id) `path` (see `DepthVLM.from_pretrained` for the arguments); `load` is
    Hugging Face's `from_pretrained` bound to DepthVLM."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ModelError(f"{path}: not a checkpoint folder")
    if not folder.exists() and (folder.is_absolute() or path.startswith(".") or len(folder.parts) > 2):
        raise ModelError(f"{path}: no such checkpoint folder")  # clearly a local path, not a Hub id
    saved_cfg = DepthBranchConfig.load(folder) if DepthBranchConfig.exists(folder) else None
    if saved_cfg is not None and depth_cfg is not None and depth_cfg != saved_cfg:
        raise ModelError(f"{path}: saved with a different depth branch config; do not pass depth_cfg")
    cfg = saved_cfg or depth_cfg or DepthBranchConfig()
    reference = json.loads((folder / BASE_REF_FILE).read_text()) if (folder / BASE_REF_FILE).is_file() else None
    if saved_cfg is None and (folder / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{path}: a LoRA adapter without vlm_depth_config.json is not a vlm-depth checkpoint")
    weights = (base_model or reference["base_model"]) if reference is not None else path
    if quantization is not None:
        kwargs.update(_nf4_kwargs(quantization, kwargs))
    model = _load_qwen(load, weights, path, *model_args, **kwargs)
    if quantization is not None:
        _disable_cpu_repacking(model)
    if cfg.query_mode == "pointer" and reference is not None and reference.get("pointer_token_id") is not None:
        init_pointer_embedding(model, reference["pointer_token_id"])
    model.attach_depth_branch(cfg)
    if reference is not None:
        model.load_adapter(path, is_trainable=adapter_trainable)
    if saved_cfg is not None:
        model.load_branch(folder)
    else:
        logger.info("%s: plain Qwen2.5-VL checkpoint, fresh depth branch (fusion %s)", path, cfg.fusion)
    return model


def _resolved_reference(name_or_path: str) -> str:
    """An absolute path for a local base checkpoint (so the adapter folder can move), the Hub id otherwise."""
    local = Path(name_or_path)
    return str(local.resolve()) if local.is_dir() else name_or_path


def _nf4_kwargs(quantization: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`from_pretrained` arguments for a bitsandbytes NF4 language model."""
    if quantization != "nf4":
        raise ConfigError(f"unknown quantization {quantization!r}; the supported value is 'nf4'")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ModelError(f'QLoRA (nf4) needs bitsandbytes: pip install "vlm-depth[qlora]" ({err})') from err
    from transformers import BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = kwargs.get("dtype") or (torch.bfloat16 if cuda else torch.float32)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=NF4_SKIP_MODULES,
    )
    return {"quantization_config": config, "device_map": kwargs.get("device_map") or ({"": 0} if cuda else "cpu")}


def _disable_cpu_repacking(model: nn.Module) -> None:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a 4-bit layer's weights, irreversibly, at its first no-grad
    eval forward into an inference-only layout (bf16 kernel without autograd, whose in-place bias add then fails
    under autograd): one evaluation would break later training and shift logits by ~5e-3. Keeping the ordinary
    layout makes forward and backward work in any order, with the same numbers in train and eval."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def cpu_repacked_4bit_layers(model: nn.Module) -> list[str]:
    """Names of 4-bit layers whose weights bitsandbytes has repacked for CPU inference (they cannot be trained)."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
    ]


def _load_qwen(load: Any, weights: str, path: str, *model_args: Any, **kwargs: Any):
    """`load(weights)` (Hugging Face `from_pretrained` bound to DepthVLM); a one-line ModelError naming the folder
    when it cannot be read."""
    try:
        model = load(weights, *model_args, **kwargs)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = path if weights == path else f"{path} (base model {weights})"
        raise ModelError(f"{where}: cannot load a Qwen2.5-VL checkpoint: {first_line}") from err
    if model.config.model_type != "qwen2_5_vl":
        raise ModelError(f"{weights}: model type {model.config.model_type!r} is not qwen2_5_vl")
    return model
