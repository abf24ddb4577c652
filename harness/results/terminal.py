"""Terminal output: the result table of one run and leaderboard views (rich)."""
from __future__ import annotations

from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table


def _pct(x: Any) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"{summary.get('suite')}  {summary.get('threat')}  n={summary.get('n_samples')}")
    for col in ("stage", "robust acc", "broken", "fwd/sample", "bwd/sample", "queries", "time s"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    n = max(int(summary.get("n_samples") or 1), 1)
    t.add_row("clean", _pct(summary.get("clean_acc")), "", "", "", "", "")
    for label, a in (summary.get("attacks") or {}).items():
        t.add_row(label, _pct(a["robust_acc_after"]), str(a["broken"]), f"{a['n_forward'] / n:.0f}",
                  f"{a['n_backward'] / n:.0f}", str(a["n_queries"]), f"{a['time_s']:.1f}")
    if summary.get("randomized"):
        t.caption = (f"randomised: robust mean {_pct(summary.get('robust_acc_mean'))}, majority "
                     f"{_pct(summary.get('robust_acc_majority'))}, worst {_pct(summary.get('robust_acc'))}")
    console.print(t)
    certified = summary.get("certified_acc")
    proved = "" if certified is None or certified != certified else f"certified (proved robust): [bold]{_pct(certified)}[/bold]   "
    console.print(f"robust accuracy (worst case per sample): [bold]{_pct(summary.get('robust_acc'))}[/bold]   "
                  f"{proved}run: {summary.get('run_dir')}")


def print_board(df: pd.DataFrame, columns: list[str], console: Console | None = None, title: str = "leaderboard") -> None:
    console = console or Console(width=200)
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for _, row in df.iterrows():
        t.add_row(*["" if (isinstance(row[c], float) and row[c] != row[c]) else str(row[c]) for c in columns])
    console.print(t)
