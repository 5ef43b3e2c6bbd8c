"""Progress with an ETA for long work (index rebuilds, re-embedding, imports, eval replays).

One class serves the library and the command line::

    with Progress("rebuilding the index of /x", total=12345, unit="entries") as p:
        for batch in batches:
            p.advance(len(batch))

In the library it logs to the ``semcache`` logger at INFO, so a sidecar's log shows a long
rebuild moving: nothing for work that ends within ``quiet`` seconds (2 by default), then
``done/total``, the rate and the ETA at most every ``every`` seconds (5 by default), and one
closing line. ``advance()`` only adds and reads the clock; the message is built only when it is
due. ``total`` may be None (work of unknown size): the counts and the rate, no ETA.

The command line wraps its work in :func:`bars`: every ``Progress`` entered inside it (in any
thread) draws a rich progress bar with its ETA on the given console instead of logging. rich is
imported only then, so the library never loads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .clock import Clock

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("semcache")

QUIET_S = 2.0  # work shorter than this says nothing in the log
EVERY_S = 5.0  # at most one progress line per this many seconds


class MonotonicClock:
    """Seconds from ``time.monotonic``: durations that wall-clock steps cannot bend."""

    def now(self) -> float:
        return time.monotonic()


def rate_per_second(done: int, elapsed: float) -> float | None:
    """Average units per second so far; None before any time or work has passed."""
    if done <= 0 or elapsed <= 0:
        return None
    return done / elapsed


def eta_seconds(done: int, total: int | None, elapsed: float) -> float | None:
    """Seconds left at the average rate so far: ``(total - done) * elapsed / done``.

    None when it cannot be known: no total, or nothing done yet. 0 once ``done`` reaches
    ``total``.
    """
    if total is None:
        return None
    if done >= total:
        return 0.0
    rate = rate_per_second(done, elapsed)
    if rate is None:
        return None
    return (total - done) / rate


def format_duration(seconds: float) -> str:
    """A duration for people: ``"7s"``, ``"2m05s"``, ``"1h02m"``."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts units of long work and reports them: to a rich bar inside :func:`bars`, else
    to the ``semcache`` logger (see the module doc). Use it as a context manager.

    Args:
        description: what is being done, e.g. ``"rebuilding the index of /x"``.
        total: units the work has, or None when unknown.
        unit: the units' name in messages (``"entries"``, ``"lines"``).
        clock: the time source (tests inject a ``FakeClock``); default ``time.monotonic``.
        logger: where library progress goes; default the ``semcache`` logger.
        quiet: seconds of work before the first log line.
        every: least seconds between two log lines.
    """

    def __init__(
        self,
        description: str,
        total: int | None = None,
        *,
        unit: str = "items",
        clock: Clock | None = None,
        logger: logging.Logger | None = None,
        quiet: float = QUIET_S,
        every: float = EVERY_S,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.logger = logger if logger is not None else log
        self.quiet = quiet
        self.every = every
        self.started: float | None = None
        self.reported = 0  # log lines written so far
        self._next = float("inf")  # when the next log line is due (inf: not started)
        self._bar: _Task | None = None

    # -- the work ---------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        self.started = self.clock.now()
        sink = _active()
        if sink is not None:
            self._bar = sink.add(self.description, self.total, self.unit)
        if self._bar is None:
            self._next = self.started + self.quiet
        return self

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.done += n
        if self._bar is not None:
            self._bar.advance(n)
            return
        now = self.clock.now()
        if now >= self._next:
            self._report(now)

    def update(self, done: int, *, total: int | None = None) -> None:
        """Set the count of units done (and, when given, a new total): for work that reports
        where it stands rather than how much it just did."""
        if total is not None:
            self.total = total
        self.advance(done - self.done)
        if self._bar is not None and total is not None:
            self._bar.set_total(total)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        self._next = float("inf")
        if self.reported:  # long work says how it ended; short work stays silent
            elapsed = self.elapsed()
            rate = rate_per_second(self.done, elapsed)
            speed = f" ({rate:,.0f} {self.unit}/s)" if rate is not None else ""
            how = "done" if kind is None else f"stopped ({kind.__name__})"
            self.logger.info(
                "%s: %s, %s in %s%s",
                self.description,
                how,
                self._count(),
                format_duration(elapsed),
                speed,
            )

    # -- reporting --------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds since the work started (0 before it has)."""
        return 0.0 if self.started is None else max(0.0, self.clock.now() - self.started)

    def eta(self) -> float | None:
        """Seconds left at the average rate so far, or None when unknown."""
        return eta_seconds(self.done, self.total, self.elapsed())

    def message(self) -> str:
        """The progress line as logged: count (and share), rate, ETA."""
        elapsed = self.elapsed()
        parts = [self._count()]
        rate = rate_per_second(self.done, elapsed)
        if rate is not None:
            parts.append(f"{rate:,.0f} {self.unit}/s")
        eta = eta_seconds(self.done, self.total, elapsed)
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        return f"{self.description}: {', '.join(parts)}"

    def _count(self) -> str:
        if self.total is None:
            return f"{self.done:,} {self.unit}"
        share = f" ({self.done / self.total:.0%})" if self.total > 0 else ""
        return f"{self.done:,}/{self.total:,} {self.unit}{share}"

    def _report(self, now: float) -> None:
        self._next = now + self.every
        self.reported += 1
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info("%s", self.message())


