"""Resuming training: the run folder's log, resumable checkpoints (atomic) of the training state, and the final
DepthVLM checkpoint.

A resumable checkpoint is `OUT/checkpoints/step-NNNNNNN/`, written by `accelerator.save_state` into a temporary
folder that is renamed only once every process has finished writing, so a crash never leaves a half-written
checkpoint under a valid name (pruned ones are renamed away before they are deleted). It holds:
- `training_weights.safetensors`: the trainable parameters and all buffers (e.g. BatchNorm statistics) of the
  DepthVLM, not the frozen base (which the run reloads from `model`);
- accelerate's optimizer, scheduler and per-process RNG states (torch-serialised tensors and numbers, read back with
  `torch.load(weights_only=True)`, which refuses arbitrary objects);
- `trainer_state.json`: the step. The data order is a pure function of (seed, step) (`vlm_depth.train.stream`), so
  the step is the dataloader position.

A run folder holds one timeline: a fresh run refuses a folder that holds a run (`vlm_depth.train.trainer`), and
resuming from step S removes what the folder holds beyond S (later checkpoints and final/ of an abandoned
continuation, with a warning; log rows after S), so the newest checkpoints by step are the newest written and
pruning keeps them. A damaged checkpoint is refused with a CheckpointError naming the previous good one; a torn
last log line is dropped with a warning; an unreadable RNG state is a warning (the run then is not bit-identical).

The final folder `OUT/final/` is a DepthVLM checkpoint (`DepthVLM.from_pretrained`) plus the processor.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from vlm_depth.errors import CheckpointError, ConfigError, ModelError, VlmDepthError
from vlm_depth.files import (
    append_line,
    atomic_dir,
    atomic_write,
    fault_point,
    read_jsonl,
    remove_dir,
    replace_dir,
)
from vlm_depth.train.sharding import gather_state, load_optimizer_state, save_optimizer_state, scatter_state

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "training_weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"  # `sharding: fsdp`: the gathered AdamW state
STATE_FILE = "trainer_state.json"
LOG_FILE = "log.jsonl"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoint folders of a run (`step-N`, damaged ones included), oldest first; temporary folders of an
    interrupted save are ignored."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _folder_step(folder: Path) -> int:
    return int(_STEP_DIR.match(folder.name).group(1))


def resolve_resume(out: str | Path, resume_from: str) -> Path | None:
    """The checkpoint folder to resume from: `latest` (newest in OUT/checkpoints, None if there is none yet, so a
    preemptible job can always pass it), a folder path, or "" (None, a fresh run)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(out)
        return found[-1] if found else None
    folder = Path(resume_from)
    if not folder.is_dir() or not (_STEP_DIR.match(folder.name) or (folder / STATE_FILE).is_file()):
        raise ConfigError(f"resume_from: {folder} is not a training checkpoint (no {STATE_FILE})")
    return folder


def resumes_in(out: str | Path, resume_from: str) -> bool:
    """True when `resume_from` continues the run of the folder `out` (rather than starting one from elsewhere)."""
    if resume_from == "latest":
        return True
    return bool(resume_from) and Path(resume_from).resolve().parent == (Path(out) / CHECKPOINTS).resolve()


