"""Pointer query mode: a special token whose input embedding names a pixel by the image itself.

Per occurrence, the pointer token's input embedding is replaced by `PointerEncoder(feature, offset)`: a trainable
projection of the merged visual feature (what fills the `<|image_pad|>` placeholders, already in the LLM's
embedding space) bilinearly sampled at the queried pixel, plus a projected Fourier encoding of the pixel's offset
inside its merged cell (28x28 pixels for Qwen2.5-VL). The image is encoded once, however many pixels are queried.

Pixel convention (that of `DepthProcessor.to_grid_xy`): `pointer_xy` (n, 2) holds (x, y) = (column, row) on the
processor's resized grid (H' = grid_h * 14, W' = grid_w * 14) in pixel units with pixel centres at integers, so
integer values are pixel indices and any value in [-0.5, W' - 0.5] x [-0.5, H' - 0.5] is allowed (sampled
bilinearly).

Init (pointer mode must name the pixel from step 0): `feature_proj` is the identity with zero bias, so the pointer
embedding starts as the visual feature at the pixel (interpolated between the merged tokens around it), which the LLM
already reads at image positions; `offset_proj` is normal(0, initializer_range), a small sub-cell signal that keeps
two pixels of the same merged cell apart where the interpolation cannot (image borders).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm_depth.errors import ConfigError, ModelError


def fourier_features(offsets: torch.Tensor, channels: int) -> torch.Tensor:
    """Fourier encoding (n, channels) of sub-cell offsets (n, 2) in [0, 1): sin and cos of 2 pi 2^k offset per axis,
    k = 0 .. channels / 4 - 1."""
    if channels < 4 or channels % 4:
        raise ConfigError(f"pointer_fourier must be a positive multiple of 4, got {channels}")
    freqs = 2.0 ** torch.arange(channels // 4, device=offsets.device, dtype=torch.float32)
    angles = 2 * math.pi * offsets.float()[:, :, None] * freqs  # (n, 2, K)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)


class PointerEncoder(nn.Module):
    """Pointer-token embedding (n, hidden) from sampled visual features (n, hidden) and sub-cell offsets (n, 2)."""

    def __init__(self, hidden_size: int, fourier: int, init_std: float):
        super().__init__()
        self.fourier = fourier
        self.feature_proj = nn.Linear(hidden_size, hidden_size)
        self.offset_proj = nn.Linear(fourier, hidden_size, bias=False)
        with torch.no_grad():
            self.feature_proj.weight.copy_(torch.eye(hidden_size))
            self.feature_proj.bias.zero_()
            self.offset_proj.weight.normal_(0.0, init_std)

    def forward(self, features: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        dtype = self.feature_proj.weight.dtype
        return self.feature_proj(features.to(dtype)) + self.offset_proj(fourier_features(offsets, self.fourier))


def sample_pointer_features(
    image_embeds: torch.Tensor,
    image_grid_thw: torch.Tensor,
    pointer_xy: torch.Tensor,
    pointer_image_index: torch.Tensor,
    patch_size: int = 14,
    merge_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged visual features bilinearly sampled at the pointers' pixels, and the pixels' offsets in their cells.

    image_embeds: (sum_i t*h*w / merge^2, hidden) merged features of all images, row-major on each image's merged
    grid; image_grid_thw: (n_images, 3); pointer_xy: (n, 2) pixel (x, y) on the resized grid; pointer_image_index:
    (n,) image of each pointer. Returns features (n, hidden) and offsets (n, 2) in [0, 1).
    """
    n = pointer_xy.shape[0]
    xy = pointer_xy.to(device=image_embeds.device, dtype=torch.float32)
    index = pointer_image_index.to(image_embeds.device).long()
    if xy.ndim != 2 or xy.shape[1] != 2 or index.shape != (n,):
        raise ModelError(f"pointer_xy must be (n, 2) and pointer_image_index (n,), got {tuple(xy.shape)}")
    cell = patch_size * merge_size
    counts = (image_grid_thw.prod(-1) // merge_size**2).tolist()
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    if starts[-1] != image_embeds.shape[0]:
        raise ModelError(f"image_embeds has {image_embeds.shape[0]} rows, image_grid_thw implies {starts[-1]}")
    if n and (index.min() < 0 or index.max() >= len(counts)):
        raise ModelError(f"pointer_image_index out of range for {len(counts)} image(s)")
    features = image_embeds.new_zeros(n, image_embeds.shape[1])
    for image in index.unique().tolist():
        t, h, w = image_grid_thw[image].tolist()
        sel = (index == image).nonzero().squeeze(1)
        size = torch.tensor([w * patch_size, h * patch_size], device=xy.device, dtype=torch.float32)
        points = xy[sel]
        if (points < -0.5).any() or (points > size - 0.5).any():
            raise ModelError(f"pointer pixel outside the {w * patch_size}x{h * patch_size} grid of image {image}")
        grid = image_embeds[starts[image] : starts[image + 1]]
        grid = grid.view(t, h // merge_size, w // merge_size, -1)[0].permute(2, 0, 1)[None]
        where = ((points + 0.5) / size * 2 - 1).view(1, -1, 1, 2).to(grid.dtype)
        sampled = F.grid_sample(grid, where, mode="bilinear", padding_mode="border", align_corners=False)
        features = features.index_copy(0, sel, sampled[0, :, :, 0].T)
    offsets = torch.remainder(xy + 0.5, cell) / cell
    return features, offsets


def infer_pointer_image_index(
    input_ids: torch.Tensor, vision_start_id: int, image_token_id: int, pointer_token_id: int
) -> torch.Tensor:
    """Image of each pointer token (in flattened order): the last image that starts before it in the flattened
    batch, images counted in placeholder order (the order of `image_grid_thw`)."""
    flat = input_ids.flatten()
    starts = (flat[:-1] == vision_start_id) & (flat[1:] == image_token_id)
    image_at = torch.cat([starts.new_zeros(1), starts]).long().cumsum(0) - 1
    index = image_at[flat == pointer_token_id]
    if (index < 0).any():
        raise ModelError("a pointer token comes before any image in input_ids; pass pointer_image_index")
    return index


def init_pointer_embedding(model: nn.Module, token_id: int) -> None:
    """Make room for `token_id` in the input and output embeddings (resizing if needed) and set its row, and any row
    created by the resize, to the mean of the rows before it: deterministic, so an adapter checkpoint can redo it."""
    inputs = model.get_input_embeddings()
    known = min(token_id, inputs.num_embeddings)
    if token_id >= inputs.num_embeddings:
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    weights = {id(layer.weight): layer.weight for layer in layers if layer is not None}  # once if tied
    with torch.no_grad():
        for weight in weights.values():
            weight[known : token_id + 1] = weight[:known].mean(dim=0)
    model.config.pointer_token_id = token_id


def add_pointer_token(model: nn.Module, tokenizer, token: str | None = None) -> int:
    """Add the pointer special token (default `model.depth_cfg.pointer_token`) to `tokenizer` and the model's
    embeddings (mean-initialised rows); returns its id. Idempotent for a tokenizer that already has it."""
    token = token or model.depth_cfg.pointer_token
    tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if getattr(model.config, "pointer_token_id", None) != token_id:
        init_pointer_embedding(model, token_id)
    return token_id
