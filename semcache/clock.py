"""One injectable notion of time: TTLs, expiry, LRU order and tests all read the same clock."""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Anything with ``now() -> float`` (seconds since the epoch)."""

    def now(self) -> float: ...


class SystemClock:
    """Wall-clock time (``time.time``): expiry survives restarts because it is absolute."""

    def now(self) -> float:
        return time.time()


class FakeClock:
    """A clock that moves only when told to, so tests tick instead of sleeping."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` and return the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        with self._lock:
            self._now += seconds
            return self._now

    tick = advance
