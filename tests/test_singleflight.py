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
