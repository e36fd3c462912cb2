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

Per query the decoder returns the greedy value (meters, parsed with `parse_meters`), the expected value and a
spread from the digit distributions along the greedy path (see `number_moments`), and flags; it never raises on a
strange answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from vlm_depth.errors import ConfigError, ModelError
from vlm_depth.infer.prefix_attention import shared_prefix_attention
from vlm_depth.model.packing import PAD, block_attention_mask, packed_position_ids, with_block_positions
from vlm_depth.prompts.chat import ChatLayout, QueryTokens
from vlm_depth.prompts.digits import digit_moments, digit_places
from vlm_depth.prompts.numbers import format_meters, parse_meters

Packing = Literal["batch", "packed"]

# Per-query flags (bit mask).
FLAG_FORCED = 1  # at some number position the model's top token over the whole vocabulary broke the grammar
FLAG_CLIPPED = 2  # the integer part hit its maximum length while the model wanted another digit (or, set by the
# readout, the value exceeded the checkpoint's max_depth)
FLAG_UNPARSEABLE = 4  # the decoded text did not parse (value is NaN); cannot happen under the grammar

POINT = 10  # choice index of the decimal point; choices 0-9 are the digits


@dataclass
class GrammarState:
    """Per query: integer digits written, decimals written (-1 before the point), leading zero written."""

    n_int: torch.Tensor
    n_frac: torch.Tensor
    lead_zero: torch.Tensor

    def select(self, index: torch.Tensor) -> GrammarState:
        return GrammarState(self.n_int[index], self.n_frac[index], self.lead_zero[index])


