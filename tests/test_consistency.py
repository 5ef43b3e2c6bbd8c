"""Issue 9's six findings, one regression test (or a few) each, against the public API only.

1. An answer computed before an invalidation is never cached after it (the fenced write).
2. The index is tied to its store: a deleted or restored ``semcache.db`` is never read through
   an index built for another one.
3. A torn, garbage or missing checkpoint file (or manifest) never stops the cache from opening.
4. Separate processes on one folder stay coherent (real processes, :class:`tests.procs.Worker`).
5. Eviction never returns a dead id, counts every byte it stores, and expired rows never hide a
   live neighbour.
6. Every store error is a ``StoreError``; no ``sqlite3`` error escapes.

Meaning does not matter here, so the embedders are the deterministic fakes: :class:`AxisEmbedder`
where similarities must be exact (radii, k), :class:`HashEmbedder` elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from semcache import EntryNotFoundError, FakeClock, Scope, SemanticCache, SemcacheError, StoreError

from .axis_embedder import AxisEmbedder, similarity
from .fakes import HashEmbedder
from .procs import Worker

ACME = Scope(namespace="acme")
OTHER = Scope(namespace="other")


@pytest.fixture
def axis_cache(tmp_path: Path, clock: FakeClock) -> Iterator[SemanticCache]:
    """A cache on AxisEmbedder (exact similarities) and a fake clock; verify() clean at the end."""
    c = SemanticCache(tmp_path / "axis", embedder=AxisEmbedder(), clock=clock, threshold=0.9)
    yield c
    assert c.verify() == []
    c.close()


# ============================================================ 1. the fenced write after a miss
def _invalidations(cache: SemanticCache) -> dict[str, Callable[[], Any]]:
    """Each invalidation kind, aimed at "topic 1" in namespace acme tagged "policy"."""
    covering_radius = similarity(0, 2) - 1e-4  # "topic 1 variant 2" reaches "topic 1"
    return {
        "tags": lambda: cache.invalidate_tags("policy"),
        "tags_in_namespace": lambda: cache.invalidate_tags("policy", namespace="acme"),
        "bump": lambda: cache.bump("acme"),
        "delete_prompt": lambda: cache.delete_prompt("topic 1", scope=ACME),
        "similar": lambda: cache.invalidate_similar("topic 1 variant 2", covering_radius),
        "similar_in_scope": lambda: cache.invalidate_similar(
            "topic 1 variant 2", covering_radius, scope=ACME
        ),
    }


def _harmless(cache: SemanticCache) -> dict[str, Callable[[], Any]]:
    """Invalidations that do not cover "topic 1" in acme tagged "policy"."""
    short_radius = similarity(0, 2) + 1e-3  # "topic 1 variant 2" does not reach "topic 1"
    return {
        "other_tag": lambda: cache.invalidate_tags("pricing"),
        "tag_in_other_namespace": lambda: cache.invalidate_tags("policy", namespace="other"),
        "bump_other_namespace": lambda: cache.bump("other"),
        "delete_other_prompt": lambda: cache.delete_prompt("topic 2", scope=ACME),
        "delete_prompt_other_scope": lambda: cache.delete_prompt("topic 1", scope=OTHER),
        "similar_out_of_radius": lambda: cache.invalidate_similar(
            "topic 1 variant 2", short_radius
        ),
        "similar_other_topic": lambda: cache.invalidate_similar("topic 2", 0.5),
        "similar_other_scope": lambda: cache.invalidate_similar("topic 1", 0.9, scope=OTHER),
    }


FENCING = ["tags", "tags_in_namespace", "bump", "delete_prompt", "similar", "similar_in_scope"]
HARMLESS = [
    "other_tag",
    "tag_in_other_namespace",
    "bump_other_namespace",
    "delete_other_prompt",
    "delete_prompt_other_scope",
    "similar_out_of_radius",
    "similar_other_topic",
    "similar_other_scope",
]


@pytest.mark.parametrize("kind", FENCING)
def test_an_answer_computed_across_an_invalidation_is_returned_not_cached(
    axis_cache: SemanticCache, kind: str
) -> None:
    invalidate = _invalidations(axis_cache)[kind]

    def slow_llm(prompt: str) -> str:
        invalidate()  # returns while the "LLM" is still running
        return "old answer"

    got = axis_cache.get_or_compute("topic 1", slow_llm, scope=ACME, tags=["policy"])
    assert got == "old answer"  # the caller still gets what it paid for
    assert axis_cache.lookup("topic 1", scope=ACME) is None  # but it was not cached
    assert axis_cache.lookup("topic 1 variant 1", scope=ACME) is None
    assert axis_cache.stats()["fenced"] == 1
    # the next call computes afresh, and that answer (no invalidation meanwhile) is cached
    again = axis_cache.get_or_compute("topic 1", lambda p: "new", scope=ACME, tags=["policy"])
    assert again == "new"
    hit = axis_cache.lookup("topic 1", scope=ACME)
    assert hit is not None and hit.response == "new"


@pytest.mark.parametrize("kind", HARMLESS)
def test_an_invalidation_that_does_not_cover_the_answer_does_not_fence_it(
    axis_cache: SemanticCache, kind: str
) -> None:
    invalidate = _harmless(axis_cache)[kind]

    def llm(prompt: str) -> str:
        invalidate()
        return "fresh answer"

    assert axis_cache.get_or_compute("topic 1", llm, scope=ACME, tags=["policy"]) == "fresh answer"
    hit = axis_cache.lookup("topic 1", scope=ACME)
    assert hit is not None and hit.response == "fresh answer"
    assert axis_cache.stats()["fenced"] == 0


@pytest.mark.parametrize("kind", ["delete", "update"])
def test_deleting_or_updating_the_prompts_old_entry_during_a_recompute_fences_it(
    axis_cache: SemanticCache, clock: FakeClock, kind: str
) -> None:
    old = axis_cache.store("topic 1", "v1", scope=ACME, ttl=10)
    clock.advance(11)  # expired: the next get_or_compute recomputes

    def llm(prompt: str) -> str:
        if kind == "delete":
            axis_cache.delete(old)
        else:
            axis_cache.update(old, response="corrected")
        return "computed from old data"

    assert axis_cache.get_or_compute("topic 1", llm, scope=ACME) == "computed from old data"
    hit = axis_cache.lookup("topic 1", scope=ACME)
    assert hit is None or hit.response != "computed from old data"
    assert axis_cache.stats()["fenced"] == 1


@pytest.mark.parametrize("kind", ["tags", "bump", "similar"])
def test_an_invalidation_from_another_thread_during_the_compute_fences_it(
    axis_cache: SemanticCache, kind: str
) -> None:
    invalidate = _invalidations(axis_cache)[kind]
    computing, invalidated = threading.Event(), threading.Event()
    results: list[str] = []

    def slow_llm(prompt: str) -> str:
        computing.set()
        assert invalidated.wait(30)
        return "old answer"

    caller = threading.Thread(
        target=lambda: results.append(
            axis_cache.get_or_compute("topic 1", slow_llm, scope=ACME, tags=["policy"])
        )
    )
    caller.start()
    assert computing.wait(30)
    invalidate()  # returns while slow_llm is still running in the other thread
    invalidated.set()
    caller.join(30)
    assert results == ["old answer"]
    assert axis_cache.lookup("topic 1", scope=ACME) is None
    assert axis_cache.stats()["fenced"] == 1


async def test_aget_or_compute_is_fenced_too(axis_cache: SemanticCache) -> None:
    async def slow_llm(prompt: str) -> str:
        await asyncio.to_thread(axis_cache.invalidate_tags, "policy")
        return "old answer"

    got = await axis_cache.aget_or_compute("topic 1", slow_llm, scope=ACME, tags=["policy"])
    assert got == "old answer"
    assert axis_cache.lookup("topic 1", scope=ACME) is None
    assert axis_cache.stats()["fenced"] == 1


def test_the_cached_decorator_is_fenced_too(axis_cache: SemanticCache) -> None:
    calls: list[str] = []

    @axis_cache.cached(scope=ACME, tags=["policy"])
    def answer(prompt: str) -> str:
        calls.append(prompt)
        if len(calls) == 1:
            axis_cache.bump("acme")
        return f"answer {len(calls)}"

    assert answer("topic 3") == "answer 1"  # computed across a bump: returned, not cached
    assert answer("topic 3") == "answer 2"  # so this computes again, and is cached
    assert answer("topic 3") == "answer 2"
    assert len(calls) == 2


def test_store_with_a_fence_position(axis_cache: SemanticCache) -> None:
    before = axis_cache.position()
    assert isinstance(before, int)
    assert axis_cache.invalidate_tags("policy") == 0  # covers it even though nothing was deleted
    assert axis_cache.position() >= before
    assert axis_cache.store("topic 1", "stale", scope=ACME, tags=["policy"], fence=before) is None
    assert axis_cache.stats()["fenced"] == 1
    assert axis_cache.lookup("topic 1", scope=ACME) is None
    # an unrelated entry with the same old position is stored
    kept = axis_cache.store("topic 2", "fine", scope=ACME, tags=["other"], fence=before)
    assert kept is not None and axis_cache.get(kept).response == "fine"
    # a position taken after the invalidation does not fence; nor does store() without one
    now = axis_cache.position()
    eid = axis_cache.store("topic 1", "fresh", scope=ACME, tags=["policy"], fence=now)
    assert eid is not None and axis_cache.lookup("topic 1", scope=ACME).response == "fresh"
    axis_cache.bump("acme")
    assert axis_cache.store("topic 1", "plain", scope=ACME) is not None
    assert axis_cache.lookup("topic 1", scope=ACME).response == "plain"
    assert axis_cache.stats()["fenced"] == 1


def test_invalidate_tags_in_one_namespace(axis_cache: SemanticCache) -> None:
    axis_cache.store("topic 1", "acme's", scope=ACME, tags=["policy"])
    axis_cache.store("topic 1", "other's", scope=OTHER, tags=["policy"])
    assert axis_cache.invalidate_tags("policy", namespace="acme") == 1
    assert axis_cache.lookup("topic 1", scope=ACME) is None
    assert axis_cache.lookup("topic 1", scope=OTHER).response == "other's"
    assert axis_cache.invalidate_tags("policy") == 1
    assert axis_cache.lookup("topic 1", scope=OTHER) is None


# ============================================================ 2. the index is tied to its store
def _db_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith("semcache.db")]


def test_a_deleted_database_with_the_index_kept_is_not_read_through_the_old_index(
    tmp_path: Path,
) -> None:
    with SemanticCache(tmp_path, embedder=AxisEmbedder(), threshold=0.9) as c:
        c.store("topic 1", "old answer")
        c.store("topic 2", "another old answer")
    assert (tmp_path / "index").is_dir()
    for path in _db_files(tmp_path):  # "deleting the database deletes the cache"
        path.unlink()
    with SemanticCache(tmp_path, embedder=AxisEmbedder(), threshold=0.9) as c:
        assert c.lookup("topic 1") is None
        c.store("topic 5", "new answer")  # takes row id 1 in the new database
        assert c.lookup("topic 1") is None  # never the new answer for the old prompt
        assert c.lookup("topic 1 variant 1") is None
        assert c.lookup("topic 2") is None
        assert c.lookup("topic 5").response == "new answer"
        assert c.verify() == []
    with SemanticCache(tmp_path, embedder=AxisEmbedder(), threshold=0.9) as c:
        assert c.lookup("topic 1 variant 1") is None
        assert c.lookup("topic 5 variant 1").response == "new answer"
        assert c.verify() == []


def test_a_restored_backup_of_the_database_is_not_read_through_a_newer_index(
    tmp_path: Path,
) -> None:
    data, backup = tmp_path / "data", tmp_path / "backup"
    with SemanticCache(data, embedder=AxisEmbedder(), threshold=0.9) as c:
        c.store("topic 1", "A")
    backup.mkdir()
    for path in _db_files(data):
        shutil.copy2(path, backup / path.name)
    with SemanticCache(data, embedder=AxisEmbedder(), threshold=0.9) as c:
        c.store("topic 2", "B (after the backup)")
    for path in _db_files(data):
        path.unlink()
    for path in backup.iterdir():
        shutil.copy2(path, data / path.name)
    with SemanticCache(data, embedder=AxisEmbedder(), threshold=0.9) as c:
        c.store("topic 3", "C")  # reuses the row id B had in the newer database
        assert c.lookup("topic 2") is None
        assert c.lookup("topic 2 variant 1") is None
        assert c.lookup("topic 1 variant 1").response == "A"
        assert c.lookup("topic 3 variant 1").response == "C"
        assert c.verify() == []


# ================================================ 3. a damaged checkpoint never blocks opening
def _damage(folder: Path, how: str) -> None:
    index = folder / "index"
    files = sorted(index.glob("*.idx"))
    manifest = index / "manifest.json"
    assert files and manifest.exists(), f"expected .idx files and a manifest in {index}"
    if how == "idx_torn":
        data = files[0].read_bytes()
        files[0].write_bytes(data[: len(data) // 2])
    elif how == "idx_empty":
        files[0].write_bytes(b"")
    elif how == "idx_garbage":
        files[0].write_bytes(b"\x00garbage" * 100)
    elif how == "idx_missing":
        files[0].unlink()
    elif how == "all_idx_garbage":
        for path in files:
            path.write_bytes(b"garbage")
    elif how == "manifest_garbage":
        manifest.write_text("garbage")
    elif how == "manifest_torn":
        text = manifest.read_text()
        manifest.write_text(text[: len(text) // 2])
    elif how == "manifest_wrong_shape":
        manifest.write_text(json.dumps({"format": 1, "seq": "x", "shards": 7}))
    else:
        raise ValueError(how)


@pytest.mark.parametrize(
    "how",
    [
        "idx_torn",
        "idx_empty",
        "idx_garbage",
        "idx_missing",
        "all_idx_garbage",
        "manifest_garbage",
        "manifest_torn",
        "manifest_wrong_shape",
    ],
)
def test_a_damaged_checkpoint_still_opens_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    answers = {(f"topic {i}", ns): f"answer {i} {ns}" for i in range(6) for ns in ("a", "b")}
    with SemanticCache(tmp_path, embedder=AxisEmbedder(), threshold=0.9) as c:
        for (prompt, ns), response in answers.items():
            c.store(prompt, response, scope=Scope(namespace=ns))
    _damage(tmp_path, how)
    caplog.set_level(logging.WARNING, logger="semcache")
    with SemanticCache(tmp_path, embedder=AxisEmbedder(), threshold=0.9) as c:  # no rebuild=True
        warned = [r for r in caplog.records if r.name.startswith("semcache")]
        assert warned and max(r.levelno for r in warned) >= logging.WARNING
        for (prompt, ns), response in answers.items():
            hit = c.lookup(prompt + " variant 1", scope=Scope(namespace=ns))  # the index path
            assert hit is not None and hit.response == response
        assert c.verify() == []
    caplog.clear()
    with SemanticCache(tmp_path, embedder=AxisEmbedder(), threshold=0.9) as c:  # repaired
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert c.lookup("topic 3 variant 1", scope=Scope(namespace="b")).response == "answer 3 b"
        assert c.verify() == []


# =================================================== 4. separate processes on one data folder
ACTIONS = {
    "delete": lambda w, eid: w.call("delete", eid),
    "delete_prompt": lambda w, eid: w.call("delete_prompt", "topic 1", scope={"namespace": "a"}),
    "invalidate_tags": lambda w, eid: w.call("invalidate_tags", "policy"),
    "invalidate_tags_in_namespace": lambda w, eid: w.call(
        "invalidate_tags", "policy", namespace="a"
    ),
    "bump": lambda w, eid: w.call("bump", "a"),
    "invalidate_similar": lambda w, eid: w.call("invalidate_similar", "topic 1 variant 1", 0.99),
    "update": lambda w, eid: w.call("update", eid, response="v2"),
    "replace": lambda w, eid: w.call("store", "topic 1", "v2", scope={"namespace": "a"}),
}


@pytest.mark.parametrize("action", list(ACTIONS))
def test_a_change_in_another_process_reaches_this_ones_l1(tmp_path: Path, action: str) -> None:
    scope = Scope(namespace="a")
    a = SemanticCache(tmp_path, embedder=AxisEmbedder(), threshold=0.9)
    try:
        eid = a.store("topic 1", "v1", scope=scope, tags=["policy"])
        assert a.lookup("topic 1", scope=scope).response == "v1"
        assert a.lookup("topic 1", scope=scope).tier == "l1"  # warm in this process's L1
        with Worker(tmp_path, embedder="axis", options={"threshold": 0.9}) as b:
            assert b.call("lookup", "topic 1", scope={"namespace": "a"})["response"] == "v1"
            ACTIONS[action](b, eid)  # returned in process B
            hit = a.lookup("topic 1", scope=scope)
            if action in ("update", "replace"):
                assert hit is not None and hit.response == "v2"
            else:
                assert hit is None
            hit = a.lookup("topic 1 variant 1", scope=scope)  # and through the index
            assert hit is None or hit.response == "v2"
            assert b.call("verify") == []
        assert a.verify() == []
    finally:
        a.close()


def test_a_follower_behind_a_trimmed_log_rebuilds_instead_of_missing_changes(
    tmp_path: Path,
) -> None:
    prompts = [f"owner prompt {i} words {i * 3}" for i in range(400)]
    options = {"threshold": 0.9, "checkpoint_every": 50, "log_keep": 0}  # trim all it can
    with Worker(tmp_path, options=options) as owner:
        follower = SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9)
        try:
            eid = follower.store("follower words only", "mine", tags=["x"])
            assert follower.lookup("follower words only").tier == "l1"
            assert follower.lookup("follower words only").tier == "l1"
            # the owner makes many changes and checkpoints (trimming its log) meanwhile
            for start in range(0, len(prompts), 100):
                owner.call("store_many", [[p, f"answer {p}"] for p in prompts[start : start + 100]])
                owner.call("checkpoint")
            owner.call("delete", eid)
            owner.call("invalidate_tags", "nothing-tagged")
            owner.call("checkpoint")
            assert follower.lookup("follower words only") is None
            for p in prompts[::37]:
                hit = follower.lookup(p)
                assert hit is not None and hit.response == f"answer {p}"
            assert follower.verify() == []
            assert owner.call("verify") == []
        finally:
            follower.close()


def test_a_commit_between_an_empty_scan_and_the_head_read_is_applied_not_taken_for_a_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower reads the log head only after a scan found nothing: a commit landing just
    before that read puts the head past the follower, and the second scan finds the change
    (a follower that skipped it would take the log for trimmed and rebuild its index)."""
    with (
        SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as writer,
        SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as follower,
    ):
        writer.store("first words", "1")
        assert follower.lookup("first words").response == "1"
        real = follower._db.last_seq
        landed: list[str] = []

        def racing() -> int:
            if not landed:  # another connection commits between the scan and this read
                landed.append(writer.store("landed between", "2") or "")
            return real()

        monkeypatch.setattr(follower._db, "last_seq", racing)
        rebuilds = follower.stats()["index_rebuilds"]
        follower.replica.catch_up()
        assert landed and follower.stats()["index_rebuilds"] == rebuilds
        hit = follower.lookup("landed between")
        assert hit is not None and hit.response == "2" and follower.verify() == []


