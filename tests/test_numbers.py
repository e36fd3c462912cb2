"""Number format and parse in meters, and the one-token-per-digit property the numeric loss relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlm_depth.prompts.numbers import ParsedNumber, format_meters, parse_meters
from vlm_depth.prompts.template import PromptTemplate
from vlm_depth.prompts.textualize import Textualizer


@pytest.mark.parametrize(
    "value,kwargs,text",
    [
        (1.5, {}, "1.500"),
        (0.0, {}, "0.000"),
        (0.0004, {}, "0.000"),
        (0.0005001, {}, "0.001"),
        (12.3456, {}, "12.346"),
        (-2.0, {}, "0.000"),  # clipped to 0
        (1234.5, {}, "999.999"),  # clipped to max_value
        (999.9996, {}, "999.999"),  # rounding never carries past max_value
        (3.14159, {"decimals": 2}, "3.14"),
        (99.0, {"decimals": 1, "max_value": 80.0}, "80.0"),
        (7.0, {"decimals": 0}, "7"),
    ],
)
def test_format_meters_golden(value, kwargs, text):
    assert format_meters(value, **kwargs) == text


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_format_meters_refuses_non_finite_depth(value):
    with pytest.raises(ValueError, match="non-finite"):
        format_meters(value)


def test_parser_round_trips_every_formatted_value_from_1_mm_to_300_m():
    textualizer = Textualizer(PromptTemplate.load("paper"))
    for mm in range(1, 300_001):
        x = mm / 1000
        text = format_meters(x)
        assert abs(float(text) - x) < 5e-4
        parsed = parse_meters(text)
        assert parsed == ParsedNumber(float(text), "ok"), text
        if mm % 97 == 0:  # also inside the full answer sentence
            assert parse_meters(textualizer.answer(x)).value == float(text)


@pytest.mark.parametrize(
    "text,value",
    [
        ("The pixel is 5.678 meters away from the camera.", 5.678),
        ("The pixel at (12, 34) is 5.678 meters away.", 5.678),  # several numbers, one with a unit
        ("about 3.2m.", 3.2),
        ("  0.5  ", 0.5),
        ("7 metres", 7.0),
        (".25 m", 0.25),
    ],
)
def test_parser_tolerates_text_around_the_number(text, value):
    assert parse_meters(text) == ParsedNumber(value, "ok")


GARBAGE = [
    "",
    "   ",
    "The pixel is far away from the camera.",
    "nan meters",
    "inf",
    "1.2.3 meters",
    "x2 and v3.5",
    "between 2 and 3",
    "2 m or 3 m",
    "-5 meters",
    "9" * 400,
    "１２ meters",  # full-width digits are not a number the model should write
    "<|im_end|>",
    "\x00\xff\ud7ff",
]


@pytest.mark.parametrize("text", [*GARBAGE, None, 4.2, b"3.5", ["1"]])
def test_parser_gives_no_value_and_a_reason_on_garbage(text):
    parsed = parse_meters(text)
    assert parsed.value is None and not parsed.ok
    assert parsed.reason and parsed.reason != "ok"


def test_parser_never_raises_on_random_strings():
    rng = np.random.default_rng(0)
    alphabet = list("0123456789.-+ emtrsabc,;()\n\t") + ["\u00e9", "\u4e00"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 25)))
        parsed = parse_meters(text)
        assert (parsed.value is None) != (parsed.reason == "ok")
        if parsed.value is not None:
            assert math.isfinite(parsed.value) and parsed.value >= 0


def test_parser_range_and_clipping():
    assert parse_meters("120 m", max_value=80.0).value is None
    assert parse_meters("120 m", max_value=80.0).reason.startswith("out of range")
    assert parse_meters("120 m", max_value=80.0, clip=True) == ParsedNumber(80.0, "clipped")
    assert parse_meters("0.05 m", min_value=0.1, clip=True) == ParsedNumber(0.1, "clipped")


def test_every_digit_of_an_answer_is_one_tiny_tokenizer_token(tiny_ckpt):
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_ckpt).tokenizer
    textualizer = Textualizer(PromptTemplate.load("paper"))

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prefix, suffix = ids(textualizer.answer_prefix()), ids(textualizer.answer_suffix())
    values = [0.001, 0.5, 1.234, 9.999, 10.0, 12.345, 99.999, 123.456, 299.999, 999.999]
    values += list(np.random.default_rng(0).uniform(0, 300, 200))
    for value in values:
        number = format_meters(value)
        number_ids = ids(number)
        assert [tokenizer.decode([i]) for i in number_ids] == list(number), number
        # The decoder forces prefix and suffix and decodes only the number: the pieces must tokenise like the whole.
        assert ids(textualizer.answer(value)) == prefix + number_ids + suffix, number
    digit_ids = {ids(d)[0] for d in "0123456789"}
    assert len(digit_ids) == 10
