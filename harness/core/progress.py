"""Progress that talks: live bars on a terminal, one line per stage in logs, a resume hint on Ctrl-C.

Three kinds of work report here, each with one or two lines at its call site:

- `progress_bar(total, desc)`: a counted stage (training steps, poison rounds); `bar.advance()`,
  `bar.update(info=...)` (text after the bar, e.g. loss and accuracy; `bar.due()` says when a new
  value would be shown, so callers sync device numbers to the host only then);
- `eval_progress(stages, n, title)`: an evaluation, one row per stage (clean, then each attack)
  counting samples, with the running accuracy after that stage. The cascade calls
  `stage_done(label, n, robust)` after each stage of a batch and an attack may call
  `substage(name, robust, attacked)` after each internal component (AutoAttack's APGD-CE, ...);
  both are no-ops when no evaluation is being shown;
- `stage(desc)`: an uncounted step (a health-report probe set) shown with a spinner.

Where the output goes (`mode()`): on a terminal (stderr is a TTY) rich draws transient bars and
every finished stage leaves one permanent line; elsewhere (CI logs, `| tee`, files) only those
lines are printed, plus a status line when a stage has run `HEARTBEAT_S` seconds without one.
`progress=false` in a config (or `enabled=False`) silences everything; the environment variable
`ARENA_PROGRESS=live|lines|off` overrides the detection.

`set_interrupt_hint(fn)` registers what the CLI says when Ctrl-C stops a command (e.g. "run
258ee4… keeps 3 of 4 finished batches; run the same command again to resume").
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from harness.core.formats import pct as fmt_pct

HEARTBEAT_S = 30.0  # lines mode: a status line when a stage has been quiet this long
REFRESH_S = 0.25  # live mode: how often a caller-computed field (loss, accuracy) is refreshed
PREFIX = "[arena] "

_live: Any = None  # the one rich Progress on screen (rich allows one live display at a time)
_live_users = 0
_tracker: "EvalProgress | None" = None
_interrupt_hint: Callable[[], str] | None = None


def mode() -> str:
    """'live' (bars on a terminal), 'lines' (one line per stage) or 'off'."""
    forced = os.environ.get("ARENA_PROGRESS", "").strip().lower()
    if forced in ("live", "lines", "off"):
        return forced
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "live" if tty and os.environ.get("TERM") != "dumb" else "lines"


def fmt_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d} min" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d} h"


def say(text: str, enabled: bool = True) -> None:
    """One permanent line on the progress channel (stderr): above the bars when they are live."""
    m = mode()
    if not enabled or m == "off":
        return
    if m == "live" and _live is not None:
        _live.console.print(PREFIX + text, highlight=False, markup=False)
    else:
        print(PREFIX + text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the live display


def _acquire() -> Any:
    global _live, _live_users
    if _live is None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        _live = Progress(SpinnerColumn(finished_text=" "), TextColumn("{task.description}"), BarColumn(bar_width=20),
                         TextColumn("{task.fields[count]}"), TextColumn("{task.fields[info]}"),
                         console=Console(stderr=True), transient=True, refresh_per_second=8)
        _live.start()
    _live_users += 1
    return _live


def _release() -> None:
    global _live, _live_users
    _live_users -= 1
    if _live_users <= 0 and _live is not None:
        live, _live, _live_users = _live, None, 0
        live.stop()


@contextmanager
def _display(enabled: bool) -> Iterator[Any]:
    """The shared rich Progress in live mode, else None."""
    if not enabled or mode() != "live":
        yield None
        return
    live = _acquire()
    try:
        yield live
    finally:
        _release()


# ------------------------------------------------------------------------------ counted stages


class Bar:
    """One counted stage; every method is cheap and host-only (no device work)."""

    def __init__(self, live: Any, total: int | None, desc: str, unit: str, enabled: bool) -> None:
        self._live, self.total, self.desc, self.unit = live, total, desc, unit
        self.enabled = enabled and mode() != "off"
        self.done = 0
        self.info = ""
        self.start = self._last_line = self._last_show = time.perf_counter()
        self._task = live.add_task(desc, total=total, count=self._count(), info="") if live is not None else None

    def _count(self) -> str:
        return f"{self.done}/{self.total} {self.unit}" if self.total is not None else ""

    def due(self) -> bool:
        """True when a refreshed `update()` would be shown now (callers compute numbers only then)."""
        if not self.enabled:
            return False
        now = time.perf_counter()
        return now - (self._last_show if self._live is not None else self._last_line) >= (
            REFRESH_S if self._live is not None else HEARTBEAT_S)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._refresh()

    def update(self, info: str) -> None:
        self.info = info
        self._last_show = time.perf_counter()
        self._refresh()

    def _refresh(self) -> None:
        if not self.enabled:
            return
        if self._task is not None:
            self._live.update(self._task, completed=self.done, count=self._count(), info=self.info)
        elif time.perf_counter() - self._last_line >= HEARTBEAT_S:
            self._line(finished=False)

    def _line(self, finished: bool) -> None:
        self._last_line = time.perf_counter()
        count = self._count() if not finished else (f"{self.done} {self.unit}" if self.total is not None else "")
        parts = [p for p in (count, self.info, fmt_time(time.perf_counter() - self.start)) if p]
        say(f"{self.desc}: " + ", ".join(parts) + ("" if finished else " (running)"))

    def close(self, finished: bool) -> None:
        if self._task is not None:
            self._live.remove_task(self._task)
        if self.enabled and finished:
            self._line(finished=True)


@contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool = True, unit: str = "steps") -> Iterator[Bar]:
    """A counted stage: a bar on a terminal, one line when it ends elsewhere (none if disabled)."""
    with _display(enabled) as live:
        bar = Bar(live, total, desc, unit, enabled)
        ok = False
        try:
            yield bar
            ok = True
        finally:
            bar.close(finished=ok)


@contextmanager
def stage(desc: str, enabled: bool = True) -> Iterator[Bar]:
    """An uncounted step: a spinner on a terminal, one line with its time when it ends."""
    with progress_bar(None, desc, enabled=enabled, unit="") as bar:
        yield bar


# ------------------------------------------------------------------------------ the evaluation


@dataclass
class _Stage:
    label: str
    done: int = 0  # samples whose batch has finished this stage
    value: float = 0.0  # clean: correct (mean over draws); attacks: robust after this stage
    time_s: float = 0.0
    parts: dict[str, list[float]] = field(default_factory=dict)  # component -> [robust, samples]
    task: Any = None


class EvalProgress:
    """Rows per stage over samples, with the running accuracy (see the module doc)."""

    def __init__(self, live: Any, stages: list[str], n: int, title: str, enabled: bool) -> None:
        self._live, self.n, self.title = live, n, title
        self.enabled = enabled and mode() != "off"
        self.stages = {s: _Stage(s) for s in ["clean", *stages]}
        self.order = list(self.stages)
        self.start = self._last_line = self._t = time.perf_counter()
        self._batch_n = 0
        self._next = 0  # index of the stage running in the current batch
        self._parts_seen: set[str] = set()
        self.batches_done = 0
        self.batches_total = 0
        if live is not None:
            width = max(len(s) for s in self.order)
            for s in self.stages.values():
                s.task = live.add_task(f"{s.label:<{width}}", total=n, count=f"0/{n}", info="")

    # the run loop
    def batch(self, index: int, size: int, total: int) -> None:
        """Batch `index` (of `total`) with `size` samples starts now."""
        self._batch_n, self._next, self._t = size, 0, time.perf_counter()
        self._parts_seen = set()
        self.batches_total = total

    def resumed(self, size: int, values: dict[str, float], total: int) -> None:
        """A batch read back from the run directory: `values` are per-stage counts as in `stage_done`."""
        self.batches_total = total
        self.batches_done += 1
        for label, s in self.stages.items():
            s.done += size
            s.value += float(values.get(label, 0.0))
            self._show(s)

    # the cascade and the attacks
    def stage_done(self, label: str, size: int, value: float) -> None:
        s = self.stages.get(label)
        if s is None:
            return
        now = time.perf_counter()
        s.time_s += now - self._t
        self._t = now
        s.done += size
        s.value += float(value)
        for name, pr in s.parts.items():  # components the attack skipped (everything already broken)
            if name not in self._parts_seen:
                pr[1] += size
                if s.done >= self.n:
                    self._part_line(s, name)
        self._parts_seen = set()
        self._next = self.order.index(label) + 1
        if label == self.order[-1]:
            self.batches_done += 1
        self._show(s)
        if s.done >= self.n:
            self._finished_line(s)
        elif self.enabled and self._live is None and now - self._last_line >= HEARTBEAT_S:
            self._status_line()

    def substage(self, name: str, robust: int, attacked: int) -> None:
        if self._next >= len(self.order):
            return
        s = self.stages[self.order[self._next]]
        pr = s.parts.setdefault(name, [0.0, 0.0])
        pr[0] += robust
        pr[1] += self._batch_n  # samples outside the attacked pool were broken before: not robust
        self._parts_seen.add(name)
        self._show(s, running=name)
        if s.done + self._batch_n >= self.n:  # the stage's last batch: the component's number is final
            self._part_line(s, name)
        elif self.enabled and self._live is None and time.perf_counter() - self._last_line >= HEARTBEAT_S:
            self._status_line()

    # output
    def _acc(self, s: _Stage) -> float:
        return s.value / s.done if s.done else float("nan")

    def _parts(self, s: _Stage) -> str:
        return ", ".join(f"{k} {fmt_pct(v[0] / v[1]) if v[1] else '-'}" for k, v in s.parts.items())

    def _what(self, s: _Stage) -> str:
        return ("acc " if s.label == "clean" else "robust ") + fmt_pct(self._acc(s))

    def _show(self, s: _Stage, running: str | None = None) -> None:
        if not self.enabled or s.task is None:
            return
        info = f"{self._what(s)}  {fmt_time(s.time_s)}" if s.done else ""
        if s.parts:
            info += ("  " if info else "") + self._parts(s) + (" …" if running else "")
        self._live.update(s.task, completed=s.done, count=f"{s.done}/{self.n}", info=info)

    def _part_line(self, s: _Stage, name: str) -> None:
        if self.enabled:
            self._last_line = time.perf_counter()
            robust, seen = s.parts[name]
            say(f"{s.label} / {name}: robust {fmt_pct(robust / seen)} ({int(seen)} samples)")

    def _finished_line(self, s: _Stage) -> None:
        if not self.enabled:
            return
        self._last_line = time.perf_counter()
        say(f"{s.label}: {self._what(s)} ({s.done} samples, {fmt_time(s.time_s)})")

    def _status_line(self) -> None:
        self._last_line = time.perf_counter()
        seen = [s for s in self.stages.values() if s.done or s.parts]
        running = self.order[self._next] if self._next < len(self.order) else ""
        parts = "; ".join(f"{s.label} {fmt_pct(self._acc(s))}" + (f" [{self._parts(s)}]" if s.parts else "") for s in seen)
        say(f"{self.title}: batch {self.batches_done + 1}/{max(self.batches_total, 1)}, running {running}; "
            f"so far {parts} ({fmt_time(time.perf_counter() - self.start)})")

    def close(self) -> None:
        if self._live is not None:
            for s in self.stages.values():
                self._live.remove_task(s.task)


@contextmanager
def eval_progress(stages: list[str], n: int, title: str, enabled: bool = True) -> Iterator[EvalProgress]:
    """Show an evaluation of `n` samples through `stages` (attack labels, suite order)."""
    global _tracker
    with _display(enabled) as live:
        if live is not None and enabled:
            live.console.print(PREFIX + title, highlight=False, markup=False)
        elif enabled and mode() == "lines":
            say(title)
        tracker = EvalProgress(live, stages, n, title, enabled)
        previous, _tracker = _tracker, tracker
        try:
            yield tracker
        finally:
            _tracker = previous
            tracker.close()


def stage_done(label: str, n: int, robust: float) -> None:
    """The cascade finished `label` on a batch of `n` samples; `robust` of them remain (clean: correct)."""
    if _tracker is not None:
        _tracker.stage_done(label, n, robust)


def substage(name: str, robust: int, attacked: int) -> None:
    """An attack finished an internal component on `attacked` samples, `robust` of them not fooled."""
    if _tracker is not None:
        _tracker.substage(name, robust, attacked)


# --------------------------------------------------------------------------------- interruption


def set_interrupt_hint(hint: Callable[[], str] | None) -> None:
    """What to tell the user if Ctrl-C stops the command now (None: nothing resumable yet)."""
    global _interrupt_hint
    _interrupt_hint = hint


def interrupt_hint() -> str | None:
    try:
        return _interrupt_hint() if _interrupt_hint is not None else None
    except Exception:  # a hint must never turn Ctrl-C into a traceback
        return None