def _count_calls(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str) -> list[int]:
    """Wrap ``obj.name`` so each call appends to the returned list (the call goes through)."""
    calls: list[int] = []
    real = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


def test_an_empty_scan_behind_the_head_twice_is_a_trimmed_log_and_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the log holds nothing after the replica's position but its head is past it, even
    on a second scan, the changes in between were trimmed: the replica rebuilds from the store
    (and serves what the store holds) instead of going on without them. A write's own
    catch-up reads only the log: the head is not read after a scan that found the write."""
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as cache:
        real_head = cache._db.last_seq
        heads = _count_calls(monkeypatch, cache._db, "last_seq")
        cache.store("kept words", "1")
        assert heads == []  # the write's catch-up found its change: no head read
        # the log after this replica's position is gone, the head is past it
        real_scan = cache._db.changes_since
        monkeypatch.setattr(cache._db, "changes_since", lambda seq, limit=10_000: [])
        monkeypatch.setattr(cache._db, "last_seq", lambda: cache.replica.shards.seq + 5)
        rebuilt: list[int] = []
        real_rebuild = cache.replica.rebuild

        def rebuild() -> None:
            rebuilt.append(1)
            monkeypatch.setattr(cache._db, "changes_since", real_scan)
            monkeypatch.setattr(cache._db, "last_seq", real_head)
            real_rebuild()

        monkeypatch.setattr(cache.replica, "rebuild", rebuild)
        cache.replica.catch_up()
        assert rebuilt == [1]
        assert cache.lookup("kept words").response == "1" and cache.verify() == []


def test_a_write_catches_up_without_reading_the_version_again_and_misses_no_later_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write's catch-up takes the store's data version from the write transaction's start
    (no second read of it). Another connection committing after the log scan is then still
    caught up on by the next lookup: the version kept is from before the scan, never after."""
    with (
        SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as cache,
        SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as other,
    ):
        cache.store("warm words", "0")
        reads = _count_calls(monkeypatch, cache._db, "data_version")
        real_scan = cache._db.changes_since
        landed: list[str] = []

        def racing_scan(seq: int, limit: int = 10_000) -> list[Any]:
            found = real_scan(seq, limit)
            if not landed:  # another connection commits right after the write's scan
                landed.append(other.store("landed after the scan", "2") or "")
            return found

        monkeypatch.setattr(cache._db, "changes_since", racing_scan)
        cache.store("written words", "1")
        assert landed and len(reads) == 1  # the sync before the write; none after it
        monkeypatch.setattr(cache._db, "changes_since", real_scan)
        hit = cache.lookup("the scan landed after")  # through the index, not an exact read
        assert hit is not None and hit.response == "2" and hit.tier == "semantic"
        assert cache.verify() == []


