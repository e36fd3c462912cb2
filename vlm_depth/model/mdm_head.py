"""MDM head: LingBot-Depth's masked-depth-modelling readout, a ConvStack decoder on Qwen2.5-VL's visual tokens that
turns one vision-tower pass into a dense metric depth map (`--readout mdm`), next to the pixel-query readout.

Tokens (`mdm_tokens`): `pre_merger` (default) takes the vision tower's last hidden states, one token per 14-px patch,
before the 2x2 patch merger; `post_merger` takes the merged tokens (one per 28-px cell, the LLM's input space).
Pre-merger is the default because (1) it has twice the spatial resolution, which a dense readout needs at depth
edges, and it is what LingBot-Depth's ConvStack reads (patch-14 ViT tokens); (2) one token is exactly one MDM mask
decision, since depth enters per 14-px patch (F_e2 embeds each patch on its own), so masked and visible patches
map 1:1 to tokens; (3) the merger's MLP folds four patches into one vector made for the language model, which a
dense decoder would have to unfold again; (4) the input is narrower (1280 vs 2048 channels for the 3B model).
`post_merger` is offered for comparison; its gradients (joint training) also reach the merger.

Pre-merger order: the vision tower permutes 2x2 merge groups into attention windows and only un-permutes the merged
output, so its `last_hidden_state` is in window order. `processor_order` un-permutes it with the same window index
(`transformers.vision_utils.get_vision_window_index`), giving rows in the processor's patch order (tested: the
merger applied to them reproduces the tower's own merged output).

Decoder (after MoGe / LingBot-Depth's ConvStack): LayerNorm on the tokens; the image's mean token is added to every
token (a CLS-like global token broadcast); tokens are reshaped to the (h, w) patch grid; a 1x1 conv (with the UV
encoding concatenated) to `width` channels; `levels` x [transposed-conv 2x upsampling + 3x3 conv, UV encoding of
the new scale added through a 1x1 conv, `blocks` residual conv blocks], halving the width each time (>= 32); a 1x1
conv to log-depth, bilinear upsampling (in log space) to the requested size, and `exp`: depth is positive by
construction, and finite since log-depth is clamped to [1 mm, 10 km]; the clamp passes gradients straight through,
so a prediction pushed beyond the range by a large step is still pulled back by the loss. UV encoding: view-plane
coordinates of the cell centres with the half-diagonal at 1 (MoGe's `normalized_view_plane_uv`), so the head knows
position and aspect.
Group norms (no batch statistics): an image's output does not depend on the other images of its batch.

Full-resolution stage (`mdm_pyramid` N > 0). The token path alone sees depth only through F_e2's 14-px patch
embedding, so the head cannot place depth more finely than the token grid. This stage reads the sparse input itself
at the processor's grid, as a parameter-free *depth pyramid* (`depth_pyramid`: per cell of 1, 2, ... 2^(N-1) px the
valid-weighted mean of log-depth and the valid share, normalised-convolution style), concatenated with the UV
encoding, projected by a 1x1 conv and merged (3x3 conv) with the token path's features bilinearly upsampled to the
same grid, then `fullres_blocks` residual blocks and the output conv. With `mdm_pyramid_mix` the output conv gives a
residual and one logit per *slot*: a prior (log init_depth) and each scale's mean at the pixel's cell and, with
`mdm_pyramid_taps` 9 or 25, at the cells up to 1 or 2 cells away in every direction; log-depth = log init_depth +
softmax over the slots that have depth (the prior always has) of the slot values + residual. The output conv is
zero-initialised, so the untrained head gives the plain mean of its available slots; the learned part is where to
take depth from (which scale, which side of a hole) and the correction. Valid input pixels are returned unchanged by
the readouts anyway; the stage matters for the holes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlm_depth.depth import valid_mask
from vlm_depth.errors import ConfigError
from vlm_depth.model.align import split_maps

TOKENS = ("pre_merger", "post_merger")
MDM_HEAD_FIELDS = (  # the branch-config fields that build the head (copied by DepthVLM.attach_mdm_head)
    "mdm_tokens",
    "mdm_width",
    "mdm_levels",
    "mdm_blocks",
    "mdm_pyramid",
    "mdm_fullres_width",
    "mdm_fullres_blocks",
    "mdm_pyramid_mix",
    "mdm_pyramid_taps",
)
TAPS = {1: 0, 9: 1, 25: 2}  # mixture slots per pyramid scale -> neighbourhood radius in cells
MIN_WIDTH = 32
LOG_DEPTH_RANGE = (math.log(1e-3), math.log(1e4))  # meters: keeps exp() finite in fp32 whatever the weights


def head_input_dim(vision_config, tokens: str) -> int:
    """Channels of the tokens the head reads: the vision width (pre_merger) or the merger's output (post_merger)."""
    if tokens == "pre_merger":
        return vision_config.hidden_size
    if tokens == "post_merger":
        return vision_config.out_hidden_size
    raise ConfigError(f"mdm_tokens must be one of {TOKENS}, got {tokens!r}")