class NumberGrammar:
    """The format of an answer's number as a state machine over 11 choices (digits 0-9, the point).

    Valid numbers: 1 to `max_int_digits` integer digits without a leading zero (except "0"), a point, then exactly
    `decimals` digits: what `format_meters` writes. `max_int_digits` follows from the formatter's clipping.
    """

    def __init__(self, digit_ids: Sequence[int], point_id: int, decimals: int, max_int_digits: int) -> None:
        if decimals < 1:
            raise ConfigError(
                f"the decoder needs answers with decimals >= 1 (the point ends the integer part), got {decimals}"
            )
        if len(digit_ids) != 10:
            raise ConfigError(f"expected 10 digit token ids, got {len(digit_ids)}")
        self.choice_ids = torch.tensor([*digit_ids, point_id], dtype=torch.long)
        self.decimals = decimals
        self.max_int_digits = max_int_digits
        self.max_tokens = max_int_digits + 1 + decimals

    @classmethod
    def from_layout(cls, layout: ChatLayout) -> NumberGrammar:
        decimals = layout.textualizer.decimals
        max_int = len(format_meters(1e12, decimals).split(".")[0])
        return cls(layout.digit_ids, layout.point_id, decimals, max_int)

    def start(self, n: int, device: torch.device | str = "cpu") -> GrammarState:
        zeros = torch.zeros(n, dtype=torch.long, device=device)
        return GrammarState(zeros, zeros - 1, torch.zeros(n, dtype=torch.bool, device=device))

    def allowed(self, state: GrammarState) -> torch.Tensor:
        """(n, 11) bool: which choices may come next."""
        before_point = state.n_frac < 0
        digit_ok = (before_point & (state.n_int < self.max_int_digits) & ~state.lead_zero) | (
            ~before_point & (state.n_frac < self.decimals)
        )
        point_ok = before_point & (state.n_int > 0)
        return torch.cat([digit_ok[:, None].expand(-1, 10), point_ok[:, None]], dim=1)

    def advance(self, state: GrammarState, choice: torch.Tensor) -> GrammarState:
        """State after `choice` (n,) (assumed allowed)."""
        before_point = state.n_frac < 0
        is_point = choice == POINT
        lead_zero = state.lead_zero | (before_point & (state.n_int == 0) & (choice == 0))
        n_int = state.n_int + (before_point & ~is_point).long()
        n_frac = torch.where(is_point, 0, torch.where(before_point, state.n_frac, state.n_frac + 1))
        return GrammarState(n_int, n_frac, lead_zero)

    def done(self, state: GrammarState) -> torch.Tensor:
        return state.n_frac >= self.decimals

    def text(self, choices: Sequence[int]) -> str:
        return "".join("." if c == POINT else str(c) for c in choices)

    def choices_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Choice index of each token id (-1 for tokens outside the grammar's alphabet)."""
        vocab = int(max(int(token_ids.max()) if token_ids.numel() else 0, int(self.choice_ids.max()))) + 1
        lookup = torch.full((vocab,), -1, dtype=torch.long, device=token_ids.device)
        lookup[self.choice_ids.to(token_ids.device)] = torch.arange(11, device=token_ids.device)
        return lookup[token_ids]


def number_moments(places: Sequence[float], means: np.ndarray, variances: np.ndarray) -> tuple[float, float]:
    """Expected value and spread (meters) of one decoded number from its digit distributions.

    places: place value of each decoded token (`vlm_depth.prompts.digits.digit_places`: 10, 1, 0 for the point, 0.1,
    ...); means, variances: (tokens,) E[digit] and Var[digit] at each step. A digit at place 10^k contributes
    10^k * E[digit] to the expected value and 10^2k * Var[digit] to the variance (positions taken as independent,
    each distribution conditioned on the greedy digits before it, as in the numeric training loss). The spread is
    the square root of that variance; it does not cover doubt about the number of integer digits.
    """
    places = np.asarray(places, dtype=np.float64)
    expected = float(places @ means[: len(places)])
    return expected, float(np.sqrt(places**2 @ variances[: len(places)]))


@dataclass
class QueryAnswers:
    """Answers of n queries. value/expected/spread: (n,) float32 meters (value NaN if unparseable); flags: (n,)
    uint8 `FLAG_*` bits; margin: (n,) smallest gap between the best and second-best allowed logit over the decoded
    positions (near-ties); tokens: the number's token ids per query."""

    value: np.ndarray
    expected: np.ndarray
    spread: np.ndarray
    flags: np.ndarray
    margin: np.ndarray
    tokens: list[list[int]]

    def __len__(self) -> int:
        return len(self.value)

    def select(self, index: np.ndarray) -> QueryAnswers:
        return QueryAnswers(
            self.value[index],
            self.expected[index],
            self.spread[index],
            self.flags[index],
            self.margin[index],
            [self.tokens[i] for i in index],
        )

    @staticmethod
    def concat(parts: Sequence[QueryAnswers]) -> QueryAnswers:
        """The answers of `parts`, one after the other."""
        if not parts:
            empty = np.zeros(0, dtype=np.float32)
            return QueryAnswers(empty, empty, empty, np.zeros(0, np.uint8), empty, [])
        arrays = (
            np.concatenate([getattr(p, f) for p in parts]) for f in ("value", "expected", "spread", "flags", "margin")
        )
        return QueryAnswers(*arrays, [t for p in parts for t in p.tokens])

    def counts(self) -> dict[str, int]:
        return {
            "queries": len(self),
            "forced": int((self.flags & FLAG_FORCED).astype(bool).sum()),
            "clipped": int((self.flags & FLAG_CLIPPED).astype(bool).sum()),
            "unparseable": int((self.flags & FLAG_UNPARSEABLE).astype(bool).sum()),
        }


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


@dataclass
class StepStats:
    """One decoding step of m queries: greedy choice (m,), digit mean and variance (m,), FLAG_* bits (m,) uint8 and
    the gap between the two best allowed logits (m,) (inf when only one choice is allowed)."""

    choice: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    flags: torch.Tensor
    gap: torch.Tensor


def _step_stats(grammar: NumberGrammar, logits: torch.Tensor, state: GrammarState) -> StepStats:
    """Greedy grammar-constrained choice and its statistics from full-vocabulary logits (m, vocab)."""
    sub = logits[:, grammar.choice_ids.to(logits.device)].float()
    allowed = grammar.allowed(state)
    masked = sub.masked_fill(~allowed, -math.inf)
    top2 = masked.topk(2, dim=-1).values
    gap = torch.where(torch.isinf(top2[:, 1]), math.inf, top2[:, 0] - top2[:, 1])
    full_best = grammar.choices_of(logits.argmax(dim=-1))
    broke = (full_best < 0) | ~allowed.gather(1, full_best.clamp(min=0)[:, None])[:, 0]
    at_limit = (state.n_frac < 0) & (state.n_int >= grammar.max_int_digits) & ~state.lead_zero
    clipped = at_limit & (sub[:, :POINT].max(dim=-1).values > sub[:, POINT])
    mean, var = digit_moments(sub[:, :POINT])
    flags = (broke.to(torch.uint8) * FLAG_FORCED) | (clipped.to(torch.uint8) * FLAG_CLIPPED)
    return StepStats(masked.argmax(dim=-1), mean, var, flags, gap)


def _answers_from_steps(
    grammar: NumberGrammar,
    choices: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    flags: np.ndarray,
    margin: np.ndarray,
) -> QueryAnswers:
    """Per-step records (n, steps) (choice -1 = no step) -> answers: text parsed by `parse_meters`, moments."""
    n = len(choices)
    values, expected, spread = (np.full(n, np.nan, dtype=np.float32) for _ in range(3))
    tokens = []
    choice_ids = grammar.choice_ids.tolist()
    digit_ids, point_id = choice_ids[:POINT], choice_ids[POINT]
    for i, row in enumerate(choices):
        picked = [int(c) for c in row if c >= 0]
        tokens.append([choice_ids[c] for c in picked])
        expected[i], spread[i] = number_moments(digit_places(tokens[-1], digit_ids, point_id), means[i], variances[i])
        parsed = parse_meters(grammar.text(picked))
        if parsed.ok:
            values[i] = parsed.value
        else:
            flags[i] |= FLAG_UNPARSEABLE
    return QueryAnswers(values, expected, spread, flags, margin, tokens)


class QueryDecoder:
    """Answers pixel queries about one image: `encode_prefix(inputs)` once, then `decode(prefix, queries)`.

    model: a `DepthVLM` (uses `encode_images`, `embed_inputs` and the forward with `inputs_embeds`, 3-D
    `position_ids`, a 4-D mask and `past_key_values`). layout: the `ChatLayout` the checkpoint was trained with.
    packing: `batch` (one query per row) or `packed` (a chunk in one row); share_common_prefix: encode a chunk's
    common leading tokens once.
    """

    def __init__(
        self,
        model,
        layout: ChatLayout,
        *,
        max_queries_per_pass: int = 128,
        packing: Packing = "batch",
        share_common_prefix: bool = True,
    ) -> None:
        if max_queries_per_pass < 1:
            raise ConfigError(f"max_queries_per_pass must be >= 1, got {max_queries_per_pass}")
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

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ prefix
    @torch.no_grad()
    def encode_prefix(self, inputs: Any) -> PrefixCache:
        """Run the vision tower, the depth branch and the prefix tokens once; keep their keys and values.

        inputs: the `DepthProcessor` output for one image and `layout.prefix_text()` (input_ids (1, P),
        pixel_values, image_grid_thw, mm_token_type_ids, and depth_values unless monocular).
        """
        from transformers import DynamicCache

        model, device = self.model, self.device
        input_ids = inputs["input_ids"].to(device)
        if input_ids.shape[0] != 1:
            raise ModelError(f"encode_prefix takes one image prefix, got a batch of {input_ids.shape[0]}")
        grid = inputs["image_grid_thw"].to(device)
        depth = inputs.get("depth_values")
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

    def _shared_length(self, blocks: list[list[int]]) -> int:
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

    def _forward(self, embeds, positions, segments, cache, prefix: PrefixCache, logits_to_keep) -> torch.Tensor:
        """One forward of `embeds` (B, n, hidden) at `positions` (3, B, n) over the prefix and `cache` (the rows'
        own earlier tokens); `segments` (B, L): segment ids of the cached + new own tokens. Returns the kept logits
        flattened to (kept, vocab)."""
        out = self.model(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=block_attention_mask(segments, num_new=embeds.shape[1], dtype=embeds.dtype),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            prefix_kv=prefix.key_values,
        )
        return out.logits.reshape(-1, out.logits.shape[-1])

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
        base = self._extend(prefix, blocks[0][: self._shared_length(blocks)])
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
        base, cache, segments, next_position, logits = self._prefill(prefix, chunk)
        n = len(chunk)
        batched = self.packing == "batch"
        choice_ids = grammar.choice_ids.to(device)
        steps = grammar.max_tokens
        choices = np.full((n, steps), -1, dtype=np.int64)
        means = np.zeros((n, steps), dtype=np.float32)
        variances = np.zeros((n, steps), dtype=np.float32)
        flags = np.zeros(n, dtype=np.uint8)
        margin = np.full(n, np.inf, dtype=np.float32)
        active = torch.arange(n, device=device)
        state = grammar.start(n, device)
        for step in range(steps):
            stats = _step_stats(grammar, logits, state)
            rows = active.cpu().numpy()
            choices[rows, step] = stats.choice.cpu().numpy()
            means[rows, step] = stats.mean.cpu().numpy()
            variances[rows, step] = stats.var.cpu().numpy()
            flags[rows] |= stats.flags.cpu().numpy()
            margin[rows] = np.minimum(margin[rows], stats.gap.cpu().numpy())

            choice = stats.choice
            state = grammar.advance(state, choice)
            going = ~grammar.done(state)
            if not bool(going.any()):
                break
            if not bool(going.all()):
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
            logits = self._forward(
                self._embed(new_ids, base, None), positions, segments, cache, base, 1 if batched else 0
            )
        return _answers_from_steps(grammar, choices, means, variances, flags, margin)


class GrammarLogitsProcessor:
    """`generate()` logits processor enforcing `NumberGrammar` on the tokens after `prompt_length`, then forcing
    `eos_token_id` once the number is complete: the naive reference decoder's constraint."""

    def __init__(self, grammar: NumberGrammar, prompt_length: int, eos_token_id: int) -> None:
        self.grammar = grammar
        self.prompt_length = prompt_length
        self.eos_token_id = eos_token_id

    def state(self, input_ids: torch.Tensor) -> GrammarState:
        state = self.grammar.start(input_ids.shape[0], input_ids.device)
        for column in input_ids[:, self.prompt_length :].T:
            state = self.grammar.advance(state, self.grammar.choices_of(column).clamp(min=0))
        return state

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        state = self.state(input_ids)
        allowed = self.grammar.allowed(state)
        done = self.grammar.done(state)
        bias = torch.full_like(scores, -math.inf)
        choice_ids = self.grammar.choice_ids.to(scores.device)
        bias[:, choice_ids] = torch.where(allowed, 0.0, -math.inf).to(scores.dtype)
        bias[done] = -math.inf
        bias[done, self.eos_token_id] = 0.0
        return scores + bias


def _naive_inputs(inputs: Any, query: QueryTokens, device: torch.device) -> dict[str, torch.Tensor]:
    block = torch.tensor(query.prompt + query.answer_prefix, dtype=torch.long)
    input_ids = torch.cat([inputs["input_ids"][0].cpu(), block])[None]
    mm_types = torch.cat([inputs["mm_token_type_ids"][0].cpu(), torch.zeros_like(block, dtype=torch.int)])[None]
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": mm_types.to(inputs["mm_token_type_ids"].dtype),
        "pixel_values": inputs["pixel_values"],
        "image_grid_thw": inputs["image_grid_thw"],
    }
    if inputs.get("depth_values") is not None:
        out["depth_values"] = inputs["depth_values"]
    if query.pointer_xy:
        out["pointer_xy"] = torch.tensor(query.pointer_xy, dtype=torch.float32)
    return {k: v.to(device) for k, v in out.items()}


