"""Everything a training run holds (`Run`) and how it is set up from a `TrainConfig`: accelerator, seeds, model with
its trainable weights, data stream, validation batches, optimiser and learning-rate schedule, and a restored
checkpoint when resuming."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vlm_depth.config import save_config
from vlm_depth.errors import ConfigError
from vlm_depth.train.collator import Batch, ExampleBuilder, QuerySpec, collate_packed
from vlm_depth.train.mdm import mdm_spec, prepare_mdm_model
from vlm_depth.train.resume import (
    checkpoint_step,
    prepare_log,
    register_weight_hooks,
    resolve_resume,
    restore_checkpoint,
)
from vlm_depth.train.sharding import shard
from vlm_depth.train.step import PackedModel
from vlm_depth.train.stream import PackedQueryStream
from vlm_depth.train.train_config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vlm_depth.model.depth_vlm import DepthVLM
    from vlm_depth.model.processor import DepthProcessor
    from vlm_depth.prompts.chat import ChatLayout

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training run holds between the small functions of `vlm_depth.train`."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: DepthVLM  # unwrapped
    processor: DepthProcessor
    layout: ChatLayout
    packed: torch.nn.Module  # `PackedModel` as prepared by accelerate (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: PackedQueryStream
    val_batches: list[Batch]
    digit_ids: torch.Tensor  # (10,) token ids of the digits 0-9
    max_steps: int
    start_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        """The step this invocation ends after: `max_steps`, or `stop_at_step` when it is set."""
        return min(self.max_steps, self.cfg.stop_at_step) if self.cfg.stop_at_step else self.max_steps


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    import accelerate.utils
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    trackers = None if cfg.report_to == "none" else cfg.report_to
    available = {
        "tensorboard": accelerate.utils.is_tensorboard_available,
        "wandb": accelerate.utils.is_wandb_available,
    }
    if trackers and not available[trackers]():
        raise ConfigError(f"report_to {trackers}: the `{trackers}` package is not installed (pip install {trackers})")
    accelerator = Accelerator(
        # Without CUDA this is a CPU run; under torchrun / `accelerate launch --multi_gpu` it is then DDP over gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=cfg.out, logging_dir=str(Path(cfg.out) / "trackers")),
        # The scheduler is stepped once per optimiser step whatever the number of processes (see module docstring).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    engine = accelerator.distributed_type.value
    if engine == "FSDP":
        raise ConfigError(
            "accelerate's FSDP plugin is on: vlm-depth shards the model itself. Launch with "
            "launch/fsdp.yaml (or --multi_gpu) and give --sharding fsdp"
        )
    if cfg.sharding == "fsdp" and engine == "DEEPSPEED":
        raise ConfigError("--sharding fsdp and a DeepSpeed launch both shard the model: use one of them")
    return accelerator


def base_checkpoint(cfg: TrainConfig, accelerator: Accelerator | None = None) -> str:
    """`cfg.model`, or for `tiny` the offline tiny checkpoint built once into OUT/tiny-base (by the main process)."""
    if cfg.model != "tiny":
        return cfg.model
    from vlm_depth.model.tiny import TINY_SETTINGS, build_tiny_checkpoint

    folder = Path(cfg.out) / "tiny-base"
    main = accelerator is None or accelerator.is_main_process
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        if main and not (folder / TINY_SETTINGS).is_file():
            if folder.exists():  # only a build of an older version can be interrupted in place
                logger.warning("%s is incomplete (an interrupted build): rebuilding it", folder)
            build_tiny_checkpoint(folder, seed=cfg.seed)
    return str(folder)


def load_for_training(cfg: TrainConfig, accelerator: Accelerator | None = None) -> tuple[DepthVLM, DepthProcessor]:
    """The model and processor of `cfg.model` (`vlm_depth.model.finetune.load_trainable`) with the weights of
    `cfg.finetune` (and the MDM head of `cfg.mdm_mode`) switched to trainable in fp32, and the speed options."""
    from vlm_depth.model.branch_config import DepthBranchConfig
    from vlm_depth.model.finetune import load_trainable, trainable_to_fp32
    from vlm_depth.model.speed import speed_options

    path = base_checkpoint(cfg, accelerator)
    fresh = not DepthBranchConfig.exists(path)
    if not fresh and DepthBranchConfig.load(path) != cfg.branch_config():
        logger.warning("%s has its own depth-branch config; the recipe's branch keys are ignored", path)
    model, processor = load_trainable(
        path,
        cfg.finetune,
        branch=cfg.branch_config() if fresh else None,
        max_pixels=cfg.max_pixels,
        process_index=accelerator.local_process_index if accelerator is not None else 0,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        lora_targets=[t.strip() for t in cfg.lora_targets.split(",") if t.strip()],
        train_vision=cfg.train_vision,
    )
    prepare_mdm_model(model, cfg)
    trainable_to_fp32(model)  # a fresh MDM head
    speed_options(
        model,
        gradient_checkpointing=cfg.gradient_checkpointing,
        packed_attention=cfg.packed_attention,
        compile=cfg.compile,
    )
    return model, processor


def lr_factor(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """LR multiplier after `step` optimiser steps: linear warm-up to 1, then cosine to 0 / step decay / constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    done = step - cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(done / max(max_steps - cfg.warmup_steps, 1), 1.0)))
    if cfg.lr_schedule == "step":
        return cfg.step_gamma ** (done // max(cfg.step_every, 1))
    return 1.0


def make_optimizer(cfg: TrainConfig, model: DepthVLM, max_steps: int):
    """AdamW with one parameter group per learning rate (`branch`, `backbone`, and `mdm_head` when `lr_mdm_head`
    is set) and its LambdaLR schedule."""
    from vlm_depth.model.finetune import trainable_parameter_groups

    groups = trainable_parameter_groups(model)
    lrs = {"branch": cfg.lr_branch, "backbone": cfg.lr_backbone}
    if cfg.lr_mdm_head and model.depth_cfg.mdm_head:
        head = {id(p) for p in model.mdm_head.parameters()}
        groups["mdm_head"] = [p for p in groups["branch"] if id(p) in head]
        groups["branch"] = [p for p in groups["branch"] if id(p) not in head]
        lrs["mdm_head"] = cfg.lr_mdm_head
    params = [{"params": p, "lr": lrs[name], "name": name} for name, p in groups.items() if p]
    if not params:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    # One fused kernel for all parameters on CUDA; the CPU keeps the default (for-each) update.
    optimizer = torch.optim.AdamW(params, weight_decay=cfg.weight_decay, fused=torch.cuda.is_available())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg, max_steps=max_steps))
    return optimizer, scheduler


