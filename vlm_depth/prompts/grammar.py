"""The grammar of a number in an answer: what `format_meters` writes (1 to `max_int_digits` integer digits without a
leading zero except "0", a point, exactly `decimals` decimals), as a state machine over 11 choices (digits 0-9 and
the point). The fast decoder steps it in lockstep for many queries; `GrammarLogitsProcessor` enforces it inside
Hugging Face `generate()` (the reference decoder).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlm_depth.errors import ConfigError
from vlm_depth.prompts.chat import ChatLayout
from vlm_depth.prompts.numbers import format_meters

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
