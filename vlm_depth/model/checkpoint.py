"""The checkpoint format of a DepthVLM: an ordinary Hugging Face folder, written and read here.

    config.json + model.safetensors          full fine-tune (the Qwen2.5-VL weights under their original names)
    adapter_config.json + adapter_model.safetensors + base_model.json     LoRA (the base is referenced, not copied)
    depth_branch.safetensors                 the depth branch, F_e2, pointer projection and heads
    vlm_depth_config.json                    `DepthBranchConfig`, everything needed to rebuild the branch

`DepthVLM.save_pretrained` / `from_pretrained` call `save_depth_vlm` / `load_depth_vlm`. Safetensors only; 4-bit
(NF4) loading goes through bitsandbytes (`quantization="nf4"`).

Where a checkpoint comes from (`locate_checkpoint`): a local folder, checked before anything is loaded (config,
weight-file headers; a training run or resumable checkpoint is named as such), or a Hub id of the form owner/name
whose first part is no local folder. Nothing else ever reaches the Hub: the package downloads only a Hub id the
user gave, and only when HF_HUB_OFFLINE is unset (otherwise the local cache). A LoRA checkpoint's `base_model.json`
is honoured for a Hub id or the run's own tiny base (RUN/tiny-base beside RUN/final); any other local base must be
passed by the user (`base_model=`, `--base_model`), so a checkpoint never points weight loading at a path itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.files import atomic_path, atomic_write
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.pointer import init_pointer_embedding

logger = logging.getLogger(__name__)

BRANCH_FILE = "depth_branch.safetensors"
BASE_REF_FILE = "base_model.json"
ADAPTER_CONFIG = "adapter_config.json"
TINY_BASE = "tiny-base"  # OUT/tiny-base: the base a `--model tiny` training run builds beside OUT/final
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Weights bitsandbytes must leave in full precision: the vision tower (incl. patch embedding) and the output head.
NF4_SKIP_MODULES = ["model.visual", "lm_head"]


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids Hub downloads."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true")


def is_hub_id(name: str) -> bool:
    """True for a name that can only mean a Hub repository: owner/name, no local folder of its first part."""
    return bool(_HUB_ID.match(name)) and not Path(name.split("/")[0]).exists()


def check_weight_files(folder: Path) -> None:
    """ModelError naming a damaged or truncated `*.safetensors` file of `folder` (headers are read, not weights)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelError(f"{path}: damaged or truncated weights ({err}); re-save or re-download it") from err


def locate_checkpoint(path: str) -> str:
    """`path` if it is a loadable checkpoint folder or a Hub id, else a ModelError that says what it is, before
    anything is loaded (transformers would otherwise build a default-size model for a folder without config.json,
    or try the Hub for a local name)."""
    if not path:
        raise ConfigError("--model is required: a vlm-depth or Qwen2.5-VL checkpoint folder")
    folder = Path(path)
    if folder.is_dir():
        if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
            check_weight_files(folder)
            return path
        if (folder / "trainer_state.json").is_file():
            raise ModelError(
                f"{path}: a resumable training checkpoint (for train --resume_from), not a model; load the run's "
                "final/ folder (OUT/final)"
            )
        if any((folder / name).exists() for name in ("final", "log.jsonl", "checkpoints")):
            raise ModelError(f"{path}: a training run folder, not a model; load {folder / 'final'}")
        raise ModelError(f"{path}: no config.json, not a checkpoint folder")
    if folder.exists():
        raise ModelError(f"{path}: checkpoint folder not found ({path} is a file)")
    if not is_hub_id(path):
        raise ModelError(f"{path}: checkpoint folder not found (and not a Hub id either: those look like owner/name)")
    return path


