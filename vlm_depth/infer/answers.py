"""What the decoders return per query: the greedy number, its expected value and spread from the digit distributions
along the greedy path, flags, and the near-tie margin. The fast decoder and the naive reference record the same
per-step statistics (`step_stats`, `AnswerRecorder`), so their answers are comparable field by field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlm_depth.prompts.digits import digit_moments, digit_places
from vlm_depth.prompts.grammar import POINT, GrammarState, NumberGrammar
from vlm_depth.prompts.numbers import parse_meters

# Per-query flags (bit mask).
FLAG_FORCED = 1  # at some number position the model's top token over the whole vocabulary broke the grammar
# (checked only on request: `check_forced`, since it needs the full vocabulary projection)
FLAG_CLIPPED = 2  # the integer part hit its maximum length while the model wanted another digit (or, set by the
# readout, the value exceeded the checkpoint's max_depth)
FLAG_UNPARSEABLE = 4  # the decoded text did not parse (value is NaN); cannot happen under the grammar


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
class StepStats:
    """One decoding step of m queries: greedy choice (m,), digit mean and variance (m,), FLAG_* bits (m,) uint8 and
    the gap between the two best allowed logits (m,) (inf when only one choice is allowed)."""

    choice: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    flags: torch.Tensor
    gap: torch.Tensor


def step_stats(
    grammar: NumberGrammar, choice_logits: torch.Tensor, state: GrammarState, full_best: torch.Tensor | None = None
) -> StepStats:
    """Greedy grammar-constrained choice and its statistics from the logits of the 11 choices (m, 11) (digits 0-9,
    the point). full_best: the choice index (-1 outside the grammar) of the top token over the whole vocabulary
    (m,), which sets FLAG_FORCED where the grammar overruled it; None = not checked (flag never set)."""
    sub = choice_logits.float()
    allowed = grammar.allowed(state)
    masked = sub.masked_fill(~allowed, -math.inf)
    top2 = masked.topk(2, dim=-1).values
    gap = torch.where(torch.isinf(top2[:, 1]), math.inf, top2[:, 0] - top2[:, 1])
    at_limit = (state.n_frac < 0) & (state.n_int >= grammar.max_int_digits) & ~state.lead_zero
    clipped = at_limit & (sub[:, :POINT].max(dim=-1).values > sub[:, POINT])
    mean, var = digit_moments(sub[:, :POINT])
    flags = clipped.to(torch.uint8) * FLAG_CLIPPED
    if full_best is not None:
        broke = (full_best < 0) | ~allowed.gather(1, full_best.clamp(min=0)[:, None])[:, 0]
        flags = flags | (broke.to(torch.uint8) * FLAG_FORCED)
    return StepStats(masked.argmax(dim=-1), mean, var, flags, gap)


class AnswerRecorder:
    """Per-step records of n queries decoded under the grammar, kept on `device` (one copy to the host at the end,
    no sync per step): the choice, the digit mean and variance at every step, the flags and the smallest near-tie
    gap; `answers()` turns them into `QueryAnswers`."""

    def __init__(self, grammar: NumberGrammar, n: int, device: torch.device | str = "cpu") -> None:
        steps = grammar.max_tokens
        self.grammar = grammar
        self.choices = torch.full((n, steps), -1, dtype=torch.long, device=device)  # -1 = no step
        self.means = torch.zeros((n, steps), dtype=torch.float32, device=device)
        self.variances = torch.zeros((n, steps), dtype=torch.float32, device=device)
        self.flags = torch.zeros(n, dtype=torch.uint8, device=device)
        self.margin = torch.full((n,), math.inf, dtype=torch.float32, device=device)

    def record(self, rows: torch.Tensor, step: int, stats: StepStats, choice: torch.Tensor) -> None:
        """Step `step` of the queries `rows` (m,) (distinct): their `stats` and the choice (m,) actually taken."""
        self.choices[rows, step] = choice
        self.means[rows, step] = stats.mean.float()
        self.variances[rows, step] = stats.var.float()
        self.flags[rows] |= stats.flags
        self.margin[rows] = torch.minimum(self.margin[rows], stats.gap.float())

    def answers(self) -> QueryAnswers:
        """The recorded steps as answers: text parsed by `parse_meters`, expected value and spread."""
        grammar, n = self.grammar, len(self.choices)
        choices, means, variances = (t.cpu().numpy() for t in (self.choices, self.means, self.variances))
        flags, margin = self.flags.cpu().numpy(), self.margin.cpu().numpy()
        values, expected, spread = (np.full(n, np.nan, dtype=np.float32) for _ in range(3))
        tokens = []
        choice_ids = grammar.choice_ids.tolist()
        digit_ids, point_id = choice_ids[:POINT], choice_ids[POINT]
        for i, row in enumerate(choices):
            picked = [int(c) for c in row if c >= 0]
            tokens.append([choice_ids[c] for c in picked])
            places = digit_places(tokens[-1], digit_ids, point_id)
            expected[i], spread[i] = number_moments(places, means[i], variances[i])
            parsed = parse_meters(grammar.text(picked))
            if parsed.ok:
                values[i] = parsed.value
            else:
                flags[i] |= FLAG_UNPARSEABLE
        return QueryAnswers(values, expected, spread, flags, margin, tokens)
