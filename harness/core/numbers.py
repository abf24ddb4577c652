"""Numbers as researchers write them: a radius is `8/255` in papers, configs and command lines.

`as_number` turns a fraction string (`"8/255"`, `" 2 / 255 "`) or a decimal string into a float
and leaves anything else alone, so every float setting (the registry's coercion of plugin
parameters, `threat.eps`, the submission card, the Python API) takes the same spellings. Hydra
reads `threat.eps=8/255` as the string "8/255"; the CLI converts it once, before interpolations
such as a defense's `eps: ${threat.eps}` resolve, and records the fraction beside the float.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

_FRACTION = re.compile(r"^\s*[+-]?\d+(\.\d+)?\s*/\s*\d+(\.\d+)?\s*$")


def is_fraction(value: Any) -> bool:
    """True for a string such as "8/255" (numerator / denominator, no other characters)."""
    return isinstance(value, str) and bool(_FRACTION.match(value))


def as_number(value: Any) -> Any:
    """`value` as a float when it is a fraction or decimal string with a finite value; else unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if is_fraction(text):
            num, den = (Fraction(part.strip()) for part in text.split("/"))
            return float(num / den) if den != 0 else value
        number = float(text)
    except (ValueError, ZeroDivisionError):
        return value
    return number if math.isfinite(number) else value
