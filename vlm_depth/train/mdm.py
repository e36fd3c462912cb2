"""MDM training: LingBot-Depth's masking of the depth patches, the MDM labels, and the MDM losses.

Masking. Patch decisions come from the shared mask module (`vlm_depth.model.patch_mask`: `valid_mask` ->
`patch_states` -> `mdm_patch_mask`), on the depth the depth branch would see (`depth_maps`, the sparse input after
the textualizer's hold-out, on the processor's grid). They are decided on the 14-px grid of the vision tower, not the
28-px merged grid, because depth enters per 14-px patch: F_e2 embeds each patch on its own and the pre-merger token
is that patch, so "masked" means exactly "this patch's depth token carries no depth" (LingBot-Depth masks per
patch-14 ViT token). A masked patch's depth is zeroed before the branch (`mdm_head.hide_patches`), i.e. it becomes
missing depth, the state the branch already knows. "Mask all" is monocular mode. The masking is for the
MDM head only: in joint training the text loss sees the textualizer's shown depth unmasked (the paper's input), so
the vision tower runs twice per image, once per input.

Labels (`mdm_labels`): label-free (`label_source: sparse`) = the held-out input points, the same split the
textualizer makes (so the MDM and the query readouts learn from the same labels); `gt` = every pixel with valid
ground truth. Labels are resized to the processor's grid with the valid-aware resize that never invents values
(`align.resize_depth`) and stored in the layout of `depth_maps` (flat per-image maps), so a batch concatenates them
like the other image fields; `mdm_patch_mask` holds one bool per 14-px patch in the same per-image flat layout.

Losses, on the head's output at the processor's grid, over labelled pixels:
- `l1` (default, LingBot-Depth): |pred - label| in meters.
- `balanced_si`: Vanishing Depth's balanced scale-invariant multi-scale loss. Per image, scale and region:
  SI = mean(d^2) - SI_LAMBDA * mean(d)^2 with d = log pred - log label (Eigen et al.; SI_LAMBDA = 0.5 keeps the
  absolute scale supervised, 1 would leave it free, which a metric readout cannot afford). Balanced: the visible
  (unmasked) and the masked region each get half the weight (a region without labels gives its weight to the
  other), so neither the usually larger masked area nor the reconstruction of visible depth dominates. Multi-scale:
  the log-depths (prediction and labels, per region, valid-weighted) are average-pooled by SI_SCALES and the losses
  averaged over scales. Vanishing Depth supervises several decoder stages; here the scales are pooled copies of
  the one output, which keeps the head's parameters and outputs the same for both losses.
Losses come as (sum, weight) so a trainer can normalise over the global batch: for `l1` the weight is the number of
labelled pixels, for `balanced_si` the number of images with labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError, DataError
from vlm_depth.model.align import processor_grid, resize_depth, split_maps
from vlm_depth.model.mdm_head import hide_patches
from vlm_depth.model.patch_mask import mdm_patch_mask, patch_states

MDM_MODES = ("off", "head_only", "joint")
MDM_SUMS = ("loss_sum", "l1_masked_sum", "n_masked", "l1_visible_sum", "n_visible")  # what a trainer logs
MDM_LOSSES = ("l1", "balanced_si")
SI_LAMBDA = 0.5
SI_SCALES = (1, 2, 4, 8)


@dataclass(frozen=True)
class MDMSpec:
    """LingBot-Depth's masking policy of one image (`vlm_depth.model.patch_mask.mdm_patch_mask`)."""

    mixed_keep_prob: float = 0.5
    ratio_range: tuple[float, float] = (0.6, 0.9)
    mask_all: bool = False
    sparse_labels: Literal["heldout", "masked"] = "heldout"  # label-free labels: see `mdm_fields`