def test_a_follower_keeps_serving_while_the_owner_trims_during_its_rebuild(
    tmp_path: Path,
) -> None:
    """The owner checkpoints (and trims its log) all the time while a follower, idle between
    lookups and so behind the trim, rebuilds: no follower call may fail, none may miss."""
    seed = [(f"seed prompt {i} words {i * 7}", f"seed {i}") for i in range(3000)]
    options = {"threshold": 0.9, "checkpoint_every": 10, "log_keep": 0}
    with Worker(tmp_path, options=options) as owner:
        owner.call("store_many", seed)
        follower = SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9)
        stop = threading.Event()
        failures: list[str] = []

        def churn() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                owner.call("store_many", [[f"churn {i} item {j}", "c"] for j in range(20)])
                owner.call("checkpoint")

        writer = threading.Thread(target=churn)
        writer.start()
        try:
            for i in range(150):
                time.sleep(0.03)  # idle long enough to fall behind the owner's trim
                prompt, response = seed[(i * 37) % len(seed)]
                try:
                    hit = follower.lookup(prompt)
                except SemcacheError as exc:
                    failures.append(f"lookup {i}: {type(exc).__name__}: {exc}")
                    continue
                if hit is None or hit.response != response:
                    failures.append(f"lookup {i}: {prompt!r} served {hit}")
        finally:
            stop.set()
            writer.join(60)
        try:
            assert failures == [], f"{len(failures)} failed lookups, e.g. {failures[:3]}"
            assert follower.verify() == []
        finally:
            follower.close()


