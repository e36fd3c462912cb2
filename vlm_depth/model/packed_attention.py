"""The attention function of packed training: B image prefixes and R = sum K query blocks in ONE sequence and ONE
model call, so no KV cache crosses a decoder layer and Hugging Face's own gradient checkpointing works.

The sequence (batch 1) is the B prefixes, each padded to the longest prefix P, then the R blocks, each padded to the
longest block T. The attention mask handed to the language model is a `PackedMask` (in the `{"full_attention":
mask}` mapping, which skips transformers' mask builder and reaches every layer unchanged, checkpoint recomputation
included). The registered attention function `vlm_depth_packed` understands it:

- `sdpa` (every device; the reference): two SDPA calls per layer, the prefixes (B, H, P, d) under their causal
  mask, then the blocks (R, H, T, d) against their image's prefix keys and their own under the block mask
  (R, 1, T, P + T): the cost of attending the two passes, P^2 + R T (P + T), not the (B P + R T)^2 of one dense mask.
- `flex` (CUDA only, opt-in): `flex_attention` over the whole sequence with a BlockMask from per-token (image,
  segment) ids, compiled into one fused kernel that skips empty tiles. Not run on a GPU yet; flex has no CPU
  backward.

Any other mask (`generate()`, the decoder's 4-D masks, 2-D padding masks) goes to transformers' SDPA unchanged, so a
model keeps this implementation for its whole life: recomputation looks the function up again during backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from vlm_depth.errors import ModelError
from vlm_depth.model.packing import PAD, PREFIX

NAME = "vlm_depth_packed"


@dataclass
class PackedMask:
    """The layout of one packed sequence: B prefixes of P tokens, then R blocks of T tokens; `row_image` (R,) the
    image of each block; additive masks `prefix_mask` (B, 1, P, P) and `block_mask` (R, 1, T, P + T); `flex` a
    BlockMask over all tokens (flex mode) or None."""

    num_images: int
    prefix_len: int
    row_image: torch.Tensor
    block_len: int
    prefix_mask: torch.Tensor
    block_mask: torch.Tensor
    flex: Any = None


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (1, H, N, d) queries of a packed sequence under a `PackedMask` -> (1, N, H,
    d); any other mask -> transformers' SDPA."""
    if not isinstance(attention_mask, PackedMask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    mask = attention_mask
    if mask.flex is not None:
        return _flex_attention(query, key, value, mask.flex, scaling), None
    images, blocks = mask.num_images, len(mask.row_image)
    split = images * mask.prefix_len

    def rows(x: torch.Tensor, n: int, length: int) -> torch.Tensor:  # (1, h, n * length, d) -> (n, h, length, d)
        return x[0].unflatten(1, (n, length)).transpose(0, 1)

    qp, kp, vp = (rows(x[:, :, :split], images, mask.prefix_len) for x in (query, key, value))
    qb, kb, vb = (rows(x[:, :, split:], blocks, mask.block_len) for x in (query, key, value))
    options = dict(scaling=scaling, dropout=dropout, is_causal=False)
    prefix_out, _ = sdpa_attention_forward(module, qp, kp, vp, mask.prefix_mask, **options)  # (B, P, H, d)
    if not blocks:
        return prefix_out.flatten(0, 1)[None], None
    keys = torch.cat([kp.index_select(0, mask.row_image), kb], dim=2)
    values = torch.cat([vp.index_select(0, mask.row_image), vb], dim=2)
    block_out, _ = sdpa_attention_forward(module, qb, keys, values, mask.block_mask, **options)  # (R, T, H, d)
    return torch.cat([prefix_out.flatten(0, 1), block_out.flatten(0, 1)])[None], None


def use_packed_attention(model) -> None:
    """Make the language model of `model` (a Qwen2.5-VL) use `packed_attention` (idempotent). Masks other than a
    `PackedMask` keep SDPA, so generation and decoding are unchanged."""
    config = model.model.language_model.config
    if config._attn_implementation == NAME:
        return
    if config._attn_implementation != "sdpa":
        raise ModelError(f"packed training runs on sdpa attention models, not {config._attn_implementation!r}")
    AttentionInterface.register(NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # generate() builds ordinary SDPA masks
    config._attn_implementation = NAME
    model.config.get_text_config()._attn_implementation = NAME


# ---------------------------------------------------------------------------------------------- flex (CUDA only)
def flex_block_mask(images: torch.Tensor, segments: torch.Tensor):
    """BlockMask over the N tokens of a packed sequence from each token's image (N,) and segment id (N,): a token
    sees earlier tokens of its image's prefix and of its own block; padding sees itself only."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        seen = (images[q] == images[k]) & ((segments[k] == PREFIX) | (segments[k] == segments[q])) & (k <= q)
        return (seen & (segments[q] != PAD) & (segments[k] != PAD)) | ((q == k) & (segments[q] == PAD))

    n = len(segments)
    return create_block_mask(mask_mod, None, None, n, n, device=segments.device)


_COMPILED_FLEX: list = []


def _flex_attention(query, key, value, block_mask, scaling: float | None) -> torch.Tensor:
    """`flex_attention` -> (1, N, H, d): compiled on CUDA (once per process, dynamic shapes: the sequence length
    changes every step); eager elsewhere, which is a dense reference without backward (CPU tests only)."""
    from torch.nn.attention.flex_attention import flex_attention

    if query.is_cuda and not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=True))
    attend = _COMPILED_FLEX[0] if query.is_cuda else flex_attention
    gqa = query.shape[1] != key.shape[1]
    return attend(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa).transpose(1, 2).contiguous()
