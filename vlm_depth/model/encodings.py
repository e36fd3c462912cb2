"""Depth encodings for the depth branch: validity mask + one of `metric`, `inverse`, `log`, `pde`.

Scalar encodings: `metric` = depth / max_depth, `inverse` = 1 m / depth, `log` = ln(depth / 1 m) / ln(1 + max_depth)
(so about 1 at max_depth); `inverse` and `log` clamp depth to >= 1 cm first.

A missing pixel (0, negative or non-finite depth) is its own state: mask channel 0 and every encoding channel 0.
A valid pixel has mask 1; its encoding channels are never all zero for `pde` (cos terms), and for the scalar
encodings the mask channel alone tells "missing" from any measured value, so missing never reads as "0 meters".

`pde` is Vanishing Depth's positional depth encoding (Koch et al., 2025): depth treated like a transformer position,
`pde_channels / 2` geometric frequencies, a sin and a cos channel each. It is bounded in [-1, 1] for any depth, so
unbounded metric depth lands in a bounded feature space; `max_depth` sets the longest wavelength
(angle_k = depth / max_depth * 10000 ** (k / (K - 1)), k = 0..K-1), so the slowest pair is injective up to
pi * max_depth and the fastest resolves about max_depth / 10000 (8 mm at 80 m).
"""

from __future__ import annotations

import math

import torch

from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError
from vlm_depth.model.branch_config import DepthBranchConfig

PDE_TEMPERATURE = 10000.0
# Valid depth is clamped from below for `inverse`/`log` so a stray 1e-30 m cannot overflow float32.
MIN_DEPTH = 0.01


def encoded_channels(cfg: DepthBranchConfig) -> int:
    """Channels of `depth_features`'s output: 1 validity mask + the encoding's channels."""
    if cfg.depth_encoding == "pde":
        if cfg.pde_channels < 2 or cfg.pde_channels % 2:
            raise ConfigError(f"pde_channels must be an even number >= 2, got {cfg.pde_channels}")
        return 1 + cfg.pde_channels
    if cfg.depth_encoding in ("metric", "inverse", "log"):
        return 2
    raise ConfigError(f"unknown depth_encoding {cfg.depth_encoding!r}; choose metric, inverse, log or pde")


def depth_features(depth: torch.Tensor, cfg: DepthBranchConfig) -> torch.Tensor:
    """Encode sparse depth (B, 1, H, W) float meters, 0 / non-finite = missing, into (B, C, H, W) float32 features.

    Channel 0 is the validity mask (1 valid, 0 missing); channels 1.. are the encoding (`cfg.depth_encoding`),
    zero at missing pixels. C = `encoded_channels(cfg)`. Finite for any input (including NaN/inf/all-missing).
    """
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be (B, 1, H, W), got {tuple(depth.shape)}")
    if cfg.max_depth <= 0:
        raise ConfigError(f"max_depth must be positive, got {cfg.max_depth}")
    channels = encoded_channels(cfg)
    depth = depth.float()
    valid = valid_mask(depth)
    mask = valid.float()
    # Computing on a safe stand-in at missing pixels keeps NaN/inf out of values and gradients alike.
    safe = torch.where(valid, depth, torch.ones_like(depth))
    if cfg.depth_encoding == "metric":
        feats = safe / cfg.max_depth
    elif cfg.depth_encoding == "inverse":
        feats = 1.0 / safe.clamp(min=MIN_DEPTH)
    elif cfg.depth_encoding == "log":
        feats = torch.log(safe.clamp(min=MIN_DEPTH)) / math.log1p(cfg.max_depth)
    else:
        num_freqs = (channels - 1) // 2
        exponents = torch.arange(num_freqs, dtype=torch.float32, device=depth.device) / max(num_freqs - 1, 1)
        freqs = PDE_TEMPERATURE**exponents / cfg.max_depth  # (K,) radians per meter
        angles = safe * freqs.view(1, -1, 1, 1)  # (B, K, H, W)
        feats = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.cat([mask, feats * mask], dim=1)
