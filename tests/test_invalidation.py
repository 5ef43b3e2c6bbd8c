"""The invalidation patterns, and a state machine that interleaves them with stores and lookups."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from semcache import FakeClock, InvalidInputError, Scope, SemanticCache

from .fakes import HashEmbedder


def test_invalidate_tags_deletes_past_one_batch(fast_cache: SemanticCache) -> None:
    from semcache.cache import TAG_BATCH

    n = TAG_BATCH * 2 + 7
    fast_cache.store_many(
        [{"prompt": f"entry {i} words", "response": "x", "tags": ["big"]} for i in range(n)]
    )
    fast_cache.store("untagged words", "y", tags=["small"])
    assert fast_cache.invalidate_tags("big") == n
    assert fast_cache.stats()["entries"] == 1 and fast_cache.verify() == []
    fast_cache.store_many(
        [{"prompt": f"again {i} words", "response": "x", "tags": ["big"]} for i in range(TAG_BATCH)]
    )
    assert fast_cache.invalidate_tags("big") == TAG_BATCH  # exactly one full batch
    assert fast_cache.stats()["entries"] == 1


def test_invalidate_tags_counts_and_is_idempotent(fast_cache: SemanticCache) -> None:
    for i in range(30):
        fast_cache.store(f"tagged prompt {i}", "x", tags=[f"user:{i % 3}", "all"])
    fast_cache.store("untagged prompt", "y")
    assert fast_cache.invalidate_tags("user:0") == 10
    assert fast_cache.invalidate_tags("user:0") == 0
    assert fast_cache.invalidate_tags("user:1", "user:2") == 20
    assert fast_cache.lookup("untagged prompt") is not None
    assert fast_cache.stats()["entries"] == 1


def test_the_cached_decorator_checks_its_tags_like_get_or_compute(
    fast_cache: SemanticCache,
) -> None:
    """A str would otherwise be stored as its letters (invalidate_tags("faq") finding nothing);
    None means no tags, as in get_or_compute."""
    for bad in ("faq", 5, ["ok", ""]):
        with pytest.raises(InvalidInputError, match="tag"):
            fast_cache.cached(tags=bad)

    @fast_cache.cached(tags=None)
    def untagged(prompt: str) -> str:
        return "untagged"

    @fast_cache.cached(tags=["faq"])
    def tagged(prompt: str) -> str:
        return "tagged"

    assert untagged("one question here") == "untagged" and tagged("another one") == "tagged"
    assert fast_cache.invalidate_tags("faq") == 1


def test_invalidates_decorator(fast_cache: SemanticCache) -> None:
    fast_cache.store("profile of user 7", "old name", tags=["user:7"])
    fast_cache.store("profile of user 8", "other", tags=["user:8"])

    @fast_cache.invalidates(tags=lambda user_id, **_: [f"user:{user_id}"])
    def rename(user_id: int, name: str) -> str:
        if not name:
            raise ValueError("empty name")
        assert fast_cache.lookup("profile of user 7") is not None  # not invalidated before
        return name

    with pytest.raises(ValueError):
        rename(7, "")
    assert fast_cache.lookup("profile of user 7") is not None  # a failed write invalidates nothing
    assert rename(7, name="new") == "new"
    assert fast_cache.lookup("profile of user 7") is None
    assert fast_cache.lookup("profile of user 8") is not None


async def test_invalidates_decorator_async(fast_cache: SemanticCache) -> None:
    fast_cache.store("order 5 status", "shipped", tags=["order:5"])

    @fast_cache.invalidates(tags=["order:5"], namespaces=["other"])
    async def cancel() -> None:
        return None

    await cancel()
    assert fast_cache.lookup("order 5 status") is None
    assert fast_cache.version("other") == 1


def test_invalidate_similar_is_exact(tmp_path: Path) -> None:
    """On 10,000 entries it removes exactly what a brute-force scan finds, for several radii."""
    dim = 32
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((20, dim)).astype(np.float32)
    x = centres[rng.integers(0, 20, 10_000)] + 0.6 * rng.standard_normal((10_000, dim)).astype(
        np.float32
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cache = SemanticCache(tmp_path, embedder=HashEmbedder(dim=dim), hnsw_threshold=2000)
    ids = [cache.store(f"p{i}", "r", vector=x[i]) for i in range(10_000)]
    alive = np.ones(10_000, dtype=bool)
    for radius in (0.9, 0.8, 0.7, 0.6):
        q = centres[int(rng.integers(0, 20))] / np.linalg.norm(centres[0])
        q = q / np.linalg.norm(q)
        expected = {ids[i] for i in np.flatnonzero(alive & ((x @ q) >= np.float32(radius)))}
        removed = cache.invalidate_similar(q, radius)
        assert set(removed) == expected and len(removed) == len(expected)
        for i in range(10_000):
            if ids[i] in expected:
                alive[i] = False
    assert cache.stats()["entries"] == int(alive.sum())
    assert cache.verify() == []
    cache.close()


def test_invalidate_similar_text_and_scope(cache: SemanticCache) -> None:
    a, b = Scope(namespace="a"), Scope(namespace="b")
    cache.store("What is the capital of France?", "Paris.", scope=a)
    cache.store("What is the capital of France?", "Paris.", scope=b)
    cache.store("How do I bake bread?", "Flour, water, heat.", scope=a)
    removed = cache.invalidate_similar("capital city of France", 0.7, scope=a)
    assert len(removed) == 1
    assert cache.lookup("What is the capital of France?", scope=a) is None
    assert cache.lookup("What is the capital of France?", scope=b) is not None
    assert cache.lookup("How do I bake bread?", scope=a) is not None


PROMPTS = [f"w{i}" for i in range(6)]
NAMESPACES = ["n0", "n1"]
TAGS = ["t0", "t1", "t2"]


class InvalidationMachine(RuleBasedStateMachine):
    """A reference model of what must be served; every invalidation is checked against it."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.clock = FakeClock()
        self.embedder = HashEmbedder(dim=64)
        self.cache = self._open()
        # (namespace, prompt) -> (entry_id, response, tags, expires_at)
        self.model: dict[tuple[str, str], tuple[str, str, set[str], float | None]] = {}
        self.counter = 0

    def _open(self) -> SemanticCache:
        return SemanticCache(
            Path(self.tmp.name),
            embedder=self.embedder,
            clock=self.clock,
            threshold=0.95,
            hnsw_threshold=8,
        )

    def _live(self) -> dict[tuple[str, str], tuple[str, str, set[str], float | None]]:
        now = self.clock.now()
        return {k: v for k, v in self.model.items() if v[3] is None or v[3] > now}

    @rule(
        ns=st.sampled_from(NAMESPACES),
        prompt=st.sampled_from(PROMPTS),
        tags=st.sets(st.sampled_from(TAGS), max_size=2),
        ttl=st.sampled_from([None, 0, 5, 50]),
    )
    def store(self, ns: str, prompt: str, tags: set[str], ttl: float | None) -> None:
        self.counter += 1
        response = f"r{self.counter}"
        eid = self.cache.store(prompt, response, scope=Scope(namespace=ns), tags=tags, ttl=ttl)
        expires = None if ttl is None else self.clock.now() + ttl
        self.model[(ns, prompt)] = (eid, response, set(tags), expires)

    @rule(ns=st.sampled_from(NAMESPACES), prompt=st.sampled_from(PROMPTS))
    def lookup(self, ns: str, prompt: str) -> None:
        hit = self.cache.lookup(prompt, scope=Scope(namespace=ns))
        expected = self._live().get((ns, prompt))
        if expected is None:
            assert hit is None, f"served an invalidated entry {hit}"
        else:
            assert hit is not None and (hit.entry_id, hit.response) == expected[:2]

    @rule(ns=st.sampled_from(NAMESPACES), prompt=st.sampled_from(PROMPTS))
    def delete(self, ns: str, prompt: str) -> None:
        entry = self.model.pop((ns, prompt), None)
        if entry is not None:
            self.cache.delete(entry[0])

    @rule(tag=st.sampled_from(TAGS))
    def invalidate_tag(self, tag: str) -> None:
        self.cache.invalidate_tags(tag)
        self.model = {k: v for k, v in self.model.items() if tag not in v[2]}

    @rule(ns=st.sampled_from(NAMESPACES))
    def bump(self, ns: str) -> None:
        self.cache.bump(ns)
        self.model = {k: v for k, v in self.model.items() if k[0] != ns}

    @rule(prompt=st.sampled_from(PROMPTS))
    def invalidate_similar(self, prompt: str) -> None:
        self.cache.invalidate_similar(prompt, 0.99)
        self.model = {k: v for k, v in self.model.items() if k[1] != prompt}

    @rule(seconds=st.sampled_from([1, 10, 100]))
    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def expire(self) -> None:
        self.cache.expire()
        self.model = self._live()

    @precondition(lambda self: self.counter > 0)
    @rule()
    def restart(self) -> None:
        self.cache.close()
        self.cache = self._open()

    @invariant()
    def store_and_index_agree(self) -> None:
        assert self.cache.verify() == []

    def teardown(self) -> None:
        self.cache.close()
        self.tmp.cleanup()