@torch.no_grad()
def decode_naive(
    model, layout: ChatLayout, inputs: Any, queries: Sequence[QueryTokens], progress: bool = False
) -> QueryAnswers:
    """Reference decoder: one `model.generate()` per query on the full sequence (prefix + block, image and depth
    re-encoded every time), greedy under the same grammar (`GrammarLogitsProcessor`). The expected value, spread,
    flags and margins come from the raw logits of each generated step, computed as in `QueryDecoder`."""
    from transformers import LogitsProcessorList

    grammar = NumberGrammar.from_layout(layout)
    eos = layout.tokenizer.eos_token_id
    device = model.get_input_embeddings().weight.device
    steps = grammar.max_tokens
    n = len(queries)
    choices = np.full((n, steps), -1, dtype=np.int64)
    means = np.zeros((n, steps), dtype=np.float32)
    variances = np.zeros((n, steps), dtype=np.float32)
    flags = np.zeros(n, dtype=np.uint8)
    margin = np.full(n, np.inf, dtype=np.float32)
    for i, query in enumerate(tqdm(queries, desc="naive generate", unit="query", disable=not progress)):
        args = _naive_inputs(inputs, query, device)
        length = args["input_ids"].shape[1]
        out = model.generate(
            **args,
            logits_processor=LogitsProcessorList([GrammarLogitsProcessor(grammar, length, eos)]),
            max_new_tokens=steps + 1,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=layout.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        number = out.sequences[0, length:]
        state = grammar.start(1, device)
        for step, token in enumerate(number.tolist()):
            if bool(grammar.done(state)[0]):
                break
            stats = _step_stats(grammar, out.logits[step].to(device), state)
            choice = int(grammar.choices_of(torch.tensor([token], device=device))[0])
            choices[i, step], means[i, step], variances[i, step] = choice, stats.mean[0], stats.var[0]
            flags[i] |= int(stats.flags[0])
            margin[i] = min(margin[i], float(stats.gap[0]))
            state = grammar.advance(state, torch.tensor([max(choice, 0)], device=device))
    return _answers_from_steps(grammar, choices, means, variances, flags, margin)