# --------------------------------------------------------------------------------------------
# rich bars for the command line
# --------------------------------------------------------------------------------------------


class _Task:
    """One Progress's row in a rich bar."""

    def __init__(self, bar: Any, task_id: Any) -> None:
        self._bar = bar
        self._id = task_id

    def advance(self, n: int) -> None:
        self._bar.advance(self._id, n)

    def set_total(self, total: int) -> None:
        self._bar.update(self._id, total=total)

    def close(self) -> None:
        self._bar.stop_task(self._id)
        self._bar.refresh()


class _Bars:
    """A rich ``Progress`` display that Progress instances add their rows to: description,
    bar, done/total, unit, average rate and ETA (fitting 80 columns)."""

    def __init__(self, console: Console | None, transient: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress
        from rich.table import Column
        from rich.text import Text

        class RateColumn(ProgressColumn):
            """Units per second so far (blank until there is a rate)."""

            def render(self, task: Any) -> Text:
                rate = rate_per_second(int(task.completed), task.elapsed or 0.0)
                return Text("" if rate is None else f"{rate:,.0f}/s")

        self.display = RichProgress(
            TextColumn(
                "[bold]{task.description}[/bold]",
                table_column=Column(max_width=24, no_wrap=True, overflow="ellipsis"),
            ),
            BarColumn(bar_width=None),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[unit]}", table_column=Column(no_wrap=True)),
            RateColumn(table_column=Column(no_wrap=True)),
            TextColumn("ETA", table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)),
            console=console,
            transient=transient,
            expand=True,
        )
        self.started = False

    def add(self, description: str, total: int | None, unit: str) -> _Task | None:
        """A row for a Progress, or None for work with nothing to do (``total`` 0). The
        display starts with its first row, so a block without long work prints nothing."""
        if total == 0:
            return None
        with _SINKS_LOCK:
            if not self.started:
                self.display.start()
                self.started = True
        return _Task(self.display, self.display.add_task(description, total=total, unit=unit))

    def stop(self) -> None:
        if self.started:
            self.display.stop()


_SINKS: list[_Bars] = []
_SINKS_LOCK = threading.Lock()


def _active() -> _Bars | None:
    if not _SINKS:  # the library's case: no lock taken
        return None
    with _SINKS_LOCK:
        return _SINKS[-1] if _SINKS else None


@contextmanager
def bars(console: Console | None = None, *, transient: bool = False) -> Iterator[None]:
    """Draw every :class:`Progress` entered inside this block (in any thread) as a rich bar
    with its count, rate and ETA on ``console`` (default: rich's stdout console),
    instead of logging it. Inside another ``bars`` block the outer display is reused.
    ``transient`` removes the bars when the block ends."""
    with _SINKS_LOCK:
        nested = bool(_SINKS)
        sink = _SINKS[-1] if nested else _Bars(console, transient)
        _SINKS.append(sink)
    try:
        yield
    finally:
        with _SINKS_LOCK:
            _SINKS.pop()
        if not nested:
            sink.stop()