def _problem(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from, judged by its small files and weight headers; None if
    it looks whole."""
    from vlm_depth.model.checkpoint import check_weight_files

    try:
        step = json.loads((folder / STATE_FILE).read_text())["step"]
    except FileNotFoundError:
        return f"incomplete: no {STATE_FILE}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{STATE_FILE} unreadable ({err})"
    if not isinstance(step, int) or step != _folder_step(folder):
        return f"{STATE_FILE} says step {step!r}"
    if not (folder / WEIGHTS_FILE).is_file():
        return f"incomplete: no {WEIGHTS_FILE}"
    try:
        check_weight_files(folder)
    except ModelError as err:
        return str(err)
    return None


def _damaged(folder: Path, reason: str) -> CheckpointError:
    """The error for a damaged checkpoint, naming the newest earlier one that looks whole."""
    earlier = [p for p in list_checkpoints(folder.parent.parent) if _folder_step(p) < _folder_step(folder)]
    good = next((p for p in reversed(earlier) if _problem(p) is None), None)
    advice = (
        f"the previous good one is {good.name}: resume with --resume_from {good}"
        if good
        else ("there is no earlier one: start over with --overwrite")
    )
    return CheckpointError(f"checkpoint {folder.name} is damaged ({reason}); {advice}")


def checkpoint_step(folder: Path) -> int:
    """The step of the resumable checkpoint `folder`; CheckpointError when it is damaged or incomplete."""
    if _STEP_DIR.match(folder.name):
        problem = _problem(folder)
        if problem is not None:
            raise _damaged(folder, problem)
    return int(json.loads((folder / STATE_FILE).read_text())["step"])


def trainable_names(model: torch.nn.Module) -> set[str]:
    """Names in `model.state_dict()` of the trainable parameters and the (persistent) buffers: what a checkpoint
    keeps."""
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return keep & set(model.state_dict())


def training_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers of `model`, whole and on the CPU (under `sharding: fsdp` a collective:
    every process calls it)."""
    keep = trainable_names(model)
    return gather_state({k: v for k, v in model.state_dict().items() if k in keep})


def load_training_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Load `training_weights.safetensors` into `model`; every trainable tensor must be there (and nothing else);
    sharded parameters receive their shards."""
    from vlm_depth.model.checkpoint import read_exact_state

    state = read_exact_state(
        Path(folder) / WEIGHTS_FILE,
        trainable_names(model),
        "does not match this run's trainable weights; resume with the same model and finetune settings",
    )
    model.load_state_dict(scatter_state(state, model.state_dict()), strict=False)


def register_weight_hooks(
    accelerator, model: torch.nn.Module, sharded: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None
) -> None:
    """Make `accelerator.save_state/load_state` store only `model`'s trainable weights and buffers (safetensors),
    and with `sharded` = (FSDP root, optimizer) the optimizer state too, gathered (accelerate does not hold that
    optimizer)."""
    from safetensors.torch import save_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        weights.clear()
        state = training_state_dict(model)  # every process: gathering shards is a collective
        if accelerator.is_main_process:
            save_file(state, str(Path(output_dir) / WEIGHTS_FILE))
        if sharded is not None:
            save_optimizer_state(*sharded, Path(output_dir) / OPTIMIZER_FILE, accelerator.is_main_process)

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()
        load_training_weights(model, input_dir)
        if sharded is not None:
            load_optimizer_state(*sharded, Path(input_dir) / OPTIMIZER_FILE)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, out: str | Path, step: int, keep: int) -> Path:
    """Atomically write the resumable checkpoint of `step` (all processes call this) and prune to the newest `keep`
    (the newest by step are the newest written: a run folder holds one timeline, see the module docstring)."""
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
        fault_point(f"checkpoint@{step}")
        replace_dir(tmp, final)
        fault_point(f"prune@{step}")
        for old in list_checkpoints(out)[:-keep]:
            remove_dir(old)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def restore_checkpoint(accelerator, folder: Path) -> int:
    """Restore weights, optimiser, scheduler and RNG states from `folder`; returns the step to continue after.
    CheckpointError (naming the previous good checkpoint) when it is damaged; a warning when its RNG state is
    unreadable (the run goes on, no longer bit-identical to an uninterrupted one)."""
    from accelerate.utils import load

    step = checkpoint_step(folder)
    rng_file = folder / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        raise ConfigError(
            f"{folder}: no RNG state for process {accelerator.process_index}; resume with the same number of processes"
        )
    try:
        states = load(rng_file)
        if not {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(states):
            raise KeyError("random states missing")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        logger.warning(
            "%s unreadable (%s): the RNG (dropout) continues from this process's state, so the resumed run is not "
            "bit-identical to an uninterrupted one",
            rng_file,
            type(err).__name__,
        )
    try:
        accelerator.load_state(str(folder))
    except VlmDepthError:  # e.g. weights of another finetune mode: not damage
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise _damaged(folder, f"{type(err).__name__}: {first_line}") from err
    return step


def prepare_log(out: str | Path, step: int, resumed: Path | None, resume_from: str) -> None:
    """Make the run folder `out` a run that ends at `step` (main process): log rows after it are dropped (a torn
    last line with a warning) and what an abandoned continuation left beyond it (later checkpoints, final/) is
    removed with a warning."""
    out = Path(out)
    rows = read_jsonl(out / LOG_FILE)
    if resumed is None and resume_from and rows:
        logger.warning(
            "%s: no checkpoint yet: starting from step 0 (the %d log rows of the interrupted start are dropped)",
            out,
            len(rows),
        )
    later = [p for p in list_checkpoints(out) if _folder_step(p) > step]
    final = out / "final"
    stale = later + ([final] if final.is_dir() and (later or any(r.get("step", 0) > step for r in rows)) else [])
    if stale:
        logger.warning(
            "resuming from step %d abandons what this folder holds beyond it: removing %s",
            step,
            ", ".join(p.name for p in stale),
        )
        for folder in stale:
            remove_dir(folder)
    if (out / LOG_FILE).exists():
        atomic_write(out / LOG_FILE, "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= step))


def append_log(out: str | Path, row: dict[str, Any], fault: str = "") -> None:
    """Append one row to OUT/log.jsonl (one write, fsynced); `fault`: see `vlm_depth.files.append_line`."""
    append_line(Path(out) / LOG_FILE, json.dumps(row), fault=fault)


def save_final(model, processor, out: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `OUT/final`: the DepthVLM checkpoint (base or LoRA adapter + branch + config) and the processor;
    `state`: the weights to write (gathered from a sharded model), default the model's own."""
    final = Path(out) / "final"
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
        fault_point("final")
    return final
