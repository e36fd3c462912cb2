"""Resuming training: resumable checkpoints (atomic) of the training state, and the final DepthVLM checkpoint.

A resumable checkpoint is `OUT/checkpoints/step-NNNNNNN/`, written by `accelerator.save_state` into a temporary
folder that is renamed only once every process has finished writing, so a crash never leaves a half-written
checkpoint under a valid name. It holds:
- `training_weights.safetensors`: the trainable parameters and all buffers (e.g. BatchNorm statistics) of the
  DepthVLM, not the frozen base (which the run reloads from `model`);
- accelerate's optimizer, scheduler and per-process RNG states (torch-serialised tensors and numbers, read back with
  `torch.load(weights_only=True)`, which refuses arbitrary objects);
- `trainer_state.json`: the step. The data order is a pure function of (seed, step) (`vlm_depth.train.data`), so the
  step is the dataloader position.

The final folder `OUT/final/` is a DepthVLM checkpoint (`DepthVLM.from_pretrained`) plus the processor.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from vlm_depth.errors import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "training_weights.safetensors"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted save are ignored)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(out: str | Path, resume_from: str) -> Path | None:
    """The checkpoint folder to resume from: `latest` (newest in OUT/checkpoints, None if there is none yet, so a
    preemptible job can always pass it), a folder path, or "" (None, a fresh run)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(out)
        return found[-1] if found else None
    folder = Path(resume_from)
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(f"resume_from: {folder} is not a training checkpoint (no {STATE_FILE})")
    return folder


def training_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers of `model` (names as in its `state_dict`), on the CPU."""
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in keep}


def load_training_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Load `training_weights.safetensors` into `model`; every trainable tensor must be there (and nothing else)."""
    from vlm_depth.model.checkpoint import load_exact_state

    load_exact_state(
        model,
        Path(folder) / WEIGHTS_FILE,
        set(training_state_dict(model)),
        "does not match this run's trainable weights; resume with the same model and finetune settings",
    )


def register_weight_hooks(accelerator, model: torch.nn.Module) -> None:
    """Make `accelerator.save_state/load_state` store only `model`'s trainable weights and buffers (safetensors)."""
    from safetensors.torch import save_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        weights.clear()
        if accelerator.is_main_process:
            save_file(training_state_dict(model), str(Path(output_dir) / WEIGHTS_FILE))

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()
        load_training_weights(model, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, out: str | Path, step: int, keep: int) -> Path:
    """Atomically write the resumable checkpoint of `step` (all processes call this) and prune to the newest `keep`."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, final)
        for old in list_checkpoints(out)[: -max(keep, 1)]:
            shutil.rmtree(old)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def restore_checkpoint(accelerator, folder: Path) -> int:
    """Restore weights, optimiser, scheduler and RNG states from `folder`; returns the step to continue after."""
    state: dict[str, Any] = json.loads((folder / STATE_FILE).read_text())
    rng_file = folder / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        raise ConfigError(
            f"{folder}: no RNG state for process {accelerator.process_index}; resume with the same number of processes"
        )
    accelerator.load_state(str(folder))
    return int(state["step"])


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing an older `final` (renames only, no partial copies)."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_final(model, processor, out: str | Path) -> Path:
    """Write `OUT/final`: the DepthVLM checkpoint (base or LoRA adapter + branch + config) and the processor."""
    final = Path(out) / "final"
    tmp = final.with_name(".tmp-final")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    replace_dir(tmp, final)
    return final
