"""One number format for people: accuracies as percent with one decimal, everywhere a human reads.

Terminal tables, progress lines, the HTML board and plots all format through here, so `48.0`
and `48.5` never sit in one column as `48` and `48.5`. Machine surfaces keep more precision
(see leaderboard/README.md, "Number formats"): `summary.json` holds fractions in [0, 1] at full
precision, the leaderboard CSVs percent rounded to two decimals, the RobustBench export percent
strings with two decimals as RobustBench's own `model_info` files do.
"""
from __future__ import annotations

import math
from typing import Any

PERCENT_SUFFIXES = ("_acc", "_acc_mean", "_acc_std", "_acc_majority", "_acc_worst")
PERCENT_NAMES = ("acc_drop",)
ATTACK_PREFIX = "after "  # per-attack columns of the board: robust accuracy after that stage


def is_percent_column(name: str) -> bool:
    """Leaderboard columns that hold accuracies in percent (or differences of them, in points)."""
    return name.endswith(PERCENT_SUFFIXES) or name in PERCENT_NAMES or name.startswith(ATTACK_PREFIX)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def pct(fraction: float | None, sign: bool = True) -> str:
    """A fraction in [0, 1] as `48.5%` ('-' when unknown)."""
    if _missing(fraction):
        return "-"
    return f"{100.0 * float(fraction):.1f}" + ("%" if sign else "")


def points(value: float | None) -> str:
    """A value already in percent (leaderboard CSVs) as `48.5` ('' when missing)."""
    return "" if _missing(value) else f"{float(value):.1f}"


def number(value: Any) -> str:
    """Any other cell: integers as integers, floats with up to four significant digits' worth."""
    if _missing(value):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value)


def cell(column: str, value: Any) -> str:
    """The text of one leaderboard cell for people."""
    if is_percent_column(column) and not isinstance(value, str):
        return points(value)
    return number(value)
