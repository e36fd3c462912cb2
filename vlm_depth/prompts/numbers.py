"""The one formatter and the one parser of depth values in text (meters, fixed decimals).

Answers carry meters with a fixed number of decimals (default 3, i.e. millimetres) and no sign, exponent or digit
grouping, so with Qwen2's tokenizer every character of a number is one token (digits and the point).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# A decimal number not glued to a letter, digit or point ("x2", "v3.5" and "1.2.3" hold no depth); a sentence's
# final period after the number is fine.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?!\.?[0-9])")
_UNIT = re.compile(r"\s*(?:m\b|meters?\b|metres?\b)", re.IGNORECASE)


def format_meters(x: float, decimals: int = 3, max_value: float = 999.999) -> str:
    """`x` meters as text with exactly `decimals` decimals, clipped to [0, max_value] (e.g. 1.5 -> "1.500").

    Clipping keeps the number of integer digits bounded (max_value 999.999 -> at most 3). Raises ValueError for a
    non-finite `x`: a missing depth has no textual value and must not be written as one.
    """
    if not math.isfinite(x):
        raise ValueError(f"cannot format a non-finite depth ({x!r}) as meters")
    if decimals < 0:
        raise ValueError(f"decimals must be >= 0, got {decimals}")
    scale = 10**decimals
    # Clip on the decimal grid, so rounding can never carry past max_value (999.9996 -> "999.999", not "1000.000").
    top = math.floor(max_value * scale + 1e-6) / scale
    return f"{min(max(float(x), 0.0), top):.{decimals}f}"


@dataclass(frozen=True)
class ParsedNumber:
    """Result of `parse_meters`: `value` in meters, or None with the reason ("ok" when a value was found)."""

    value: float | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.value is not None


def parse_meters(
    text: str, *, min_value: float = 0.0, max_value: float | None = None, clip: bool = False
) -> ParsedNumber:
    """Read one depth in meters from a model answer such as "The pixel is 5.678 meters away from the camera.".

    Tolerates text around the number. With several numbers, the one followed by a unit (m, meter(s), metre(s)) is
    taken if exactly one is; otherwise the answer is ambiguous. A value outside [min_value, max_value] is clipped
    when `clip` is set, else rejected. Never raises: garbage gives `ParsedNumber(None, reason)`.
    """
    if not isinstance(text, str):
        return ParsedNumber(None, f"not text: {type(text).__name__}")
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return ParsedNumber(None, "no number" if text.strip() else "empty answer")
    if len(matches) > 1:
        with_unit = [m for m in matches if _UNIT.match(text, m.end())]
        if len(with_unit) != 1:
            return ParsedNumber(None, f"ambiguous: {len(matches)} numbers")
        matches = with_unit
    value = float(matches[0].group())
    if not math.isfinite(value):
        return ParsedNumber(None, f"non-finite number {matches[0].group()!r}")
    low_ok = value >= min_value
    high_ok = max_value is None or value <= max_value
    if low_ok and high_ok:
        return ParsedNumber(value, "ok")
    if not clip:
        return ParsedNumber(None, f"out of range: {value} not in [{min_value}, {max_value}]")
    return ParsedNumber(min_value if not low_ok else max_value, "clipped")
