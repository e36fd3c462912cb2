"""Window attention of the Qwen2.5-VL vision tower in one attention call per block on CUDA.

transformers' vision attention, under `sdpa`, splits every block's queries, keys and values by window with
`lengths.tolist()` (a host sync per block) and calls attention once per window (30 windows at 640x480, 28 windowed
blocks in the 3B tower): thousands of small kernels and syncs per image. Under an implementation whose name contains
"flash" it instead hands over the whole (1, H, S, d) sequence with the window boundaries `cu_seq_lens_q` and their
longest length `max_length_q` (one host read per tower forward). `vlm_depth_flash_windows` takes that hand-over:

- CUDA: the windows become a padded batch (n, H, M, d) gathered on the device, one SDPA call with a key-padding mask
  (none when every window is full), then gathered back: no host sync, static shapes. Not run on a GPU yet.
- elsewhere: exactly transformers' loop (one SDPA call per window), so CPU numbers do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "vlm_depth_flash_windows"  # "flash": transformers then passes whole sequences and window boundaries


def padded_window_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: torch.Tensor, longest: int, scaling: float
) -> torch.Tensor:
    """Attention within each window [bounds[i], bounds[i + 1]) of (1, H, S, d) queries, keys and values (windows
    padded to `longest` tokens, one SDPA call) -> (1, S, H, d)."""
    _, heads, length, dim = query.shape
    count = len(bounds) - 1
    starts = bounds[:-1].long()
    slots = starts[:, None] + torch.arange(longest, device=query.device)  # (n, M) token of each window slot
    valid = slots < bounds[1:].long()[:, None]
    slots = slots.masked_fill(~valid, length)  # padding slots read an appended zero row

    def windows(x: torch.Tensor) -> torch.Tensor:  # (1, H, S, d) -> (n, H, M, d)
        padded = torch.cat([x[0], x.new_zeros(heads, 1, dim)], dim=1)
        return padded[:, slots.flatten()].unflatten(1, (count, longest)).transpose(0, 1)

    mask = None if longest * count == length else valid[:, None, None, :]
    out = F.scaled_dot_product_attention(windows(query), windows(key), windows(value), attn_mask=mask, scale=scaling)
    window = torch.searchsorted(bounds[1:].long(), torch.arange(length, device=query.device), right=True)
    token = window * longest + torch.arange(length, device=query.device) - starts[window]
    return out.transpose(1, 2).flatten(0, 1)[token][None]  # (n M, H, d) -> (1, S, H, d)


def window_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function of the vision blocks (see the module docstring) -> (1, S, H, d)."""
    if query.is_cuda and not dropout:
        return padded_window_attention(query, key, value, cu_seq_lens_q, int(max_length_q), scaling), None
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    parts = [
        sdpa_attention_forward(
            module, q, k, v, attention_mask=None, scaling=scaling, dropout=dropout, is_causal=False
        )[0]
        for q, k, v in zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value)))
    ]
    return torch.cat(parts, dim=1), None


AttentionInterface.register(NAME, window_attention)


def use_window_attention(model) -> None:
    """Make the vision tower of `model` (a Qwen2.5-VL) use `window_attention` (not saved with the checkpoint)."""
    model.model.visual.config._attn_implementation = NAME
