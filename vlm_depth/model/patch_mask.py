"""Patch-level depth coverage and LingBot-Depth's masked-depth-modelling (MDM) policy on the vision tower's grid.

Depth enters the vision tower per 14-px patch, so a patch is the unit of an MDM mask decision: `patch_states` says
whether a patch's depth is EMPTY, MIXED or VALID (from `vlm_depth.depth.valid_mask` on the processor's grid), and
`mdm_patch_mask` draws which patches hide their depth. Used by the training collator and the MDM head.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

from vlm_depth.depth import Array


class PatchState(IntEnum):
    """Depth coverage of one image patch."""

    EMPTY = 0  # no valid pixel
    MIXED = 1  # some valid pixels
    VALID = 2  # every pixel valid


def patch_states(valid: Array, patch: int) -> Array:
    """Per-patch `PatchState` of a validity mask `valid` (..., H, W) on a `patch`-pixel grid (e.g. 14 or 28).

    Returns (..., H // patch, W // patch) int8 of the input's type. H and W must be multiples of `patch`
    (resize to the processor's grid first); anything else raises ValueError rather than silently cropping.
    """
    *lead, height, width = valid.shape
    if patch <= 0 or height % patch or width % patch:
        raise ValueError(f"mask of size {height}x{width} is not a multiple of the patch size {patch}")
    grid = (*lead, height // patch, patch, width // patch, patch)
    if isinstance(valid, torch.Tensor):
        counts = valid.reshape(grid).to(torch.int32).sum(dim=(-3, -1))
        states = torch.full_like(counts, PatchState.MIXED, dtype=torch.int8)
    else:
        counts = np.asarray(valid, dtype=bool).reshape(grid).sum(axis=(-3, -1))
        states = np.full(counts.shape, PatchState.MIXED, dtype=np.int8)
    states[counts == 0] = PatchState.EMPTY
    states[counts == patch * patch] = PatchState.VALID
    return states


def mdm_patch_mask(
    states: Array,
    rng: np.random.Generator,
    mixed_keep_prob: float = 0.5,
    ratio_range: tuple[float, float] = (0.6, 0.9),
    mask_all: bool = False,
) -> Array:
    """LingBot-Depth's masked-depth-modeling policy on patch states (..., h, w); True = the depth token is masked.

    Per image (the leading dimensions are independent images):
    1. EMPTY patches are always masked (the sensor's natural mask);
    2. each MIXED patch is kept with probability `mixed_keep_prob`, otherwise masked;
    3. a ratio r ~ U(ratio_range) is drawn. "Ratio" is the share of *all* patches of the image that end up masked:
       if steps 1-2 masked fewer than round(r * h * w) patches, random VALID patches are masked until that count is
       reached (or the valid patches run out); if they already masked more, no valid patch is masked (the natural
       mask is never undone, so the ratio can exceed the range on images with large holes).
    `mask_all=True` masks everything (monocular mode). Returns a bool array of the input's type and shape.
    """
    low, high = ratio_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= low <= high <= 1, got {ratio_range}")
    if not 0.0 <= mixed_keep_prob <= 1.0:
        raise ValueError(f"mixed_keep_prob must be in [0, 1], got {mixed_keep_prob}")
    as_torch = isinstance(states, torch.Tensor)
    values = states.detach().cpu().numpy() if as_torch else np.asarray(states)
    if mask_all:
        masked = np.ones(values.shape, dtype=bool)
    else:
        flat = values.reshape(-1, values.shape[-2] * values.shape[-1])
        masked = np.stack([_mdm_one(row, rng, mixed_keep_prob, low, high) for row in flat]).reshape(values.shape)
    return torch.from_numpy(masked).to(states.device) if as_torch else masked


def _mdm_one(states: np.ndarray, rng: np.random.Generator, keep_prob: float, low: float, high: float) -> np.ndarray:
    masked = states == PatchState.EMPTY
    mixed = np.flatnonzero(states == PatchState.MIXED)
    masked[mixed] = rng.random(mixed.size) >= keep_prob
    target = round(rng.uniform(low, high) * states.size)
    missing = target - int(masked.sum())
    if missing > 0:
        valid = np.flatnonzero(states == PatchState.VALID)
        masked[rng.permutation(valid)[:missing]] = True
    return masked
