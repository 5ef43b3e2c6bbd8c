"""The core cache: real-model hits and misses, scopes, TTL, write-through, eviction, L1, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from semcache import (
    CacheClosedError,
    EmbedderMismatchError,
    EntryNotFoundError,
    EntryTooLargeError,
    FakeClock,
    InvalidInputError,
    InvalidPromptError,
    InvalidScopeError,
    InvalidVectorError,
    Scope,
    SemanticCache,
    SemcacheError,
    StoreError,
)
from semcache.store import SCHEMA_VERSION

from .fakes import HashEmbedder

FRANCE = "What is the capital of France?"
FRANCE_PARAPHRASE = "What's France's capital city?"
GERMANY = "What is the capital of Germany?"


# -- the real model --------------------------------------------------------------------------
def test_paraphrase_hits_and_near_miss_misses(cache: SemanticCache) -> None:
    scope = Scope(namespace="acme", model="gpt-4o-mini", params={"temperature": 0})
    entry_id = cache.store(FRANCE, "Paris.", scope=scope, ttl=3600, tags=["geo"])
    hit = cache.lookup(FRANCE_PARAPHRASE, scope=scope)
    assert hit is not None
    assert (hit.response, hit.entry_id, hit.tier) == ("Paris.", entry_id, "semantic")
    assert 0.9 < hit.similarity < 1.0
    assert cache.lookup(GERMANY, scope=scope) is None
    exact = cache.lookup("  What is the capital   of France? ", scope=scope)
    assert exact is not None and exact.tier == "l1" and exact.similarity == 1.0


def test_probe_tells_how_close_a_miss_came(cache: SemanticCache) -> None:
    assert cache.probe(GERMANY) == (None, None)  # nothing indexed: nothing was near
    cache.store(FRANCE, "Paris.")
    hit, nearest = cache.probe(GERMANY)
    assert hit is None and nearest is not None
    a, b = cache.embed([FRANCE, GERMANY])
    assert nearest == pytest.approx(float(a @ b), abs=1e-5)
    assert nearest == pytest.approx(cache.nearest_similarity(GERMANY), abs=1e-6)
    hit, nearest = cache.probe(FRANCE_PARAPHRASE)
    assert hit is not None and nearest == pytest.approx(hit.similarity, abs=1e-6)
    hit, nearest = cache.probe(FRANCE)  # an exact repeat needs no search
    assert hit is not None and hit.tier == "l1" and nearest is None


def test_threshold_override_per_call(cache: SemanticCache) -> None:
    cache.store(FRANCE, "Paris.")
    assert cache.lookup(FRANCE_PARAPHRASE, threshold=0.99) is None
    assert cache.lookup(GERMANY, threshold=0.6) is not None  # GPTCache's rule: a wrong answer
    with pytest.raises(InvalidInputError):
        cache.lookup(FRANCE_PARAPHRASE, threshold=1.5)


@pytest.mark.parametrize(
    "other",
    [
        Scope(namespace="globex", model="gpt-4o-mini", params={"temperature": 0}, system="s"),
        Scope(namespace="acme", model="gpt-4o", params={"temperature": 0}, system="s"),
        Scope(namespace="acme", model="gpt-4o-mini", params={"temperature": 0.7}, system="s"),
        Scope(namespace="acme", model="gpt-4o-mini", params={"temperature": 0}, system="other"),
        Scope(
            namespace="acme",
            model="gpt-4o-mini",
            params={"temperature": 0},
            system="s",
            context=[{"role": "user", "content": "hi"}],
        ),
    ],
    ids=["namespace", "model", "params", "system", "context"],
)
def test_scope_isolation(cache: SemanticCache, other: Scope) -> None:
    scope = Scope(namespace="acme", model="gpt-4o-mini", params={"temperature": 0}, system="s")
    cache.store(FRANCE, "Paris.", scope=scope)
    assert cache.lookup(FRANCE, scope=other) is None
    assert cache.lookup(FRANCE_PARAPHRASE, scope=other) is None
    assert cache.lookup(FRANCE, scope=scope) is not None


def test_scope_equivalences() -> None:
    assert Scope(params={"temperature": 0}) == Scope(params={"temperature": 0.0})
    assert Scope(params={"a": 1, "b": 2}).digest == Scope(params={"b": 2, "a": 1}).digest
    assert Scope(params={"temperature": 0}) != Scope(params={"temperature": 1})
    with pytest.raises(InvalidScopeError):
        Scope(params={"x": float("nan")})
    with pytest.raises(InvalidScopeError):
        Scope(params={"x": object()})
    with pytest.raises(InvalidScopeError):
        Scope(namespace="")
    with pytest.raises(InvalidScopeError):
        Scope(context="a string, not a list of turns")
    with pytest.raises(InvalidScopeError, match="serialised"):  # was a raw ValueError
        Scope(params={"n": 10**5000})
    with pytest.raises(InvalidScopeError, match="NUL"):  # a text column on every store
        Scope(namespace="a\x00b")
    assert Scope(system="a\x00b", params={"p": "\x00"}).digest  # kept inside escaped JSON


# -- TTL --------------------------------------------------------------------------------------
def test_ttl_with_injected_clock(fast_cache: SemanticCache, clock: FakeClock) -> None:
    fast_cache.store("alpha beta gamma", "short", ttl=10)
    fast_cache.store("delta epsilon", "forever", ttl=None)
    fast_cache.store("zeta eta", "gone at once", ttl=0)
    assert fast_cache.lookup("alpha beta gamma") is not None
    assert fast_cache.lookup("zeta eta") is None
    clock.advance(9.9)
    assert fast_cache.lookup("alpha beta gamma") is not None
    clock.advance(0.2)
    assert fast_cache.lookup("alpha beta gamma") is None  # L1 held it; expiry still applies
    assert fast_cache.lookup("gamma beta alpha") is None  # nor the semantic tier
    assert fast_cache.lookup("delta epsilon") is not None
    assert fast_cache.expire() == 2  # alpha and the ttl=0 entry
    assert fast_cache.stats()["entries"] == 1


def test_writes_cull_expired_entries_in_bounded_batches(
    fast_cache: SemanticCache, clock: FakeClock
) -> None:
    from semcache.writer import CULL_EVERY

    for i in range(5):
        fast_cache.store(f"short lived {i}", "x", ttl=1)
    clock.advance(2)
    for i in range(CULL_EVERY):
        fast_cache.store(f"long lived {i}", "y", ttl=None)
    assert fast_cache.stats()["culled"] == 5  # no expire() call: the writes removed them
    assert fast_cache.expire() == 0


def test_default_and_max_ttl(tmp_path: Path, clock: FakeClock) -> None:
    c = SemanticCache(
        tmp_path, embedder=HashEmbedder(), clock=clock, default_ttl=100, max_ttl=50, threshold=0.9
    )
    a = c.store("one two", "x")
    b = c.store("three four", "y", ttl=None)  # None is capped by max_ttl: bounded staleness
    assert c.get(a).expires_at == clock.now() + 50
    assert c.get(b).expires_at == clock.now() + 50
    with pytest.raises(InvalidInputError):
        c.store("five", "z", ttl=-1)
    with pytest.raises(InvalidInputError):
        c.store("five", "z", ttl=float("nan"))
    c.close()


# -- write-through ----------------------------------------------------------------------------
def test_delete_and_update(fast_cache: SemanticCache) -> None:
    eid = fast_cache.store("red green blue", "colours", tags=["t1"], metadata={"k": 1})
    assert fast_cache.lookup("red green blue").response == "colours"
    fast_cache.update(eid, response="new colours", tags=["t2"], metadata={"k": 2, "café": "é"})
    entry = fast_cache.get(eid)
    assert (entry.response, entry.tags) == ("new colours", ("t2",))
    assert dict(entry.metadata) == {"k": 2, "café": "é"}  # non-ASCII metadata round-trips
    assert fast_cache.lookup("red green blue").response == "new colours"  # L1 refreshed
    fast_cache.update(eid, prompt="cyan magenta yellow")
    assert fast_cache.lookup("red green blue") is None
    assert fast_cache.lookup("cyan magenta yellow").response == "new colours"
    assert fast_cache.delete(eid) is True
    assert fast_cache.delete(eid) is False
    assert fast_cache.lookup("cyan magenta yellow") is None
    with pytest.raises(EntryNotFoundError):
        fast_cache.update(eid, response="x")
    with pytest.raises(EntryNotFoundError):
        fast_cache.get(eid)


def test_delete_prompt_and_upsert(fast_cache: SemanticCache) -> None:
    first = fast_cache.store("one two three", "a")
    second = fast_cache.store("one  two three", "b")  # an exact repeat replaces the entry
    assert first != second
    assert fast_cache.stats()["entries"] == 1
    assert fast_cache.lookup("one two three").response == "b"
    assert fast_cache.delete_prompt("one two three") == 1
    assert fast_cache.lookup("one two three") is None


# -- L1 consistency: every write path ----------------------------------------------------------
def test_l1_follows_every_write_path(fast_cache: SemanticCache, clock: FakeClock) -> None:
    scope = Scope(namespace="n1")
    paths = {
        "delete": lambda eid: fast_cache.delete(eid),
        "update": lambda eid: fast_cache.update(eid, response="changed"),
        "tag": lambda eid: fast_cache.invalidate_tags("t"),
        "bump": lambda eid: fast_cache.bump("n1"),
        "similar": lambda eid: fast_cache.invalidate_similar("w1 w2 w3", 0.99, scope=scope),
        "ttl": lambda eid: (fast_cache.update(eid, ttl=1), clock.advance(2)),
        "prompt": lambda eid: fast_cache.delete_prompt("w1 w2 w3", scope=scope),
    }
    for name, action in paths.items():
        eid = fast_cache.store("w1 w2 w3", "original", scope=scope, tags=["t"])
        hit = fast_cache.lookup("w1 w2 w3", scope=scope)
        assert hit is not None and hit.tier == "l1", name
        action(eid)
        hit = fast_cache.lookup("w1 w2 w3", scope=scope)
        assert hit is None or hit.response == "changed", name
        fast_cache.delete(eid)


def test_another_process_invalidation_reaches_l1(tmp_path: Path, clock: FakeClock) -> None:
    """Two caches on one folder stand for two processes: the change log keeps L1 honest."""
    a = SemanticCache(tmp_path, embedder=HashEmbedder(), clock=clock, threshold=0.9)
    b = SemanticCache(tmp_path, embedder=HashEmbedder(), clock=clock, threshold=0.9)
    eid = a.store("shared words here", "v1", tags=["x"])
    assert a.lookup("shared words here").tier == "l1"
    assert b.lookup("shared words here").response == "v1"  # b picked the entry up
    b.update(eid, response="v2")
    assert a.lookup("shared words here").response == "v2"
    b.invalidate_tags("x")
    assert a.lookup("shared words here") is None
    b.bump("default")
    a.store("after bump words", "v3")
    assert b.lookup("after bump words").response == "v3"
    assert a.verify() == [] and b.verify() == []
    b.close()
    a.close()


# -- eviction ---------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_eviction(tmp_path: Path, clock: FakeClock, policy: str) -> None:
    c = SemanticCache(
        tmp_path,
        embedder=HashEmbedder(),
        clock=clock,
        max_entries=3,
        eviction=policy,
        threshold=0.95,
    )
    for word in ("aa", "bb", "cc"):
        c.store(f"{word} question", word)
        clock.advance(1)
    c.lookup("aa question")  # recently and frequently used
    c.lookup("aa question")
    clock.advance(1)
    c.store("dd question", "dd")
    assert c.stats()["entries"] == 3
    kept = {w for w in ("aa", "bb", "cc", "dd") if c.lookup(f"{w} question") is not None}
    if policy in ("lru", "lfu"):
        assert kept == {"aa", "cc", "dd"}
    else:
        assert kept == {"bb", "cc", "dd"}
    assert c.verify() == []
    c.close()


def test_max_bytes(tmp_path: Path, clock: FakeClock) -> None:
    c = SemanticCache(tmp_path, embedder=HashEmbedder(dim=16), clock=clock, max_bytes=2000)
    for i in range(20):
        c.store(f"prompt number {i}", "x" * 200)
        clock.advance(1)
    stats = c.stats()
    assert stats["bytes"] <= 2000 and stats["evictions"] > 0
    assert c.lookup("prompt number 19") is not None
    c.close()


def test_an_update_that_grows_an_entry_keeps_max_bytes_and_never_evicts_that_entry(
    tmp_path: Path, clock: FakeClock
) -> None:
    """max_bytes is enforced on every write, updates included: the oldest entries go (LRU),
    the one updated stays, and one too large on its own is refused with nothing changed."""
    c = SemanticCache(tmp_path, embedder=HashEmbedder(dim=16), clock=clock, max_bytes=4000)
    ids = []
    for i in range(6):
        ids.append(c.store(f"prompt number {i}", "x" * 200))
        clock.advance(1)
    assert c.stats()["evictions"] == 0
    c.update(ids[0], response="y" * 2500)  # the oldest entry, the first LRU would pick
    stats = c.stats()
    assert stats["bytes"] <= 4000 and stats["evictions"] > 0
    assert c.get(ids[0]).response == "y" * 2500
    with pytest.raises(EntryNotFoundError):
        c.get(ids[1])  # the least recently used went
    assert c.get(ids[5]).response == "x" * 200
    before = c.stats()
    with pytest.raises(InvalidInputError, match="max_bytes"):
        c.update(ids[5], response="z" * 5000)
    assert c.get(ids[5]).response == "x" * 200 and c.stats()["bytes"] == before["bytes"]
    assert c.verify() == []
    c.close()


def test_text_no_store_keeps_is_refused_and_a_computed_one_is_returned_uncached(
    tmp_path: Path,
) -> None:
    """A NUL character (PostgreSQL's text cannot hold it) is refused in every text field on
    every store, as a lone surrogate is; an id holding one is simply not found. An answer a
    compute function paid for is returned even when it holds one, and not cached."""
    with SemanticCache(tmp_path, embedder=HashEmbedder()) as c:
        eid = c.store("a stored prompt", "answer", tags=["t"])
        with pytest.raises(InvalidPromptError, match="NUL"):
            c.store("a\x00prompt", "x")
        for call in (
            lambda: c.store("ok prompt", "an\x00swer"),
            lambda: c.store("ok prompt", "x", tags=["t\x00"]),
            lambda: c.store_many([("ok prompt", "x"), ("other prompt", "y\x00")]),
            lambda: c.update(eid, response="\x00"),
            lambda: c.invalidate_tags("t\x00"),
            lambda: c.bump("a\x00"),
            lambda: c.version("a\x00"),
        ):
            with pytest.raises(InvalidInputError, match="NUL"):
                call()
        with pytest.raises(EntryNotFoundError):
            c.get("ab\x00")
        assert c.delete("ab\x00") is False
        for answer in ("bad\x00answer", "bad\ud800answer"):
            calls: list[str] = []

            def llm(prompt: str, answer: str = answer, calls: list[str] = calls) -> str:
                calls.append(prompt)
                return answer

            assert c.get_or_compute("a question to compute", llm) == answer
            assert c.get_or_compute("a question to compute", llm) == answer
            assert len(calls) == 2  # not cached
        assert c.stats()["unstorable"] == 4 and c.stats()["entries"] == 1
        assert c.get(eid).response == "answer" and c.verify() == []


def test_a_bulk_write_spares_only_its_own_batches_and_others_keep_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes that land between two batches of a store_many are evicted like any other (the
    bound holds when the call returns), and the call's own earlier batches stay."""
    with SemanticCache(
        tmp_path, embedder=HashEmbedder(), max_entries=300, eviction="fifo", threshold=0.99
    ) as c:
        c.store_many([(f"older question {i}", "old") for i in range(200)])
        real = c.writer.write_many
        batches: list[int] = []

        def interleaved(*args: Any, **kwargs: Any) -> Any:
            if batches:  # another writer between two batches of the call
                for i in range(20):  # fewer than the older entries left: only those go
                    c.store(f"interleaved question {len(batches)} {i}", "other")
            batches.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(c.writer, "write_many", interleaved)
        ids = c.store_many([(f"bulk question {i}", "new") for i in range(300)])  # 256 + 44
        assert len(batches) == 2
        assert all(c.get(entry_id).response == "new" for entry_id in ids)
        assert c.stats()["entries"] == 300 and c.verify() == []


def test_a_prompt_repeated_in_a_later_batch_gets_the_surviving_id(tmp_path: Path) -> None:
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.99) as c:
        items = [(f"question number {i}", f"a{i}") for i in range(300)]
        items[280] = ("question number 0", "the later answer")  # batches of 256: another batch
        ids = c.store_many(items)
        assert ids[0] == ids[280] and c.get(ids[0]).response == "the later answer"
        assert len(set(ids)) == 299 == c.stats()["entries"]


