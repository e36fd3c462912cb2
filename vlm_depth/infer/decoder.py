"""Batched pixel-query decoder: one image prefix encoded once, then many pixel queries answered against its KV cache.

The prefix (system turn, image with its depth injection, shared instruction) runs once per image and its keys and
values are kept. Queries are then answered in chunks of at most `max_queries_per_pass`:

1. The chunk's longest common token prefix (e.g. the fill prompt and "The current pixel is at (") extends the cached
   prefix once; blocks see it exactly as if each had its own copy (same tokens, same positions, same context).
2. The rest of every query block (pixel identification, question, end of turn, assistant header, the answer's
   forced prefix "The pixel is ") runs in one forward against the cache.
3. Lockstep greedy decoding of the number: each step feeds one token per unfinished query, under `NumberGrammar`
   (digits, one point, exactly `decimals` decimals, no leading zero except "0."); finished queries leave the batch.
   The answer's suffix is implied and never computed.

Every query token attends to the image prefix through `vlm_depth.infer.prefix_attention` (shared-prefix attention:
the prefix keys and values are stored once and never copied per query); only the query blocks' own tokens live in
a per-chunk cache, under the block mask and per-block M-RoPE positions of `vlm_depth.model.packing`. Two layouts of
a chunk are implemented (`packing`): `batch` (default) puts one query per batch row, so the blocks' own attention
grows linearly with the chunk; `packed` puts the whole chunk in one row (batch 1), so every token's own attention
spans all blocks of the chunk (quadratic). `vlm-depth bench decoder --packing packed|batch` measures both (README).

Only the 11 logits the grammar can choose (digits, point) are computed: the last hidden state of every decoded
position is projected on those 11 rows of the LM head (a 151,936-row projection at 3B otherwise); `check_forced`
adds the full projection's argmax to flag answers the grammar overruled (FLAG_FORCED). A pass holds at most
`max_queries_per_pass` queries; -1 picks the device's default (`default_queries_per_pass`).

Per query the decoder returns `vlm_depth.infer.answers.QueryAnswers`: the greedy value (meters), the expected value
and a spread from the digit distributions along the greedy path, and flags; it never raises on a strange answer.
The reference it is tested against, one `generate()` per pixel, is `vlm_depth.infer.naive.decode_naive`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.modeling_utils import slice_logits_to_keep

from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.infer.answers import AnswerRecorder, QueryAnswers, step_stats
from vlm_depth.infer.prefix_attention import shared_prefix_attention
from vlm_depth.model.packing import PAD, block_attention_mask, packed_position_ids, with_block_positions
from vlm_depth.prompts.chat import ChatLayout, QueryTokens
from vlm_depth.prompts.grammar import NumberGrammar

Packing = Literal["batch", "packed"]


@dataclass
class PrefixCache:
    """An encoded prefix (one image): keys and values per layer (1, kv_heads, length, head_dim), the first text
    position after it (M-RoPE) and the merged image features (the source of pointer embeddings)."""

    key_values: list[tuple[torch.Tensor, torch.Tensor]]
    length: int
    text_start: int
    image_embeds: torch.Tensor
    image_grid_thw: torch.Tensor
    extended: dict[tuple[int, ...], PrefixCache] = field(default_factory=dict, repr=False)  # by shared block text


class QueryDecoder:
    """Answers pixel queries about one image: `encode_prefix(inputs)` once, then `decode(prefix, queries)`.

    model: a `DepthVLM` (uses `encode_images`, `embed_inputs`, its inner model with `inputs_embeds`, 3-D
    `position_ids`, a 4-D mask and `past_key_values`, and its LM head). layout: the `ChatLayout` the checkpoint was
    trained with. max_queries_per_pass: queries per pass, -1 = the device's default. packing: `batch` (one query
    per row) or `packed` (a chunk in one row); share_common_prefix: encode a chunk's common leading tokens once;
    check_forced: also compute the full vocabulary's argmax for FLAG_FORCED.
    """

    def __init__(
        self,
        model,
        layout: ChatLayout,
        *,
        max_queries_per_pass: int = -1,
        packing: Packing = "batch",
        share_common_prefix: bool = True,
        check_forced: bool = False,
    ) -> None:
        if max_queries_per_pass == -1:
            max_queries_per_pass = default_queries_per_pass(model)
        if max_queries_per_pass < 1:
            raise ConfigError(
                f"max_queries_per_pass must be >= 1 (or -1: the device's default), got {max_queries_per_pass}"
            )
        if packing not in ("batch", "packed"):
            raise ConfigError(f"packing must be 'batch' or 'packed', got {packing!r}")
        for method in ("encode_images", "embed_inputs"):
            if not hasattr(model, method):
                raise ModelError(f"the decoder needs a DepthVLM (no {method} on {type(model).__name__})")
        self.model = model
        self.layout = layout
        self.grammar = NumberGrammar.from_layout(layout)
        self.max_queries_per_pass = max_queries_per_pass
        self.packing = packing
        self.share_common_prefix = share_common_prefix
        self.pad_id = layout.tokenizer.pad_token_id or 0  # padding is masked; any id will do
        self.pointer_id = getattr(model, "pointer_token_id", None)
        self.check_forced = check_forced
        head = model.get_output_embeddings()
        self.choice_weight = head.weight.detach()[self.grammar.choice_ids.to(head.weight.device)]  # (11, hidden)
        self.choice_bias = None if head.bias is None else head.bias.detach()[self.grammar.choice_ids]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ prefix
    @torch.no_grad()
    def encode_prefix(self, inputs: Any) -> PrefixCache:
        """Run the vision tower, the depth branch and the prefix tokens once; keep their keys and values.

        inputs: the `DepthProcessor` output for one image and `layout.prefix_text()` (input_ids (1, P),
        pixel_values, image_grid_thw, mm_token_type_ids, and depth_maps unless monocular).
        """
        from transformers import DynamicCache

        model, device = self.model, self.device
        input_ids = inputs["input_ids"].to(device)
        if input_ids.shape[0] != 1:
            raise ModelError(f"encode_prefix takes one image prefix, got a batch of {input_ids.shape[0]}")
        grid = inputs["image_grid_thw"].to(device)
        depth = inputs.get("depth_maps")
        image_embeds = model.encode_images(
            inputs["pixel_values"].to(device), grid, None if depth is None else depth.to(device)
        )
        # Every token is prefix (segment 0): the positions are Qwen's own, text_start the first position after them.
        positions, text_start = packed_position_ids(
            model, input_ids, torch.zeros_like(input_ids), inputs["mm_token_type_ids"].to(device), grid
        )
        cache = DynamicCache(config=model.config)
        model(
            inputs_embeds=model.embed_inputs(input_ids, image_embeds=image_embeds),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        key_values = [(layer.keys, layer.values) for layer in cache.layers]
        return PrefixCache(key_values, int(input_ids.shape[1]), int(text_start[0]), image_embeds, grid)

    # ------------------------------------------------------------------ queries
    @torch.no_grad()
    def decode(self, prefix: PrefixCache, queries: Sequence[QueryTokens], progress: bool = False) -> QueryAnswers:
        """Greedy constrained answers to `queries` (blocks from `ChatLayout.query_tokens` without a number).

        Identical blocks (same tokens, same pointer pixel) are decoded once. Queries go in chunks of at most
        `max_queries_per_pass`, sorted by their tokens so a chunk shares a long common prefix.
        """
        keys = [(tuple(q.prompt + q.answer_prefix), tuple(q.pointer_xy)) for q in queries]
        unique = sorted(set(keys))
        where = {key: i for i, key in enumerate(unique)}
        parts = []
        chunks = range(0, len(unique), self.max_queries_per_pass)
        with shared_prefix_attention(self.model):
            for start in tqdm(chunks, desc="query chunks", unit="chunk", disable=not progress, leave=False):
                parts.append(self._decode_chunk(prefix, unique[start : start + self.max_queries_per_pass]))
        merged = QueryAnswers.concat(parts)
        return merged.select(np.array([where[key] for key in keys], dtype=np.int64))

    @torch.no_grad()
    def forward_blocks(self, prefix: PrefixCache, blocks: Sequence[tuple[Sequence[int], Sequence]]) -> None:
        """One forward of whole token blocks `(token_ids, pointer_xy)` per chunk against the prefix, with the same
        chunking, common-prefix sharing and layout as `decode`: the lower bound of decoding those tokens."""
        unique = sorted({(tuple(ids), tuple(xy)) for ids, xy in blocks})
        with shared_prefix_attention(self.model):
            for start in range(0, len(unique), self.max_queries_per_pass):
                self._prefill(prefix, unique[start : start + self.max_queries_per_pass])

    def shared_length(self, blocks: list[list[int]]) -> int:
        """Tokens all blocks start with (before any pointer token), keeping at least one own token per block."""
        if not self.share_common_prefix or len(blocks) < 2:
            return 0
        limit = min(len(b) for b in blocks) - 1
        first = blocks[0]
        if self.pointer_id is not None and self.pointer_id in first:
            limit = min(limit, first.index(self.pointer_id))
        n = 0
        while n < limit and all(b[n] == first[n] for b in blocks):
            n += 1
        return n

    def _embed(self, ids: torch.Tensor, prefix: PrefixCache, pointer_xy: torch.Tensor | None) -> torch.Tensor:
        if pointer_xy is None:
            return self.model.embed_inputs(ids)
        return self.model.embed_inputs(
            ids, image_embeds=prefix.image_embeds, pointer_xy=pointer_xy, image_grid_thw=prefix.image_grid_thw
        )

    def _forward(
        self, embeds, positions, segments, cache, prefix: PrefixCache, logits_to_keep
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward of `embeds` (B, n, hidden) at `positions` (3, B, n) over the prefix and `cache` (the rows'
        own earlier tokens); `segments` (B, L): segment ids of the cached + new own tokens. Returns the logits of
        the 11 grammar choices at the kept positions (kept, 11), and with `check_forced` the choice index of the
        full vocabulary's argmax there (kept,) (-1 outside the grammar), else None."""
        hidden = self.model.model(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=block_attention_mask(segments, num_new=embeds.shape[1], dtype=embeds.dtype),
            past_key_values=cache,
            use_cache=True,
            prefix_kv=prefix.key_values,
        ).last_hidden_state
        hidden = slice_logits_to_keep(hidden, logits_to_keep)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        full_best = None
        if self.check_forced:
            full_best = self.grammar.choices_of(self.model.get_output_embeddings()(hidden).argmax(dim=-1))
        return F.linear(hidden, self.choice_weight.to(hidden.dtype), self.choice_bias), full_best

    def _extend(self, prefix: PrefixCache, token_ids: Sequence[int]) -> PrefixCache:
        """The prefix followed by `token_ids` (text shared by a chunk's blocks, no pointer), encoded once per image
        (memoised in `prefix.extended`) at the positions those tokens have inside every block: blocks then see
        exactly what they would see alone."""
        from transformers import DynamicCache

        if not token_ids:
            return prefix
        if tuple(token_ids) in prefix.extended:
            return prefix.extended[tuple(token_ids)]
        n = len(token_ids)
        ids = torch.tensor([list(token_ids)], device=self.device)
        positions = (prefix.text_start + torch.arange(n, device=self.device)).view(1, 1, n).expand(3, 1, n)
        cache = DynamicCache(config=self.model.config)
        segments = torch.ones(1, n, dtype=torch.long, device=self.device)
        self._forward(self.model.embed_inputs(ids), positions, segments, cache, prefix, 1)
        key_values = [
            (torch.cat([k, layer.keys], dim=2), torch.cat([v, layer.values], dim=2))
            for (k, v), layer in zip(prefix.key_values, cache.layers)
        ]
        extended = PrefixCache(
            key_values, prefix.length + n, prefix.text_start + n, prefix.image_embeds, prefix.image_grid_thw
        )
        prefix.extended[tuple(token_ids)] = extended
        return extended

    def _first_pass_inputs(self, rests: list[list[int]], text_start: int) -> tuple[torch.Tensor, ...]:
        """Token ids (B, L), positions (3, B, L), segment ids (B, L) and the logits mask (B, L) of a chunk's first
        forward. batch: one query per row, left-padded so every block ends in the last column; packed: all blocks
        in one row."""
        if self.packing == "batch":
            width = max(len(r) for r in rests)
            ids = torch.full((len(rests), width), self.pad_id, dtype=torch.long)
            segments = torch.full((len(rests), width), PAD, dtype=torch.long)
            for i, rest in enumerate(rests):
                ids[i, width - len(rest) :] = torch.tensor(rest)
                segments[i, width - len(rest) :] = 1
            keep = torch.zeros(len(rests), width, dtype=torch.bool)
            keep[:, -1] = True
        else:
            ids = torch.tensor([[t for r in rests for t in r]])
            segments = torch.cat([torch.full((len(r),), i + 1) for i, r in enumerate(rests)])[None]
            keep = torch.zeros_like(ids, dtype=torch.bool)
            keep[0, torch.tensor([len(r) for r in rests]).cumsum(0) - 1] = True
        starts = torch.full((ids.shape[0],), text_start, dtype=torch.long)
        positions = with_block_positions(torch.zeros(3, *ids.shape, dtype=torch.long), segments, starts)
        return tuple(t.to(self.device) for t in (ids, positions, segments, keep))

    def _prefill(self, prefix: PrefixCache, chunk: list[tuple[tuple[int, ...], tuple]]):
        """Shared leading tokens, then every block's remaining tokens in one forward. Returns the extended prefix,
        the rows' cache, their segment ids, the next position of every block and the logits at the blocks' ends."""
        from transformers import DynamicCache

        blocks = [list(ids) for ids, _ in chunk]
        base = self._extend(prefix, blocks[0][: self.shared_length(blocks)])
        rests = [b[base.length - prefix.length :] for b in blocks]
        pointer_xy = None
        if self.pointer_id is not None and any(self.pointer_id in r for r in rests):
            pointer_xy = torch.tensor([xy for _, pointers in chunk for xy in pointers], dtype=torch.float32)
        cache = DynamicCache(config=self.model.config)
        ids, positions, segments, keep = self._first_pass_inputs(rests, base.text_start)
        logits = self._forward(self._embed(ids, base, pointer_xy), positions, segments, cache, base, keep)
        next_position = base.text_start + torch.tensor([len(r) for r in rests], device=self.device)
        return base, cache, segments, next_position, logits

    def _decode_chunk(self, prefix: PrefixCache, chunk: list[tuple[tuple[int, ...], tuple]]) -> QueryAnswers:
        grammar, device = self.grammar, self.device
        base, cache, segments, next_position, (logits, full_best) = self._prefill(prefix, chunk)
        n = len(chunk)
        batched = self.packing == "batch"
        choice_ids = grammar.choice_ids.to(device)
        record = AnswerRecorder(grammar, n, device)
        active = torch.arange(n, device=device)
        state = grammar.start(n, device)
        for step in range(grammar.max_tokens):
            stats = step_stats(grammar, logits, state, full_best)
            record.record(active, step, stats, stats.choice)
            choice = stats.choice
            state = grammar.advance(state, choice)
            going = ~grammar.done(state)
            remaining = int(going.sum())  # the step's one host sync
            if not remaining:
                break
            if remaining < len(active):
                kept = going.nonzero().squeeze(1)
                active, state, choice = active[kept], state.select(kept), choice[kept]
                if batched:
                    cache.batch_select_indices(kept)
                    segments = segments[kept]
            # One new token per unfinished query: a row each (batch) or all in the one row (packed).
            shape = (len(active), 1) if batched else (1, len(active))
            new_ids = choice_ids[choice].view(shape)
            segments = torch.cat([segments, torch.ones_like(new_ids) if batched else (active + 1).view(shape)], 1)
            positions = next_position[active].view(1, *shape).expand(3, *shape)
            next_position[active] += 1
            logits, full_best = self._forward(
                self._embed(new_ids, base, None), positions, segments, cache, base, 1 if batched else 0
            )
        return record.answers()


def decode_bytes_per_query(config, block_tokens: int = 66, steps: int = 8) -> int:
    """Peak bytes one query adds to a decoding pass on a GPU (bf16): its own KV cache (block and number tokens,
    every layer), one layer's transient activations of its block (q, k, v, o and 3 MLP widths per token) and its
    11 fp32 choice logits."""
    text = config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    kv = text.num_hidden_layers * (block_tokens + steps) * 2 * text.num_key_value_heads * head_dim * 2
    return kv + block_tokens * (4 * text.hidden_size + 3 * text.intermediate_size) * 2 + 11 * 4


def default_queries_per_pass(model, share: float = 0.5, largest: int = 4096) -> int:
    """Queries per pass on the model's device: 128 on a CPU (measured fastest: cache-sized passes); on a GPU the
    largest power of two whose `decode_bytes_per_query` fit in `share` of the free memory, in [128, `largest`]
    (4096: a whole 640x480 grid at stride 9 in one pass on an H200; about 512 on a 24 GB card with the 3B)."""
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return 128
    free = torch.cuda.mem_get_info(device)[0]
    fits = int(free * share // decode_bytes_per_query(model.config))
    return max(128, min(largest, 2 ** max(fits, 1).bit_length() // 2))