def test_a_follower_a_little_behind_catches_up_from_the_kept_log(tmp_path: Path) -> None:
    """The owner keeps ``log_keep`` changes behind its checkpoints: a follower that many
    changes behind catches up from the log, without rebuilding its index."""
    with Worker(tmp_path, options={"threshold": 0.9, "log_keep": 1000}) as owner:
        follower = SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9)
        try:
            built = follower.stats()["index_rebuilds"]  # its first build, at open
            owner.call("store_many", [[f"kept log prompt {i}", f"a{i}"] for i in range(300)])
            owner.call("checkpoint")
            assert follower.lookup("kept log prompt 123").response == "a123"
            assert follower.stats()["index_rebuilds"] == built
        finally:
            follower.close()


def _manifest_seq(folder: Path) -> int:
    return int(json.loads((folder / "index" / "manifest.json").read_text())["seq"])


def test_checkpoint_ownership_passes_on_when_the_owner_exits(tmp_path: Path) -> None:
    first = Worker(tmp_path, options={"threshold": 0.9})
    try:
        first.call("store", "first process words", "one")
        second = SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9)
    except BaseException:
        first.kill()
        raise
    try:
        first.close()  # the owner exits (its close checkpoints)
        seq = _manifest_seq(tmp_path)
        for i in range(20):
            second.store(f"second process words {i}", f"two {i}")
        second.checkpoint()
        assert _manifest_seq(tmp_path) > seq  # the survivor took the checkpoints over
        seq = _manifest_seq(tmp_path)
        second.delete_prompt("second process words 3")
    finally:
        second.close()
    assert _manifest_seq(tmp_path) > seq
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        assert c.lookup("second process words 7").response == "two 7"
        assert c.lookup("second process words 3") is None
        assert c.verify() == []


