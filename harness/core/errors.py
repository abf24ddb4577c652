"""User-facing errors.

A `UserError` is bad input, not a bug: the CLI prints its message as one line and exits with
status 2. The message must name the bad value and say how to fix it. Tracebacks are for bugs.

`UserError` subclasses `ValueError`, so Python callers of `harness.evaluate` / `harness.attack`
(who, like AutoAttack's and Foolbox's users, expect a bad argument to raise `ValueError`) can catch
it as one; a wrong *type* is reported the same way (one line, `UserError`), never as a traceback
from deep inside a run.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(ValueError):
    """Bad input from the user (config, data file, checkpoint, bundle, API argument). Exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would be cut by log scrapers and sweep summaries.
        super().__init__(" ".join(str(message).split()))


def did_you_mean(value: object, valid: Iterable[str]) -> str:
    """`"did you mean 'steps'?"` for the closest valid name (difflib), or "" when none is close."""
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def choices_error(kind: str, value: object, valid: list[str] | tuple[str, ...]) -> UserError:
    """Error for an unknown name among a fixed set of choices, listing the valid ones."""
    hint = did_you_mean(value, valid)
    return UserError(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(valid))}" + (f"; {hint}" if hint else ""))
