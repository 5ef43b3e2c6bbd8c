"""The background expiry sweeper: calls a cache's ``expire()`` every ``interval`` seconds."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .errors import CacheClosedError, SemcacheError

log = logging.getLogger("semcache")


class Sweeper:
    """A daemon thread that runs ``sweep`` periodically until stopped or the cache closes."""

    def __init__(self, sweep: Callable[[], object], interval: float) -> None:
        self._sweep = sweep
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="semcache-sweeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._sweep()
            except CacheClosedError:
                return
            except SemcacheError:  # pragma: no cover - logged, retried next round
                log.exception("expiry sweep failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)
