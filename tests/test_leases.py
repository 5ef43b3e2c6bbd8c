"""Single-flight between processes, its waiting logic (semcache.leases) with a fake clock and a
real SQLite store; the store's side of leases is in the store contract, and real processes
sharing a PostgreSQL store are in test_shared_store.py."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

from semcache.leases import LONGEST_WAIT, Lead, Leases, poll_lead
from semcache.store import Store


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def leases(store: Store, clock: Clock, timeout: float = 10.0) -> Leases:
    return Leases(store, timeout, time_fn=clock.time, sleep=clock.sleep, monotonic=clock.time)


def test_a_free_prompt_is_led_and_released(tmp_path: Path) -> None:
    store, clock = Store(tmp_path / "s.db"), Clock()
    one = leases(store, clock)
    lead = one.lead_or_wait("k", lambda: None)
    assert lead.led and lead.hit is None
    assert store.lease_owner("k", clock.t).startswith(one.owner)  # type: ignore[union-attr]
    lead.release()
    lead.release()  # idempotent
    assert store.lease_owner("k", clock.t) is None


def test_a_waiter_takes_the_answer_the_leader_stores(tmp_path: Path) -> None:
    store, clock = Store(tmp_path / "s.db"), Clock()
    leader, waiter = leases(store, clock), leases(store, clock)
    assert leader.lead_or_wait("k", lambda: None).led
    looks = []

    def answered() -> str | None:
        looks.append(clock.t)
        return "stored" if len(looks) >= 3 else None

    lead = waiter.lead_or_wait("k", answered)
    assert lead.hit == "stored" and not lead.led
    assert waiter.waits == 1 and waiter.served == 1
    assert clock.slept == [0.005, 0.01]  # backing off, never longer than LONGEST_WAIT
    assert max(clock.slept) <= LONGEST_WAIT


def test_an_answer_stored_just_before_the_lease_was_taken_is_served(tmp_path: Path) -> None:
    store, clock = Store(tmp_path / "s.db"), Clock()
    one = leases(store, clock)
    lead = one.lead_or_wait("k", lambda: "already there")
    assert lead.hit == "already there" and not lead.led
    assert store.lease_owner("k", clock.t) is None  # given back at once


def test_a_waiter_computes_itself_after_the_timeout(tmp_path: Path) -> None:
    store, clock = Store(tmp_path / "s.db"), Clock()
    # a holder with a longer lease that never releases it (stuck, or killed)
    stuck, waiter = leases(store, clock, timeout=5.0), leases(store, clock, timeout=1.0)
    assert stuck.lead_or_wait("k", lambda: None).led
    start = clock.t
    lead = waiter.lead_or_wait("k", lambda: None)
    assert lead.hit is None and not lead.led and waiter.timeouts == 1
    assert 1.0 <= clock.t - start <= 1.0 + LONGEST_WAIT
    # once the holder's lease has expired, the next caller leads
    clock.t = start + 5.0
    assert waiter.lead_or_wait("k", lambda: None).led


def test_a_look_without_waiting_never_sleeps(tmp_path: Path) -> None:
    store, clock = Store(tmp_path / "s.db"), Clock()
    one, other = leases(store, clock), leases(store, clock)
    assert one.lead_or_wait("k", lambda: None).led
    lead = other.lead_or_wait("k", lambda: None, wait=False)
    assert not lead.led and lead.hit is None and clock.slept == [] and other.timeouts == 0


def test_two_callers_in_one_process_never_share_a_lease(tmp_path: Path) -> None:
    """A second caller of the same process is a waiter like any other: it neither leads the
    same prompt too nor, by releasing, ends the first caller's lease."""
    store, clock = Store(tmp_path / "s.db"), Clock()
    one = leases(store, clock)
    first = one.lead_or_wait("k", lambda: None)
    second = one.lead_or_wait("k", lambda: None, wait=False)
    assert first.led and not second.led and second.hit is None
    second.release()
    other = leases(store, clock)
    assert not other.lead_or_wait("k", lambda: None, wait=False).led  # still the first's
    first.release()
    assert other.lead_or_wait("k", lambda: None, wait=False).led


def test_a_look_that_fails_after_taking_the_lease_gives_it_back(tmp_path: Path) -> None:
    import pytest

    from semcache.errors import StoreError

    store, clock = Store(tmp_path / "s.db"), Clock()
    one = leases(store, clock)

    def failing() -> str | None:
        raise StoreError("the store went away")

    with pytest.raises(StoreError):
        one.lead_or_wait("k", failing)
    assert store.lease_owner("k", clock.t) is None


