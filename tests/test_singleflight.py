"""Single-flight: concurrent misses for one prompt make one call (threads and asyncio tasks)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from semcache import SemanticCache


def test_sixteen_threads_one_call(cache: SemanticCache) -> None:
    calls = 0
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def llm(prompt: str) -> str:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.3)  # a slow LLM: every other thread arrives while it is in flight
        return "Paris."

    def ask(_: int) -> str:
        barrier.wait()
        return cache.get_or_compute("What is the capital of France?", llm)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert calls == 1
    assert answers == ["Paris."] * 16
    assert cache.lookup("What is the capital of France?").response == "Paris."


def test_near_identical_prompts_share_a_flight(cache: SemanticCache) -> None:
    calls = []
    started = threading.Event()

    def llm(prompt: str) -> str:
        calls.append(prompt)
        started.set()
        time.sleep(0.5)
        return "Paris."

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(cache.get_or_compute, "What is the capital of France?", llm)
        started.wait(5)
        second = pool.submit(cache.get_or_compute, "What's France's capital city?", llm)
        assert first.result() == second.result() == "Paris."
    assert len(calls) == 1


async def test_sixteen_tasks_one_call(cache: SemanticCache) -> None:
    calls = 0

    async def llm(prompt: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return "Paris."

    answers = await asyncio.gather(
        *(cache.aget_or_compute("What is the capital of France?", llm) for _ in range(16))
    )
    assert calls == 1 and answers == ["Paris."] * 16
    assert (await cache.alookup("What's France's capital city?")).response == "Paris."


async def test_async_with_sync_fn_and_astore(cache: SemanticCache) -> None:
    calls = 0

    def llm(prompt: str) -> str:
        nonlocal calls
        calls += 1
        time.sleep(0.2)
        return "Berlin."

    answers = await asyncio.gather(
        *(cache.aget_or_compute("What is the capital of Germany?", llm) for _ in range(8))
    )
    assert calls == 1 and set(answers) == {"Berlin."}
    await cache.astore("What is the capital of Italy?", "Rome.")
    assert (await cache.alookup("What is the capital of Italy?")).tier == "l1"


def test_leader_failure_is_shared_and_nothing_cached(cache: SemanticCache) -> None:
    barrier = threading.Barrier(4)

    def llm(prompt: str) -> str:
        time.sleep(0.3)
        raise RuntimeError("upstream down")

    def ask(_: int) -> str:
        barrier.wait()
        return cache.get_or_compute("What is the capital of Spain?", llm)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, i) for i in range(4)]
        for future in futures:
            with pytest.raises(RuntimeError, match="upstream down"):
                future.result()
    assert cache.lookup("What is the capital of Spain?") is None
    assert len(cache._flights) == 0


async def test_a_cancelled_leader_hands_over_to_a_follower(fast_cache: SemanticCache) -> None:
    """Cancelling the task that leads a flight does not fail the tasks waiting on it: one of
    them leads a new flight and every survivor gets an answer."""
    calls: list[str] = []
    started = asyncio.Event()

    async def llm(prompt: str) -> str:
        calls.append(prompt)
        started.set()
        await asyncio.sleep(0.3)
        return "answer"

    leader = asyncio.create_task(fast_cache.aget_or_compute("handover words here", llm))
    await started.wait()
    followers = [
        asyncio.create_task(fast_cache.aget_or_compute("handover words here", llm))
        for _ in range(3)
    ]
    await asyncio.sleep(0.1)  # the followers have joined the leader's flight
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await asyncio.gather(*followers) == ["answer"] * 3
    assert len(calls) == 2  # the cancelled leader's call and its successor's, no more
    assert fast_cache.lookup("handover words here").response == "answer"
    assert len(fast_cache._flights) == 0


def test_a_miss_after_a_bump_never_joins_a_flight_from_before_it(
    fast_cache: SemanticCache,
) -> None:
    release = threading.Event()
    started = threading.Event()

    def old_llm(prompt: str) -> str:
        started.set()
        release.wait(5)
        return "old answer"

    with ThreadPoolExecutor(1) as pool:
        before = pool.submit(fast_cache.get_or_compute, "versioned words here", old_llm)
        assert started.wait(5)
        fast_cache.bump("default")
        after = fast_cache.get_or_compute("versioned words here", lambda p: "new answer")
        release.set()
        assert before.result() == "old answer"  # its caller still gets its answer
    assert after == "new answer"
    assert fast_cache.lookup("versioned words here").response == "new answer"
    assert fast_cache.stats()["fenced"] == 1


def test_a_fenced_answers_ttl_counts_from_its_lookup(fast_cache: SemanticCache, clock) -> None:  # type: ignore[no-untyped-def]
    """An answer that took 30 s to compute is 30 s old when stored: with ttl=60 it expires 60 s
    after the lookup, so the TTL bounds how stale it can be."""
    start = clock.now()

    def slow(prompt: str) -> str:
        clock.advance(30)
        return "answer"

    fast_cache.get_or_compute("slow words here", slow, ttl=60)
    hit = fast_cache.lookup("slow words here")
    assert hit is not None and fast_cache.get(hit.entry_id).expires_at == start + 60
    clock.advance(31)
    assert fast_cache.lookup("slow words here") is None
