"""`vlm-depth train`: accelerate-driven SFT on sparse labels, as a chain of small functions
setup -> train -> evaluate -> save.

Runs as one process or under `accelerate launch` (DDP; CPU/gloo or GPUs). Loss normalisation: the CE term is the
mean over *every answer token of the global batch* (all processes, all accumulation micro-batches of the optimiser
step) and the numeric L1 term the mean over every query of the global batch. Each process divides its local sums by
those all-reduced counts and multiplies by the number of processes (DDP averages gradients), so the gradient, the
logged loss and hence the run are those of one process holding the whole global batch (up to float summation order;
DepthFusion's BatchNorm statistics are per process, which matters from the second step on for he_init fusion or
once the zero-initialised output conv has moved).

Step anatomy: fetch the step's micro-batches -> count answer tokens and queries, all-reduce -> forward/backward per
micro-batch (gradient sync on the last only) -> all-reduce the loss sums -> stop if non-finite (weights untouched,
checkpoints kept) -> clip (1.0) -> AdamW (separate LRs for the depth branch and the backbone) -> LR schedule.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_depth.config import save_config
from vlm_depth.errors import ConfigError, VlmDepthError
from vlm_depth.train.checkpoint import (
    load_checkpoint,
    register_weight_hooks,
    resolve_resume,
    save_checkpoint,
    save_final,
)
from vlm_depth.train.collator import Batch, ExampleBuilder, QuerySpec, collate_packed
from vlm_depth.train.config import TrainConfig
from vlm_depth.train.losses import IGNORE_INDEX, AnswerLosses, answer_losses, supervised_positions
from vlm_depth.train.mdm import (
    MDM_SUMS,
    batch_mdm_loss,
    mdm_log_row,
    mdm_loss_weight,
    mdm_predictions,
    mdm_spec,
    prepare_mdm_model,
    validate_mdm,
)
from vlm_depth.train.packed import packed_forward

logger = logging.getLogger(__name__)


class TrainingDiverged(VlmDepthError):
    """The loss became NaN or infinite; the run stopped before applying that step."""


class PackedModel(torch.nn.Module):
    """The module accelerate prepares (and DDP wraps): its forward is the whole computation of a micro-batch (one
    forward per backward, as DDP needs): the packed query logits, and with `mdm_mode` head_only / joint the MDM
    head's depth maps (head_only: those only). Returns (logits or None, MDM depth maps or None)."""

    def __init__(self, model: torch.nn.Module, mdm_mode: str = "off") -> None:
        super().__init__()
        self.model = model
        self.mdm_mode = mdm_mode

    def train(self, mode: bool = True) -> PackedModel:
        super().train(mode)
        if self.mdm_mode == "head_only":  # the frozen model keeps inference behaviour (BatchNorm statistics)
            self.model.eval()
            self.model.mdm_head.train(mode)
        return self

    def forward(self, batch: Batch, logits_to_keep: int | torch.Tensor = 0):
        logits = None if self.mdm_mode == "head_only" else packed_forward(self.model, batch, logits_to_keep)
        mdm_depth = None if self.mdm_mode == "off" else mdm_predictions(self.model, batch)
        return logits, mdm_depth


@dataclass
class Run:
    """Everything a training run holds between the small functions below."""

    cfg: TrainConfig
    accelerator: Any
    model: Any  # the DepthVLM (unwrapped)
    processor: Any
    layout: Any
    packed: Any  # PackedModel as prepared by accelerate
    optimizer: Any
    scheduler: Any
    stream: Any
    val_batches: list[Batch]
    digit_ids: torch.Tensor
    max_steps: int
    start_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------- setup