def test_an_answer_too_large_to_cache_is_still_returned(tmp_path: Path) -> None:
    """get_or_compute (and so @cached) returns the answer it paid for when it is larger than
    max_bytes on its own, without caching it; store() refuses it with EntryTooLargeError."""
    import asyncio

    with SemanticCache(tmp_path, embedder=HashEmbedder(), max_bytes=2000) as c:
        big = "z" * 5000
        calls: list[str] = []

        def llm(prompt: str) -> str:
            calls.append(prompt)
            return big

        assert c.get_or_compute("a long answer please", llm) == big
        assert c.get_or_compute("a long answer please", llm) == big  # not cached: asked again
        assert len(calls) == 2
        assert asyncio.run(c.aget_or_compute("another long one", llm)) == big
        assert c.cached()(llm)("a third long one") == big
        stats = c.stats()
        assert stats["too_large"] == 4 and stats["entries"] == 0 and stats["computes"] == 4
        with pytest.raises(EntryTooLargeError, match="max_bytes=2000"):
            c.store("stored directly", big)
        assert issubclass(EntryTooLargeError, InvalidInputError)
        assert c.verify() == []


def test_store_many_that_cannot_fit_the_bounds_is_refused_whole(tmp_path: Path) -> None:
    """A bulk write never evicts its own entries, so one larger than max_entries or max_bytes
    is refused before anything is written, as is one with a single oversize item anywhere
    (after the first batch of 256 too)."""
    with SemanticCache(tmp_path / "n", embedder=HashEmbedder(), max_entries=5) as c:
        c.store("kept before", "0")
        with pytest.raises(InvalidInputError, match="max_entries=5"):
            c.store_many([(f"question number {i}", f"a{i}") for i in range(10)])
        # repeats of one prompt are one entry: this fits
        c.store_many([("same question", f"a{i}") for i in range(10)])
        assert c.stats()["entries"] == 2 and c.verify() == []
    with SemanticCache(tmp_path / "b", embedder=HashEmbedder(), max_bytes=5000) as c:
        with pytest.raises(InvalidInputError, match="max_bytes=5000"):
            c.store_many([(f"question number {i}", "x" * 400) for i in range(12)])
        items = [(f"small question {i}", "y") for i in range(300)] + [("big one", "z" * 9000)]
        with pytest.raises(InvalidInputError, match="max_bytes"):
            c.store_many(items)
        assert c.stats()["entries"] == 0 and c.verify() == []


