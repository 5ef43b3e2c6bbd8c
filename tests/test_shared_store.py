"""Replicas of one PostgreSQL store (real PostgreSQL on 127.0.0.1:5432, a schema per test):
each process keeps its own index, L1 and version cache and follows the store's change log.

Most tests run replicas as separate OS processes (``tests.procs.Worker``); the ones that check
what a replica does *before* it hears of a change pause its following in-process, which no
outside process can do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from semcache import Scope, SemanticCache
from semcache.errors import EmbedderMismatchError, InvalidInputError, StoreError

from .fakes import HashEmbedder
from .polling import eventually
from .procs import ENV, ROOT, Worker

pytestmark = pytest.mark.postgres

URL = "postgresql://root@127.0.0.1:5432/test"
PROMPT = "alpha beta gamma delta epsilon"
PARAPHRASE = "alpha beta gamma delta zeta"  # HashEmbedder: cosine about 0.8 with PROMPT
OPTIONS = {"threshold": 0.7}


@pytest.fixture
def schema() -> Iterator[str]:
    import psycopg

    name = "semcache_shared_" + uuid.uuid4().hex[:12]
    yield name
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")  # type: ignore[arg-type]


def replica(tmp: Path, schema: str, name: str, **options: Any) -> Worker:
    return Worker(
        URL, options={**OPTIONS, "schema": schema, "index_dir": str(tmp / name), **options}
    )


def local(tmp: Path, schema: str, name: str, **options: Any) -> SemanticCache:
    return SemanticCache(
        URL,
        embedder=HashEmbedder(),
        schema=schema,
        index_dir=tmp / name,
        **{**OPTIONS, **options},
    )


def test_an_answer_stored_on_one_replica_is_served_by_the_others(
    tmp_path: Path, schema: str
) -> None:
    with (
        replica(tmp_path, schema, "a") as a,
        replica(tmp_path, schema, "b") as b,
        replica(tmp_path, schema, "c") as c,
    ):
        entry = a.call("store", PROMPT, "from a")
        for other in (b, c):
            hit = eventually(lambda o=other: o.call("lookup", PROMPT))
            assert hit and hit["response"] == "from a" and hit["entry_id"] == entry
        hit = b.call("lookup", PARAPHRASE)  # a paraphrase, by meaning
        assert hit is not None and hit["tier"] == "semantic" and hit["response"] == "from a"
        b.call("store", "one two three four five", "from b")
        hit = eventually(lambda: a.call("lookup", "one two three four six"))
        assert hit and hit["response"] == "from b"
        for w in (a, b, c):
            assert w.call("verify") == []


@pytest.mark.parametrize(
    "invalidate",
    ["tags", "bump", "delete", "delete_prompt", "similar"],
)
def test_an_invalidation_on_one_replica_stops_hits_on_the_others(
    tmp_path: Path, schema: str, invalidate: str
) -> None:
    scope = {"namespace": "ns"}
    with (
        replica(tmp_path, schema, "a") as a,
        replica(tmp_path, schema, "b") as b,
        replica(tmp_path, schema, "c") as c,
    ):
        entry = a.call("store", PROMPT, "old", scope=scope, tags=["doc:1"])
        for w in (a, b):  # both have it in L1 and in their index
            assert eventually(lambda w=w: w.call("lookup", PROMPT, scope=scope))
            assert w.call("lookup", PARAPHRASE, scope=scope)
        if invalidate == "tags":
            c.call("invalidate_tags", "doc:1")
        elif invalidate == "bump":
            c.call("bump", "ns")
        elif invalidate == "delete":
            assert c.call("delete", entry)
        elif invalidate == "delete_prompt":
            assert c.call("delete_prompt", PROMPT, scope=scope) == 1
        else:
            assert c.call("invalidate_similar", PROMPT, radius=0.05, scope=scope) == [entry]
        for w in (a, b):
            # a semantic hit is confirmed against the store: never served once committed
            assert w.call("lookup", PARAPHRASE, scope=scope) is None
            # an exact repeat (L1) stops within the propagation delay
            assert eventually(lambda w=w: w.call("lookup", PROMPT, scope=scope) is None)
            assert w.call("verify") == []


class _Deaf:
    """A listener that says it is listening and delivers nothing: a replica that has not yet
    heard of a change (the propagation delay, held open)."""

    alive = True

    def close(self) -> None:
        pass


def deafen(cache: SemanticCache) -> None:
    cache.replica.listener.close()
    cache.replica.listener = _Deaf()


def test_a_replica_that_has_not_heard_of_an_invalidation_serves_no_dead_semantic_hit(
    tmp_path: Path, schema: str
) -> None:
    writer = local(tmp_path, schema, "writer")
    reader = local(tmp_path, schema, "reader")
    ns, other = Scope(namespace="ns"), Scope(namespace="other")
    try:
        short = Scope(namespace="short")
        writer.store(PROMPT, "old", scope=ns)
        gone = writer.store(PROMPT, "old too", scope=other)
        writer.store(PROMPT, "brief", scope=short, ttl=1.0)
        assert eventually(lambda: reader.lookup(PARAPHRASE, scope=other))
        assert reader.lookup(PARAPHRASE, scope=ns) and reader.lookup(PROMPT, scope=other)
        assert eventually(lambda: reader.lookup(PARAPHRASE, scope=short))
        deafen(reader)  # its index, L1 and version cache are frozen from here on
        writer.bump("ns")
        assert writer.delete(gone)  # type: ignore[arg-type]
        # semantic hits are confirmed against the store of record
        assert reader.lookup(PARAPHRASE, scope=ns) is None
        assert reader.lookup(PARAPHRASE, scope=other) is None
        time.sleep(1.1)
        assert reader.lookup(PARAPHRASE, scope=short) is None  # expired, never served
        # the bounded mode's stated limit: an L1 hit is served until the change is heard
        hit = reader.lookup(PROMPT, scope=other)
        assert hit is not None and hit.tier == "l1" and hit.response == "old too"
    finally:
        writer.close()
        reader.close()


def test_a_lookup_given_its_vector_reads_the_exact_repeat_with_the_candidates(
    tmp_path: Path, schema: str
) -> None:
    writer = local(tmp_path, schema, "writer")
    reader = local(tmp_path, schema, "reader")
    try:
        writer.store("first prompt here", "warm")
        assert eventually(lambda: reader.lookup("first prompt here"))
        deafen(reader)  # it never hears of what follows: only the store can know it
        writer.store(PROMPT, "exact", scope=Scope(namespace="ns"))
        writer.store("one two three four five", "bumped away", scope=Scope(namespace="ns"))
        elsewhere = HashEmbedder().embed(["nothing like the prompt at all"])[0]

        def no_separate_read(*args: Any) -> None:
            raise AssertionError("the exact repeat was read on its own")

        reader._db.find_exact = no_separate_read  # type: ignore[method-assign]
        hit = reader.lookup(PROMPT, scope=Scope(namespace="ns"), vector=elsewhere)
        assert hit is not None and hit.tier == "l1" and hit.response == "exact"
        assert reader.lookup(PROMPT, vector=elsewhere) is None  # another scope
        writer.bump("ns")  # another replica's bump counts at once
        gone = reader.lookup(
            "one two three four five", scope=Scope(namespace="ns"), vector=elsewhere
        )
        assert gone is None
    finally:
        writer.close()
        reader.close()


def test_the_strong_mode_confirms_l1_hits_too(tmp_path: Path, schema: str) -> None:
    writer = local(tmp_path, schema, "writer")
    strong = local(tmp_path, schema, "strong", consistency="strong")
    try:
        entry = writer.store(PROMPT, "old")
        assert eventually(lambda: strong.lookup(PROMPT))
        assert strong.lookup(PROMPT).tier == "l1"  # type: ignore[union-attr]
        deafen(strong)
        assert writer.delete(entry)  # type: ignore[arg-type]
        assert strong.lookup(PROMPT) is None  # the very next lookup, no waiting
        writer.store(PROMPT, "new")
        assert strong.lookup(PROMPT).response == "new"  # type: ignore[union-attr]
        assert strong.stats()["consistency"] == "strong"
    finally:
        writer.close()
        strong.close()


def test_replicas_follow_the_log_without_being_asked(tmp_path: Path, schema: str) -> None:
    writer = local(tmp_path, schema, "writer")
    follower = local(tmp_path, schema, "follower")
    try:
        assert eventually(lambda: follower.stats()["following"])
        writer.store(PROMPT, "x")
        head = writer.stats()["log_position"]
        # no lookup on the follower: its listener catches up on the notification
        assert eventually(lambda: follower.shards.seq >= head, timeout=2.0)
        # a lost notification (the listening connection killed): polling still delivers,
        # and the listener reconnects
        import psycopg

        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
            )
        writer.store("one two three four five", "y")
        head = writer.stats()["log_position"]
        assert eventually(lambda: follower.shards.seq >= head, timeout=5.0)
        assert eventually(lambda: follower.stats()["following"], timeout=5.0)
        assert follower.verify() == []
    finally:
        writer.close()
        follower.close()


def test_a_killed_replica_restarts_from_its_checkpoint_and_catches_up(
    tmp_path: Path, schema: str
) -> None:
    with replica(tmp_path, schema, "b") as b:
        a = replica(tmp_path, schema, "a")
        for i in range(20):
            b.call("store", f"first {i} words here", f"f{i}")
        eventually(lambda: a.call("lookup", "first 19 words here"))
        a.call("checkpoint")
        for i in range(20):
            b.call("store", f"second {i} words here", f"s{i}")
        a.kill()
        for i in range(20):
            b.call("store", f"third {i} words here", f"t{i}")
        b.call("checkpoint")  # b's checkpoint does not make a's untrusted
        with replica(tmp_path, schema, "a") as again:
            assert again.call("stats")["index_rebuilds"] == 0
            for kind in ("first", "second", "third"):
                for i in (0, 19):
                    hit = again.call("lookup", f"{kind} {i} words here")
                    assert hit and hit["response"] == f"{kind[0]}{i}"
            assert again.call("verify") == []


def test_a_replica_whose_log_was_trimmed_past_its_checkpoint_rebuilds(
    tmp_path: Path, schema: str
) -> None:
    a = replica(tmp_path, schema, "a")
    a.call("store", PROMPT, "kept")
    a.close()  # a checkpoint, and its hold on the log released
    with replica(tmp_path, schema, "b", log_keep=0, checkpoint_every=10) as b:
        for i in range(30):
            b.call("store", f"later {i} words here", f"l{i}")
        b.call("checkpoint")
    with replica(tmp_path, schema, "a") as again:
        assert again.call("stats")["index_rebuilds"] == 1
        assert again.call("lookup", PROMPT)["response"] == "kept"
        assert again.call("lookup", "later 29 words here")["response"] == "l29"
        assert again.call("verify") == []


@pytest.mark.parametrize("store", ["postgres", "sqlite folder"])
def test_identical_misses_on_three_replicas_make_one_call(
    tmp_path: Path, schema: str, store: str
) -> None:
    calls = tmp_path / "calls"
    calls.touch()
    at = time.time() + 8.0  # every process has opened its cache by then
    procs = []
    for i, threads in enumerate((3, 3, 2)):
        if store == "postgres":
            where = {"schema": schema, "index_dir": str(tmp_path / f"r{i}")}
            spec = {"path": URL, "options": {**OPTIONS, **where}}
        else:  # three processes on one data folder share flights through the same rows
            spec = {"path": str(tmp_path / "data"), "options": OPTIONS}
        cfg = {
            "spec": spec,
            "prompt": PROMPT,
            "threads": threads,
            "at": at,
            "compute": 1.0,
            "calls": str(calls),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.procs", "flight", json.dumps(cfg)],
                cwd=ROOT,
                env=ENV,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert time.time() > at + 1.0, "the processes did not start together"
    leaders = calls.read_text().split()
    assert len(leaders) == 1, f"{len(leaders)} upstream calls: {leaders}"
    answers = {a for r in results for a in r["answers"]}
    assert answers == {f"answer from {leaders[0]}"}
    # the two processes that did not lead took the answer from the store
    assert sorted(r["remote"] > 0 for r in results) == [False, True, True]


def test_a_shared_store_is_opened_only_as_asked(tmp_path: Path, schema: str) -> None:
    with pytest.raises(InvalidInputError, match="index_dir"):
        SemanticCache(
            tmp_path / "folder", embedder=HashEmbedder(), index_dir=tmp_path / "x", **OPTIONS
        )
    with pytest.raises(InvalidInputError, match="consistency"):
        SemanticCache(
            URL, embedder=HashEmbedder(), schema=schema, consistency="eventual", **OPTIONS
        )
    (tmp_path / "a file").write_text("in the way")
    with pytest.raises(StoreError, match="as an index folder"):
        local(tmp_path, schema, "a file")
    cache = local(tmp_path, schema, "a")
    try:
        stats = cache.stats()
        assert stats["store"].startswith("postgresql://") and f"schema {schema}" in stats["store"]
        assert stats["path"] == str(tmp_path / "a")
    finally:
        cache.close()
    # another model may not re-embed a store other replicas search, and the error never
    # suggests rebuild=True, which does not apply to a shared store
    for rebuild in (False, True):
        with pytest.raises(EmbedderMismatchError, match="schema of its own") as refused:
            SemanticCache(
                URL,
                embedder=HashEmbedder(model_id="test:other"),
                schema=schema,
                index_dir=tmp_path / "b",
                rebuild=rebuild,
                **OPTIONS,
            )
        assert "pass rebuild=True" not in str(refused.value)


def test_without_index_dir_a_replica_keeps_its_files_under_the_user_cache(
    tmp_path: Path, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = SemanticCache(URL, embedder=HashEmbedder(), schema=schema, **OPTIONS)
    try:
        assert cache.path == tmp_path / "xdg" / "semcache" / cache._db.store_id
        cache.store(PROMPT, "x")
    finally:
        cache.close()
    assert any(cache.path.rglob("*")) and os.path.isdir(cache.path)


WRITER = """
import sys, time
from semcache import SemanticCache
from tests.fakes import HashEmbedder
url, schema, folder, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
cache = SemanticCache(url, embedder=HashEmbedder(), threshold=0.7, schema=schema, index_dir=folder)
print("ready", flush=True)
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
    cache.store(f"written {i} here", "a")
    i += 1