def test_a_rebuild_with_another_model_is_refused_while_another_process_has_the_folder(
    tmp_path: Path,
) -> None:
    with Worker(tmp_path, options={"threshold": 0.9}) as holder:
        holder.call("store", "held words here", "kept")
        other = HashEmbedder(dim=32, model_id="test:another-model")
        with pytest.raises(StoreError):
            SemanticCache(tmp_path, embedder=other, rebuild=True)
        # the holder still searches with its model, and finds what it stored
        assert holder.call("lookup", "here held words")["response"] == "kept"
        assert holder.call("verify") == []
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:  # unchanged
        assert c.lookup("here held words").response == "kept"
        assert c.verify() == []


# ================================================================================ 5. eviction
def _exists(c: SemanticCache, eid: str) -> bool:
    try:
        c.get(eid)
    except EntryNotFoundError:
        return False
    return True


def test_lfu_at_capacity_with_every_row_hit_still_stores_a_live_entry(
    tmp_path: Path, clock: FakeClock
) -> None:
    with SemanticCache(
        tmp_path, embedder=AxisEmbedder(), clock=clock, max_entries=3, eviction="lfu", threshold=0.9
    ) as c:
        stored = {i: c.store(f"topic {i}", f"answer {i}") for i in range(3)}
        for round_ in range(3, 12):
            resident = [i for i, eid in stored.items() if _exists(c, eid)]
            assert len(resident) == 3
            for i in resident:  # every resident row has hits
                assert c.lookup(f"topic {i}") is not None
                clock.advance(1)
            eid = stored[round_] = c.store(f"topic {round_}", f"answer {round_}")
            assert c.get(eid).response == f"answer {round_}"  # the id exists
            hit = c.lookup(f"topic {round_} variant 1")
            assert hit is not None and hit.entry_id == eid
            assert c.stats()["entries"] == 3
        assert c.verify() == []