def test_a_bulk_write_in_many_batches_never_evicts_its_own_entries(tmp_path: Path) -> None:
    """store_many commits in batches; a later batch of the same call evicts older entries,
    never an earlier batch's, so every id it returns exists when it returns (LFU would
    otherwise pick the new, never-hit entries first)."""
    with SemanticCache(
        tmp_path, embedder=HashEmbedder(), max_entries=700, eviction="lfu", threshold=0.99
    ) as c:
        c.store_many([(f"older question {i}", "old") for i in range(400)])
        for i in range(400):
            assert c.lookup(f"older question {i}") is not None  # hits: LFU keeps these longer
        ids = c.store_many([(f"bulk question {i}", "new") for i in range(600)])  # 3 batches
        assert all(c.get(entry_id).response == "new" for entry_id in ids)
        assert c.stats()["entries"] == 700 and c.verify() == []


def test_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        SemanticCache(tmp_path, embedder=HashEmbedder(), eviction="random")
    with pytest.raises(InvalidInputError):
        SemanticCache(tmp_path, embedder=HashEmbedder(), max_entries=0)


@pytest.mark.parametrize(
    "settings",
    [
        {"eviction": ["lru"]},
        {"max_entries": True},
        {"max_bytes": 1.5},
        {"sweep_interval": "x"},
        {"sweep_interval": -1},
        {"sweep_interval": 0},
        {"sweep_interval": float("inf")},
        {"sweep_interval": 10**400},  # an int no float holds
        {"sweep_interval": 1e10},  # longer than a thread can wait
        {"poll_interval": 10**400},
        {"flight_timeout": float("nan")},
        {"checkpoint_every": 0},
        {"log_keep": -1},
        {"cull_limit": "x"},
        {"clock": 5},
        {"hnsw_threshold": "x"},
        {"hnsw_threshold": 0},
        {"l1_size": "x"},
        {"l1_size": -1},
        {"k": True},
    ],
)
def test_bad_constructor_arguments_are_refused_before_anything_is_created(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    """Each was a raw TypeError/ValueError, or accepted and failing later (a store, a lookup,
    close(); sweep_interval=-1 busy-looped its thread)."""
    folder = tmp_path / "never"
    with pytest.raises(InvalidInputError):
        SemanticCache(folder, embedder=HashEmbedder(), **settings)
    assert not folder.exists()


def test_a_path_that_is_not_a_path_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="path"):
        SemanticCache(5, embedder=HashEmbedder())  # type: ignore[arg-type]


