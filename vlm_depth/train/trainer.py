"""`vlm-depth train`: accelerate-driven SFT on sparse labels, read top to bottom as setup -> fit -> validate -> save.

Runs as one process or under `accelerate launch` (DDP; CPU/gloo or GPUs). The pieces: `vlm_depth.train.setup`
(the run: model, data, optimiser, resume), `vlm_depth.train.step` (one optimiser step and its loss normalisation over
the global batch), `vlm_depth.train.validate` (held-out greedy answers), `vlm_depth.train.resume` (log, checkpoints).

The run folder is claimed first (`vlm_depth.files.claim_output`, by the main process): locked against a second
writer, and a fresh run refuses a folder that holds a run (log.jsonl, checkpoints, final/) unless `--overwrite`;
`--resume_from latest` continues it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from functools import partial
from typing import Any

import numpy as np
import torch

from vlm_depth.files import claim_output, fault_point
from vlm_depth.train.collator import collate_packed
from vlm_depth.train.resume import append_log, resumes_in, save_checkpoint, save_final
from vlm_depth.train.setup import Run, check_datasets, setup
from vlm_depth.train.sharding import gather_state
from vlm_depth.train.step import to_device, train_step
from vlm_depth.train.stream import StepBatchSampler
from vlm_depth.train.train_config import TrainConfig
from vlm_depth.train.validate import record_validation

logger = logging.getLogger(__name__)

# What marks a folder as holding a training run (tiny-base/ or config.yaml alone hold nothing to lose).
MARKERS = ("log.jsonl", "checkpoints/step-*", "final")


def make_loader(run: Run) -> torch.utils.data.DataLoader:
    """This process's micro-batches for steps `run.start_step` .. `run.max_steps` (a pure function of seed and
    step, see `vlm_depth.train.stream`)."""
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


def fit(run: Run) -> None:
    """Optimiser steps from `run.start_step` to `run.last_step`, with logging, periodic checkpoints and
    validation."""
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.accelerator
    last = run.last_step
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
                fault_point(f"step@{step}")
                append_log(cfg.out, row, fault=f"log@{step}")
                bar.update(1)
                shown = {key: f"{row[key]:.4f}" for key in ("loss", "ce", "mae", "mdm_loss") if key in row}
                bar.set_postfix(shown, qps=f"{row['queries_per_s']:.1f}")
                if step % cfg.log_every == 0:
                    logger.info("step %d: %s", step, " ".join(f"{key} {value}" for key, value in shown.items()))
            if (cfg.save_every and step % cfg.save_every == 0) or step == last:
                save_checkpoint(acc, cfg.out, step, cfg.keep_checkpoints)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != run.max_steps:
                record_validation(run, step)
    finally:
        bar.close()


def claim_run_folder(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """The main process's hold on OUT (see the module docstring); other processes of a launch hold nothing."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    hint = "continue it with --resume_from latest or start over with --overwrite (deletes it)"
    reuse = resumes_in(cfg.out, cfg.resume_from)
    return claim_output(cfg.out, "train", MARKERS, overwrite=cfg.overwrite, reuse=reuse, hint=hint)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train per `cfg`; returns a JSON-able summary (steps, first/last losses, validation, output folders)."""
    tic = time.perf_counter()
    check_datasets(cfg)
    with claim_run_folder(cfg):
        run = setup(cfg)
        try:
            fit(run)
            finished = run.last_step == run.max_steps
            val = record_validation(run, run.last_step) if finished else None
            final = None
            # Sharded, every process hands in its shards; unsharded, the model's own weights are written.
            state = gather_state(run.model.state_dict()) if finished and cfg.sharding == "fsdp" else None
            if finished and run.accelerator.is_main_process:
                final = save_final(run.model, run.processor, cfg.out, state)
            run.accelerator.wait_for_everyone()
        finally:
            run.accelerator.end_training()
    window = min(20, max(len(run.history) // 2, 1))
    head, tail = run.history[:window], run.history[-window:]
    return {
        "out": cfg.out,
        "final": str(final) if final else None,
        "steps": [run.start_step, run.last_step],
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
