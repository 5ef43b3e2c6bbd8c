"""Waiting for what another process (or thread) does, without a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def eventually(check: Callable[[], Any], timeout: float = 5.0, every: float = 0.005) -> Any:
    """``check()``'s first truthy result, polled every ``every`` seconds until ``timeout``
    (then its last, falsy, result: the caller's assert says what was awaited)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)
