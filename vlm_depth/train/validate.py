"""Validation of `vlm-depth train` on held-out packed batches: greedy free-form answers (`model.generate`, the template
words included, so the share of parseable answers means something) scored against the labels, the teacher-forced
CE and expectation MAE, and, with an MDM head, its losses."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from vlm_depth.train.collator import IGNORE_INDEX, Batch, num_queries
from vlm_depth.train.losses import answer_losses, supervised_positions
from vlm_depth.train.mdm import validate_mdm
from vlm_depth.train.packed import packed_forward
from vlm_depth.train.resume import append_log
from vlm_depth.train.sharding import unsharded_root
from vlm_depth.train.step import to_device

if TYPE_CHECKING:
    from vlm_depth.train.setup import Run

logger = logging.getLogger(__name__)


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
            depth_maps=batch["depth_maps"],
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
            answer_len = int((batch["labels"] != IGNORE_INDEX).sum()) // max(num_queries(batch), 1)
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
    """Validate on the main process (under `sharding: fsdp` on every process in lockstep, since the weights are
    gathered collectively) and log the row; other processes wait."""
    acc = run.accelerator
    row = None
    sharded = run.cfg.sharding == "fsdp"
    if run.val_batches and (acc.is_main_process or sharded):
        mode, metrics = run.cfg.mdm_mode, {}
        with unsharded_root(run.packed) if sharded else contextlib.nullcontext():
            if mode != "head_only":
                metrics = validate(run.model, run.layout, run.val_batches, run.digit_ids, run.accelerator.autocast)
            if mode != "off":
                metrics |= validate_mdm(run.model, run.val_batches, run.processor.image_processor, run.cfg.mdm_loss)
        if acc.is_main_process:
            row = {"step": step, "split": "val", **metrics}
            acc.log({f"val/{k}": v for k, v in row.items() if k not in ("step", "split")}, step=step)
            append_log(run.cfg.out, row)
            logger.info("step %d validation: %s", step, row)
    acc.wait_for_everyone()
    return row
