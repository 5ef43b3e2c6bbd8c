"""BatchingEmbedder: an Embedder like any other, that merges concurrent calls into batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from semcache import SemanticCache
from semcache.batching import BatchingEmbedder
from semcache.embed import Embedder
from semcache.errors import CacheClosedError, InvalidInputError

from .fakes import HashEmbedder


class SlowEmbedder(HashEmbedder):
    """A HashEmbedder that holds each call at a gate until released, and can fail on a word."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.gate.wait(timeout=10)
        if any("POISON" in t for t in texts):
            raise ValueError("poisoned text")
        self.batches.append(len(texts))
        return super().embed(texts)


def test_contract_matches_the_inner_embedder(embedder) -> None:
    texts = ["How do I reset my password?", "What is the capital of France?", "ok"]
    with BatchingEmbedder(embedder) as batcher:
        assert isinstance(batcher, Embedder)
        assert (batcher.model_id, batcher.dim) == (embedder.model_id, embedder.dim)
        got = batcher.embed(texts)
        assert got.shape == (3, embedder.dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, embedder.embed(texts), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert batcher.embed([]).shape == (0, embedder.dim)
        # remembered texts come back identical, and repeats within a call are fine
        again = batcher.embed([texts[1], texts[1]])
        np.testing.assert_array_equal(again[0], got[1])
        np.testing.assert_array_equal(again[1], got[1])
        with pytest.raises(InvalidInputError):
            batcher.embed("one string")  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError):
            batcher.embed([1, 2])  # type: ignore[list-item]


def test_a_cache_runs_on_it(tmp_path, embedder) -> None:
    with (
        BatchingEmbedder(embedder) as batcher,
        SemanticCache(tmp_path / "c", embedder=batcher, threshold=0.85) as cache,
    ):
        cache.store("How do I reset my password?", "Use the reset link.")
        hit = cache.lookup("how can I reset my password")
        assert hit is not None and hit.response == "Use the reset link."
        assert (batcher.stats.texts, batcher.stats.memo_hits) == (2, 0)
        assert cache.lookup("how can I reset my password") is not None
        assert (batcher.stats.texts, batcher.stats.memo_hits) == (2, 1)  # remembered


def test_concurrent_calls_are_merged_and_each_gets_its_own_rows() -> None:
    inner = SlowEmbedder()
    reference = HashEmbedder()
    batcher = BatchingEmbedder(inner, max_batch=64, max_wait=0.05, memo=0)
    inner.gate.clear()  # hold the worker so that callers queue up behind the first batch
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            results[i] = batcher.embed([f"question number {i}", f"other words {i}"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    inner.gate.set()
    for t in threads:
        t.join(timeout=30)
    batcher.close()
    assert not errors
    for i in range(24):
        want = reference.embed([f"question number {i}", f"other words {i}"])
        np.testing.assert_allclose(results[i], want, atol=1e-6)
    assert sum(inner.batches) == 48
    assert len(inner.batches) < 24, inner.batches  # merged: fewer model calls than callers
    assert max(inner.batches) > 2


def test_a_failing_caller_does_not_fail_the_others() -> None:
    inner = SlowEmbedder()
    batcher = BatchingEmbedder(inner, max_wait=0.05, memo=0)
    inner.gate.clear()
    outcome: dict[str, object] = {}

    def call(name: str, text: str) -> None:
        try:
            outcome[name] = batcher.embed([text])
        except Exception as exc:
            outcome[name] = exc

    threads = [
        threading.Thread(target=call, args=(f"ok{i}", f"fine text {i}")) for i in range(5)
    ] + [threading.Thread(target=call, args=("bad", "POISON pill"))]
    for t in threads:
        t.start()
    inner.gate.set()
    for t in threads:
        t.join(timeout=30)
    batcher.close()
    assert isinstance(outcome["bad"], ValueError)
    for i in range(5):
        assert isinstance(outcome[f"ok{i}"], np.ndarray)


def test_closed_batcher_refuses_work() -> None:
    batcher = BatchingEmbedder(HashEmbedder())
    assert batcher.embed(["a b"]).shape == (1, 64)
    batcher.close()
    batcher.close()  # idempotent
    with pytest.raises(CacheClosedError):
        batcher.embed(["something new"])


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(InvalidInputError):
        BatchingEmbedder(HashEmbedder(), max_batch=0)
    with pytest.raises(InvalidInputError):
        BatchingEmbedder(HashEmbedder(), max_wait=-1)


async def test_aembed_waits_on_the_event_loop() -> None:
    import asyncio

    inner = HashEmbedder()
    with BatchingEmbedder(inner, max_wait=0.01, memo=16) as batcher:
        texts = [f"async question {i}" for i in range(12)]
        rows = await asyncio.gather(*(batcher.aembed([t]) for t in texts))
        for text, row in zip(texts, rows, strict=True):
            np.testing.assert_allclose(row, HashEmbedder().embed([text]), atol=1e-6)
        calls = inner.calls
        np.testing.assert_array_equal(batcher.embed([texts[0]]), rows[0])  # remembered
        assert inner.calls == calls


def test_a_batch_already_queued_is_not_held_back_by_max_wait() -> None:
    """Requests that queued while the model computed form the next batch at once: waiting
    max_wait on top would only leave the model idle."""
    inner = SlowEmbedder()
    batcher = BatchingEmbedder(inner, max_batch=64, max_wait=1.0, memo=0)
    inner.gate.clear()
    first = threading.Thread(target=batcher.embed, args=(["first prompt"],))
    first.start()
    while batcher.stats.batches < 1:  # the worker holds "first" at the gate
        threading.Event().wait(0.005)
    queued = [
        threading.Thread(target=batcher.embed, args=([f"queued prompt {i}"],)) for i in range(3)
    ]
    for t in queued:
        t.start()
    while batcher.stats.calls < 4:
        threading.Event().wait(0.005)
    started = time.monotonic()
    inner.gate.set()
    for t in [first, *queued]:
        t.join(timeout=10)
    waited = time.monotonic() - started
    batcher.close()
    assert inner.batches == [1, 3]
    assert waited < 0.8, f"the queued batch waited {waited:.2f}s for more (max_wait is 1s)"