def mdm_spec(cfg) -> MDMSpec | None:
    """The masking spec of a training config (`mdm_mode`, `mdm_loss`, `mdm_mixed_keep_prob`, `mdm_ratio_low`,
    `mdm_ratio_high`), None when `mdm_mode` is off; ConfigError on a bad value."""
    if cfg.mdm_mode not in MDM_MODES:
        raise ConfigError(f"train: mdm_mode must be one of {MDM_MODES}, got {cfg.mdm_mode!r}")
    if cfg.mdm_loss not in MDM_LOSSES:
        raise ConfigError(f"train: mdm_loss must be one of {MDM_LOSSES}, got {cfg.mdm_loss!r}")
    if cfg.mdm_mode == "off":
        return None
    if not 0 <= cfg.mdm_ratio_low <= cfg.mdm_ratio_high <= 1 or not 0 <= cfg.mdm_mixed_keep_prob <= 1:
        raise ConfigError("train: need 0 <= mdm_ratio_low <= mdm_ratio_high <= 1 and mdm_mixed_keep_prob in [0, 1]")
    if cfg.mdm_weight <= 0:
        raise ConfigError(f"train: mdm_weight must be > 0 with mdm_mode {cfg.mdm_mode}, got {cfg.mdm_weight}")
    return MDMSpec(
        cfg.mdm_mixed_keep_prob, (cfg.mdm_ratio_low, cfg.mdm_ratio_high), sparse_labels=cfg.mdm_sparse_labels
    )


def prepare_mdm_model(model, cfg) -> None:
    """Make a DepthVLM ready for `cfg.mdm_mode`: attach a fresh MDM head (from the config's `mdm_*` head fields) if
    the model has none; `head_only` freezes every other weight (the VLM, LoRA adapters and the depth branch), so
    the head is a probe of the visual tokens the checkpoint already has."""
    if cfg.mdm_mode == "off":
        return
    if model.depth_branch.mdm_head is None:
        model.attach_mdm_head(cfg)
    if cfg.mdm_mode == "head_only":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("depth_branch.mdm_head."))


def mdm_labels(
    depth: np.ndarray, shown: np.ndarray, gt: np.ndarray | None, label_source: Literal["sparse", "gt"]
) -> np.ndarray:
    """MDM labels (H, W) float32 meters, 0 = unlabelled. `sparse`: the points of the sparse input `depth` that the
    textualizer held out (valid in `depth`, missing in `shown`); the ground truth is never read. `gt`: valid `gt`."""
    if label_source == "sparse":
        held = valid_mask(depth) & ~valid_mask(shown)
        return np.where(held, depth, 0).astype(np.float32)
    if label_source == "gt":
        if gt is None:
            raise DataError("MDM labels from ground truth (label_source 'gt'), but gt is None")
        return np.where(valid_mask(gt), gt, 0).astype(np.float32)
    raise ConfigError(f"label_source must be 'sparse' or 'gt', got {label_source!r}")


def label_maps(labels: np.ndarray, image_processor) -> torch.Tensor:
    """Labels (H, W) meters -> the image's flat map on the processor's grid (the layout of `depth_maps`)."""
    grid = processor_grid(*labels.shape, image_processor)
    return torch.from_numpy(resize_depth(labels, grid)).flatten()


def draw_patch_mask(
    depth_maps: torch.Tensor,
    image_grid_thw: torch.Tensor,
    rng: np.random.Generator,
    image_processor,
    spec: MDMSpec = MDMSpec(),
) -> torch.Tensor:
    """LingBot-Depth patch mask, one bool per 14-px patch (True = the patch's depth is hidden; each image's patch
    grid flattened row-major, concatenated), for `depth_maps` (meters): per image, `patch_states` of its validity,
    then `mdm_patch_mask` with `rng`."""
    p = image_processor.patch_size
    masks = []
    for depth in split_maps(depth_maps, image_grid_thw, p):
        states = patch_states(valid_mask(depth), p)
        masks.append(mdm_patch_mask(states, rng, spec.mixed_keep_prob, spec.ratio_range, spec.mask_all).flatten())
    return torch.cat(masks)