def test_a_failing_release_never_strands_the_flight(tmp_path: Path) -> None:
    """A store that fails while a leader gives its lease back (a dropped connection) must not
    leave its prompt's flight open: the next miss would wait on it forever."""
    import threading

    from semcache import SemanticCache
    from semcache.errors import StoreError

    from .fakes import HashEmbedder

    with SemanticCache(
        tmp_path / "c", embedder=HashEmbedder(), threshold=0.9, flight_timeout=1.0
    ) as cache:
        real = cache._db.release_lease

        def broken(key: str, owner: str) -> None:
            raise StoreError("connection lost")

        cache._db.release_lease = broken  # type: ignore[method-assign]
        assert cache.get_or_compute("hello world", lambda p: "one", tags=["t"]) == "one"
        cache._db.release_lease = real  # type: ignore[method-assign]
        assert len(cache._flights) == 0
        cache.invalidate_tags("t")
        # the lease it could not give back expires (flight_timeout): then the next miss leads
        done: list[str] = []
        thread = threading.Thread(
            target=lambda: done.append(cache.get_or_compute("hello world", lambda p: "two"))
        )
        thread.start()
        thread.join(timeout=10)
        assert done == ["two"]


def test_a_cancelled_async_caller_leaves_no_lease_behind(tmp_path: Path) -> None:
    import asyncio
    import time as _time

    from semcache import SemanticCache

    from .fakes import HashEmbedder

    async def scenario() -> None:
        with SemanticCache(
            tmp_path / "c", embedder=HashEmbedder(), threshold=0.9, flight_timeout=30
        ) as cache:
            real = cache._db.take_lease

            def slow(*args: object) -> bool:
                _time.sleep(0.3)
                return real(*args)  # type: ignore[arg-type]

            cache._db.take_lease = slow  # type: ignore[method-assign,assignment]
            task = asyncio.ensure_future(cache.aget_or_compute("hello world", lambda p: "x"))
            await asyncio.sleep(0.15)  # inside the slow take
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            cache._db.take_lease = real  # type: ignore[method-assign]
            deadline = _time.monotonic() + 5
            while cache._db.execute("SELECT count(*) FROM leases")[0][0] and (
                _time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            assert cache._db.execute("SELECT count(*) FROM leases")[0][0] == 0
            assert len(cache._flights) == 0
            started = _time.monotonic()
            assert await cache.aget_or_compute("hello world", lambda p: "y") == "y"
            assert _time.monotonic() - started < 5  # no wait for an orphaned lease

    import contextlib

    asyncio.run(scenario())


def test_poll_lead_tries_until_it_leads_or_finds_the_answer() -> None:
    tries: list[float] = []

    async def run() -> Lead[str]:
        async def look() -> Lead[str]:
            tries.append(asyncio.get_running_loop().time())
            return Lead("answer", None, None) if len(tries) == 4 else Lead(None, None, None)

        return await poll_lead(look, asyncio.get_running_loop().time() + 30)

    lead = asyncio.run(run())
    assert lead.hit == "answer" and len(tries) == 4


def test_poll_lead_gives_up_at_the_deadline_with_the_last_try() -> None:
    async def run() -> tuple[Lead[str], float, float]:
        loop = asyncio.get_running_loop()

        async def look() -> Lead[str]:
            return Lead(None, None, None)

        start = loop.time()
        lead = await poll_lead(look, start + 0.2)
        return lead, start, loop.time()

    lead, start, end = asyncio.run(run())
    assert not lead.led and lead.hit is None
    assert end - start >= 0.2  # it waited for the deadline, and not much longer
    assert end - start < 0.2 + 5 * LONGEST_WAIT


def test_poll_lead_gives_back_a_lease_its_try_took_for_a_cancelled_caller() -> None:
    released = threading.Event()

    class Recorder:
        def release(self, key: str, owner: str) -> None:
            released.set()

    async def run() -> None:
        started = asyncio.Event()

        async def look() -> Lead[str]:
            started.set()
            await asyncio.sleep(0.2)  # the store's answer comes after the caller gave up
            return Lead(None, "key", Recorder(), "owner")  # type: ignore[arg-type]

        waiter = asyncio.ensure_future(poll_lead(look, asyncio.get_running_loop().time() + 30))
        await started.wait()
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0.3)  # the try finishes behind the shield

    asyncio.run(run())
    assert released.wait(10)
