"""The packed forward: a batch of packed rows (one image prefix + K query blocks each) -> logits.

Semantics are those of one packed sequence per image with the block attention mask and per-block M-RoPE positions
of `vlm_depth.model.packing`: every query block sees the prefix and itself only, at the positions it would have in a
sequence of its own, so its logits equal those of the paper's one-pixel conversation (tests/test_train_packing.py).

Computation: ONE language-model call on ONE sequence, the B prefixes (padded to the longest, P) followed by all
R = sum K query blocks of the batch (padded to the longest, T), under the `PackedMask` attention of
`vlm_depth.model.packed_attention`: the prefixes attend among themselves, each block to its image's prefix and to
itself. That costs P^2 + K T (P + T) of attention, not the (P + K T)^2 of a dense block-diagonal mask, and no KV
cache crosses a layer, so Hugging Face's gradient checkpointing (`model.gradient_checkpointing_enable`) applies
as-is. The vision tower, the depth branch and the prefix run once per image.

The layout, positions and kept-logit indices are computed before the vision tower, so the host waits on the device
only while it is idle (the step's start), not between the vision tower and the language model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from vlm_depth.model.packed_attention import PackedMask, flex_block_mask, use_packed_attention
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

    def sequence(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Per-token `values` (B, L, ...) -> the packed sequence (B P + R T, ...): prefixes, then blocks."""
        return torch.cat([values[:, : self.prefix_length].flatten(0, 1), self.gather(values, fill).flatten(0, 1)])


def _mask_dtype(embeds: torch.Tensor) -> torch.dtype:
    device = embeds.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else embeds.dtype


def _packed_mask(segment_ids: torch.Tensor, layout: BlockLayout, dtype: torch.dtype, flex: bool) -> PackedMask:
    """The attention layout of the packed sequence of `segment_ids` (B, L) (see `PackedMask`)."""
    span, blocks = layout.prefix_length, len(layout.row_image)
    prefix_segments = torch.where(segment_ids[:, :span] == PREFIX, PREFIX, PAD)
    block_segments = torch.where(layout.index >= 0, 1, PAD)
    key_segments = torch.cat([prefix_segments[layout.row_image], block_segments], dim=1)
    flex_mask = None
    if flex:
        device = segment_ids.device
        block_ids = torch.arange(1, blocks + 1, device=device)[:, None].expand_as(layout.index)
        segments = torch.cat([prefix_segments.flatten(), torch.where(layout.index >= 0, block_ids, PAD).flatten()])
        images = torch.cat(
            [
                torch.arange(len(segment_ids), device=device).repeat_interleave(span),
                layout.row_image.repeat_interleave(layout.index.shape[1]),
            ]
        )
        flex_mask = flex_block_mask(images, segments)
    return PackedMask(
        num_images=len(segment_ids),
        prefix_len=span,
        row_image=layout.row_image,
        block_len=layout.index.shape[1],
        prefix_mask=block_attention_mask(prefix_segments, dtype=dtype),
        block_mask=block_attention_mask(key_segments, num_new=layout.index.shape[1], dtype=dtype),
        flex=flex_mask,
    )


def packed_forward(
    model, batch: Mapping[str, torch.Tensor], logits_to_keep: int | torch.Tensor = 0, flex: bool = False
) -> torch.Tensor:
    """Logits of packed rows for a `DepthVLM` (LoRA-injected or not); switches its language model to the packed
    attention function on first use (`use_packed_attention`).

    batch: `input_ids`, `segment_ids`, `mm_token_type_ids` (B, L); `pixel_values`, `image_grid_thw`, optional
    `depth_maps` (meters, on the grids of `pixel_values`); in pointer mode `pointer_xy` (n, 2) and
    `pointer_image_index` (n,) (see `vlm_depth.train.collator`).
    logits_to_keep: 0 -> (B, L, V) logits of every token (padding rows are 0); a boolean (B, L) mask selecting
    block tokens only -> (N, V) logits of those tokens in row-major order (what training needs: no vocabulary
    projection of unsupervised positions). flex: CUDA-only fused flex attention instead of the two SDPA calls.
    """
    use_packed_attention(model)
    input_ids, segment_ids, grid = batch["input_ids"], batch["segment_ids"], batch["image_grid_thw"]
    keep_all = isinstance(logits_to_keep, int)
    if keep_all and logits_to_keep != 0:
        raise ValueError("logits_to_keep must be 0 (all tokens) or a boolean (B, L) mask")
    layout = BlockLayout.from_segments(segment_ids)
    positions, _ = packed_position_ids(model, input_ids, segment_ids, batch["mm_token_type_ids"], grid)
    batch_size, length = input_ids.shape
    span = layout.prefix_length
    if keep_all:
        keep = 0
    else:
        in_blocks = layout.gather(logits_to_keep, fill=False)
        if int(in_blocks.sum()) != int(logits_to_keep.sum()):
            raise ValueError("logits_to_keep selects tokens outside the query blocks")
        keep = batch_size * span + in_blocks.flatten().nonzero().squeeze(1)  # positions in the packed sequence

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
    mask = _packed_mask(segment_ids, layout, _mask_dtype(embeds), flex)
    logits = model(
        inputs_embeds=layout.sequence(embeds)[None],
        position_ids=layout.sequence(positions.permute(1, 2, 0)).T[:, None],
        attention_mask={"full_attention": mask},
        use_cache=False,
        logits_to_keep=keep,
    ).logits[0]
    if not keep_all:
        return logits

    out = logits.new_zeros(batch_size * length, logits.shape[-1])
    is_prefix = segment_ids[:, :span] == PREFIX
    out.view(batch_size, length, -1)[:, :span][is_prefix] = logits[: batch_size * span].view(batch_size, span, -1)[
        is_prefix
    ]
    real = layout.index >= 0
    out[layout.index[real]] = logits[batch_size * span :].view(*layout.index.shape, -1)[real]
    return out.view(batch_size, length, -1)
