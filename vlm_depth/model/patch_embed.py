"""F_e2: a second patch embedding for the depth branch, wrapped around Qwen2.5-VL's own (PEFT style).

The vision tower calls `patch_embed(pixel_values)` internally, so the depth-branch patches cannot be passed as an
argument; `DepthPatchEmbed.injecting(patches)` hands them to the wrapper for the duration of one vision-tower call.
Outside that context the wrapper is exactly the original module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from vlm_depth.errors import ModelError


class DepthPatchEmbed(nn.Module):
    """`E = F_e1(I) + F_e2(X)`: the native patch embedding `base_layer` (F_e1) of the pixel patches plus F_e2 of
    the depth-branch patches X, row by row (row i of X lies on row i of `pixel_values`).

    `init`: `copy` (F_e2 is a trainable copy of the native Conv3d; X has the native channels), `shared` (F_e2 is the
    native Conv3d itself) or `zero` (F_e2 has `in_channels` input channels and zero weights: the extra input channels
    of a widened patch embedding, for `hard_concat`).
    """

    def __init__(self, base_layer: nn.Module, init: Literal["copy", "shared", "zero"], in_channels: int | None = None):
        super().__init__()
        self.base_layer = base_layer
        native: nn.Conv3d = base_layer.proj
        self.init = init
        self._patches: torch.Tensor | None = None
        if init == "shared":
            self.depth_proj = None
            return
        if init not in ("copy", "zero"):
            raise ModelError(f"unknown patch-embedding init {init!r}; choose copy, shared or zero")
        channels = native.in_channels if init == "copy" else in_channels
        if channels is None:
            raise ModelError("a zero-initialised F_e2 needs `in_channels`")
        self.depth_proj = nn.Conv3d(
            channels,
            native.out_channels,
            kernel_size=native.kernel_size,
            stride=native.stride,
            bias=False,
            device=native.weight.device,
            dtype=torch.float32,  # the depth branch stays in full precision, whatever the backbone's dtype
        )
        with torch.no_grad():
            if init == "copy":
                self.depth_proj.weight.copy_(native.weight)
            else:
                self.depth_proj.weight.zero_()

    @property
    def proj(self) -> nn.Conv3d:
        """The Conv3d that embeds the depth-branch patches."""
        return self.base_layer.proj if self.depth_proj is None else self.depth_proj

    def embed_depth(self, patches: torch.Tensor) -> torch.Tensor:
        """F_e2 of depth-branch patches (N, C * temporal_patch_size * 14 * 14) -> (N, embed_dim)."""
        proj = self.proj
        t, p, _ = proj.kernel_size
        x = patches.reshape(-1, proj.in_channels, t, p, p).to(proj.weight.dtype)
        return proj(x).reshape(-1, proj.out_channels)

    @contextmanager
    def injecting(self, patches: torch.Tensor | None) -> Iterator[None]:
        """Add F_e2(`patches`) to every patch-embedding call made inside the block (`None`: add nothing)."""
        if self._patches is not None:
            raise ModelError("depth patches are already being injected (nested vision-tower call)")
        self._patches = patches
        try:
            yield
        finally:
            self._patches = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(hidden_states)
        if self._patches is None:
            return out
        if self._patches.shape[0] != out.shape[0]:
            raise ModelError(
                f"depth patches ({self._patches.shape[0]} rows) do not match the pixel patches ({out.shape[0]} rows)"
            )
        return out + self.embed_depth(self._patches).to(out.dtype)


def wrap_patch_embed(
    visual: nn.Module, init: Literal["copy", "shared", "zero"], in_channels: int | None = None
) -> DepthPatchEmbed:
    """Replace `visual.patch_embed` (Qwen2.5-VL vision tower) by a `DepthPatchEmbed` around it; returns the wrapper."""
    if isinstance(visual.patch_embed, DepthPatchEmbed):
        raise ModelError("the vision tower's patch embedding is already wrapped")
    wrapper = DepthPatchEmbed(visual.patch_embed, init, in_channels)
    visual.patch_embed = wrapper
    return wrapper
