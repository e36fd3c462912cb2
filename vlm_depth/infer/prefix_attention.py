"""Attention over a shared prefix without copying it: many query blocks attend to one image prefix's keys and values.

Every query block sees the same prefix (system turn, image, instruction). Repeating the prefix's keys and values
along the batch (one row per block) would copy them once per block at every decoding step and recompute the same
prefix keys' dot products batch row by batch row. Instead the attention is split in two parts that are combined
exactly with a shared log-sum-exp (as in cascade / shared-prefix inference, e.g. Hydragen, Juravsky et al. 2024):

- prefix part: all rows' queries against the prefix keys (1, kv_heads, P, head_dim) in one matrix product;
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

ATTENTION_NAME = "vlm_depth_shared_prefix"


def shared_prefix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of `query` (B, H, n, D) over the prefix `prefix_kv[layer]` ((1, H_kv, P, D) keys and values,
    visible to every token) followed by the row's own `key`/`value` (B, H_kv, L, D) under `attention_mask`
    (B, 1, n, L) additive. Returns (B, n, H, D) like transformers' attention functions."""
    if prefix_kv is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ModelError("shared-prefix attention is for inference; attention dropout must be 0")
    prefix_key, prefix_value = prefix_kv[module.layer_idx]
    batch, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    # Query head h reads kv head h // groups (transformers' repeat_kv): group the query heads under their kv head.
    q = query.reshape(batch, kv_heads, groups * n, dim)
    own = torch.matmul(q, key.transpose(-1, -2)).float() * scaling  # (B, H_kv, g*n, L)
    own = own.view(batch, kv_heads, groups, n, -1)
    if attention_mask is not None:
        own = own + attention_mask[:, :, None].float()
    q_all = q.transpose(0, 1).reshape(kv_heads, batch * groups * n, dim)
    pre = torch.matmul(q_all, prefix_key[0].transpose(-1, -2)).float() * scaling  # (H_kv, B*g*n, P)
    pre = pre.view(kv_heads, batch, groups, n, -1)
    top = torch.maximum(own.amax(-1), pre.amax(-1).transpose(0, 1))  # (B, H_kv, g, n)
    own_w = (own - top[..., None]).exp()
    pre_w = (pre - top.transpose(0, 1)[..., None]).exp()
    total = own_w.sum(-1) + pre_w.sum(-1).transpose(0, 1)  # (B, H_kv, g, n)
    out = torch.matmul(own_w.to(value.dtype).view(batch, kv_heads, groups * n, -1), value)
    out_pre = torch.matmul(pre_w.to(value.dtype).view(kv_heads, batch * groups * n, -1), prefix_value[0])
    out = out.float() + out_pre.float().view(kv_heads, batch, groups * n, dim).transpose(0, 1)
    out = out / total.view(batch, kv_heads, groups * n, 1)
    return out.to(query.dtype).view(batch, heads, n, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention_forward)


@contextmanager
def shared_prefix_attention(model) -> Iterator[None]:
    """Within the block, the language model of `model` (a Qwen2.5-VL) uses `shared_prefix_attention_forward`; forward
    calls then pass `prefix_kv=` (per layer (1, H_kv, P, D) keys and values) and the mask of the non-prefix tokens."""
    config = model.model.language_model.config
    before = config._attn_implementation
    if before not in ("sdpa", "eager"):
        raise ModelError(f"the shared-prefix decoder runs on sdpa/eager attention models, not {before!r}")
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