def test_max_bytes_counts_scope_tags_and_keys(tmp_path: Path) -> None:
    big = Scope(namespace="n", system="s" * 5000, context=["earlier turn " * 100])
    tags = [f"tag-{i:03d}-" + "x" * 60 for i in range(40)]
    with SemanticCache(tmp_path / "free", embedder=HashEmbedder()) as c:
        c.store("plain words", "r")
        plain = c.stats()["bytes"]
        c.store("scoped words", "r", scope=big, tags=tags)
        scoped = c.stats()["bytes"] - plain
    extra = len(big.to_json().encode()) + sum(len(t.encode()) for t in tags)
    assert scoped >= plain + extra  # scope JSON and tags are counted
    budget = 4 * scoped
    with SemanticCache(tmp_path / "bounded", embedder=HashEmbedder(), max_bytes=budget) as c:
        for i in range(12):
            c.store(f"scoped words {i}", "r", scope=big, tags=tags)
        stats = c.stats()
        assert stats["bytes"] <= budget and stats["evictions"] >= 8
        assert stats["entries"] <= 4
        assert c.verify() == []


def test_expired_rows_not_yet_culled_do_not_hide_a_live_neighbour(
    tmp_path: Path, clock: FakeClock
) -> None:
    with SemanticCache(
        tmp_path, embedder=AxisEmbedder(), clock=clock, threshold=0.9, cull_limit=0
    ) as c:
        assert c.k == 4
        for j in range(1, 7):  # six near-identical entries, nearer than the live one
            c.store(f"topic 1 variant {j}", f"expiring {j}", ttl=10)
        c.store("topic 1 variant 8", "live")  # similarity 0.928 to "topic 1"
        assert c.lookup("topic 1").response == "expiring 1"
        clock.advance(11)
        hit = c.lookup("topic 1")
        assert hit is not None and hit.response == "live"
        assert c.verify() == []