def mdm_fields(
    depth: np.ndarray,
    shown: np.ndarray,
    gt: np.ndarray | None,
    label_source: Literal["sparse", "gt"],
    inputs,
    rng: np.random.Generator,
    image_processor,
    spec: MDMSpec = MDMSpec(),
) -> dict[str, torch.Tensor]:
    """The MDM keys of one training example: `mdm_labels` (the layout of `depth_maps`) and `mdm_patch_mask`, for the
    processor's output `inputs` of the image with depth `shown` (the textualizer's `shown_depth` of the sparse input
    `depth`); labels per `label_source` (see `mdm_labels`). Label-free with `spec.sparse_labels` `masked`: also every
    valid input point inside a masked patch is a label (the MDM pass never sees it: LingBot-Depth's masked depth
    modelling with the sensor depth as its own target); `heldout`: the textualizer's held-out points only."""
    labels = label_maps(mdm_labels(depth, shown, gt, label_source), image_processor)
    if labels.shape != inputs["depth_maps"].shape:
        raise DataError(
            f"MDM labels of shape {depth.shape} do not fit the image's patch grid; give them at the RGB's size"
        )
    mask = draw_patch_mask(inputs["depth_maps"], inputs["image_grid_thw"], rng, image_processor, spec)
    if label_source == "sparse" and spec.sparse_labels == "masked":
        every = label_maps(np.where(valid_mask(depth), depth, 0).astype(np.float32), image_processor)
        ones = torch.ones_like(every)
        inside = hide_patches(ones, mask, inputs["image_grid_thw"], image_processor.patch_size) == 0
        labels = torch.where(inside, every, labels)
    return {"mdm_labels": labels, "mdm_patch_mask": mask}


def _pool(values: torch.Tensor, weights: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted average pooling of (H, W) values by `scale` (edge cells keep their partial windows)."""
    if scale == 1:
        return values, weights
    pooled_w = F.avg_pool2d(weights[None, None], scale, ceil_mode=True)[0, 0]
    pooled_v = F.avg_pool2d((values * weights)[None, None], scale, ceil_mode=True)[0, 0]
    return pooled_v / pooled_w.clamp(min=1e-12), pooled_w


def _balanced_si(log_pred: torch.Tensor, log_label: torch.Tensor, labelled: torch.Tensor, masked: torch.Tensor):
    """Balanced multi-scale SI loss of one image, or None without labels."""
    regions = [w.float() for w in (labelled & ~masked, labelled & masked) if bool(w.any())]
    if not regions:
        return None
    per_scale = []
    for scale in SI_SCALES:
        losses = []
        for weights in regions:
            pred, w = _pool(log_pred, weights, scale)
            label, _ = _pool(log_label, weights, scale)
            d = (pred - label)[w > 0]
            losses.append((d**2).mean() - SI_LAMBDA * d.mean() ** 2)
        per_scale.append(torch.stack(losses).mean())
    return torch.stack(per_scale).mean()


def mdm_loss(
    preds: Sequence[torch.Tensor],
    label_values: torch.Tensor,
    patch_mask: torch.Tensor,
    image_grid_thw: torch.Tensor,
    image_processor,
    kind: Literal["l1", "balanced_si"] = "l1",
) -> dict[str, torch.Tensor]:
    """MDM loss and metrics of a batch. `preds`: the head's (H', W') maps in meters, one per image (processor's
    grid); `label_values` and `patch_mask` as made by `mdm_fields`.

    Returns sums and weights (fp32 scalars): `loss_sum` / `loss_weight` (see the module docstring), and the L1 in
    meters over labelled pixels in masked patches (`l1_masked_sum`, `n_masked`) and in visible ones (`l1_visible_sum`,
    `n_visible`).
    """
    if kind not in MDM_LOSSES:
        raise ConfigError(f"mdm_loss must be one of {MDM_LOSSES}, got {kind!r}")
    p = image_processor.patch_size
    labels = split_maps(label_values, image_grid_thw, p)
    masks = [m.repeat_interleave(p, 0).repeat_interleave(p, 1) for m in split_maps(patch_mask, image_grid_thw, 1)]
    zero = preds[0].new_zeros((), dtype=torch.float32)
    out = {k: zero.clone() for k in ("loss_sum", "loss_weight", "l1_masked_sum", "n_masked", "l1_visible_sum")}
    out["n_visible"] = zero.clone()
    for pred, label, mask in zip(preds, labels, masks):
        if pred.shape != label.shape:
            raise ValueError(f"MDM prediction {tuple(pred.shape)} is not on the label grid {tuple(label.shape)}")
        pred, label = pred.float(), label.to(pred.device)
        labelled, masked = valid_mask(label), mask.to(pred.device)
        err = (pred - label).abs()
        for name, region in (("masked", labelled & masked), ("visible", labelled & ~masked)):
            out[f"l1_{name}_sum"] = out[f"l1_{name}_sum"] + err[region].detach().sum()
            out[f"n_{name}"] = out[f"n_{name}"] + region.sum()
        if kind == "l1":
            out["loss_sum"] = out["loss_sum"] + err[labelled].sum()
            out["loss_weight"] = out["loss_weight"] + labelled.sum()
        else:
            safe = torch.where(labelled, label, torch.ones_like(label))
            loss = _balanced_si(pred.log(), safe.log(), labelled, masked)
            if loss is not None:
                out["loss_sum"] = out["loss_sum"] + loss
                out["loss_weight"] = out["loss_weight"] + 1
    return out


def mdm_predictions(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The MDM head's (H', W') depth maps (meters, processor's grid) for a batch with `pixel_values`,
    `image_grid_thw`, `depth_maps` and `mdm_patch_mask` (the batch's masked patches are hidden from the branch)."""
    return model.mdm_depth(
        batch["pixel_values"], batch["image_grid_thw"], batch["depth_maps"], patch_mask=batch["mdm_patch_mask"]
    )