def make_accelerator(cfg: TrainConfig):
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
    return Accelerator(
        # Without CUDA this is a CPU run; under torchrun / `accelerate launch --multi_gpu` it is then DDP over gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=cfg.out, logging_dir=str(Path(cfg.out) / "trackers")),
        # The scheduler is stepped once per optimiser step whatever the number of processes (see module docstring).
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def base_checkpoint(cfg: TrainConfig, accelerator=None) -> str:
    """`cfg.model`, or for `tiny` the offline tiny checkpoint built once into OUT/tiny-base (by the main process)."""
    if cfg.model != "tiny":
        return cfg.model
    from vlm_depth.config import TinyConfig
    from vlm_depth.model.tiny import build_tiny_checkpoint

    folder = Path(cfg.out) / "tiny-base"
    main = accelerator is None or accelerator.is_main_process
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        if main and not (folder / "config.json").is_file():
            build_tiny_checkpoint(TinyConfig(out=str(folder), seed=cfg.seed))
    return str(folder)


def load_model(cfg: TrainConfig, accelerator=None):
    """DepthVLM + DepthProcessor with the trainable parameters of `cfg.finetune` switched on."""
    from vlm_depth.model.branch_config import DepthBranchConfig
    from vlm_depth.model.depth_vlm import DepthVLM
    from vlm_depth.model.peft_setup import apply_lora
    from vlm_depth.model.pointer import add_pointer_token
    from vlm_depth.model.processor import DepthProcessor

    path = base_checkpoint(cfg, accelerator)
    fresh = not DepthBranchConfig.exists(path)
    if not fresh and DepthBranchConfig.load(path) != cfg.branch_config():
        logger.warning("%s has its own depth-branch config; the recipe's branch keys are ignored", path)
    cuda = torch.cuda.is_available()
    # Frozen weights in bf16 on GPU (halves memory); trainable weights are kept in fp32 below.
    dtype = torch.bfloat16 if cuda and cfg.finetune != "full" else torch.float32
    extra = {}
    if cfg.finetune == "qlora" and cuda:  # bitsandbytes places the weights at load time: this process's GPU
        extra["device_map"] = {"": accelerator.local_process_index if accelerator is not None else 0}
    model = DepthVLM.from_pretrained(
        path,
        depth_cfg=cfg.branch_config() if fresh else None,
        quantization="nf4" if cfg.finetune == "qlora" else None,
        adapter_trainable=True,
        dtype=dtype,
        **extra,
    )
    processor = DepthProcessor.from_pretrained(path, template=model.depth_cfg.template)
    if cfg.max_pixels:
        set_max_pixels(processor, cfg.max_pixels)
    if model.depth_cfg.query_mode == "pointer":
        add_pointer_token(model, processor.tokenizer)
    has_adapter = getattr(model, "_hf_peft_config_loaded", False)
    if cfg.finetune == "full":
        if has_adapter:
            raise ConfigError(f"{path} is a LoRA checkpoint; continue it with finetune lora, or merge it first")
        model.requires_grad_(True)
        if not cfg.train_vision:
            frozen = model.model.visual.named_parameters(prefix="model.visual")
            for name, param in frozen:
                param.requires_grad_(name.startswith("model.visual.patch_embed.depth_proj"))
    elif not has_adapter:
        apply_lora(
            model,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=[t.strip() for t in cfg.lora_targets.split(",") if t.strip()],
            vision=cfg.train_vision,
        )
    prepare_mdm_model(model, cfg)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
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


def make_optimizer(cfg: TrainConfig, model, max_steps: int):
    from vlm_depth.model.peft_setup import trainable_parameter_groups

    groups = trainable_parameter_groups(model)
    lrs = {"branch": cfg.lr_branch, "backbone": cfg.lr_backbone}
    params = [{"params": p, "lr": lrs[name], "name": name} for name, p in groups.items() if p]
    if not params:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg, max_steps=max_steps))
    return optimizer, scheduler


def open_images(spec: str, split: str, limit: int, seed: int):
    """Images of the comma-separated reader specs `spec` (e.g. `synthetic:64?height=96&width=128`), concatenated;
    a random subset of `limit` of them fixed by `seed` (0 = all)."""
    from vlm_depth.data import load

    parts = [load(s.strip(), split=split or None) for s in spec.split(",") if s.strip()]
    if not parts:
        raise ConfigError(f"no dataset in {spec!r}")
    images = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    if limit and limit < len(images):
        chosen = np.sort(np.random.default_rng([seed, 7]).choice(len(images), limit, replace=False))
        images = torch.utils.data.Subset(images, chosen.tolist())
    return images


def set_max_pixels(processor, max_pixels: int) -> None:
    """Set the image processor's pixel budget (28*28 per visual token); it is saved with the processor."""
    processor.image_processor.size["longest_edge"] = max_pixels