def build_mdm_head(cfg, vision_config) -> MDMHead:
    """A fresh MDM head for the branch config `cfg` (the `MDM_HEAD_FIELDS`) on a Qwen2.5-VL vision tower. Its
    output starts at sqrt(max_depth) (the output bias, or the mixture's prior): predictions start around the
    geometric middle of 1 m and `cfg.max_depth`."""
    return MDMHead(
        head_input_dim(vision_config, cfg.mdm_tokens),
        width=cfg.mdm_width,
        levels=cfg.mdm_levels,
        blocks=cfg.mdm_blocks,
        init_depth=math.sqrt(cfg.max_depth),
        pyramid=cfg.mdm_pyramid,
        fullres_width=cfg.mdm_fullres_width,
        fullres_blocks=cfg.mdm_fullres_blocks,
        pyramid_mix=cfg.mdm_pyramid_mix,
        pyramid_taps=cfg.mdm_pyramid_taps,
    )


def depth_pyramid(depth: torch.Tensor, scales: int, center: float = 0.0) -> torch.Tensor:
    """Parameter-free multi-scale view of sparse depth (B, 1, H, W) meters (0 = missing): for cells of s = 1, 2, 4,
    ... 2**(scales-1) px, the valid-weighted mean of log(depth) - `center` over each cell and the cell's valid share,
    brought back to (H, W) by bilinear interpolation of the weighted sums and of the weights (normalised convolution).
    Returns (B, 2 * scales, H, W): [mean_1, share_1, mean_2, share_2, ...]; a mean is 0 where its share is 0."""
    valid = valid_mask(depth).to(torch.float32)
    logd = torch.where(valid > 0, depth.float().clamp(min=1e-3).log() - center, torch.zeros_like(valid))
    height, width = depth.shape[-2:]
    big = 2 ** max(scales - 1, 0)
    pad = (0, -width % big, 0, -height % big)  # whole cells at every scale
    num, den = F.pad(logd * valid, pad), F.pad(valid, pad)
    feats = []
    for k in range(scales):
        cell = 2**k
        n, d = num, den
        if cell > 1:
            n = F.interpolate(F.avg_pool2d(num, cell), scale_factor=cell, mode="bilinear", align_corners=False)
            d = F.interpolate(F.avg_pool2d(den, cell), scale_factor=cell, mode="bilinear", align_corners=False)
        has = d > 1e-6
        mean = torch.where(has, n / d.clamp(min=1e-6), torch.zeros_like(d))
        feats += [mean[..., :height, :width], torch.where(has, d, torch.zeros_like(d))[..., :height, :width]]
    return torch.cat(feats, dim=1)


