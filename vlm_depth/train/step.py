"""One optimiser step of `vlm-depth train`, and the module accelerate prepares (`PackedModel`).

Loss normalisation: the CE term is the mean over *every answer token of the global batch* (all processes, all
accumulation micro-batches of the optimiser step) and the numeric L1 term the mean over every query of the global
batch. Each process divides its local sums by those all-reduced counts and multiplies by the number of processes (DDP
averages gradients), so the gradient, the logged loss and hence the run are those of one process holding the whole
global batch (up to float summation order; DepthFusion's BatchNorm statistics are per process, which matters from
the second step on for he_init fusion or once the zero-initialised output conv has moved).

Step anatomy: count answer tokens, queries, fill queries and MDM label weights and all-reduce them once ->
forward/backward per micro-batch (gradient sync on the last only) -> all-reduce the loss sums -> stop if non-finite
(weights untouched, checkpoints kept) -> clip -> AdamW (separate LRs for the depth branch and the backbone) -> LR
schedule.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlm_depth.errors import DataError, VlmDepthError
from vlm_depth.train.collator import IGNORE_INDEX, Batch, num_queries
from vlm_depth.train.losses import AnswerLosses, answer_losses, supervised_positions
from vlm_depth.train.mdm import MDM_SUMS, batch_mdm_loss, mdm_log_row, mdm_loss_weight, mdm_predictions
from vlm_depth.train.packed import packed_forward
from vlm_depth.train.sharding import full

if TYPE_CHECKING:
    from vlm_depth.train.setup import Run


class TrainingDiverged(VlmDepthError):
    """The loss became NaN or infinite; the run stopped before applying that step."""


class PackedModel(torch.nn.Module):
    """The module accelerate prepares (and DDP wraps): its forward is the whole computation of a micro-batch (one
    forward per backward, as DDP needs): the packed query logits, and with `mdm_mode` head_only / joint the MDM
    head's depth maps (head_only: those only). Returns (logits or None, MDM depth maps or None)."""

    def __init__(self, model: torch.nn.Module, mdm_mode: str = "off", flex: bool = False) -> None:
        super().__init__()
        self.model = model
        self.mdm_mode = mdm_mode
        self.flex = flex  # packed attention through CUDA flex_attention (`vlm_depth.model.packed_attention`)

    def train(self, mode: bool = True) -> PackedModel:
        super().train(mode)
        if self.mdm_mode == "head_only":  # the frozen model keeps inference behaviour (BatchNorm statistics)
            self.model.eval()
            self.model.mdm_head.train(mode)
        return self

    def forward(self, batch: Batch, logits_to_keep: int | torch.Tensor = 0):
        logits = None
        if self.mdm_mode != "head_only":
            logits = packed_forward(self.model, batch, logits_to_keep, flex=self.flex)
        mdm_depth = None if self.mdm_mode == "off" else mdm_predictions(self.model, batch)
        return logits, mdm_depth


def to_device(batch: Batch, device: torch.device) -> Batch:
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
            sum(num_queries(b) for b in micro_batches),
            sum(mdm_loss_weight(b, image_processor, cfg.mdm_loss) for b in micro_batches) if mdm else 0,
            sum(int(b["is_fill"].sum()) for b in micro_batches),
        ],
        dtype=torch.float64,
        device=acc.device,
    )
    counts = acc.reduce(local, reduction="sum")
    if float(counts[2] if cfg.mdm_mode == "head_only" else counts[1]) == 0:
        raise DataError(
            f"step {step}: no labelled pixel in any image of the batch: no valid depth to learn from "
            f"(label_source {cfg.label_source}); check the dataset and its depth_scale"
        )
    n_tokens, n_queries, n_mdm, n_fill = (max(float(x), 1.0) for x in counts)
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
    norm = acc.clip_grad_norm_(run.packed.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else 0.0
    grad_norm = float(full(norm)) if isinstance(norm, torch.Tensor) else norm
    lrs = {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(run.optimizer.param_groups)}
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    # head_only runs no text query: its row has no text terms rather than zeros that read as a perfect fit
    text_row = {} if cfg.mdm_mode == "head_only" else {"ce": ce, "mae": mae, "fill_mae": float(sums[2]) / n_fill}
    return {
        "step": step,
        "loss": loss,
        **text_row,
        "grad_norm": grad_norm,
        "queries": n_queries,
        **mdm_row,
        **lrs,
    }
