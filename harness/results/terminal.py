"""Terminal output: the result table of one run and leaderboard views (rich).

On a terminal the tables fit its width as rich draws them. Anywhere else (CI logs, `| tee`, a
file) nothing is cut or wrapped: the console is as wide as the widest table, so a log holds every
column and the whole run path on one line. Accuracies are percent with one decimal
(`harness.core.formats`), the same as on the HTML board and in plots.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

import pandas as pd
from rich.console import Console
from rich.table import Table

from harness.core.formats import cell, number, pct

UNLIMITED = 100_000  # columns of a console that is not a terminal: never cut, never wrap


def make_console(file: TextIO | None = None) -> Console:
    """A console for `file` (stdout): the terminal's width on a TTY, unlimited elsewhere."""
    out = file or sys.stdout
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        tty = False
    if tty:
        return Console(file=out)
    return Console(file=out, width=UNLIMITED, no_color=True, highlight=False, soft_wrap=True)


def _print(con: Console, renderable: Any) -> None:
    if con.width >= UNLIMITED and isinstance(renderable, Table):
        # measure the table, then print it at its own width (so a title centres over the table)
        width = con.measure(renderable).maximum
        Console(file=con.file, width=width, no_color=True, highlight=False).print(renderable)
        return
    con.print(renderable)


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    con = console or make_console()
    t = Table(title=f"{summary.get('suite')}  {summary.get('threat')}  n={summary.get('n_samples')}")
    for col in ("stage", "robust acc", "broken", "fwd/sample", "bwd/sample", "queries", "time s"):
        t.add_column(col, justify="right" if col != "stage" else "left", no_wrap=True)
    n = max(int(summary.get("n_samples") or 1), 1)
    t.add_row("clean", pct(summary.get("clean_acc")), "", "", "", "", "")
    for label, a in (summary.get("attacks") or {}).items():
        t.add_row(label, pct(a["robust_acc_after"]), str(a["broken"]), f"{a['n_forward'] / n:.0f}",
                  f"{a['n_backward'] / n:.0f}", str(a["n_queries"]), f"{a['time_s']:.1f}")
    if summary.get("randomized"):
        t.caption = (f"randomised: robust mean {pct(summary.get('robust_acc_mean'))}, majority "
                     f"{pct(summary.get('robust_acc_majority'))}, worst {pct(summary.get('robust_acc'))}")
    _print(con, t)
    certified = summary.get("certified_acc")
    proved = "" if certified is None or certified != certified else f"certified (proved robust): [bold]{pct(certified)}[/bold]   "
    con.print(f"robust accuracy (worst case per sample): [bold]{pct(summary.get('robust_acc'))}[/bold]   "
              f"{proved}run: {summary.get('run_dir')}", overflow="ignore", crop=False)


def board_table(df: pd.DataFrame, columns: list[str], title: str = "leaderboard") -> Table:
    """A leaderboard view as a rich table: accuracies with one decimal, numbers right-aligned."""
    t = Table(title=title)
    for c in columns:
        numeric = c in df.columns and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
        t.add_column(c, justify="right" if numeric else "left", no_wrap=True)
    for _, row in df.iterrows():
        t.add_row(*[cell(c, row[c]) for c in columns])
    return t


def print_board(df: pd.DataFrame, columns: list[str], console: Console | None = None, title: str = "leaderboard") -> None:
    _print(console or make_console(), board_table(df, columns, title))


def plain_table(df: pd.DataFrame, columns: list[str]) -> str:
    """The same view as aligned plain text (one line per row, no box characters), e.g. for mail."""
    rows = [[c for c in columns]] + [[cell(c, r[c]) for c in columns] for _, r in df.iterrows()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


__all__ = ["make_console", "print_summary", "print_board", "board_table", "plain_table", "number"]