def check_datasets(cfg: TrainConfig) -> None:
    """ConfigError for a malformed reader spec of `dataset` or `val_dataset`, before anything is written."""
    from vlm_depth.data import parse_spec

    for spec in f"{cfg.dataset},{cfg.val_dataset}".split(","):
        if spec.strip():
            parse_spec(spec.strip())


def open_images(spec: str, split: str, limit: int, seed: int):
    """Images of the comma-separated reader specs `spec` (e.g. `synthetic:64?height=96&width=128,folder:more`),
    concatenated;
    a random subset of `limit` of them fixed by `seed` (0 = all)."""
    from vlm_depth.data import load
    from vlm_depth.data.dataset import split_specs

    parts = [load(s, split=split or None) for s in split_specs(spec)]
    if not parts:
        raise ConfigError(f"no dataset in {spec!r}")
    images = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    if limit and limit < len(images):
        chosen = np.sort(np.random.default_rng([seed, 7]).choice(len(images), limit, replace=False))
        images = torch.utils.data.Subset(images, chosen.tolist())
    return images


def query_spec(cfg: TrainConfig) -> QuerySpec:
    """How the training queries of an image are chosen and its sparse input made."""
    return QuerySpec(
        label_source=cfg.label_source,
        queries_per_image=cfg.queries_per_image,
        keep_ratio=cfg.keep_ratio,
        holdout_ratio=cfg.holdout_ratio,
        sampling=cfg.sampling,
        protocol=cfg.protocol,
        mdm=mdm_spec(cfg),
    )