def build_val_batches(cfg: TrainConfig, processor, layout) -> list[Batch]:
    """One packed batch per held-out image (fill queries only), built once with a fixed seed."""
    if not cfg.val_dataset:
        return []
    images = open_images(cfg.val_dataset, cfg.val_split, cfg.num_val_images, cfg.seed)
    spec = QuerySpec(
        cfg.val_label_source, cfg.val_queries, 0.0, cfg.holdout_ratio, "uniform", cfg.protocol, mdm_spec(cfg)
    )
    builder = ExampleBuilder(processor, layout, spec)
    pad = processor.tokenizer.pad_token_id
    return [
        collate_packed([builder(images[i], np.random.default_rng([cfg.seed, i, 3]), cfg.seed + i)], pad)
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
    from vlm_depth.train.data import PackedQueryStream

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if accelerator.is_main_process:
        save_config(cfg.out, cfg)
    model, processor = load_model(cfg, accelerator)
    layout = ChatLayout.from_branch_config(processor.tokenizer, model.depth_cfg)
    spec = QuerySpec(
        cfg.label_source, cfg.num_queries, cfg.keep_ratio, cfg.holdout_ratio, cfg.sampling, cfg.protocol, mdm_spec(cfg)
    )
    images = open_images(cfg.dataset, cfg.split, cfg.num_images, cfg.seed)
    stream = PackedQueryStream(images, ExampleBuilder(processor, layout, spec), cfg.seed, cfg.cache_images)
    max_steps = resolve_max_steps(cfg, len(images), accelerator.num_processes)
    optimizer, scheduler = make_optimizer(cfg, model, max_steps)
    register_weight_hooks(accelerator, model)
    packed, optimizer, scheduler = accelerator.prepare(PackedModel(model, cfg.mdm_mode), optimizer, scheduler)
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
        val_batches=build_val_batches(cfg, processor, layout) if accelerator.is_main_process else [],
        digit_ids=torch.tensor(layout.digit_ids, device=accelerator.device),
        max_steps=max_steps,
    )
    resume = resolve_resume(cfg.out, cfg.resume_from)
    if resume is not None:
        run.start_step = load_checkpoint(accelerator, resume)
        logger.info("resumed from %s at step %d", resume, run.start_step)
    if accelerator.is_main_process:
        accelerator.init_trackers("vlm-depth", config=_tracker_config(cfg))
    return run


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))}


# ---------------------------------------------------------------------------------------------------------- train
def make_loader(run: Run) -> torch.utils.data.DataLoader:
    from vlm_depth.train.data import StepBatchSampler

    cfg, acc = run.cfg, run.accelerator
    sampler = StepBatchSampler(
        cfg.batch_size, cfg.grad_accum, run.start_step, run.max_steps, acc.process_index, acc.num_processes
    )
    return torch.utils.data.DataLoader(
        run.stream,
        batch_sampler=sampler,
        collate_fn=partial(collate_packed, pad_token_id=run.processor.tokenizer.pad_token_id),
        num_workers=cfg.num_workers,
        # Own generator: creating the loader must not draw from the global RNG (dropout) that a resume restores.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def to_device(batch: Batch, device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_losses(run: Run, batch: Batch) -> tuple[AnswerLosses | None, dict[str, torch.Tensor] | None]:
    """Forward of one micro-batch through the prepared model: losses at the supervised positions (None in MDM
    head_only mode) and the MDM loss sums (None with mdm_mode off)."""
    predict_mask, _ = supervised_positions(batch["labels"])
    with run.accelerator.autocast():
        logits, mdm_depth = run.packed(batch, logits_to_keep=predict_mask)
    answers = None if logits is None else answer_losses(logits, batch, run.digit_ids)
    if mdm_depth is None:
        return answers, None
    return answers, batch_mdm_loss(mdm_depth, batch, run.processor.image_processor, run.cfg.mdm_loss)


def train_step(run: Run, micro_batches: list[Batch], step: int) -> dict[str, float]:
    """One optimiser step over `micro_batches` (this process's share of the global batch); returns its log row."""
    acc, cfg = run.accelerator, run.cfg
    mdm = cfg.mdm_mode != "off"
    image_processor = run.processor.image_processor
    local = torch.tensor(
        [
            sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches),
            sum(len(b["targets"]) for b in micro_batches),
            sum(mdm_loss_weight(b, image_processor, cfg.mdm_loss) for b in micro_batches) if mdm else 0,
            sum(int(b["is_fill"].sum()) for b in micro_batches),
        ],
        dtype=torch.float64,
        device=acc.device,
    )
    n_tokens, n_queries, n_mdm, n_fill = (max(float(x), 1.0) for x in acc.reduce(local, reduction="sum"))
    # ce, l1, fill-query l1, then the MDM sums (MDM_SUMS); text terms are 0 in MDM head_only mode
    sums = torch.zeros(3 + len(MDM_SUMS), dtype=torch.float64, device=acc.device)
    zero = torch.zeros((), device=acc.device)
    for i, batch in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else acc.no_sync(run.packed):
            losses, mdm_sums = batch_losses(run, batch)
            loss = zero
            if losses is not None:
                loss = loss + losses.ce_sum() / n_tokens + cfg.numeric_loss_weight * losses.l1_sum() / n_queries
            if mdm_sums is not None:
                loss = loss + cfg.mdm_weight * mdm_sums["loss_sum"] / n_mdm
            acc.backward(loss * acc.num_processes)
        text = [zero] * 3
        if losses is not None:
            fill_err = (losses.expected - losses.targets).abs()[batch["is_fill"]].sum()
            text = [losses.ce_sum(), losses.l1_sum(), fill_err]
        extra = [zero] * len(MDM_SUMS) if mdm_sums is None else [mdm_sums[k] for k in MDM_SUMS]
        sums += torch.stack([t.to(zero) for t in [*text, *extra]]).detach().double()
    sums = acc.reduce(sums, reduction="sum")
    ce, mae = float(sums[0]) / n_tokens, float(sums[1]) / n_queries
    mdm_row = mdm_log_row(sums[3:].tolist(), n_mdm) if mdm else {}
    loss = ce + cfg.numeric_loss_weight * mae + cfg.mdm_weight * mdm_row.get("mdm_loss", 0.0)
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"non-finite loss at step {step} (ce={ce}, numeric L1={mae}); stopped before applying it. The last "
            f"good checkpoint (if any) is in {Path(cfg.out) / 'checkpoints'}; lower the learning rates or check "
            "the data"
        )
    grad_norm = float(acc.clip_grad_norm_(run.packed.parameters(), cfg.max_grad_norm)) if cfg.max_grad_norm else 0.0
    lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(run.optimizer.param_groups)}
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {
        "step": step,
        "loss": loss,
        "ce": ce,
        "mae": mae,
        "fill_mae": float(sums[2]) / n_fill,
        "grad_norm": grad_norm,
        "queries": n_queries,
        **mdm_row,
        **lrs,
    }