# -- errors and bad input ---------------------------------------------------------------------
def test_bad_input_is_typed_and_harmless(fast_cache: SemanticCache) -> None:
    eid = fast_cache.store("keep this one", "safe")
    for bad in ("", "   ", None, 42, b"bytes"):
        with pytest.raises(InvalidPromptError):
            fast_cache.store(bad, "x")  # type: ignore[arg-type]
        with pytest.raises(InvalidPromptError):
            fast_cache.lookup(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        fast_cache.store("ok prompt", 123)  # type: ignore[arg-type]
    with pytest.raises(InvalidVectorError):
        fast_cache.store("ok prompt", "x", vector=np.ones(3))
    with pytest.raises(InvalidVectorError):
        fast_cache.store("ok prompt", "x", vector=np.full(64, np.nan))
    with pytest.raises(InvalidVectorError):
        fast_cache.invalidate_similar(np.zeros(64), 0.5)
    two = np.eye(2, 64, dtype=np.float32)  # two vectors where one is asked: was cut to one
    for call in (
        lambda: fast_cache.store("ok prompt", "x", vector=two),
        lambda: fast_cache.lookup("ok prompt", vector=two),
        lambda: fast_cache.invalidate_similar(two, 0.5),
    ):
        with pytest.raises(InvalidVectorError, match="one vector"):
            call()
    with pytest.raises(InvalidInputError):
        fast_cache.store("ok prompt", "x", tags="one-string")
    with pytest.raises(InvalidInputError):
        fast_cache.store("ok prompt", "x", metadata={"x": object()})
    with pytest.raises(InvalidInputError):
        fast_cache.store("ok prompt", "x", scope="acme")  # type: ignore[arg-type]
    deep: Any = "leaf"
    for _ in range(300):  # stored, then unreadable by the sidecar (500 on every read)
        deep = [deep]
    with pytest.raises(InvalidInputError, match="nested"):
        fast_cache.store("ok prompt", "x", metadata={"deep": deep})
    for meta in ({"note": "\ud800"}, {"\udcff": 1}, {"deep": [{"x": "a\ud800"}]}):
        with pytest.raises(InvalidInputError, match="metadata"):  # stored, then unservable
            fast_cache.store("ok prompt", "x", metadata=meta)
        with pytest.raises(InvalidInputError, match="metadata"):
            fast_cache.update(eid, metadata=meta)
    for namespace in ("", 3, "\ud800"):  # a lone surrogate used to escape as UnicodeEncodeError
        with pytest.raises(InvalidInputError):
            fast_cache.invalidate_tags("t", namespace=namespace)  # type: ignore[arg-type]
    assert all(issubclass(e, SemcacheError) for e in (InvalidPromptError, InvalidVectorError))
    assert fast_cache.stats()["entries"] == 1
    assert fast_cache.get(eid).response == "safe"


def test_closed_cache_refuses(tmp_path: Path) -> None:
    c = SemanticCache(tmp_path, embedder=HashEmbedder())
    c.close()
    c.close()  # idempotent
    with pytest.raises(CacheClosedError):
        c.lookup("anything")


def test_embedder_mismatch_refused_then_rebuilt(tmp_path: Path) -> None:
    with SemanticCache(tmp_path, embedder=HashEmbedder(dim=32, model_id="a"), threshold=0.9) as c:
        c.store("some stored prompt", "answer")
    with pytest.raises(EmbedderMismatchError, match="rebuild=True"):
        SemanticCache(tmp_path, embedder=HashEmbedder(dim=48, model_id="b"))
    with SemanticCache(
        tmp_path, embedder=HashEmbedder(dim=48, model_id="b"), rebuild=True, threshold=0.9
    ) as c:
        assert c.lookup("some stored prompt").response == "answer"
        assert c.lookup("prompt some stored").response == "answer"  # re-embedded, searchable
        assert c.verify() == []


def test_corrupt_and_foreign_index_files_are_rebuilt_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        c.store("persist me please", "ok")
    files = list((tmp_path / "index").glob("*.idx"))
    assert files
    files[0].write_bytes(b"garbage")
    with (
        caplog.at_level("WARNING", logger="semcache"),
        SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c,
    ):
        assert c.lookup("persist me please").response == "ok"  # nothing stored was lost
        assert c.verify() == []
        assert c.stats()["index_rebuilds"] == 1
    assert "checksum" in caplog.text
    manifest = tmp_path / "index" / "manifest.json"
    body = json.loads(manifest.read_text())
    body["model_id"] = "someone-else"
    manifest.write_text(json.dumps(body))
    caplog.clear()
    with (
        caplog.at_level("WARNING", logger="semcache"),
        SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c,
    ):
        assert c.lookup("persist me please").response == "ok"
        assert c.verify() == []
    assert "someone-else" in caplog.text
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        assert c.stats()["index_rebuilds"] == 0  # the checkpoint written at close is trusted


def test_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "semcache.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        SemanticCache(tmp_path, embedder=HashEmbedder())


def test_missing_index_is_rebuilt(tmp_path: Path) -> None:
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        c.store("rebuild from store", "ok")
    for path in (tmp_path / "index").iterdir():
        path.unlink()
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        assert c.lookup("store from rebuild").response == "ok"
        assert c.verify() == []


def test_verify_detects_and_fixes_drift(fast_cache: SemanticCache) -> None:
    eid = fast_cache.store("drift check words", "ok")
    rowid = fast_cache._db.rowid_of(eid)
    shard = next(s for s, _ in fast_cache.shards.items())
    fast_cache.shards.get(shard).remove(np.array([rowid]))
    problems = fast_cache.verify()
    assert problems and "missing" in problems[0]
    fast_cache.verify(fix=True)
    assert fast_cache.verify() == []


def test_versions_bump(fast_cache: SemanticCache) -> None:
    a, b = Scope(namespace="a"), Scope(namespace="b")
    fast_cache.store("versioned words", "old", scope=a)
    fast_cache.store("versioned words", "other tenant", scope=b)
    assert fast_cache.version("a") == 0
    assert fast_cache.bump("a") == 1 and fast_cache.version("a") == 1
    assert fast_cache.lookup("versioned words", scope=a) is None
    assert fast_cache.lookup("versioned words", scope=b).response == "other tenant"
    fast_cache.store("versioned words", "new", scope=a)
    assert fast_cache.lookup("versioned words", scope=a).response == "new"
    fast_cache.expire()  # the dead version's entry is reclaimed (the last write may have already)
    assert fast_cache.stats()["entries"] == 2


def test_store_many_and_stats(fast_cache: SemanticCache, hash_embedder: HashEmbedder) -> None:
    ids = fast_cache.store_many([(f"bulk item {i}", str(i)) for i in range(300)])
    assert len(set(ids)) == 300
    assert hash_embedder.calls == 2  # batches of 256
    assert fast_cache.lookup("bulk item 7").response == "7"
    stats = fast_cache.stats()
    assert stats["entries"] == 300 and stats["hits_l1"] == 1


def test_feedback_learns_per_entry_floors(cache: SemanticCache) -> None:
    eid = cache.store(FRANCE, "Paris.")
    hit = cache.lookup(FRANCE_PARAPHRASE)
    assert hit is not None and hit.tier == "semantic"
    cache.feedback(eid, True)
    assert cache.lookup(FRANCE_PARAPHRASE) is not None
    cache.feedback(eid, False)  # that paraphrase was, say the user, not answered right
    assert cache.lookup(FRANCE_PARAPHRASE) is None
    assert cache.lookup("What is France's capital?") is not None  # closer prompts still hit
    assert cache.lookup(FRANCE).tier == "l1"
    cache.feedback(eid, False, similarity=1.0)  # wrong even for the same prompt: drop it
    assert cache.lookup(FRANCE) is None
    with pytest.raises(EntryNotFoundError):
        cache.feedback(eid, True)


# schema 1's insert trigger (schema 6 made it skip bulk inserts)
_OLD_INSERT_TRIGGER = """
CREATE TRIGGER entries_ai AFTER INSERT ON entries BEGIN
  INSERT INTO changes(entry_id, shard, op) VALUES (new.id, new.shard, 'add');
  UPDATE counters SET entries = entries + 1, bytes = bytes + new.size WHERE id = 0;
END"""


def test_old_schema_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        c.store("migrate me", "ok")
    conn = sqlite3.connect(tmp_path / "semcache.db")
    # back to schema 1: undo migrations 8 (no insert trigger), 6, 5, 4, 3 and 2
    conn.execute(_OLD_INSERT_TRIGGER)
    conn.execute("DROP TABLE leases")
    conn.execute("DROP TABLE holds")
    conn.execute("DROP INDEX entries_lfu")
    conn.execute("DROP TABLE fences")
    for col in ("min_similarity", "feedback_good", "feedback_bad"):
        conn.execute(f"ALTER TABLE entries DROP COLUMN {col}")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        assert c.lookup("migrate me").response == "ok"
        assert c._db.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert c.store("fenced after migration", "ok", fence=c.position()) is not None
        assert c.get_or_compute("leased after migration", lambda p: "ok") == "ok"
        c.store_many([("bulk after migration", "ok"), ("bulk again", "ok")])
        assert c.verify() == [] and c.stats()["entries"] == 5
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9, rebuild=True) as c:
        assert c.lookup("bulk again").response == "ok" and c.verify() == []


