"""MDM head with a full-resolution stage (`mdm_pyramid`): the depth pyramid, the pyramid mixture output and its taps,
save/load, the zero-initialised branch, and the label-free `masked` labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlm_depth.errors import ConfigError
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.mdm_head import MDMHead, depth_pyramid, hide_patches
from vlm_depth.train.mdm import MDMSpec, label_maps, mdm_fields

HEAD = dict(mdm_head=True, mdm_width=32, mdm_levels=2, mdm_blocks=1, mdm_fullres_width=16, mdm_pyramid=4)


def _rgb_depth(seed: int, height: int, width: int, density: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    depth = np.where(rng.random((height, width)) < density, rng.uniform(0.5, 20.0, (height, width)), 0)
    return rgb, depth.astype(np.float32)


def test_depth_pyramid_holds_valid_weighted_log_means_and_valid_shares():
    depth = torch.zeros(1, 1, 8, 8)
    depth[0, 0, 0, 0] = 2.0
    depth[0, 0, 0, 1] = 8.0  # the top-left 2 x 2 cell: two valid pixels of four
    depth[0, 0, 6, 6] = 5.0
    pyr = depth_pyramid(depth, 3, center=1.0)
    assert pyr.shape == (1, 6, 8, 8)
    # scale 1: log depth - center at valid pixels, share 1; 0 and 0 elsewhere
    assert pyr[0, 0, 0, 0].item() == pytest.approx(math.log(2.0) - 1.0)
    assert pyr[0, 1, 0, 0].item() == 1.0 and pyr[0, 0, 3, 3].item() == 0.0 and pyr[0, 1, 3, 3].item() == 0.0
    # coarser scales: the valid-weighted mean (geometric mean of 2 and 8 is 4) is exact inside a single cell's reach
    assert pyr[0, 2, 0, 0].item() == pytest.approx(math.log(4.0) - 1.0, abs=1e-6)
    assert 0 < pyr[0, 3, 0, 0].item() <= 0.5
    # the top-right corner is beyond the reach of the 4 x 4 cell with depth: mean 0 and share 0; finite everywhere
    assert pyr[0, 4, 0, 7].item() == 0.0 and pyr[0, 5, 0, 7].item() == 0.0
    assert torch.isfinite(pyr).all()
    # no depth at all: all zeros
    assert torch.equal(depth_pyramid(torch.zeros(1, 1, 8, 8), 3), torch.zeros(1, 6, 8, 8))


def test_fresh_pyramid_mix_head_is_the_plain_mean_of_prior_and_supported_scales():
    torch.manual_seed(0)
    head = MDMHead(16, width=8, levels=1, init_depth=10.0, pyramid=3, fullres_width=8, pyramid_mix=True)
    depth = torch.zeros(1, 1, 12, 16)
    depth[..., :8] = 4.0  # the left half has depth
    out = head(torch.randn(1, 16, 3, 4), (12, 16), head.pyramid_of(depth))
    # far from any depth (right edge): only the prior slot has support -> init_depth
    assert out[0, 6, 15].item() == pytest.approx(10.0, rel=1e-4)
    # on the valid half, away from its edge: prior and all three scales (each log 4) mix uniformly
    expected = math.exp((math.log(10.0) + 3 * math.log(4.0)) / 4)
    assert out[0, 6, 2].item() == pytest.approx(expected, rel=1e-4)
    # monocular (no depth): the prior everywhere
    mono = head(torch.randn(1, 16, 3, 4), (12, 16), head.pyramid_of(torch.zeros(1, 1, 12, 16)))
    torch.testing.assert_close(mono, torch.full_like(mono, 10.0))
    with pytest.raises(ValueError, match="pyramid"):
        head(torch.randn(1, 16, 3, 4), (12, 16))


@pytest.mark.parametrize("pyramid,mix,taps", [(4, True, 9), (4, False, 1), (0, False, 1)])
def test_pyramid_head_shapes_save_load_and_zero_init_identity(tiny_ckpt, tmp_path, pyramid, mix, taps):
    from vlm_depth.model.depth_vlm import DepthVLM
    from vlm_depth.model.processor import DepthProcessor

    processor = DepthProcessor.from_pretrained(tiny_ckpt)
    torch.manual_seed(0)
    cfg = DepthBranchConfig(**{**HEAD, "mdm_pyramid": pyramid}, mdm_pyramid_mix=mix, mdm_pyramid_taps=taps)
    model = DepthVLM.from_pretrained(tiny_ckpt, depth_cfg=cfg).eval()
    with torch.no_grad():  # away from the init, as after training
        for param in model.mdm_head.parameters():
            param.add_(0.02 * torch.randn_like(param))
    samples = [_rgb_depth(1, 48, 64), _rgb_depth(2, 90, 120)]
    inputs = processor(rgb=[s[0] for s in samples], depth=[s[1] for s in samples])
    args = (inputs["pixel_values"], inputs["image_grid_thw"], inputs["depth_maps"])
    sizes = [(48, 64), (90, 120)]
    with torch.no_grad():
        depth = model.mdm_depth(*args, out_sizes=sizes)
        mono = model.mdm_depth(*args[:2], out_sizes=sizes)  # no depth at all
        # the soft branch stays zero-initialised: the visual features equal the base model's
        base = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
        torch.testing.assert_close(model.encode_images(*args), base, rtol=0, atol=0)
    for d, m, size in zip(depth, mono, sizes):
        assert d.shape == m.shape == size and torch.isfinite(d).all() and (d > 0).all() and (m > 0).all()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DepthVLM.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.depth_cfg == model.depth_cfg
    with torch.no_grad():
        again = loaded.mdm_depth(*args, out_sizes=sizes)
    for a, b in zip(depth, again):
        assert torch.equal(a, b)


def test_a_pyramid_head_attached_later_keeps_its_fields(tiny_ckpt):
    from vlm_depth.model.depth_vlm import DepthVLM

    plain = DepthVLM.from_pretrained(tiny_ckpt)
    plain.attach_mdm_head(DepthBranchConfig(**HEAD, mdm_pyramid_mix=True, mdm_pyramid_taps=25))
    cfg = plain.depth_cfg
    assert (cfg.mdm_pyramid, cfg.mdm_fullres_width, cfg.mdm_pyramid_mix, cfg.mdm_pyramid_taps) == (4, 16, True, 25)
    assert plain.mdm_head.output.out_channels == 2 + 4 * 25


def test_masked_sparse_labels_add_the_input_inside_masked_patches_only(tiny_ckpt):
    from vlm_depth.model.processor import DepthProcessor

    processor = DepthProcessor.from_pretrained(tiny_ckpt)
    ip = processor.image_processor
    rgb, depth = _rgb_depth(3, 56, 84, density=0.6)  # the processor's grid: no resize
    shown = depth.copy()
    shown[::5] = 0  # "held out" rows
    inputs = processor(rgb=rgb, depth=shown)

    class Poisoned:
        def __getattr__(self, name):
            raise AssertionError("ground truth was read")

    heldout = mdm_fields(depth, shown, Poisoned(), "sparse", inputs, np.random.default_rng(0), ip, MDMSpec())
    masked = mdm_fields(
        depth, shown, Poisoned(), "sparse", inputs, np.random.default_rng(0), ip, MDMSpec(sparse_labels="masked")
    )
    patches = masked["mdm_patch_mask"]
    assert torch.equal(patches, heldout["mdm_patch_mask"]) and patches.any() and not patches.all()
    every = label_maps(depth, ip)
    mask = hide_patches(torch.ones_like(every), patches, inputs["image_grid_thw"], ip.patch_size) == 0  # pixels
    assert torch.equal(masked["mdm_labels"][mask], every[mask])  # masked patches: every input point
    assert torch.equal(masked["mdm_labels"][~mask], heldout["mdm_labels"][~mask])  # visible: held-out points only
    assert (masked["mdm_labels"][mask] > 0).any() and (heldout["mdm_labels"][mask] == 0).any()


def test_cell_taps_shift_each_scale_by_whole_cells_with_zero_outside():
    from vlm_depth.model.mdm_head import _cell_taps

    x = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(1, 2, 6, 6)
    taps = _cell_taps(x, radius=1)
    assert taps.shape == (1, 18, 6, 6)
    # scale 0 (1 px), order (dy, dx) row-major: tap 0 = one pixel up-left, tap 4 = the pixel, tap 8 = down-right
    assert taps[0, 0, 2, 2] == x[0, 0, 1, 1] and taps[0, 4, 2, 2] == x[0, 0, 2, 2]
    assert taps[0, 8, 2, 2] == x[0, 0, 3, 3]
    # scale 1 (2 px cells): shifted by 2 px; beyond the border: 0
    assert taps[0, 9 + 0, 2, 2] == x[0, 1, 0, 0] and taps[0, 9 + 8, 2, 2] == x[0, 1, 4, 4]
    assert taps[0, 9 + 0, 1, 1] == 0 and taps[0, 9 + 8, 5, 5] == 0
    assert _cell_taps(x, radius=2).shape == (1, 50, 6, 6)


@pytest.mark.parametrize("taps", [9, 25])
def test_fresh_multi_tap_mix_head_is_finite_and_the_prior_far_from_depth(taps):
    torch.manual_seed(0)
    head = MDMHead(
        16, width=8, levels=1, init_depth=10.0, pyramid=3, fullres_width=8, pyramid_mix=True, pyramid_taps=taps
    )
    assert head.output.out_channels == 2 + 3 * taps
    depth = torch.zeros(1, 1, 12, 32)
    depth[..., :4] = 4.0
    out = head(torch.randn(1, 16, 3, 8), (12, 32), head.pyramid_of(depth))
    assert torch.isfinite(out).all() and (out > 0).all()
    assert out[0, 6, 31].item() == pytest.approx(10.0, rel=1e-4)  # no tap of any scale reaches depth: the prior
    assert out[0, 6, 1].item() < 10.0  # next to depth: pulled towards 4 m
    with pytest.raises(ConfigError, match="pyramid_taps"):
        MDMHead(16, pyramid=3, pyramid_mix=True, pyramid_taps=4)
    with pytest.raises(ConfigError, match="pyramid_mix"):
        MDMHead(16, pyramid=0, pyramid_mix=True)