def train(run: Run) -> None:
    """Optimiser steps from `run.start_step` to `max_steps` (or `stop_at_step`), with logging, periodic
    checkpoints and validation."""
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.accelerator
    last = min(run.max_steps, cfg.stop_at_step) if cfg.stop_at_step else run.max_steps
    log_path = Path(cfg.out) / "log.jsonl"
    if acc.is_main_process:
        _truncate_log(log_path, run.start_step)
    bar = tqdm(total=last, initial=run.start_step, disable=not acc.is_main_process, desc="train", unit="step")
    loader = iter(make_loader(run))
    run.packed.train()
    try:
        for step in range(run.start_step + 1, last + 1):
            tic = time.perf_counter()
            micro = [to_device(next(loader), acc.device) for _ in range(cfg.grad_accum)]
            row = train_step(run, micro, step)
            row["queries_per_s"] = row["queries"] / (time.perf_counter() - tic)
            run.history.append(row)
            acc.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
            if acc.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", mae=f"{row['mae']:.3f}", qps=f"{row['queries_per_s']:.1f}")
                if step % cfg.log_every == 0:
                    logger.info("step %d: loss %.4f ce %.4f mae %.3f m", step, row["loss"], row["ce"], row["mae"])
            if (cfg.save_every and step % cfg.save_every == 0) or step == last:
                save_checkpoint(acc, cfg.out, step, cfg.keep_checkpoints)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != run.max_steps:
                record_validation(run, step)
    finally:
        bar.close()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows after `step` (left by a run that went on past its last checkpoint)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(r + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def greedy_answers(model, layout, batch: Batch, max_new_tokens: int) -> list[str]:
    """Greedy answer text of every query of a one-image packed batch: prefix + the query's prompt, generated freely
    (the template words too) by `model.generate`."""
    segments, ids = batch["segment_ids"][0], batch["input_ids"][0]
    labels = batch["labels"][0]
    prefix = ids[segments == 0]
    texts = []
    for k in range(1, int(segments.max()) + 1):
        block = segments == k
        prompt = ids[block][labels[block] == IGNORE_INDEX]
        input_ids = torch.cat([prefix, prompt])[None]
        extra = {}
        if len(batch["pointer_xy"]):
            extra = {
                "pointer_xy": batch["pointer_xy"][k - 1 : k],
                "pointer_image_index": batch["pointer_image_index"][:1],
            }
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            depth_values=batch["depth_values"],
            mm_token_type_ids=(input_ids == model.config.image_token_id).int(),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **extra,
        )
        texts.append(layout.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))
    return texts


