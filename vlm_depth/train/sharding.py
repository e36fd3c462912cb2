"""Sharded data parallelism for `sharding: fsdp`: PyTorch FSDP2 (`fully_shard`) over the training processes.

Every vision block and every decoder layer is its own FSDP unit, then the rest of the `PackedModel` (embeddings, LM
head, depth branch, merger) is the root unit: weights, gradients and AdamW states are split across the processes and
weights gathered one unit at a time (the packed forward calls each layer once), which is what a full fine-tune of
the 3B/7B models needs (the AdamW states and gradients, 3x the weights in fp32, are what no longer fit one GPU).
accelerate still launches the processes (`accelerate launch --config_file launch/fsdp.yaml`), chooses the device and
runs autocast; the sharding is applied here rather than by accelerate's FSDP plugin, which does not run on the CPU
(gloo), where the tests check it against one process.

Checkpoints stay those of an unsharded run: the trainable weights are gathered into the one safetensors file
(`gather_state`) and scattered back on resume (`scatter_state`), and the AdamW state is gathered into a safetensors
file of its own (`save_optimizer_state` / `load_optimizer_state`; accelerate would pickle it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def shard(packed: torch.nn.Module, model: torch.nn.Module, bf16: bool) -> None:
    """FSDP2 in place: each vision block and each decoder layer of the DepthVLM `model`, then `packed` (its
    `PackedModel`, the module whose forward training calls) as the root (embeddings, head, depth branch, merger).
    bf16: compute in bf16, reduce gradients in fp32 (GPU recipes); else everything in the parameters' dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {} if policy is None else {"mp_policy": policy}
    for layer in [*model.model.visual.blocks, *model.model.language_model.layers]:
        fully_shard(layer, **kwargs)
    fully_shard(packed, **kwargs)


@contextmanager
def unsharded_root(packed: torch.nn.Module) -> Iterator[None]:
    """The root unit's own weights (embeddings, head, depth branch, ...) gathered for calls that do not go through
    `packed`'s forward (validation, generation); the decoder layers and vision blocks gather theirs as they run."""
    packed.unshard()
    try:
        yield
    finally:
        packed.reshard()


def full(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process calls it in the same order); other tensors as
    they are."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def gather_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every sharded tensor gathered (collective), on the CPU."""
    return {name: full(value).detach().cpu().contiguous() for name, value in state.items()}


def scatter_state(state: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors `state` laid out as the tensors of the same names in `like` (sharded ones are split over the
    processes like them)."""
    out = {}
    for name, value in state.items():
        target = like[name]
        if isinstance(target, DTensor):
            value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)
        out[name] = value
    return out


def save_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path, main: bool) -> None:
    """Gather the AdamW state of the sharded `root` (a collective) and write it whole to the safetensors file `path`
    on the main process: tensors as `state/<parameter>/<key>`, the parameter groups as JSON metadata."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True))
    if main:
        tensors = gather_state(
            {f"state/{name}/{key}": value for name, entry in state["state"].items() for key, value in entry.items()}
        )
        save_file(tensors, str(path), metadata={"param_groups": json.dumps(state["param_groups"])})


def load_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Read a state written by `save_optimizer_state` (every process reads the whole file) and give each process
    its shards."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        entries: dict[str, dict[str, torch.Tensor]] = {}
        for key in f.keys():
            _, name, field = key.split("/")
            entries.setdefault(name, {})[field] = f.get_tensor(key)
    state = {"state": entries, "param_groups": groups}
    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))
