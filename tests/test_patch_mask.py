"""Patch states on 14 and 28 px grids, and the MDM masking policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm_depth.depth import valid_mask
from vlm_depth.model.patch_mask import PatchState, mdm_patch_mask, patch_states

E, M, V = PatchState.EMPTY, PatchState.MIXED, PatchState.VALID


def _hand_made_depth() -> np.ndarray:
    """56 x 56 map, i.e. a 4 x 4 grid of 14 px patches / 2 x 2 grid of 28 px patches, with known coverage."""
    depth = np.zeros((56, 56), dtype=np.float32)

    def patch(r: int, c: int) -> np.ndarray:
        return depth[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14]

    # Row 0 of 14 px patches: full | full but one NaN | empty | one valid pixel.
    patch(0, 0)[:] = 2.0
    patch(0, 1)[:] = 3.0
    patch(0, 1)[5, 7] = np.nan
    patch(0, 3)[13, 13] = 1.0
    # Row 1: full | full | negative (empty) | inf except one pixel.
    patch(1, 0)[:] = 4.0
    patch(1, 1)[:] = 4.5
    patch(1, 2)[:] = -1.0
    patch(1, 3)[:] = np.inf
    patch(1, 3)[0, 0] = 7.0
    # Rows 2-3: bottom-left 28 px patch all empty; bottom-right one full except its last pixel.
    depth[28:, 28:] = 5.0
    depth[55, 55] = 0.0
    return depth


def test_patch_states_match_hand_computed_on_14_px_grid():
    expected = np.array([[V, M, E, M], [V, V, E, M], [E, E, V, V], [E, E, V, M]], dtype=np.int8)
    valid = valid_mask(_hand_made_depth())
    states = patch_states(valid, 14)
    assert states.dtype == np.int8 and states.shape == (4, 4)
    np.testing.assert_array_equal(states, expected)
    np.testing.assert_array_equal(patch_states(torch.from_numpy(valid), 14).numpy(), expected)


def test_patch_states_match_hand_computed_on_28_px_grid():
    expected = np.array([[M, M], [E, M]], dtype=np.int8)
    states = patch_states(valid_mask(_hand_made_depth()), 28)
    np.testing.assert_array_equal(states, expected)


def test_patch_states_batched_equals_per_image():
    valid = np.random.default_rng(0).random((3, 28, 56)) < 0.97
    batched = patch_states(valid, 14)
    assert batched.shape == (3, 2, 4)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], patch_states(valid[i], 14))


@pytest.mark.parametrize("shape,patch", [((56, 50), 14), ((42, 56), 28), ((28, 28), 0)])
def test_patch_states_reject_sizes_not_multiple_of_patch(shape, patch):
    with pytest.raises(ValueError, match="multiple"):
        patch_states(np.ones(shape, dtype=bool), patch)


def _states(n_empty: int, n_mixed: int, n_valid: int, seed: int = 0) -> np.ndarray:
    flat = np.array([E] * n_empty + [M] * n_mixed + [V] * n_valid, dtype=np.int8)
    return np.random.default_rng(seed).permutation(flat).reshape(16, -1)


def test_mdm_ratio_stays_in_range_over_many_draws():
    states = _states(n_empty=26, n_mixed=26, n_valid=204)  # 256 patches, natural masking ~15 %
    rng = np.random.default_rng(1)
    low, high = 0.6, 0.9
    ratios = []
    for _ in range(500):
        masked = mdm_patch_mask(states, rng, mixed_keep_prob=0.5, ratio_range=(low, high))
        assert masked.dtype == bool and masked.shape == states.shape
        assert masked[states == E].all()
        ratios.append(masked.mean())
    ratios = np.array(ratios)
    half_patch = 0.5 / states.size  # the target count is round(ratio * patches)
    assert ratios.min() >= low - half_patch and ratios.max() <= high + half_patch
    assert ratios.min() < low + 0.03 and ratios.max() > high - 0.03  # the whole range is used
    assert abs(ratios.mean() - (low + high) / 2) < 0.02


def test_mdm_keeps_mixed_patches_with_the_configured_probability():
    states = _states(n_empty=0, n_mixed=200, n_valid=56)
    rng = np.random.default_rng(2)
    # A ratio range of (0, 0) adds no valid patch, so only the mixed patches' coin flips are masked.
    kept = [~mdm_patch_mask(states, rng, mixed_keep_prob=0.3, ratio_range=(0.0, 0.0))[states == M] for _ in range(50)]
    assert abs(np.mean(kept) - 0.3) < 0.02
    never = mdm_patch_mask(states, rng, mixed_keep_prob=0.0, ratio_range=(0.0, 0.0))
    assert never[states == M].all() and not never[states == V].any()


def test_mdm_adds_no_valid_patch_when_natural_mask_exceeds_ratio():
    states = _states(n_empty=240, n_mixed=0, n_valid=16)  # 94 % empty > 0.9
    masked = mdm_patch_mask(states, np.random.default_rng(3))
    assert masked[states == E].all() and not masked[states == V].any()


def test_mdm_masks_everything_in_monocular_mode_and_keeps_tensor_type():
    states = torch.from_numpy(_states(n_empty=10, n_mixed=10, n_valid=236))
    masked = mdm_patch_mask(states, np.random.default_rng(4), mask_all=True)
    assert isinstance(masked, torch.Tensor) and masked.dtype == torch.bool and bool(masked.all())


def test_mdm_draws_each_image_of_a_batch_independently():
    states = np.stack([_states(0, 0, 256)] * 8)
    masked = mdm_patch_mask(states, np.random.default_rng(5))
    assert masked.shape == (8, 16, 16)
    assert len({m.tobytes() for m in masked}) == 8
    assert all(0.6 - 1 / 512 <= m.mean() <= 0.9 + 1 / 512 for m in masked)
