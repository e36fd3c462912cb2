"""Answer-token losses of packed query batches: cross-entropy and the numeric L1 of the expected number.

Every function works on the *supervised positions only*: `logits` (N, V) are the logits of the N tokens that
predict an answer token (the position before it, since token t predicts token t + 1), as returned by
`packed_forward(..., logits_to_keep=predict_mask)`. Functions return per-token or per-query values or sums; the
training loop divides the sums by counts taken over the *global* batch (all processes, all accumulation
micro-batches), so the loss is the mean over every answer token / every query of the optimiser step, whatever the
split across processes (see `vlm_depth.train.step`).

Numeric expectation ("Regress, don't guess"): numbers are written one token per character with a fixed number of
decimals, so the teacher-forced distribution over the ten digit tokens at a digit position gives E[digit], and the
number's expected value is sum_i place_i * E[digit_i] (e.g. 10, 1, 0.1, 0.01, 0.001 for "12.345"). The number of
integer digits is the label's own (teacher forcing), which is what makes the expectation differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlm_depth.prompts.digits import digit_moments
from vlm_depth.train.collator import IGNORE_INDEX, Batch, num_queries


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) labels (-100 = unsupervised) -> (predict_mask (B, L) bool, targets (N,) token ids).

    predict_mask[b, t] is True when token t + 1 is supervised; targets lists those tokens in the row-major order of
    the mask, i.e. the order of `logits[predict_mask]`.
    """
    predict_mask = torch.zeros_like(labels, dtype=torch.bool)
    predict_mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return predict_mask, labels[:, 1:][predict_mask[:, :-1]]


def shift_to_predictions(values: torch.Tensor, predict_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values (B, L) of the *predicted* tokens -> (N,) aligned with `logits[predict_mask]`."""
    return values[:, 1:][predict_mask[:, :-1]]


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token CE (N,) in nats, computed in fp32; logits (N, V), targets (N,)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def per_query_mean(values: torch.Tensor, query_index: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Mean of per-token `values` (N,) over the tokens of each query (`query_index` (N,) in [0, num_queries))."""
    sums = torch.zeros(num_queries, dtype=values.dtype, device=values.device).index_add_(0, query_index, values)
    counts = torch.bincount(query_index, minlength=num_queries).clamp(min=1)
    return sums / counts


def expected_digits(logits: torch.Tensor, digit_ids: torch.Tensor) -> torch.Tensor:
    """E[digit] (N,) under the softmax restricted to the ten digit tokens; logits (N, V), digit_ids (10,) for 0..9."""
    return digit_moments(logits.index_select(-1, digit_ids))[0]


def expected_numbers(
    logits: torch.Tensor,
    digit_ids: torch.Tensor,
    places: torch.Tensor,
    query_index: torch.Tensor,
    num_queries: int,
) -> torch.Tensor:
    """Expected value in meters (num_queries,) of each query's number: sum over its digit positions of
    place * E[digit]. `places` (N,): the place value of the predicted token (0 for non-digit tokens and the point).
    """
    is_digit = places != 0
    contrib = places[is_digit].float() * expected_digits(logits[is_digit], digit_ids)
    out = torch.zeros(num_queries, dtype=contrib.dtype, device=contrib.device)
    return out.index_add_(0, query_index[is_digit], contrib)


@dataclass
class AnswerLosses:
    """Losses of one packed (micro-)batch. token_ce (N,) nats and token_query (N,) per supervised token;
    expected and targets (Q,) meters per query (teacher-forced expectation and label as written)."""

    token_ce: torch.Tensor
    token_query: torch.Tensor
    expected: torch.Tensor
    targets: torch.Tensor

    def ce_sum(self) -> torch.Tensor:
        return self.token_ce.sum()

    def l1_sum(self) -> torch.Tensor:
        """Sum over queries of |E[number] - label| in meters."""
        return (self.expected - self.targets).abs().sum()

    def per_query_ce(self) -> torch.Tensor:
        """Mean CE over each query's answer tokens (Q,)."""
        return per_query_mean(self.token_ce, self.token_query, len(self.targets))


def answer_losses(logits: torch.Tensor, batch: Batch, digit_ids: torch.Tensor) -> AnswerLosses:
    """Losses from `logits` (N, V) at the supervised positions of `batch` (`labels`, `places`, `query_ids`,
    `targets`, see `vlm_depth.train.collator`), i.e. `packed_forward(model, batch, supervised_positions(...)[0])`."""
    predict_mask, targets = supervised_positions(batch["labels"])
    token_query = shift_to_predictions(batch["query_ids"], predict_mask)
    places = shift_to_predictions(batch["places"], predict_mask)
    count = num_queries(batch)
    return AnswerLosses(
        token_ce=token_cross_entropy(logits, targets),
        token_query=token_query,
        expected=expected_numbers(logits, digit_ids, places, token_query, count),
        targets=batch["targets"].float(),
    )