cache.close()
print(i, flush=True)
"""


@pytest.mark.parametrize("consistency", ["strong", "bounded"])
def test_a_replica_following_a_busy_writer_never_mistakes_it_for_a_trimmed_log(
    tmp_path: Path, schema: str, consistency: str
) -> None:
    """Commits landing while a replica scans the log are new changes, not a gap: the replica
    applies them instead of rebuilding its index (a rebuild costs minutes at 100k entries)."""
    reader = local(tmp_path, schema, "reader", consistency=consistency)
    try:
        before = reader.stats()["index_rebuilds"]
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, URL, schema, str(tmp_path / "w"), "3"],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        lookups = 0
        while writer.poll() is None:
            reader.lookup(f"reading {lookups} there")
            lookups += 1
        written = int(writer.stdout.read().split()[-1])
        assert writer.returncode == 0 and written > 50 and lookups > 50
        assert reader.stats()["index_rebuilds"] == before
        assert eventually(lambda: reader.lookup(f"written {written - 1} here"))
        assert reader.verify() == []
    finally:
        reader.close()


def test_text_with_a_nul_is_refused_on_a_shared_store_as_on_sqlite(
    tmp_path: Path, schema: str
) -> None:
    """PostgreSQL's text cannot hold a NUL: it is refused up front with the same typed error
    as on SQLite (it was a StoreError after get_or_compute had paid for the answer, which was
    then lost)."""
    from semcache.errors import EntryNotFoundError, InvalidPromptError

    cache = local(tmp_path, schema, "a")
    try:
        with pytest.raises(InvalidPromptError, match="NUL"):
            cache.store("a\x00prompt", "x")
        with pytest.raises(InvalidInputError, match="NUL"):
            cache.bump("a\x00")
        with pytest.raises(EntryNotFoundError):
            cache.get("ab\x00")
        assert cache.delete("ab\x00") is False
        assert cache.get_or_compute(PROMPT, lambda p: "bad\x00answer") == "bad\x00answer"
        assert cache.stats()["unstorable"] == 1 and cache.stats()["entries"] == 0
    finally:
        cache.close()
