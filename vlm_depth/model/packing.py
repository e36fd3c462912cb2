"""Query packing: one image prefix, then K query blocks in the same sequence, each block seeing the prefix and
itself only, with the position ids it would have in a sequence of its own.

Used by the training collator (K labelled pixels per image) and by the fast decoder (many pixel queries against
one cached prefix). Tokens are labelled by a segment id: `PREFIX` (0) for the shared prefix (system, image,
shared instruction), k >= 1 for the tokens of query block k, `PAD` (-1) for padding. Everything here is derived
from segment ids, so the same two functions serve a full packed forward and cached incremental decoding.
"""

from __future__ import annotations

import torch

PREFIX = 0
PAD = -1


def block_attention_mask(
    segment_ids: torch.Tensor, num_new: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive 4-D mask (B, 1, Q, L) for the last `num_new` tokens (all if None) of sequences `segment_ids` (B, L).

    Token i may attend to token j <= i when j is in the prefix or in i's own block; padding attends to itself only
    (so no row is fully masked). 0 = attend, dtype's minimum = blocked. With a KV cache, `segment_ids` covers cache
    plus new tokens and `num_new` the new ones.
    """
    batch, length = segment_ids.shape
    num_new = length if num_new is None else num_new
    rows = segment_ids[:, length - num_new :, None]  # (B, Q, 1)
    cols = segment_ids[:, None, :]  # (B, 1, L)
    i = torch.arange(length - num_new, length, device=segment_ids.device)[:, None]
    j = torch.arange(length, device=segment_ids.device)[None, :]
    causal = (j <= i)[None]
    same_or_prefix = (cols == PREFIX) | (cols == rows)
    allowed = causal & same_or_prefix & (rows != PAD) & (cols != PAD)
    allowed = allowed | ((i == j)[None] & (rows == PAD))
    mask = torch.zeros(batch, 1, num_new, length, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def block_offsets(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) index of every token within its own segment (0 for the first token of a block or of the prefix)."""
    batch, length = segment_ids.shape
    idx = torch.arange(length, device=segment_ids.device).expand(batch, length)
    seg = segment_ids.clamp(min=0)
    first = torch.full((batch, int(seg.max()) + 1), length, dtype=torch.long, device=segment_ids.device)
    first = first.scatter_reduce(1, seg, idx, reduce="amin", include_self=True)
    return idx - first.gather(1, seg)


def packed_position_ids(
    model,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL 3-D M-RoPE position ids (3, B, L) for a packed batch, and the first text position after each
    prefix (B,), which cached decoding needs for later blocks. `model`: a Qwen2.5-VL ForConditionalGeneration.

    Prefix positions come from the model's own `get_rope_index` (computed over the prefix tokens only); every query
    block continues from the prefix's last position as if it were the only block.
    """
    prefix = segment_ids == PREFIX
    positions, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=prefix.long()
    )
    text_start = positions.masked_fill(~prefix[None], -1).amax(dim=(0, 2)) + 1
    return with_block_positions(positions, segment_ids, text_start), text_start


def with_block_positions(positions: torch.Tensor, segment_ids: torch.Tensor, text_start: torch.Tensor) -> torch.Tensor:
    """Fill the positions (3, B, L) of query-block tokens: `text_start[b]` + offset within the block."""
    block = segment_ids > PREFIX
    block_pos = (text_start[:, None] + block_offsets(segment_ids)).expand(3, -1, -1)
    return torch.where(block[None], block_pos, positions)
