"""Depth encodings and the DepthFusion block: finite features, missing depth as its own state, exact zero output at
init for `soft`, a real signal for `he_init`, a small receptive field, and a branch that trains."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_depth.errors import ConfigError
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.encodings import depth_features, encoded_channels
from vlm_depth.model.fusion import RECEPTIVE_RADIUS, DepthFusion

ENCODINGS = ["metric", "inverse", "log", "pde"]


def _inputs(batch: int = 2, height: int = 48, width: int = 64, density: float = 0.05, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.randn(batch, 3, height, width, generator=gen)
    depth = torch.rand(batch, 1, height, width, generator=gen) * 50 + 0.1
    depth[torch.rand(batch, 1, height, width, generator=gen) > density] = 0
    return rgb, depth


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_is_finite_from_0_1_to_300_m_and_for_all_missing(encoding):
    cfg = DepthBranchConfig(depth_encoding=encoding)
    depth = torch.logspace(math.log10(0.1), math.log10(300.0), 1000).reshape(1, 1, 20, 50)
    features = depth_features(depth, cfg)
    assert features.shape == (1, encoded_channels(cfg), 20, 50)
    assert torch.isfinite(features).all()
    assert (features[:, 0] == 1).all()
    missing = depth_features(torch.zeros(2, 1, 8, 8), cfg)
    assert torch.isfinite(missing).all() and not missing.any()


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_missing_depth_is_a_state_of_its_own_never_zero_meters(encoding):
    cfg = DepthBranchConfig(depth_encoding=encoding)
    depth = torch.tensor([0.0, float("nan"), float("inf"), -2.0, 0.5, 5.0]).reshape(1, 1, 1, 6)
    features = depth_features(depth, cfg)[0, :, 0]  # (C, 6)
    assert torch.equal(features[0], torch.tensor([0.0, 0, 0, 0, 1, 1]))
    assert not features[:, :4].any()
    assert not torch.equal(features[:, 4], features[:, 5])


def test_encodings_follow_their_documented_formulas():
    depth = torch.tensor([0.1, 2.0, 80.0, 300.0]).reshape(1, 1, 1, 4)
    metric = depth_features(depth, DepthBranchConfig(depth_encoding="metric", max_depth=80.0))[0, 1, 0]
    inverse = depth_features(depth, DepthBranchConfig(depth_encoding="inverse"))[0, 1, 0]
    log = depth_features(depth, DepthBranchConfig(depth_encoding="log", max_depth=80.0))[0, 1, 0]
    assert torch.allclose(metric, torch.tensor([0.1, 2.0, 80.0, 300.0]) / 80)
    assert torch.allclose(inverse, torch.tensor([10.0, 0.5, 1 / 80, 1 / 300]))
    assert torch.allclose(log, torch.log(torch.tensor([0.1, 2.0, 80.0, 300.0])) / math.log(81.0))
    pde = depth_features(depth, DepthBranchConfig(depth_encoding="pde", pde_channels=8, max_depth=80.0))[0, :, 0]
    freqs = torch.tensor([10000.0 ** (k / 3) for k in range(4)], dtype=torch.float64) / 80.0
    angles = torch.tensor([0.1, 2.0, 80.0, 300.0], dtype=torch.float64)[None] * freqs[:, None]
    # float32 angles up to 37500 rad carry rounding of about 37500 * 6e-8 = 2e-3 rad.
    assert torch.allclose(pde[1:5].double(), torch.sin(angles), rtol=0, atol=3e-3)
    assert torch.allclose(pde[5:9].double(), torch.cos(angles), rtol=0, atol=3e-3)


def test_pde_separates_nearby_depths_and_stays_bounded():
    cfg = DepthBranchConfig(depth_encoding="pde", pde_channels=32, max_depth=80.0)
    depth = torch.tensor([5.00, 5.02, 60.0, 60.02, 250.0]).reshape(1, 1, 1, 5)
    features = depth_features(depth, cfg)[0, 1:, 0]
    assert features.abs().max() <= 1
    assert (features[:, 0] - features[:, 1]).norm() > 0.5  # 2 cm apart
    assert (features[:, 2] - features[:, 3]).norm() > 0.5


def test_odd_pde_channels_is_a_config_error():
    with pytest.raises(ConfigError):
        encoded_channels(DepthBranchConfig(depth_encoding="pde", pde_channels=7))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch, density", [(1, 0.01), (2, 0.3), (1, 0.0)])
def test_soft_fusion_output_is_exactly_zero_at_init(train, batch, density):
    torch.manual_seed(0)
    fusion = DepthFusion(DepthBranchConfig(fusion="soft")).train(train)
    rgb, depth = _inputs(batch=batch, density=density, seed=batch)
    out = fusion(rgb, depth)
    assert out.shape == rgb.shape
    assert torch.equal(out, torch.zeros_like(out))


def test_he_init_fusion_output_is_nonzero_and_depends_on_depth():
    torch.manual_seed(0)
    fusion = DepthFusion(DepthBranchConfig(fusion="he_init")).eval()
    rgb, depth = _inputs(batch=1, density=0.1)
    out = fusion(rgb, depth)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3
    assert not torch.allclose(out, fusion(rgb, torch.zeros_like(depth)))


def test_hard_concat_has_no_fusion_module():
    with pytest.raises(ConfigError):
        DepthFusion(DepthBranchConfig(fusion="hard_concat"))


def test_a_depth_changes_output_only_within_the_receptive_radius():
    torch.manual_seed(0)
    fusion = DepthFusion(DepthBranchConfig(fusion="he_init")).eval()
    rgb, depth = _inputs(batch=1, height=28, width=56, density=0.0)
    y, x = 7, 21  # centre of the patch in row 0, column 1 of the 14x14 grid
    dotted = depth.clone()
    dotted[0, 0, y, x] = 3.0
    with torch.no_grad():
        changed = (fusion(rgb, dotted) - fusion(rgb, depth)).abs().amax(dim=(0, 1)) > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert rows.numel() > 0
    assert (rows - y).abs().max() == RECEPTIVE_RADIUS and (cols - x).abs().max() == RECEPTIVE_RADIUS
    assert rows.min() >= 0 and rows.max() < 14 and cols.min() >= 14 and cols.max() < 28  # inside its patch


def test_every_soft_branch_parameter_trains_within_three_steps():
    torch.manual_seed(0)
    fusion = DepthFusion(DepthBranchConfig(fusion="soft")).train()
    before = {name: p.detach().clone() for name, p in fusion.named_parameters()}
    optimiser = torch.optim.Adam(fusion.parameters(), lr=1e-2)
    rgb, depth = _inputs(batch=2, density=0.2)
    target = torch.randn_like(rgb)
    for _ in range(3):
        optimiser.zero_grad()
        torch.nn.functional.mse_loss(fusion(rgb, depth), target).backward()
        optimiser.step()
    unchanged = [name for name, p in fusion.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