TestInvalidationMachine = InvalidationMachine.TestCase
TestInvalidationMachine.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_stale_while_revalidate(tmp_path: Path, clock: FakeClock) -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    cache = SemanticCache(
        tmp_path, embedder=HashEmbedder(), clock=clock, threshold=0.9, max_stale=30
    )
    cache.store("exchange rate today", "1.10", ttl=60)
    clock.advance(70)  # expired 10 s ago: inside the stale window
    assert cache.lookup("exchange rate today") is None  # lookup never serves stale answers
    started = threading.Event()
    calls = 0

    def refresh(prompt: str) -> str:
        nonlocal calls
        calls += 1
        started.set()
        time.sleep(0.3)
        return "1.12"

    with ThreadPoolExecutor(4) as pool:
        leader = pool.submit(cache.get_or_compute, "exchange rate today", refresh, ttl=60)
        started.wait(5)
        others = [
            pool.submit(cache.get_or_compute, "exchange rate today", refresh) for _ in range(3)
        ]
        assert [f.result() for f in others] == ["1.10"] * 3  # served stale meanwhile
        assert leader.result() == "1.12"
    assert calls == 1
    assert cache.lookup("exchange rate today").response == "1.12"
    clock.advance(100)  # now expired 40 s ago: beyond the window, never served
    assert cache.get_or_compute("exchange rate today", lambda p: "1.20") == "1.20"
    assert cache.verify() == []
    # expire() keeps what may still be served stale, and deletes what is past the window
    cache.store("inside the window", "a", ttl=10)
    cache.store("beyond the window", "b", ttl=1)
    clock.advance(35)  # expired 25 s and 34 s ago
    assert cache.expire() == 1
    assert cache.stats()["entries"] == 2  # the refreshed rate and the one inside the window
    cache.close()
