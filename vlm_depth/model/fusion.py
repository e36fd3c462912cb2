"""DepthFusion: the image-space half of VLM-DC's sparse depth injection. It turns the processor-normalised RGB and
the sparse depth on the processor's grid into O (B, 3, H', W'), which F_e2 (a second patch embedding) embeds and
adds to the native patch tokens.

    depth -> depth_features -> conv3x3 (zero-init for `soft`) + BN + LeakyReLU      = S-hat (depth_channels)
    rgb   -> conv3x3 + BN + LeakyReLU                                           = F-hat (rgb_channels)
    [S-hat, F-hat] -> 2 x (conv3x3 + BN + LeakyReLU) (fusion_channels) -> conv3x3 to 3 (zero-init for `soft`) = O

`soft` (paper default): He init everywhere except the depth conv and the final conv, which start at zero, so O is
exactly 0 at init for any input and the model starts as the base model. `he_init` (ablation): He init everywhere.
`hard_concat` has no fusion module: it widens the patch embedding instead (`vlm_depth.model.patch_embed`).

Receptive field: four 3x3 convs on each path, so an output pixel sees inputs within RECEPTIVE_RADIUS = 4 pixels
(Chebyshev distance). A depth at a 14x14 patch's centre (offset 6 or 7) therefore only changes O inside that patch.

Normalisation: BatchNorm2d as in the paper. In train mode it normalises with statistics over B x H' x W' (fine for a
batch of one image: thousands of pixels per channel, and sparse or all-missing depth only makes a channel constant,
which eps keeps finite); in eval mode it uses running statistics, and only then is O strictly local (batch
statistics couple all pixels). Zero-init identity holds in both modes because the final conv is all zeros. Note that
at step 0 only the final conv receives a gradient (everything else sits behind its zero weights); the rest of the
branch starts moving from the second optimiser step.
"""

from __future__ import annotations

import torch
from torch import nn

from vlm_depth.errors import ConfigError
from vlm_depth.model.branch_config import DepthBranchConfig
from vlm_depth.model.encodings import depth_features, encoded_channels

RECEPTIVE_RADIUS = 4
LEAKY_SLOPE = 0.01


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(LEAKY_SLOPE),
    )


class DepthFusion(nn.Module):
    """Soft fusion of sparse depth with RGB into O, the same size as the processor's resized image."""

    def __init__(self, cfg: DepthBranchConfig):
        super().__init__()
        if cfg.fusion not in ("soft", "he_init"):
            raise ConfigError(f"DepthFusion serves fusion 'soft' and 'he_init', not {cfg.fusion!r}")
        self.cfg = cfg
        self.depth_conv = _conv_block(encoded_channels(cfg), cfg.depth_channels)
        self.rgb_encoder = _conv_block(3, cfg.rgb_channels)
        self.fuse = nn.Sequential(
            _conv_block(cfg.depth_channels + cfg.rgb_channels, cfg.fusion_channels),
            _conv_block(cfg.fusion_channels, cfg.fusion_channels),
        )
        self.out = nn.Conv2d(cfg.fusion_channels, 3, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init for every conv; for `soft`, zero the depth conv and the final conv (weights and bias)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
        if self.cfg.fusion == "soft":
            nn.init.zeros_(self.depth_conv[0].weight)
            nn.init.zeros_(self.out.weight)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """rgb (B, 3, H', W') normalised as the processor does; depth (B, 1, H', W') meters, 0 = missing.

        Returns O (B, 3, H', W') in the module's dtype.
        """
        if rgb.ndim != 4 or rgb.shape[1] != 3 or depth.shape != (rgb.shape[0], 1, *rgb.shape[2:]):
            raise ValueError(
                f"expected rgb (B, 3, H, W) and depth (B, 1, H, W), got {tuple(rgb.shape)} and {tuple(depth.shape)}"
            )
        dtype = self.out.weight.dtype
        s_hat = self.depth_conv(depth_features(depth, self.cfg).to(dtype))
        f_hat = self.rgb_encoder(rgb.to(dtype))
        return self.out(self.fuse(torch.cat([s_hat, f_hat], dim=1)))