# ===================================================== 6. every store error is a StoreError
def test_invalidating_more_tags_than_sqlite_binds_at_once(tmp_path: Path) -> None:
    """SQLite binds at most 32,766 variables per statement (250,000 in Debian's build)."""
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        c.store("first tagged words", "1", tags=["tag0"])
        c.store("second tagged words", "2", tags=["tag20000", "keep"])
        c.store("third tagged words", "3", tags=["tag259999"])
        kept = c.store("fourth tagged words", "4", tags=["keep"])
        assert c.invalidate_tags(*[f"tag{i}" for i in range(260_000)]) == 3
        assert c.lookup("first tagged words") is None
        assert c.lookup("fourth tagged words").entry_id == kept
        assert c.verify() == []


def _each_operation(c: SemanticCache) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("store", lambda: c.store("new words here", "x", tags=["t"])),
        ("lookup", lambda: c.lookup("stored words 7 here")),
        ("delete_prompt", lambda: c.delete_prompt("stored words 3 here")),
        ("invalidate_tags", lambda: c.invalidate_tags("t3")),
        ("bump", lambda: c.bump("default")),
        ("expire", lambda: c.expire()),
        ("stats", lambda: c.stats()),
        ("checkpoint", lambda: c.checkpoint()),
    ]


def _only_store_errors(path: Path) -> list[str]:
    """Open the cache and run each operation; foreign exceptions that escaped, by name."""
    escaped: list[str] = []
    try:
        c = SemanticCache(path, embedder=HashEmbedder(), threshold=0.9)
    except SemcacheError as exc:
        assert isinstance(exc, StoreError), exc
        return escaped
    except Exception as exc:
        return [f"open: {type(exc).__module__}.{type(exc).__name__}: {exc}"]
    for name, operation in _each_operation(c):
        try:
            operation()
        except SemcacheError as exc:
            assert isinstance(exc, StoreError), (name, exc)
        except Exception as exc:
            escaped.append(f"{name}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
    try:
        c.close()
    except SemcacheError:
        pass
    except Exception as exc:
        escaped.append(f"close: {type(exc).__module__}.{type(exc).__name__}: {exc}")
    return escaped


def _fill(path: Path) -> None:
    with SemanticCache(path, embedder=HashEmbedder(), threshold=0.9) as c:
        c.store_many(
            [
                {"prompt": f"stored words {i} here", "response": "y" * 300, "tags": [f"t{i % 5}"]}
                for i in range(300)
            ]
        )


def test_a_corrupted_database_raises_store_errors_only(tmp_path: Path) -> None:
    _fill(tmp_path)
    db = tmp_path / "semcache.db"
    data = bytearray(db.read_bytes())
    start = len(data) // 2 // 4096 * 4096  # the back half's pages (rows, not the schema): torn
    for offset in range(start, len(data), 4096):
        data[offset + 8 : offset + 200] = b"\xa5" * 192
    db.write_bytes(bytes(data))
    assert _only_store_errors(tmp_path) == []


def test_a_database_made_read_only_while_open_raises_store_errors_and_recovers(
    tmp_path: Path,
) -> None:
    with SemanticCache(tmp_path, embedder=HashEmbedder(), threshold=0.9) as c:
        c.store("before words here", "kept", tags=["t"])
        files = _db_files(tmp_path)
        if subprocess.run(["chattr", "+i", *map(str, files)], capture_output=True).returncode:
            pytest.skip("cannot make the files immutable here (chattr +i)")
        try:
            for name, operation in _each_operation(c):
                try:
                    operation()
                except SemcacheError as exc:
                    assert isinstance(exc, StoreError), (name, exc)
        finally:
            subprocess.run(["chattr", "-i", *map(str, files)], check=True)
        assert c.lookup("before words here").response == "kept"  # nothing stored was harmed
        assert c.store("after words here", "new") is not None
        assert c.lookup("after words here").response == "new"
        assert c.verify() == []


def test_a_read_only_database_raises_store_errors_only(tmp_path: Path) -> None:
    _fill(tmp_path)
    db = tmp_path / "semcache.db"
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("cannot make the file immutable here (chattr +i)")
    try:
        probe = sqlite3.connect(db)  # the file really is read-only now
        try:
            with pytest.raises(sqlite3.Error):
                probe.execute("CREATE TABLE probe (x)")
        finally:
            probe.close()
        assert _only_store_errors(tmp_path) == []
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)


