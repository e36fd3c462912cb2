"""Digit-token arithmetic shared by the numeric training loss and the decoder's expected value and uncertainty.

Numbers are written one character per token (digits and the point, see `vlm_depth.prompts.numbers`), so the value of
a number is a sum of place value x digit, and a digit's distribution gives its mean and variance.
"""

from __future__ import annotations

import torch


def digit_places(number_ids: list[int], digit_ids: list[int], point_id: int) -> list[float]:
    """Place value of every token of a number written one character per token ("12.345" -> 10, 1, 0, .1, .01,
    .001); 0 for the point."""
    point = number_ids.index(point_id) if point_id in number_ids else len(number_ids)
    places = []
    for i, token in enumerate(number_ids):
        if token == point_id:
            places.append(0.0)
        elif token in digit_ids:
            places.append(10.0 ** (point - 1 - i) if i < point else 10.0 ** (point - i))
        else:
            raise ValueError(f"token {token} of a number is neither a digit nor the point")
    return places


def digit_moments(digit_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a digit under softmax over the 10 digit logits (..., 10) (the point excluded)."""
    probs = digit_logits.float().softmax(dim=-1)
    digits = torch.arange(10, dtype=torch.float32, device=probs.device)
    mean = (probs * digits).sum(-1)
    return mean, ((probs * digits**2).sum(-1) - mean**2).clamp(min=0)