def _a_schema_7_folder(folder: Path) -> None:
    """A data folder with one entry, as schema 7 left it (the insert trigger, the bulk flag)."""
    import sqlite3

    from semcache.store import _INSERT_TRIGGER

    with SemanticCache(folder, embedder=HashEmbedder(), threshold=0.9) as c:
        c.store("before", "ok")
    conn = sqlite3.connect(folder / "semcache.db")
    conn.execute("CREATE TABLE bulk (id INTEGER PRIMARY KEY CHECK (id = 0), active INTEGER)")
    conn.execute("INSERT INTO bulk(id, active) VALUES (0, 0)")
    conn.execute(_INSERT_TRIGGER)
    conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def test_schema_7_insert_trigger_is_dropped_and_inserts_log_once(tmp_path: Path) -> None:
    """Schema 8 logs inserts in the store's own statements: a schema 7 store's trigger goes,
    so a single or bulk insert after the migration is logged and counted once."""
    _a_schema_7_folder(tmp_path)
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        first = c._db.last_seq()
        c.store("single after", "ok")
        c.store_many([("bulk one", "ok"), ("bulk two", "ok")])
        assert c._db.last_seq() - first == 3  # one 'add' per entry, not two
        assert c.stats()["entries"] == 4 and c.verify() == []
        assert c._db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'entries_ai'") == [
            (0,)
        ]


