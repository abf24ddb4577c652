"""User-facing errors.

A `UserError` is bad input, not a bug: the CLI prints its message as one line and exits with
status 2. The message must name the bad value and say how to fix it. Tracebacks are for bugs.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data file, checkpoint, bundle). Exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would be cut by log scrapers and sweep summaries.
        super().__init__(" ".join(str(message).split()))


def choices_error(kind: str, value: object, valid: list[str] | tuple[str, ...]) -> UserError:
    """Error for an unknown name among a fixed set of choices, listing the valid ones."""
    return UserError(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(valid))}")
