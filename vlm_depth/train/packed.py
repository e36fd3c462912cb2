"""The packed forward: a batch of packed rows (one image prefix + K query blocks each) -> logits.

Semantics are those of one packed sequence per image with the block attention mask and per-block M-RoPE positions
of `vlm_depth.model.packing`: every query block sees the prefix and itself only, at the positions it would have in a
sequence of its own, so its logits equal those of the paper's one-pixel conversation (tests/test_train_packing.py).

Computation: the language model runs in two passes that give exactly those logits at a fraction of the cost of one
long sequence: (1) the prefixes (B rows, system + image tokens) once, keeping their keys/values; (2) all query
blocks of the batch as R = sum K rows of their own, each attending to its image's cached prefix and to itself. A
single packed sequence would spend (P + K T)^2 attention on a block-diagonal mask that throws most of it away; the
two passes cost P^2 + K T (P + T). The vision tower, the depth branch and the prefix run once per image either way.
Gradients flow through the cached keys/values into the prefix pass, so this is a training forward. (Hugging Face
gradient checkpointing drops caches, so it is not used with this forward.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vlm_depth.model.packing import PAD, PREFIX, block_attention_mask, block_offsets, packed_position_ids


@dataclass
class BlockLayout:
    """Where the blocks of packed rows are: `row_image` (R,) packed row of each block, `index` (R, T) flat
    positions (into B * L) of each block's tokens, -1 = padding; `prefix_length` P (longest prefix)."""

    row_image: torch.Tensor
    index: torch.Tensor
    prefix_length: int

    @classmethod
    def from_segments(cls, segment_ids: torch.Tensor) -> BlockLayout:
        """Layout of `segment_ids` (B, L): each row is its prefix (segment 0) followed by blocks 1..K, then PAD."""
        batch, length = segment_ids.shape
        is_prefix = segment_ids == PREFIX
        prefix_len = is_prefix.sum(1)
        first_non_prefix = torch.where(is_prefix, 0, 1).argmax(1).masked_fill(is_prefix.all(1), length)
        if not torch.equal(prefix_len, first_non_prefix):
            raise ValueError("every packed row must start with its whole prefix (segment 0)")
        rows, cols = torch.nonzero(segment_ids > PREFIX, as_tuple=True)
        key = rows * (int(segment_ids.max()) + 1) + segment_ids[rows, cols]
        block_of_token = torch.unique_consecutive(key, return_inverse=True)[1]
        num_blocks = int(block_of_token.max()) + 1 if len(key) else 0
        offsets = block_offsets(segment_ids)[rows, cols]
        width = int(offsets.max()) + 1 if len(key) else 0
        index = torch.full((num_blocks, width), -1, dtype=torch.long, device=segment_ids.device)
        index[block_of_token, offsets] = rows * length + cols
        row_image = torch.zeros(num_blocks, dtype=torch.long, device=segment_ids.device)
        row_image[block_of_token] = rows
        return cls(row_image, index, int(prefix_len.max()))

    def gather(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Per-token `values` (B, L, ...) -> per-block rows (R, T, ...), `fill` at padding."""
        flat = values.reshape(-1, *values.shape[2:])
        picked = flat[self.index.clamp(min=0)]
        pad = (self.index < 0).reshape(*self.index.shape, *([1] * (values.dim() - 2)))
        return picked.masked_fill(pad, fill)


def _mask_dtype(embeds: torch.Tensor) -> torch.dtype:
    device = embeds.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else embeds.dtype


def packed_forward(model, batch: Mapping[str, torch.Tensor], logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
    """Logits of packed rows for a `DepthVLM` (LoRA-injected or not).

    batch: `input_ids`, `segment_ids`, `mm_token_type_ids` (B, L); `pixel_values`, `image_grid_thw`, optional
    `depth_maps` (meters, on the grids of `pixel_values`); in pointer mode `pointer_xy` (n, 2) and
    `pointer_image_index` (n,) (see `vlm_depth.train.collator`).
    logits_to_keep: 0 -> (B, L, V) logits of every token (padding rows are 0); a boolean (B, L) mask selecting
    block tokens only -> (N, V) logits of those tokens in row-major order (what training needs: no vocabulary
    projection of unsupervised positions).
    """
    input_ids, segment_ids, grid = batch["input_ids"], batch["segment_ids"], batch["image_grid_thw"]
    image_embeds = model.encode_images(batch["pixel_values"], grid, batch.get("depth_maps"))
    pointer_xy = batch.get("pointer_xy")
    has_pointers = pointer_xy is not None and len(pointer_xy) > 0
    embeds = model.embed_inputs(
        input_ids,
        image_embeds=image_embeds,
        pointer_xy=pointer_xy if has_pointers else None,
        image_grid_thw=grid,
        pointer_image_index=batch.get("pointer_image_index") if has_pointers else None,
    )
    positions, _ = packed_position_ids(model, input_ids, segment_ids, batch["mm_token_type_ids"], grid)
    layout = BlockLayout.from_segments(segment_ids)
    dtype = _mask_dtype(embeds)
    keep_all = isinstance(logits_to_keep, int)
    if keep_all and logits_to_keep != 0:
        raise ValueError("logits_to_keep must be 0 (all tokens) or a boolean (B, L) mask")

    span = layout.prefix_length
    prefix_segments = torch.where(segment_ids[:, :span] == PREFIX, PREFIX, PAD)
    prefix = model(
        inputs_embeds=embeds[:, :span],
        position_ids=positions[:, :, :span],
        attention_mask=block_attention_mask(prefix_segments, dtype=dtype),
        use_cache=True,
        logits_to_keep=0 if keep_all else 1,
    )
    has_blocks = layout.index.shape[0] > 0
    if has_blocks:
        cache = prefix.past_key_values
        cache.batch_select_indices(layout.row_image)
        block_segments = torch.where(layout.index >= 0, 1, PAD)
        key_segments = torch.cat([prefix_segments[layout.row_image], block_segments], dim=1)
        block_keep = 0 if keep_all else layout.gather(logits_to_keep, fill=False)
        blocks = model(
            inputs_embeds=layout.gather(embeds),
            position_ids=layout.gather(positions.permute(1, 2, 0)).permute(2, 0, 1),
            attention_mask=block_attention_mask(key_segments, num_new=layout.index.shape[1], dtype=dtype),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=block_keep,
        ).logits
    if not keep_all:
        kept = int(logits_to_keep.sum())
        if (int(block_keep.sum()) if has_blocks else 0) != kept:
            raise ValueError("logits_to_keep selects tokens outside the query blocks")
        return blocks if has_blocks else prefix.logits[:, :0].flatten(0, 1)

    batch_size, length = input_ids.shape
    logits = prefix.logits.new_zeros(batch_size * length, prefix.logits.shape[-1])
    is_prefix = segment_ids[:, :span] == PREFIX
    logits.view(batch_size, length, -1)[:, :span][is_prefix] = prefix.logits[is_prefix]
    if has_blocks:
        real = layout.index >= 0
        logits[layout.index[real]] = blocks[real].to(logits.dtype)
    return logits.view(batch_size, length, -1)