def build_val_batches(cfg: TrainConfig, processor: DepthProcessor, layout: ChatLayout) -> list[Batch]:
    """One packed batch per held-out image (fill queries only), built once with a fixed seed."""
    from vlm_depth.data.sparsify import image_seed

    if not cfg.val_dataset:
        return []
    images = open_images(cfg.val_dataset, cfg.val_split, cfg.num_val_images, cfg.seed)
    spec = QuerySpec(
        label_source=cfg.val_label_source,
        queries_per_image=cfg.val_queries_per_image,
        keep_ratio=0.0,
        holdout_ratio=cfg.holdout_ratio,
        sampling="uniform",
        protocol=cfg.protocol,
        mdm=mdm_spec(cfg),
    )
    builder = ExampleBuilder(processor, layout, spec)
    pad = processor.tokenizer.pad_token_id
    return [
        collate_packed([builder(images[i], np.random.default_rng([cfg.seed, i, 3]), image_seed(cfg.seed, i, 3))], pad)
        for i in range(len(images))
    ]


def resolve_max_steps(cfg: TrainConfig, num_images: int, num_processes: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.batch_size * num_processes * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * num_images / per_step))


def setup(cfg: TrainConfig) -> Run:
    """Accelerator, seeds, model, data, optimiser and schedule; restores a checkpoint when resuming."""
    from accelerate.utils import set_seed

    from vlm_depth.prompts.chat import ChatLayout

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model, processor = load_for_training(cfg, accelerator)
    layout = ChatLayout.from_branch_config(processor.tokenizer, model.depth_cfg)
    images = open_images(cfg.dataset, cfg.split, cfg.num_images, cfg.seed)
    stream = PackedQueryStream(images, ExampleBuilder(processor, layout, query_spec(cfg)), cfg.seed, cfg.cache_images)
    max_steps = resolve_max_steps(cfg, len(images), accelerator.num_processes)
    packed = PackedModel(model, cfg.mdm_mode, flex=cfg.packed_attention == "flex")
    if cfg.sharding == "fsdp":
        shard(packed.to(accelerator.device), model, bf16=accelerator.mixed_precision == "bf16")
    optimizer, scheduler = make_optimizer(cfg, model, max_steps)
    register_weight_hooks(accelerator, model, (packed, optimizer) if cfg.sharding == "fsdp" else None)
    if cfg.sharding == "fsdp":  # sharded already: accelerate must not wrap it in DDP
        scheduler = accelerator.prepare(scheduler)
    else:
        packed, optimizer, scheduler = accelerator.prepare(packed, optimizer, scheduler)
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        processor=processor,
        layout=layout,
        packed=packed,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=stream,
        # Sharded, every process takes part in the validation forwards (FSDP gathers weights collectively).
        val_batches=build_val_batches(cfg, processor, layout)
        if accelerator.is_main_process or cfg.sharding == "fsdp"
        else [],
        digit_ids=torch.tensor(layout.digit_ids, device=accelerator.device),
        max_steps=max_steps,
    )
    resume = resolve_resume(cfg.out, cfg.resume_from)
    if resume is not None:
        step = checkpoint_step(resume)
        if step > max_steps:
            raise ConfigError(
                f"the checkpoint {resume} (step {step}) is past --max_steps {max_steps}: raise --max_steps, or start "
                "over with --overwrite"
            )
        run.start_step = restore_checkpoint(accelerator, resume)
        logger.info("resumed from %s at step %d", resume, run.start_step)
    if accelerator.is_main_process:
        prepare_log(cfg.out, run.start_step, resume, cfg.resume_from)
        save_config(cfg.out, cfg)
        accelerator.init_trackers("vlm-depth", config=_tracker_config(cfg))
    return run


def _tracker_config(cfg: TrainConfig) -> dict:
    from dataclasses import asdict

    return {k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