def test_a_bump_applied_while_a_version_is_being_read_is_not_forgotten(tmp_path: Path) -> None:
    """A version read from the store and a bump applied by another thread (a listener, another
    caller's catch-up) in between: the replica must not keep the old version afterwards."""
    cache = SemanticCache(tmp_path / "c", embedder=HashEmbedder())
    replica, store = cache.replica, cache._db
    read, proceed = threading.Event(), threading.Event()
    original = store.version

    def slow_version(namespace: str) -> int:
        value = original(namespace)
        read.set()
        proceed.wait(5)
        return value

    store.version = slow_version  # type: ignore[method-assign]
    try:
        reader = threading.Thread(target=replica.version, args=("ns",))
        reader.start()
        assert read.wait(5)  # it has read version 0 from the store
        store.bump("ns", now=1.0)  # committed now (as by another process)
        follower = threading.Thread(target=replica.catch_up)  # as a listener would
        follower.start()
        follower.join(0.5)  # it waits for the reader, or (the bug) applies the bump now
        proceed.set()
        reader.join(5)
        follower.join(5)
        store.version = original  # type: ignore[method-assign]
        assert replica.version("ns") == 1
        assert cache.version("ns") == 1
    finally:
        proceed.set()
        store.version = original  # type: ignore[method-assign]
        cache.close()