def _cell_taps(x: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """(B, S, H, W) maps, channel k at scale 2**k -> (B, (2 r + 1)^2 S, H, W): each map at the pixel and shifted by
    up to `radius` cells (2**k px each) in both axes (0 outside the image), channel order (scale, dy, dx)."""
    height, width = x.shape[-2:]
    taps = []
    for k in range(x.shape[1]):
        cell = 2**k
        pad = radius * cell
        padded = F.pad(x[:, k : k + 1], (pad, pad, pad, pad))
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                y0, x0 = pad + dy * cell, pad + dx * cell
                taps.append(padded[..., y0 : y0 + height, x0 : x0 + width])
    return torch.cat(taps, dim=1)


def processor_order(last_hidden_state: torch.Tensor, image_grid_thw: torch.Tensor, vision_config) -> torch.Tensor:
    """Pre-merger tokens (N, C) of a Qwen2.5-VL vision tower, from its window order to the processor's patch order
    (row i lies on row i of `pixel_values`)."""
    from transformers.vision_utils import get_vision_window_index

    merge = vision_config.spatial_merge_size
    window_index, _ = get_vision_window_index(
        image_grid_thw, merge, vision_config.window_size, vision_config.patch_size
    )
    groups = last_hidden_state.reshape(-1, merge * merge, last_hidden_state.shape[-1])
    return groups[torch.argsort(window_index.to(groups.device))].reshape(last_hidden_state.shape)


def token_grids(
    tokens: torch.Tensor, image_grid_thw: torch.Tensor, merge_size: int, merged: bool
) -> list[torch.Tensor]:
    """Split tokens in processor order into one (C, h, w) grid per image: merged tokens (one per merge x merge
    cell, raster order) on the (H'/28, W'/28) grid, or patch tokens (grouped 2x2 as the processor orders them) on
    the (H'/14, W'/14) grid."""
    m = merge_size
    counts = [int(t * h * w) // (m * m if merged else 1) for t, h, w in image_grid_thw.tolist()]
    grids = []
    for rows, (t, h, w) in zip(tokens.split(counts), image_grid_thw.tolist()):
        if t != 1:
            raise ValueError(f"the MDM head reads still images (t = 1), got grid {t}x{h}x{w}")
        if merged:
            grids.append(rows.reshape(h // m, w // m, -1).permute(2, 0, 1))
        else:
            x = rows.reshape(h // m, w // m, m, m, -1).permute(4, 0, 2, 1, 3)  # (C, h/m, m, w/m, m)
            grids.append(x.reshape(-1, h, w))
    return grids


def view_plane_uv(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """(2, height, width) view-plane coordinates (u right, v down) of cell centres, the half-diagonal scaled to 1."""
    diagonal = math.hypot(width, height)
    u = (torch.arange(width, device=device, dtype=torch.float32) + 0.5 - width / 2) * (2 / diagonal)
    v = (torch.arange(height, device=device, dtype=torch.float32) + 0.5 - height / 2) * (2 / diagonal)
    uv = torch.stack(torch.meshgrid(u, v, indexing="xy"))
    return uv.to(dtype) if dtype is not None else uv


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, channels // 32), channels)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode="replicate")


class ResidualConvBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), 3x3 convs with replicate padding (pre-activation)."""

    def __init__(self, channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            _norm(channels),
            nn.ReLU(),
            _conv3x3(channels, channels),
            _norm(channels),
            nn.ReLU(),
            _conv3x3(channels, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class Upsample(nn.Module):
    """2x transposed-conv upsampling + a 3x3 conv. The four taps of the transposed conv start equal (nearest-
    neighbour-like), which avoids the checkerboard pattern of a random init."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = _conv3x3(out_channels, out_channels)
        with torch.no_grad():
            self.up.weight.copy_(self.up.weight[:, :, :1, :1].expand_as(self.up.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class MDMHead(nn.Module):
    """ConvStack decoder: visual token grids -> dense metric depth (see the module docstring).

    `in_dim`: token channels; `width`: channels at the token grid (halved per level, at least 32); `levels`: 2x
    upsamplings (4 turns 14-px tokens into 0.875-px cells); `blocks`: residual blocks per level; `init_depth`:
    meters, the output bias is log(init_depth), so untrained predictions scatter around it. `pyramid` > 0 adds the
    full-resolution stage (`fullres_width` channels, `fullres_blocks` residual blocks; `pyramid_mix`,
    `pyramid_taps`: the mixture output), see the module docstring.
    """

    def __init__(
        self,
        in_dim: int,
        width: int = 256,
        levels: int = 4,
        blocks: int = 1,
        init_depth: float = 10.0,
        pyramid: int = 0,
        fullres_width: int = 32,
        fullres_blocks: int = 1,
        pyramid_mix: bool = False,
        pyramid_taps: int = 1,
    ):
        super().__init__()
        if width < 1 or levels < 0 or blocks < 0 or not init_depth > 0:
            raise ConfigError(
                f"MDM head needs width >= 1, levels >= 0, blocks >= 0, init_depth > 0 (got "
                f"{width}, {levels}, {blocks}, {init_depth})"
            )
        if pyramid < 0 or (pyramid and (fullres_width < 1 or fullres_blocks < 0)) or pyramid_taps not in TAPS:
            raise ConfigError(
                f"MDM head needs pyramid >= 0, fullres_width >= 1, fullres_blocks >= 0 and pyramid_taps in "
                f"{sorted(TAPS)} (got {pyramid}, {fullres_width}, {fullres_blocks}, {pyramid_taps})"
            )
        if pyramid_mix and not pyramid:
            raise ConfigError("MDM head: pyramid_mix needs a depth pyramid (pyramid > 0)")
        widths = [max(width >> k, min(width, MIN_WIDTH)) for k in range(levels + 1)]
        self.token_norm = nn.LayerNorm(in_dim)
        self.input_proj = nn.Conv2d(in_dim + 2, widths[0], 1)
        self.upsample = nn.ModuleList(Upsample(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.uv_proj = nn.ModuleList(nn.Conv2d(2, w, 1) for w in widths[1:])
        self.stages = nn.ModuleList(nn.Sequential(*(ResidualConvBlock(w) for _ in range(blocks))) for w in widths)
        self.pyramid, self.pyramid_mix, self.taps = pyramid, pyramid_mix, pyramid_taps
        self.center = math.log(init_depth)
        out_width = widths[-1]
        if pyramid:
            self.fullres_proj = nn.Conv2d(2 * pyramid + 2, fullres_width, 1)
            self.fullres_merge = _conv3x3(widths[-1] + fullres_width, fullres_width)
            self.fullres_stage = nn.Sequential(*(ResidualConvBlock(fullres_width) for _ in range(fullres_blocks)))
            out_width = fullres_width
        if pyramid_mix:  # residual + prior logit + one logit per scale and tap; zero init (see the module docstring)
            self.output = nn.Conv2d(out_width, 2 + pyramid * pyramid_taps, 1)
            with torch.no_grad():
                self.output.weight.zero_()
                self.output.bias.zero_()
        else:
            self.output = nn.Conv2d(out_width, 1, 1)
            with torch.no_grad():
                self.output.bias.fill_(math.log(init_depth))

    def pyramid_of(self, depth: torch.Tensor) -> torch.Tensor:
        """The full-resolution stage's input for sparse depth (B, 1, H', W') meters on the processor's grid:
        `depth_pyramid` with this head's scales, centred at log init_depth."""
        return depth_pyramid(depth, self.pyramid, self.center)

    def log_depth(self, tokens: torch.Tensor, pyramid: torch.Tensor | None = None) -> torch.Tensor:
        """Token grids (B, in_dim, h, w) -> log-depth (B, 1, h * 2**levels, w * 2**levels), log meters, unclamped.
        With the full-resolution stage: also `pyramid` (B, 2 * scales, H', W') from `pyramid_of`, and the log-depth
        is at (H', W')."""
        dtype = self.output.weight.dtype
        x = self.token_norm(tokens.to(dtype).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + x.mean(dim=(2, 3), keepdim=True)
        batch, _, h, w = x.shape
        uv = view_plane_uv(h, w, x.device, dtype).expand(batch, -1, -1, -1)
        x = self.stages[0](self.input_proj(torch.cat([x, uv], dim=1)))
        for upsample, uv_proj, stage in zip(self.upsample, self.uv_proj, self.stages[1:]):
            x = upsample(x)
            x = stage(x + uv_proj(view_plane_uv(*x.shape[-2:], x.device, dtype)))
        if not self.pyramid:
            return self.output(x)
        if pyramid is None:
            raise ValueError("this MDM head has a full-resolution stage: pass the depth pyramid")
        pyramid = pyramid.to(dtype)
        x = F.interpolate(x, size=tuple(pyramid.shape[-2:]), mode="bilinear", align_corners=False)
        uv = view_plane_uv(*pyramid.shape[-2:], x.device, dtype).expand(batch, -1, -1, -1)
        skip = self.fullres_proj(torch.cat([pyramid, uv], dim=1))
        out = self.output(self.fullres_stage(self.fullres_merge(torch.cat([x, skip], dim=1))))
        if not self.pyramid_mix:
            return out
        means, shares = pyramid[:, 0::2], pyramid[:, 1::2]
        if TAPS[self.taps]:
            means, shares = _cell_taps(means, TAPS[self.taps]), _cell_taps(shares, TAPS[self.taps])
        values = torch.cat([torch.zeros_like(means[:, :1]), means], dim=1)  # the prior (0 = log init_depth) first
        support = torch.cat([torch.ones_like(shares[:, :1]), shares], dim=1) > 1e-6
        weights = out[:, 1:].masked_fill(~support, float("-inf")).softmax(dim=1)
        return self.center + (weights * values).sum(dim=1, keepdim=True) + out[:, :1]

    def forward(
        self, tokens: torch.Tensor, out_size: tuple[int, int], pyramid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token grids (B, in_dim, h, w) -> depth (B, H, W) float meters, > 0 and finite, at `out_size` = (H, W)
        (`pyramid`: see `log_depth`)."""
        log_depth = self.log_depth(tokens, pyramid)
        log_depth = F.interpolate(log_depth, size=tuple(out_size), mode="bilinear", align_corners=False)
        clamped = log_depth + (log_depth.clamp(*LOG_DEPTH_RANGE) - log_depth).detach()  # straight-through
        return clamped.exp().squeeze(1)

    def predict(
        self,
        grids: Sequence[torch.Tensor],
        out_sizes: Sequence[tuple[int, int]],
        depths: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """One depth map (H, W) meters per token grid (C, h, w), at its `out_sizes` entry; images of equal grid and
        output size run as one batch. A head with a full-resolution stage also takes each image's sparse input
        `depths` (1, H', W') meters on the processor's grid."""
        if self.pyramid and (depths is None or len(depths) != len(grids)):
            raise ValueError("this MDM head has a full-resolution stage: pass one sparse depth map per image")
        if len(grids) != len(out_sizes):
            raise ValueError(f"{len(grids)} token grids but {len(out_sizes)} output sizes")
        outputs: list[torch.Tensor | None] = [None] * len(grids)
        groups: dict[tuple, list[int]] = {}
        for i, (grid, size) in enumerate(zip(grids, out_sizes)):
            groups.setdefault((*grid.shape[-2:], *size), []).append(i)
        for key, members in groups.items():
            pyramid = self.pyramid_of(torch.stack([depths[i] for i in members])) if self.pyramid else None
            depth = self(torch.stack([grids[i] for i in members]), key[2:], pyramid)
            for i, d in zip(members, depth):
                outputs[i] = d
        return outputs


def visual_token_grids(outputs, image_grid_thw: torch.Tensor, vision_config, tokens: str) -> list[torch.Tensor]:
    """(C, h, w) token grid per image from a vision-tower output (`last_hidden_state` for pre_merger,
    `pooler_output` for post_merger)."""
    merge = vision_config.spatial_merge_size
    if tokens == "pre_merger":
        rows = processor_order(outputs.last_hidden_state, image_grid_thw, vision_config)
        return token_grids(rows, image_grid_thw, merge, merged=False)
    if tokens == "post_merger":
        return token_grids(outputs.pooler_output, image_grid_thw, merge, merged=True)
    raise ConfigError(f"mdm_tokens must be one of {TOKENS}, got {tokens!r}")


def hide_patches(
    depth_maps: torch.Tensor, patch_mask: torch.Tensor, image_grid_thw: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """`depth_maps` (the processor's flat per-image maps, meters) with the depth of the 14-px patches flagged in
    `patch_mask` (each image's (h, w) patch grid flattened row-major, concatenated; True = hidden) set to 0, i.e.
    missing."""
    maps = split_maps(depth_maps, image_grid_thw, patch_size)
    masks = split_maps(patch_mask.to(depth_maps.device, torch.bool), image_grid_thw, 1)
    hidden = [
        d.view(m.shape[0], patch_size, m.shape[1], patch_size).masked_fill(m[:, None, :, None], 0).flatten()
        for d, m in zip(maps, masks)
    ]
    return torch.cat(hidden)


def mdm_depth(
    model,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    depth_maps: torch.Tensor | None = None,
    patch_mask: torch.Tensor | None = None,
    out_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[torch.Tensor]:
    """Dense depth from the MDM head of a DepthVLM `model`: one (H, W) float map in meters (> 0) per image.

    `depth_maps` meters on the grids of `pixel_values` (None: monocular); `patch_mask` (one bool per 14-px patch,
    see `hide_patches`), True = that patch's depth is hidden: zeroed before the depth branch, exactly as missing depth.
    `out_sizes`: (H, W) per image (default: the processor's resized grid, `image_grid_thw` x 14).
    """
    head = model.mdm_head
    vision = model.config.vision_config
    if patch_mask is not None:
        if depth_maps is None:
            raise ValueError("patch_mask given without depth_maps")
        depth_maps = hide_patches(depth_maps, patch_mask, image_grid_thw, vision.patch_size)
    outputs = model.vision_outputs(pixel_values, image_grid_thw, depth_maps)
    grids = visual_token_grids(outputs, image_grid_thw, vision, model.depth_cfg.mdm_tokens)
    if out_sizes is None:
        out_sizes = [(h * vision.patch_size, w * vision.patch_size) for _, h, w in image_grid_thw.tolist()]
    depths = None
    if head.pyramid:  # the sparse input (masked patches hidden) on the processor's grid; none = monocular
        if depth_maps is None:
            sizes = [(h * vision.patch_size, w * vision.patch_size) for _, h, w in image_grid_thw.tolist()]
            depth_maps = pixel_values.new_zeros(sum(h * w for h, w in sizes))
        depths = [d.float()[None] for d in split_maps(depth_maps, image_grid_thw, vision.patch_size)]
    return head.predict(grids, out_sizes, depths)