def test_an_upgrade_across_schema_8_waits_for_older_processes_to_close(tmp_path: Path) -> None:
    """An older release still open on the folder would insert without logging once schema 8
    drops the insert trigger: the upgrade is refused while another cache holds the folder's
    open lock, changes nothing, and goes through once it is released."""
    import fcntl
    import os
    import sqlite3

    from semcache.errors import StoreBusyError

    _a_schema_7_folder(tmp_path)
    conn = sqlite3.connect(tmp_path / "semcache.db")
    older = os.open(tmp_path / ".open", os.O_RDWR)  # an older release's cache, still open
    fcntl.flock(older, fcntl.LOCK_SH)
    try:
        with pytest.raises(StoreBusyError, match="schema 7 to"):
            SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9)
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            "7",
        )
        assert conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'entries_ai'"
        ).fetchone() == (1,)
    finally:
        os.close(older)
        conn.close()
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        c.store("after", "ok")
        assert c.stats()["entries"] == 2 and c.verify() == []
        assert c._db.get_meta("schema_version") == str(SCHEMA_VERSION)


def test_given_vectors_are_checked_and_normalised_alike_one_or_many() -> None:
    """One vector and a matrix pass the same checks (NaN, infinity, zero, wrong shape, not
    numbers) and come out as the same unit rows; a finite vector whose squared norm overflows
    float32 keeps its direction instead of turning into zeros."""
    import warnings

    from semcache.embed import as_unit_matrix

    rng = np.random.default_rng(9)
    rows = rng.standard_normal((50, 64)).astype(np.float32) * 3
    many = as_unit_matrix(rows, 64)
    for row, unit in zip(rows, many, strict=True):
        one = as_unit_matrix(row, 64)
        assert one.shape == (1, 64) and one.dtype == np.float32
        np.testing.assert_allclose(one[0], unit, rtol=0, atol=1e-6)
    assert as_unit_matrix([3, 4] + [0] * 62, 64)[0][:2].tolist() == pytest.approx([0.6, 0.8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning either
        big = as_unit_matrix([1e20, 1e20] + [0.0] * 62, 64)
        both = as_unit_matrix([[3e38] + [0.0] * 63, [1.0] + [0.0] * 63], 64)
    assert big[0][:2] == pytest.approx([2**-0.5, 2**-0.5]) and both[:, 0].tolist() == [1.0, 1.0]
    for bad in (
        [np.nan] + [0.0] * 63,
        [np.inf] + [0.0] * 63,
        [0.0] * 64,
        [1e-30] + [0.0] * 63,
        [1.0] * 63,
        [[1.0] * 64, [0.0] * 64],
        "not numbers",
        [[1.0, 2.0]],
    ):
        with pytest.raises(InvalidVectorError):
            as_unit_matrix(bad, 64)


def test_write_settings_are_read_and_set_on_the_cache(tmp_path: Path) -> None:
    """``max_ttl``, ``max_stale`` and ``cull_limit`` are the cache's settings: set on it, they
    are what the next write uses; bad values are refused there and at open."""
    with SemanticCache(
        tmp_path / "a", embedder=HashEmbedder(), max_ttl=60, max_stale=5, cull_limit=3
    ) as cache:
        assert (cache.max_ttl, cache.max_stale, cache.cull_limit) == (60.0, 5.0, 3)
        cache.max_ttl, cache.max_stale, cache.cull_limit = 10, None, 0
        assert (cache.max_ttl, cache.max_stale, cache.cull_limit) == (10.0, 0.0, 0)
        entry = cache.get(cache.store("capped words", "ok", ttl=100))
        assert entry.expires_at is not None
        assert entry.expires_at - entry.created_at == pytest.approx(10)
        for bad in (-1, True, 1.5):
            with pytest.raises(InvalidInputError, match="cull_limit"):
                cache.cull_limit = bad  # type: ignore[assignment]
        with pytest.raises(InvalidInputError):
            cache.max_ttl = -5
    with pytest.raises(InvalidInputError, match="cull_limit"):
        SemanticCache(tmp_path / "b", embedder=HashEmbedder(), cull_limit=-1)


def test_checkpoint_every_is_a_positive_int_or_none(tmp_path: Path) -> None:
    for bad in (0, -5, True, 2.5, "10"):
        with pytest.raises(InvalidInputError, match="checkpoint_every"):
            SemanticCache(tmp_path, embedder=HashEmbedder(), checkpoint_every=bad)  # type: ignore[arg-type]
    with SemanticCache(tmp_path, embedder=HashEmbedder(), checkpoint_every=1) as cache:
        cache.store("still opens", "ok")


def test_similarities_stay_on_the_scale(fast_cache: SemanticCache) -> None:
    vector = np.random.default_rng(3).standard_normal(64)
    eid = fast_cache.store("rounding check words", "ok", vector=vector)
    hit = fast_cache.lookup("rounding check other", vector=vector * 1.0000001)
    assert hit is not None and -1.0 <= hit.similarity <= 1.0
    # float32 self-similarity can read 1.0000001: feedback takes it back as 1.0 (a wrong
    # exact answer, so the entry goes) instead of rejecting it as off the scale
    fast_cache.feedback(eid, False, similarity=1.0000001)
    assert fast_cache.lookup("rounding check words") is None


def test_a_write_never_evicts_its_own_entry(tmp_path: Path) -> None:
    """LFU with every resident row hit: the new entry has no hits yet, but it is not the victim
    of its own write; the id store() returns always exists."""
    with SemanticCache(
        tmp_path / "a", embedder=HashEmbedder(), max_entries=2, eviction="lfu", threshold=0.99
    ) as c:
        for word in ("alpha", "beta"):
            c.store(f"{word} question", word)
            assert c.lookup(f"{word} question") is not None
        gamma = c.store("gamma question", "gamma")
        assert c.get(gamma).response == "gamma"
        assert c.lookup("gamma question").response == "gamma"
        assert c.stats()["entries"] == 2 and c.stats()["evictions"] == 1
        assert c.verify() == []
    with SemanticCache(tmp_path / "b", embedder=HashEmbedder(), max_bytes=10) as c:
        with pytest.raises(InvalidInputError, match="max_bytes"):
            c.store("gamma", "G")  # larger than the whole budget: refused, not stored
        assert c.lookup("gamma") is None and c.stats()["entries"] == 0


def test_failed_open_releases_the_locks(tmp_path: Path) -> None:
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        c.store("lock check words", "ok")
    with pytest.raises(EmbedderMismatchError):
        SemanticCache(tmp_path, embedder=HashEmbedder(dim=32, model_id="other"))
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        assert c.shards.owner  # the failed open did not keep the writer lock
        assert c.lookup("lock check words").response == "ok"
    with SemanticCache(  # nor the folder's open lock: a re-embed needs the folder alone
        tmp_path, embedder=HashEmbedder(dim=32, model_id="other"), rebuild=True, threshold=0.9
    ) as c:
        assert c.lookup("lock check words").response == "ok"


def test_a_bump_while_embedding_is_honoured(tmp_path: Path) -> None:
    """A lookup that embeds while another thread bumps the namespace must not serve old entries."""
    inner = HashEmbedder()

    class BumpingEmbedder:
        model_id, dim = inner.model_id, inner.dim
        cache: SemanticCache | None = None

        def embed(self, texts):  # type: ignore[no-untyped-def]
            if self.cache is not None and texts == ["old words here please"]:
                self.cache.bump("default")
            return inner.embed(texts)

    emb = BumpingEmbedder()
    with SemanticCache(tmp_path, embedder=emb, threshold=0.8) as c:
        c.store("old words here", "stale answer")
        emb.cache = c
        assert c.lookup("old words here please") is None


def test_a_file_where_the_folder_should_be_is_a_typed_error(tmp_path, hash_embedder) -> None:
    from semcache.errors import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("precious")
    with pytest.raises(StoreError, match="cache folder"):
        SemanticCache(blocker, embedder=hash_embedder)
    assert blocker.read_text() == "precious"


def test_store_many_replaces_exact_repeats_and_never_evicts_its_own_batch(tmp_path: Path) -> None:
    with SemanticCache(
        tmp_path, embedder=HashEmbedder(), threshold=0.99, max_entries=3, eviction="fifo"
    ) as c:
        old = c.store("first words", "old")
        ids = c.store_many(
            [("first words", "new"), ("second words", "2"), ("first words", "newer")]
        )
        assert ids[0] == ids[2] != old  # the later repeat replaced the earlier one, in the batch
        assert c.get(ids[0]).response == "newer" and c.lookup("first words").response == "newer"
        with pytest.raises(EntryNotFoundError):
            c.get(old)
        more = c.store_many([(f"bulk words {i}", str(i)) for i in range(3)])
        assert all(c.get(i) for i in more)  # the batch evicted the older entries, not itself
        assert c.stats()["entries"] == 3
        assert c.verify() == []


def test_stats_report_wrong_feedback_and_the_largest_namespaces(
    fast_cache: SemanticCache,
) -> None:
    from semcache import Scope

    for i in range(3):
        fast_cache.store(f"acme words {i}", "a", scope=Scope(namespace="acme"))
    eid = fast_cache.store("globex words", "g", scope=Scope(namespace="globex"))
    fast_cache.feedback(eid, False)  # a wrong exact answer: deleted, and counted
    stats = fast_cache.stats()
    assert stats["feedback_wrong"] == 1
    assert stats["namespaces"] == {"acme": 3}
    with pytest.raises(InvalidInputError, match="finite"):
        fast_cache.store("huge ttl words", "x", ttl=10**400)


def test_an_entry_is_never_culled_by_its_own_write(tmp_path: Path) -> None:
    """Writes cull expired entries in batches (every few writes); an entry whose TTL ends at
    once is still stored by its write, and ``get`` finds it (expired) until a later cull."""
    from semcache.writer import CULL_EVERY

    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as cache:
        for i in range(CULL_EVERY * 2):
            eid = cache.store("the same prompt", f"answer {i}", ttl=0)
            assert cache.get(eid).response == f"answer {i}"  # type: ignore[arg-type]
        for _ in range(CULL_EVERY * 2):
            (bulk,) = cache.store_many([("bulk prompt", "b")], ttl=0)
            assert cache.get(bulk).response == "b"


def test_namespaces_are_checked_alike_everywhere(fast_cache: SemanticCache) -> None:
    for bad in (5, "", None, "\ud800"):
        with pytest.raises(InvalidInputError):
            fast_cache.version(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError):
            fast_cache.bump(bad)  # type: ignore[arg-type]
        if bad is not None:  # None means every namespace there
            with pytest.raises(InvalidInputError):
                list(fast_cache.iter_entries(namespace=bad))  # type: ignore[arg-type]