def batch_mdm_loss(
    preds: Sequence[torch.Tensor], batch: dict[str, torch.Tensor], image_processor, kind: str = "l1"
) -> dict[str, torch.Tensor]:
    """`mdm_loss` of `mdm_predictions` against the batch's `mdm_labels` and `mdm_patch_mask`."""
    return mdm_loss(
        preds, batch["mdm_labels"], batch["mdm_patch_mask"], batch["image_grid_thw"], image_processor, kind
    )


def mdm_log_row(sums: Sequence[float], loss_weight: float) -> dict[str, float]:
    """Log entries from the `MDM_SUMS` of a step (summed over the global batch) and its global loss weight: the
    loss, and the L1 in meters over labelled pixels of masked and of visible patches."""
    values = dict(zip(MDM_SUMS, sums))
    return {
        "mdm_loss": values["loss_sum"] / max(loss_weight, 1.0),
        "mdm_l1_masked": values["l1_masked_sum"] / max(values["n_masked"], 1.0),
        "mdm_l1_visible": values["l1_visible_sum"] / max(values["n_visible"], 1.0),
    }


def mdm_loss_weight(batch: dict[str, torch.Tensor], image_processor, kind: str = "l1") -> int:
    """The `loss_weight` that `batch_mdm_loss` will return, from the labels alone (a trainer normalises by its
    global sum before the forward): labelled pixels (`l1`) or images with a label (`balanced_si`)."""
    labelled = valid_mask(batch["mdm_labels"])
    if kind == "l1":
        return int(labelled.sum())
    return sum(int(m.any()) for m in split_maps(labelled, batch["image_grid_thw"], image_processor.patch_size))


@torch.no_grad()
def validate_mdm(model, batches: Sequence[dict[str, torch.Tensor]], image_processor, kind: str = "l1") -> dict:
    """MDM validation on held-out batches (made with fixed masks): the loss and the L1 in meters over labelled
    pixels of masked and of visible patches."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(MDM_SUMS, 0.0)
    weight = 0.0
    try:
        for batch in batches:
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out = batch_mdm_loss(mdm_predictions(model, batch), batch, image_processor, kind)
            weight += float(out["loss_weight"])
            for key in MDM_SUMS:
                sums[key] += float(out[key])
    finally:
        model.train(was_training)
    return {f"val_{k}": v for k, v in mdm_log_row(list(sums.values()), weight).items()}
