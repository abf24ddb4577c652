"""Progress bars on long work (training, attacks), via rich; silent when disabled or not a TTY."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class _Bar:
    def __init__(self, progress, task) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True) -> Iterator[_Bar]:
    """A rich progress bar on stderr; a no-op object when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    ) as progress:
        task = progress.add_task(desc, total=total)
        yield _Bar(progress, task)
