"""`vlm-depth train` config: one dataclass, read from a recipe YAML (top-level `train/`) plus `--key value` overrides.

`TrainConfig` extends `DepthBranchConfig`, so a recipe also sets the depth branch (fusion, encoding, template,
query mode, decimals) of a fresh model; when `model` is already a vlm-depth checkpoint, its saved branch config
wins and those keys are ignored (a warning names any that differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from vlm_depth.config import check_options, option, pick
from vlm_depth.errors import ConfigError
from vlm_depth.model.branch_config import DepthBranchConfig


@dataclass
class TrainConfig(DepthBranchConfig):
    """Text-supervised fine-tuning on sparse labels: K pixel queries packed per image, CE + optional numeric L1."""

    shipped: ClassVar[str] = "train"  # `--config NAME` finds a recipe of the top-level train/ folder
    renamed: ClassVar[dict[str, str]] = {"num_queries": "queries_per_image", "val_queries": "val_queries_per_image"}

    # --- model ---
    model: str = option(
        "Checkpoint to start from: a plain Qwen2.5-VL (hub name or folder; a fresh depth branch is attached), a "
        "vlm-depth checkpoint, or `tiny` (builds the offline tiny checkpoint into OUT/tiny-base).",
        default="tiny",
    )
    finetune: Literal["lora", "qlora", "full"] = option(
        "lora: LoRA on the language model, base frozen; qlora: the same on a 4-bit NF4 base (GPU); full: every "
        "language-model weight trains. The depth branch (and pointer projection, heads) always trains fully.",
        default="lora",
    )
    sharding: Literal["none", "fsdp"] = option(
        "Across the processes of `accelerate launch`: none (each holds the whole model; gradients averaged, DDP) or "
        "fsdp (PyTorch FSDP2: weights, gradients and AdamW states sharded, one unit per vision block and per decoder "
        "layer, one for the rest; for finetune full of the 3B/7B models, launched with launch/fsdp.yaml).",
        default="none",
    )
    lora_r: int = option("LoRA rank.", default=16)
    lora_alpha: int = option("LoRA alpha (scale = alpha / r).", default=32)
    lora_dropout: float = option("Dropout on the LoRA input.", default=0.05)
    lora_targets: str = option(
        "Comma-separated module names that get LoRA adapters (language model).",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    )
    max_pixels: int = option(
        "Image pixel budget of the processor (28*28 per visual token; smart_resize keeps the aspect ratio); saved "
        "with the checkpoint. 0 = the checkpoint's own setting.",
        default=0,
    )
    train_vision: bool = option(
        "Train the vision tower and merger too: LoRA adapters on them (lora/qlora) or their full weights (full). "
        "Off: frozen, as in the paper.",
        default=False,
    )

    # --- data ---
    dataset: str = option(
        "Training images: one or more reader specs `KIND:PATH` (vlm_depth.data.load) joined by commas, e.g. "
        "`synthetic:64?height=96&width=128&seed=0` (generated on the fly, deterministic by seed and index), "
        "`folder:data/train`, `hypersim:/data/hypersim,vkitti2:/data/vkitti2`.",
        default="synthetic:64?seed=0",
    )
    split: str = option("Split passed to the reader (empty: the reader's default).", default="")
    num_images: int = option("Use a random subset of N images of `dataset`, fixed by `seed` (0 = all).", default=0)
    cache_images: bool = option(
        "Keep read/generated images in memory (small or slow-to-generate datasets, e.g. synthetic).", default=False
    )
    val_dataset: str = option(
        "Held-out images for validation (a reader spec; for synthetic use another seed than `dataset`), or empty "
        "to skip validation.",
        default="synthetic:4?seed=1",
    )
    val_split: str = option("Split of `val_dataset` (empty: the reader's default).", default="")
    num_val_images: int = option("Validation images (0 = all of val_dataset).", default=4)
    val_queries_per_image: int = option("Validation queries per image (greedy answers, fill pixels).", default=8)
    val_label_source: Literal["sparse", "gt"] = option(
        "Labels of validation queries: gt (fill pixels where the input is missing; needs ground truth) or sparse "
        "(held-out input points).",
        default="gt",
    )
    protocol: str = option(
        "Sparse input: `sensor` (the dataset's own depth as-is) or a sparsity protocol applied to the ground truth "
        "(vlm_depth.data.sparsify, e.g. `uniform:500`, `lidar:64`, `blocks:medium`).",
        default="sensor",
    )
    label_source: Literal["sparse", "gt"] = option(
        "sparse: label-free, labels are held-out input points that the model never sees; gt: fill queries at "
        "pixels with ground truth where the input is missing.",
        default="sparse",
    )
    queries_per_image: int = option(
        "K: labelled pixel queries packed per image (K = 1 is the paper's setting).", default=16
    )
    keep_ratio: float = option("Share of keep queries (pixel with a given depth; label = that depth).", default=0.2)
    holdout_ratio: float = option(
        "label_source sparse: share of valid input points held out as labels (hidden from the depth branch and "
        "every prompt).",
        default=0.1,
    )
    sampling: Literal["uniform", "depth_stratified", "distance"] = option(
        "How query pixels are drawn among the candidates.", default="uniform"
    )

    # --- optimisation ---
    max_steps: int = option("Optimiser steps (0: derived from `epochs`).", default=0)
    epochs: float = option("Passes over the training images (used when max_steps is 0).", default=1.0)
    batch_size: int = option("Images per process per micro-batch (each image carries K queries).", default=1)
    grad_accum: int = option("Micro-batches per optimiser step.", default=1)
    lr_branch: float = option("Learning rate of the depth branch, pointer projection and heads.", default=1e-4)
    lr_mdm_head: float = option(
        "Learning rate of the MDM head (its own optimiser group); 0 = lr_branch, like the rest of the branch.",
        default=0.0,
    )
    lr_backbone: float = option("Learning rate of LoRA / language-model / vision weights.", default=1e-5)
    weight_decay: float = option("AdamW weight decay (both groups).", default=0.0)
    warmup_steps: int = option("Linear warm-up steps from 0 to the learning rates.", default=0)
    lr_schedule: Literal["cosine", "step", "constant"] = option(
        "After warm-up: cosine decay to 0 at max_steps, step decay (x step_gamma every step_every steps), or "
        "constant.",
        default="cosine",
    )
    step_every: int = option("step schedule: steps between decays.", default=1000)
    step_gamma: float = option("step schedule: factor per decay.", default=0.1)
    max_grad_norm: float = option("Gradient clipping (global L2 norm; 0 = off).", default=1.0)
    numeric_loss_weight: float = option(
        "Weight of the numeric L1 term: |sum_i place_i * E[digit_i] - label| in meters, from the teacher-forced "
        "digit distributions (0 = CE only, the paper's loss).",
        default=0.0,
    )
    mdm_mode: Literal["off", "head_only", "joint"] = option(
        "MDM head (vlm_depth.train.mdm): off = text loss only; head_only = the head alone on the frozen model (VLM, "
        "LoRA and depth branch: a probe of its visual tokens); joint = text loss + mdm_weight x MDM loss. A head "
        "(mdm_* head keys) is attached when the model has none.",
        default="off",
    )
    mdm_weight: float = option("Weight of the MDM loss (joint: relative to the text loss).", default=1.0)
    mdm_loss: Literal["l1", "balanced_si"] = option(
        "MDM loss: l1 on labelled pixels (LingBot-Depth) or balanced_si (Vanishing Depth's balanced scale-invariant "
        "multi-scale loss). Labels: held-out points (label_source sparse) or ground truth (gt).",
        default="l1",
    )
    mdm_sparse_labels: Literal["heldout", "masked"] = option(
        "Label-free MDM labels (label_source sparse): heldout = the textualizer's held-out points only; masked = "
        "those plus every valid input point inside a masked patch (hidden from the MDM pass).",
        default="heldout",
    )
    mdm_mixed_keep_prob: float = option("MDM masking: probability of keeping a partly valid 14-px patch.", default=0.5)
    mdm_ratio_low: float = option("MDM masking: lowest share of patches masked per image.", default=0.6)
    mdm_ratio_high: float = option("MDM masking: highest share of patches masked per image.", default=0.9)
    gradient_checkpointing: bool = option(
        "Recompute every decoder layer and vision block in backward instead of keeping its activations (3B at K = "
        "64: ~1.4 GiB per layer -> its input, ~21 MiB; costs one more forward of those layers, +44% FLOPs).",
        default=False,
    )
    packed_attention: Literal["sdpa", "flex"] = option(
        "Attention of the packed sequence: sdpa (two SDPA calls per layer, any device) or flex (one fused "
        "flex_attention kernel; CUDA only, not run on a GPU yet).",
        default="sdpa",
    )
    compile: bool = option(
        "Regional torch.compile of the decoder layers (fuses their small kernels; the first steps compile).",
        default=False,
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto: bf16 on a CUDA GPU, fp32 on CPU.", default="auto"
    )
    seed: int = option("Seed for weights of new modules, data order, query selection and dropout.", default=0)
    num_workers: int = option("DataLoader worker processes preparing packed examples.", default=0)
    num_threads: int = option(
        "torch intra-op CPU threads for this process (0 = torch's default). Small models on a shared CPU train "
        "much faster with 1.",
        default=0,
    )

    # --- logging and checkpoints ---
    out: str = option(
        "Output folder: checkpoints/, final/ (a DepthVLM checkpoint), log.jsonl, config.yaml.", default="runs/train"
    )
    log_every: int = option("Steps between progress log lines (every step is written to log.jsonl).", default=10)
    report_to: Literal["none", "tensorboard", "wandb"] = option("Tracker for accelerator.log.", default="none")
    save_every: int = option("Steps between resumable checkpoints (0 = only at the end).", default=0)
    keep_checkpoints: int = option("Resumable checkpoints kept on disk (oldest deleted first).", default=2)
    eval_every: int = option("Steps between validations (0 = only at the end).", default=0)
    stop_at_step: int = option(
        "End this invocation after step N (with a checkpoint) without changing the schedule; continue later with "
        "--resume_from latest (time-limited jobs). 0 = run to max_steps.",
        default=0,
    )
    resume_from: str = option(
        "Resume: `latest` (newest checkpoint in OUT/checkpoints) or a checkpoint folder; empty = fresh run.",
        default="",
    )
    overwrite: bool = option(
        "Start over in an OUT that holds a run (log.jsonl, checkpoints, final/): empty it first. Without it a fresh "
        "run refuses such a folder.",
        default=False,
    )

    def __post_init__(self) -> None:
        """Every option is checked here, before anything loads or is written."""
        positive = ("queries_per_image", "batch_size", "grad_accum", "log_every", "lora_r", "keep_checkpoints")
        positive += ("val_queries_per_image", "step_every")
        nonnegative = ("max_steps", "save_every", "eval_every", "stop_at_step", "warmup_steps", "num_images")
        nonnegative += ("num_val_images", "max_pixels", "seed", "num_workers", "num_threads", "lr_branch")
        nonnegative += ("lr_backbone", "lr_mdm_head", "weight_decay", "max_grad_norm", "numeric_loss_weight")
        nonnegative += ("mdm_weight", "epochs")
        check_options(self, dict.fromkeys(positive, 1) | dict.fromkeys(nonnegative, 0))
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("train: set max_steps > 0 or epochs > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.overwrite and self.resume_from:
            raise ConfigError("--overwrite starts over and --resume_from continues: give one of them")
        if not 0 <= self.keep_ratio <= 1 or not 0 < self.holdout_ratio < 1:
            raise ConfigError("train: keep_ratio must be in [0, 1] and holdout_ratio in (0, 1)")
        if self.sharding == "fsdp" and self.finetune != "full":
            raise ConfigError("--sharding fsdp shards a full fine-tune; LoRA/QLoRA runs fit without it (none)")
        if self.finetune == "qlora" and self.train_vision:
            raise ConfigError("train: qlora quantises the language model only; train_vision needs lora or full")
        from vlm_depth.train.mdm import mdm_spec

        mdm_spec(self)  # validates the mdm_* keys

    def branch_config(self) -> DepthBranchConfig:
        """The depth-branch part of this config (for a fresh branch)."""
        return pick(DepthBranchConfig, self)
