"""The numeric expectation is sum(place * E[digit]) under the digit-restricted softmax; CE and places as stated."""

from __future__ import annotations

import math

import pytest
import torch

from vlm_depth.prompts.digits import digit_places
from vlm_depth.train.losses import (
    expected_digits,
    expected_numbers,
    per_query_mean,
    supervised_positions,
)

DIGITS = list(range(20, 30))  # token ids of "0".."9" in a toy vocabulary of 32
POINT = 30


def test_digit_places_of_a_number():
    ids = [DIGITS[1], DIGITS[2], POINT, DIGITS[3], DIGITS[4], DIGITS[5]]  # "12.345"
    assert digit_places(ids, DIGITS, POINT) == pytest.approx([10, 1, 0, 0.1, 0.01, 0.001])
    with pytest.raises(ValueError):
        digit_places([DIGITS[1], 3], DIGITS, POINT)


def test_expected_digit_ignores_non_digit_tokens():
    logits = torch.full((1, 32), -5.0)
    logits[0, 0] = 50.0  # a huge non-digit logit must not enter the digit distribution
    logits[0, DIGITS[2]] = math.log(3.0)
    logits[0, DIGITS[7]] = 0.0
    others = [d for i, d in enumerate(DIGITS) if i not in (2, 7)]
    logits[0, others] = -1e4
    # p(2) = 3/4, p(7) = 1/4
    assert float(expected_digits(logits, torch.tensor(DIGITS))) == pytest.approx(0.75 * 2 + 0.25 * 7, abs=1e-5)


def test_expected_number_is_place_weighted_sum_of_digit_expectations():
    torch.manual_seed(0)
    logits = torch.randn(7, 32) * 3
    places = torch.tensor([1.0, 0.0, 0.1, 0.01, 0.001, 10.0, 1.0])  # query 0: "d.ddd", query 1: "dd"
    query = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    got = expected_numbers(logits, torch.tensor(DIGITS), places, query, 2)
    probs = torch.softmax(logits[:, DIGITS], dim=-1)
    e = (probs * torch.arange(10.0)).sum(-1)
    want = torch.stack([(places[:5] * e[:5]).sum(), (places[5:] * e[5:]).sum()])
    torch.testing.assert_close(got, want)
    # a confident distribution gives the number itself
    sharp = torch.full((5, 32), -1e4)
    for row, digit in enumerate([4, 0, 2, 5, 0]):  # "4.250" with the point (place 0) in row 1
        sharp[row, DIGITS[digit]] = 0.0
    value = expected_numbers(
        sharp, torch.tensor(DIGITS), torch.tensor([1.0, 0.0, 0.1, 0.01, 0.001]), torch.zeros(5, dtype=torch.long), 1
    )
    assert float(value) == pytest.approx(4.25, abs=1e-6)


def test_supervised_positions_shift_labels_by_one():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, -100]])
    mask, targets = supervised_positions(labels)
    assert mask.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert targets.tolist() == [7, 8, 5]


def test_per_query_mean():
    values = torch.tensor([1.0, 3.0, 10.0])
    assert per_query_mean(values, torch.tensor([0, 0, 2]), 3).tolist() == [2.0, 0.0, 10.0]