def validate(model, layout, batches: list[Batch], digit_ids: torch.Tensor, autocast=contextlib.nullcontext) -> dict:
    """Validation on held-out packed batches (one image each): greedy numeric MAE/RMSE (meters) of free-form
    answers, the share of parseable answers, and the teacher-forced CE and expectation MAE."""
    from vlm_depth.prompts.numbers import parse_meters

    was_training = model.training
    model.eval()
    errors, parsed, total, ce, tf_err, n_tok = [], 0, 0, 0.0, 0.0, 0
    device = digit_ids.device
    try:
        for batch in batches:
            batch = to_device(batch, device)
            with torch.no_grad(), autocast():
                predict_mask, _ = supervised_positions(batch["labels"])
                losses = answer_losses(packed_forward(model, batch, predict_mask), batch, digit_ids)
            ce += float(losses.ce_sum())
            n_tok += len(losses.token_ce)
            tf_err += float(losses.l1_sum())
            answer_len = int((batch["labels"] != IGNORE_INDEX).sum()) // max(len(batch["targets"]), 1)
            for text, target in zip(greedy_answers(model, layout, batch, answer_len + 4), batch["targets"]):
                total += 1
                value = parse_meters(text).value
                if value is not None:
                    parsed += 1
                    errors.append(value - float(target))
    finally:
        model.train(was_training)
    err = np.asarray(errors, dtype=np.float64)
    return {
        "val_mae": float(np.abs(err).mean()) if len(err) else float("nan"),
        "val_rmse": float(np.sqrt((err**2).mean())) if len(err) else float("nan"),
        "val_parsed": parsed / max(total, 1),
        "val_queries": total,
        "val_ce": ce / max(n_tok, 1),
        "val_tf_mae": tf_err / max(total, 1),
    }


def record_validation(run: Run, step: int) -> dict[str, float] | None:
    """Validate on the main process, log the row; other processes wait."""
    acc = run.accelerator
    row = None
    if acc.is_main_process and run.val_batches:
        mode, metrics = run.cfg.mdm_mode, {}
        if mode != "head_only":
            metrics = validate(run.model, run.layout, run.val_batches, run.digit_ids, run.accelerator.autocast)
        if mode != "off":
            metrics |= validate_mdm(run.model, run.val_batches, run.processor.image_processor, run.cfg.mdm_loss)
        row = {"step": step, "split": "val", **metrics}
        acc.log({f"val/{k}": v for k, v in row.items() if k not in ("step", "split")}, step=step)
        with (Path(run.cfg.out) / "log.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        logger.info("step %d validation: %s", step, row)
    acc.wait_for_everyone()
    return row


# ---------------------------------------------------------------------------------------------------------- entry
def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train per `cfg`; returns a JSON-able summary (steps, first/last losses, validation, output folders)."""
    tic = time.perf_counter()
    run = setup(cfg)
    try:
        train(run)
        last = min(run.max_steps, cfg.stop_at_step) if cfg.stop_at_step else run.max_steps
        finished = last == run.max_steps
        val = record_validation(run, last) if finished else None
        final = None
        if finished and run.accelerator.is_main_process:
            final = save_final(run.model, run.processor, cfg.out)
        run.accelerator.wait_for_everyone()
    finally:
        run.accelerator.end_training()
    window = min(20, max(len(run.history) // 2, 1))
    head, tail = run.history[:window], run.history[-window:]
    return {
        "out": cfg.out,
        "final": str(final) if final else None,
        "steps": [run.start_step, last],
        "max_steps": run.max_steps,
        "loss_first": _mean(head, "loss"),
        "loss_last": _mean(tail, "loss"),
        "mae_first": _mean(head, "mae"),
        "mae_last": _mean(tail, "mae"),
        "mdm_loss_first": _mean(head, "mdm_loss"),
        "mdm_loss_last": _mean(tail, "mdm_loss"),
        "validation": val,
        "seconds": round(time.perf_counter() - tic, 1),
    }


def _mean(rows: list[dict[str, float]], key: str) -> float | None:
    """Mean of `key` over `rows`; None without rows or when the rows do not log it (e.g. MDM terms with mdm off)."""
    return float(np.mean([r[key] for r in rows])) if rows and key in rows[0] else None