def read_exact_state(path: Path, expected: set[str], mismatch: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `path`, whose names must be exactly `expected`, else ModelError naming
    the file, `mismatch` saying what it should have matched."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path.parent}: no {path.name}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModelError(f"{path}: damaged or truncated weights ({err}); re-save or re-download it") from err
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelError(f"{path}: {mismatch} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return state


def load_exact_state(module: nn.Module, path: Path, expected: set[str], mismatch: str) -> None:
    """`read_exact_state` loaded into `module` (non-strict)."""
    module.load_state_dict(read_exact_state(path, expected, mismatch), strict=False)


def save_depth_vlm(
    model, out: Path, save_base: Callable[..., None], state: dict[str, torch.Tensor] | None = None, **kwargs: Any
) -> None:
    """Write the DepthVLM `model` into the folder `out`; `save_base` is Hugging Face's `save_pretrained` bound to
    it (the base weights or the LoRA adapter), `kwargs` go to it; `state`: the weights to write (a
    `state_dict()`), default the model's own."""
    from safetensors.torch import save_file

    if model.depth_branch is None:
        raise ModelError("no depth branch to save; save a plain Qwen2.5-VL with Qwen2_5_VLForConditionalGeneration")
    out.mkdir(parents=True, exist_ok=True)
    if getattr(model, "_hf_peft_config_loaded", False):
        base = _resolved_reference(model.name_or_path)
        save_base(out, **kwargs)
        adapter = json.loads((out / ADAPTER_CONFIG).read_text())
        adapter["base_model_name_or_path"] = base  # the same base as base_model.json, for peft's own loaders
        atomic_write(out / ADAPTER_CONFIG, json.dumps(adapter, indent=2, sort_keys=True))
        reference = {"base_model": base, "pointer_token_id": model.pointer_token_id}
        atomic_write(out / BASE_REF_FILE, json.dumps(reference, indent=2))
    else:
        if getattr(model, "hf_quantizer", None) is not None:
            raise ModelError(f"{out}: a quantized model is saved as a LoRA adapter only (apply_lora first)")
        save_base(out, state_dict=model.base_state_dict(state), **kwargs)
    with atomic_path(out / BRANCH_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.branch_state_dict(state).items()}, str(tmp))
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
    path = locate_checkpoint(path)
    folder = Path(path)
    saved_cfg = DepthBranchConfig.load(folder) if DepthBranchConfig.exists(folder) else None
    if saved_cfg is not None and depth_cfg is not None and depth_cfg != saved_cfg:
        raise ModelError(f"{path}: saved with a different depth branch config; do not pass depth_cfg")
    cfg = saved_cfg or depth_cfg or DepthBranchConfig()
    reference = _base_reference(folder) if (folder / BASE_REF_FILE).is_file() else None
    if saved_cfg is None and (folder / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{path}: a LoRA adapter without vlm_depth_config.json is not a vlm-depth checkpoint")
    weights = _base_weights(folder, reference["base_model"], base_model) if reference is not None else path
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


def _base_reference(folder: Path) -> dict[str, Any]:
    """The contents of `folder`/base_model.json ({"base_model": Hub id or path, "pointer_token_id": int | None})."""
    path = folder / BASE_REF_FILE
    try:
        reference = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err}); re-save the checkpoint") from err
    if not isinstance(reference, dict) or not isinstance(reference.get("base_model"), str):
        raise ModelError(f'{path}: expected {{"base_model": NAME, "pointer_token_id": ID}}, got {reference!r:.60}')
    return reference


def _base_weights(folder: Path, named: str, passed: str | None) -> str:
    """Where the base weights of the LoRA checkpoint `folder` come from (see the module docstring): the base the
    user `passed`, the run's own tiny base, or the Hub id that base_model.json `named`."""
    if passed:
        return locate_checkpoint(passed)
    own = folder.resolve().parent / TINY_BASE
    if Path(named).name == TINY_BASE and (own / "config.json").is_file():
        return str(own)
    if is_hub_id(named):
        return named
    raise ModelError(
        f"{folder / BASE_REF_FILE} names the local base model {named}; a checkpoint never points weight loading at "
        f"a path itself: pass it with --base_model {named} (base_model= in Python)"
    )


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
        where = path if weights == path else f"{path} (base model {weights} of its {BASE_REF_FILE})"
        if is_hub_id(weights) and hub_offline():
            raise ModelError(
                f"{where}: {weights} is not a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is "
                "set: download it first, unset HF_HUB_OFFLINE, or give a local folder (--base_model for a base)"
            ) from err
        raise ModelError(f"{where}: cannot load a Qwen2.5-VL checkpoint: {first_line}") from err
    if model.config.model_type != "qwen2_5_vl":
        raise ModelError(f"{weights}: model type {model.config.model_type!r} is not qwen2_5_vl")
    return model
