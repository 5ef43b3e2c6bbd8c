"""Single-flight between processes: a lease row in the store of record per prompt in flight.

Within one process :class:`~semcache.singleflight.SingleFlight` makes concurrent misses for the
same (or a near-identical) prompt share one computation. Processes that share a store (replicas
of one PostgreSQL store, or several processes on one SQLite folder) coordinate through the store
instead: the first to miss an exact prompt takes its lease and computes; the others poll the
store until the answer is there (and serve it) or the lease is gone (and take it themselves).
A lease expires after ``timeout`` seconds, so a process killed while it computes delays the
others by at most that long; a waiter gives up after ``timeout`` and computes without a lease
rather than fail. Leases use wall-clock time (they coordinate processes, not cache content),
and they are not logged: they are coordination, not cache state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from .errors import SemcacheError

log = logging.getLogger("semcache")

T = TypeVar("T")
#: First and longest pause between two looks at a lease another process holds.
FIRST_WAIT, LONGEST_WAIT = 0.005, 0.05


class LeaseStore(Protocol):
    """What a store gives single-flight between processes (both stores implement it)."""

    def take_lease(self, key: str, owner: str, now: float, ttl: float) -> bool: ...

    def release_lease(self, key: str, owner: str) -> None: ...


class Lead(Generic[T]):
    """The outcome of :meth:`Leases.lead_or_wait`: ``hit`` is the answer another process
    stored while this one waited (serve it); without one, this process leads (``led``), or
    computes without a lease after the wait timed out. :meth:`release` ends the lease (call it
    after the answer is stored, whatever happened); it is idempotent."""

    def __init__(
        self, hit: T | None, key: str | None, leases: Leases | None, owner: str = ""
    ) -> None:
        self.hit = hit
        self._key = key
        self._leases = leases
        self._owner = owner

    @property
    def led(self) -> bool:
        return self._key is not None

    def release(self) -> None:
        key, leases = self._key, self._leases
        self._key = None
        if key is not None and leases is not None:
            leases.release(key, self._owner)


class Leases:
    """This process's side of single-flight through ``store``."""

    def __init__(
        self,
        store: LeaseStore,
        timeout: float,
        *,
        time_fn: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.timeout = timeout
        self.owner = uuid.uuid4().hex
        self._calls = itertools.count()
        self._time, self._sleep, self._monotonic = time_fn, sleep, monotonic
        self.waits = 0
        self.served = 0
        self.timeouts = 0

    def lead_or_wait(
        self, key: str, answered: Callable[[], T | None], *, wait: bool = True
    ) -> Lead[T]:
        """Take the lease on ``key``, or wait while another process holds it. ``answered``
        looks in the store for the answer (None while there is none); it is asked again right
        after the lease is taken, since another process may have stored the answer and let
        its lease go just before. With ``wait=False`` it looks once: a Lead that neither
        ``led`` nor has a ``hit`` means another caller (of this process or another) is
        computing the answer now."""
        # each call is an owner of its own: two callers in this process never share a lease
        # (nor can one release the other's)
        owner = f"{self.owner}:{next(self._calls)}"
        deadline = self._monotonic() + (self.timeout if wait else 0.0)
        delay, waited = FIRST_WAIT, False
        while True:
            if self._store.take_lease(key, owner, self._time(), self.timeout):
                try:
                    found = answered()
                except BaseException:
                    self.release(key, owner)  # never leave a lease nobody will end
                    raise
                if found is not None:
                    self.release(key, owner)
                    self.served += waited
                    return Lead(found, None, None)
                return Lead(None, key, self, owner)
            if not waited:
                waited = True
                self.waits += 1
            found = answered()
            if found is not None:
                self.served += 1
                return Lead(found, None, None)
            if not wait:
                return Lead(None, None, None)
            if self._monotonic() >= deadline:
                self.timeouts += 1
                log.warning(
                    "another process held the computation of a prompt for %.0fs: computing it "
                    "here too",
                    self.timeout,
                )
                return Lead(None, None, None)
            self._sleep(delay)
            delay = min(delay * 2, LONGEST_WAIT)

    def release(self, key: str, owner: str) -> None:
        self._store.release_lease(key, owner)


def release_quietly(lead: Lead[Any] | None) -> None:
    """End a lease; a store that fails here only delays other processes until it expires."""
    if lead is None:
        return
    try:
        lead.release()
    except SemcacheError as exc:
        log.warning("could not give back a single-flight lease (it expires on its own): %s", exc)


def _release_orphan(look: asyncio.Future[Lead[Any]]) -> None:
    """A lease a cancelled caller's look took after all: give it back (off the loop)."""
    if look.cancelled() or look.exception() is not None:
        return
    lead = look.result()
    if lead.led:
        threading.Thread(target=release_quietly, args=(lead,), daemon=True).start()


async def poll_lead(look: Callable[[], Awaitable[Lead[T]]], deadline: float) -> Lead[T]:
    """Wait for a lead on the event loop: ``look`` is one non-blocking try (a
    ``lead_or_wait(..., wait=False)`` run off the loop), repeated with a growing pause until it
    leads, finds the answer, or the loop's clock reaches ``deadline``; the last try is
    returned. No thread is held while another process computes, and a lease that a try took
    for a caller cancelled meanwhile is given back, not left to expire."""
    loop = asyncio.get_running_loop()
    delay = FIRST_WAIT
    while True:
        task = asyncio.ensure_future(look())
        try:
            lead = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_release_orphan)
            raise
        if lead.led or lead.hit is not None or loop.time() >= deadline:
            return lead
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 2, LONGEST_WAIT)
