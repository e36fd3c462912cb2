"""Attention over a shared prefix without copying it: many query blocks attend to one image prefix's keys and values.

Every query block sees the same prefix (system turn, image, instruction). Repeating the prefix's keys and values
along the batch (one row per block) would copy them once per block at every decoding step and recompute the same
prefix keys' dot products batch row by batch row. Instead the attention is split in two parts that are combined
exactly with a shared log-sum-exp (as in cascade / shared-prefix inference, e.g. Hydragen, Juravsky et al. 2024):

- prefix part: all rows' queries against the prefix keys (1, kv_heads, P, head_dim) in one attention call;
- own part: each row against its own cached block tokens with the caller's 4-D additive mask.

It is registered as the transformers attention function `vlm_depth_shared_prefix` (the library's extension point)
and active only inside `shared_prefix_attention(model)`; calls without `prefix_kv` fall back to SDPA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlm_depth.errors import ModelError
from vlm_depth.model.packed_attention import NAME as PACKED_ATTENTION

ATTENTION_NAME = "vlm_depth_shared_prefix"


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (B, H, n, D) and its log-sum-exp (B, H, n) in float32, for queries (B, H, n, D) over keys
    and values (B', H, L, D) (B' = B or 1) with an additive mask (broadcast to (B, H, n, L)) or None.

    fused: use a PyTorch kernel that returns the log-sum-exp: on CPU the flash-attention kernel (about 4x faster than
    the plain computation); on CUDA, without a mask (the prefix part), flash attention for bf16/fp16 and the
    memory-efficient kernel for fp32 (not run on a GPU yet). Otherwise scores are materialised in float32.
    """
    if fused and query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=mask, scale=scale
        )
        return out.float(), lse.float()
    if fused and query.is_cuda and mask is None:
        if query.dtype in (torch.float16, torch.bfloat16):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, scale=scale)[
                :2
            ]
        else:  # the log-sum-exp comes padded to a multiple of 32 queries
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, None, True, 0.0, False, scale=scale
            )[:2]
        return out.float(), lse[..., : query.shape[2]].float()
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = scores.logsumexp(dim=-1)
    weights = (scores - lse[..., None]).exp()
    return torch.matmul(weights.to(value.dtype), value).float(), lse


def shared_prefix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    fused: bool = True,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of `query` (B, H, n, D) over the prefix `prefix_kv[layer]` ((1, H_kv, P, D) keys and values,
    visible to every token) followed by the row's own `key`/`value` (B, H_kv, L, D) under `attention_mask`
    (B, 1, n, L) additive. Returns (B, n, H, D) like transformers' attention functions. The two parts are computed
    separately (`attention_with_lse`) and merged by their log-sum-exps."""
    if prefix_kv is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ModelError("shared-prefix attention is for inference; attention dropout must be 0")
    prefix_key, prefix_value = prefix_kv[module.layer_idx]
    batch, heads, n, dim = query.shape
    groups = heads // key.shape[1]
    scaling = dim**-0.5 if scaling is None else scaling
    # Query head h reads kv head h // groups (transformers' repeat_kv).
    own, own_lse = attention_with_lse(
        query,
        key.repeat_interleave(groups, dim=1),
        value.repeat_interleave(groups, dim=1),
        attention_mask,
        scaling,
        fused,
    )
    # All rows' queries against the one prefix: fold the batch into the query length, so nothing is repeated.
    folded = query.transpose(0, 1).reshape(1, heads, batch * n, dim)
    pre, pre_lse = attention_with_lse(
        folded,
        prefix_key.repeat_interleave(groups, dim=1),
        prefix_value.repeat_interleave(groups, dim=1),
        None,
        scaling,
        fused,
    )
    pre = pre.view(heads, batch, n, dim).transpose(0, 1)
    pre_lse = pre_lse.view(heads, batch, n).transpose(0, 1)
    top = torch.maximum(own_lse, pre_lse)
    own_w, pre_w = (own_lse - top).exp()[..., None], (pre_lse - top).exp()[..., None]
    out = (own * own_w + pre * pre_w) / (own_w + pre_w)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention_forward)


@contextmanager
def shared_prefix_attention(model) -> Iterator[None]:
    """Within the block, the language model of `model` (a Qwen2.5-VL) uses `shared_prefix_attention_forward`; forward
    calls then pass `prefix_kv=` (per layer (1, H_kv, P, D) keys and values) and the mask of the non-prefix tokens."""
    config = model.model.language_model.config
    before = config._attn_implementation
    if before not in ("sdpa", "eager", PACKED_ATTENTION):  # packed attention is SDPA outside packed training
        raise ModelError(f"the shared-prefix decoder runs on sdpa/eager attention models, not {before!r}")
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
