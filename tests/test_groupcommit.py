"""Group commit: concurrent single writes share one transaction, each keeping its own outcome;
and the WAL is checkpointed off the commit path."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from semcache import SemanticCache
from semcache.errors import EntryNotFoundError, StoreError
from semcache.groupcommit import GroupCommit, Request

from .fakes import HashEmbedder


def _queued(group: GroupCommit, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(group._queued) < n:
        assert time.monotonic() < deadline, "writers never queued"
        time.sleep(0.005)


def test_writers_queued_behind_a_commit_share_the_next_one() -> None:
    lock = threading.RLock()
    batches: list[list[int]] = []

    def commit(batch: list[Request[int]]) -> None:
        batches.append([r.payload for r in batch])
        for r in batch:
            if r.payload == 13:
                r.error = ValueError("thirteen")  # one request's own failure
            else:
                r.result = r.payload * 2

    group: GroupCommit[int] = GroupCommit(lock, commit)
    assert group.submit(1) == 2 and batches == [[1]]  # alone: commits alone, at once
    results: dict[int, object] = {}

    def write(n: int) -> None:
        try:
            results[n] = group.submit(n)
        except ValueError as exc:
            results[n] = exc

    with lock:  # a commit in progress
        threads = [threading.Thread(target=write, args=(n,)) for n in (10, 11, 12, 13)]
        for t in threads:
            t.start()
        _queued(group, 4)
    for t in threads:
        t.join()
    assert sorted(batches[1]) == [10, 11, 12, 13] and len(batches) == 2
    assert results[10] == 20 and results[12] == 24 and isinstance(results[13], ValueError)
    assert group.batches == 2 and group.requests == 5


def test_a_failed_batch_fails_every_request_in_it() -> None:
    lock = threading.RLock()

    def commit(batch: list[Request[int]]) -> None:
        for r in batch:
            r.result = "written"
        raise OSError("disk full")  # the transaction rolled back: nothing was acknowledged

    group: GroupCommit[int] = GroupCommit(lock, commit)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            group.submit(n)
        except OSError as exc:
            errors.append(exc)

    with lock:
        threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        _queued(group, 3)
    for t in threads:
        t.join()
    assert len(errors) == 3


def _transactions(cache: SemanticCache) -> list[int]:
    """Records the size of every write transaction the cache's group commit makes."""
    sizes: list[int] = []
    commit_group = cache.writer._commit_group

    def spy(group: list, now: float) -> None:
        sizes.append(len(group))
        commit_group(group, now)

    cache.writer._commit_group = spy  # type: ignore[method-assign]
    return sizes


def _held_writes(cache: SemanticCache, writes: list[tuple[str, dict]], during=None) -> dict:
    """Start a thread per write while holding the writers' turn, wait until all are queued,
    run ``during`` (still holding it), release; returns each prompt's result."""
    results: dict[str, object] = {}

    def write(prompt: str, kwargs: dict) -> None:
        results[prompt] = cache.store(prompt, f"answer to {prompt}", **kwargs)

    with cache._lock:
        threads = [threading.Thread(target=write, args=w) for w in writes]
        for t in threads:
            t.start()
        _queued(cache.writer.group, len(writes))
        if during is not None:
            during()
    for t in threads:
        t.join()
    return results


def test_concurrent_stores_share_a_commit_each_fenced_on_its_own(tmp_path: Path) -> None:
    """Writes queued while another holds the writers' turn commit together in one transaction:
    each gets its own id, and a fenced one whose invalidation committed after its lookup is
    refused alone."""
    cache = SemanticCache(tmp_path, embedder=HashEmbedder())
    try:
        position = cache.position()
        transactions = _transactions(cache)
        writes = [(f"plain question {i}", {}) for i in range(4)]
        writes.append(("a fenced question", {"tags": ["doc:1"], "fence": position}))
        results = _held_writes(cache, writes, lambda: cache.invalidate_tags("doc:1"))
        assert transactions == [5]  # the five shared one transaction
        assert results.pop("a fenced question") is None
        assert cache.stats()["fenced"] == 1 and cache.stats()["stores"] == 4
        for prompt, uid in results.items():
            assert cache.get(uid).response == f"answer to {prompt}"  # type: ignore[arg-type]
        assert cache.verify() == []
    finally:
        cache.close()


def test_a_bounded_cache_commits_concurrent_writes_one_by_one(tmp_path: Path) -> None:
    """With ``max_entries``, queued writes still go in one turn but in a transaction each, so
    the bound holds after every commit, and no write evicts itself."""
    cache = SemanticCache(tmp_path, embedder=HashEmbedder(), max_entries=2, eviction="fifo")
    try:
        transactions = _transactions(cache)
        results = _held_writes(cache, [(f"bounded question {i}", {}) for i in range(6)])
        assert transactions == [1] * 6
        assert all(uid is not None for uid in results.values())
        assert cache.stats()["entries"] == 2 and cache.stats()["stores"] == 6
        assert cache.stats()["evictions"] == 4
        survivors = []
        for uid in results.values():
            with contextlib.suppress(EntryNotFoundError):
                survivors.append(cache.get(uid))  # type: ignore[arg-type]
        assert len(survivors) == 2
        assert cache.verify() == []
    finally:
        cache.close()


def test_writes_acknowledged_before_a_failed_transaction_are_seen_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bounded cache commits a queue one transaction per write; when a later one fails, the
    earlier ones are acknowledged, and the replica catches up on them before the turn ends (the
    next semantic lookup finds them without waiting for another write)."""
    from semcache.checks import as_scope

    with SemanticCache(tmp_path, embedder=HashEmbedder(), max_entries=100, threshold=0.8) as c:
        c.store("warm up entry", "w")
        prompts = [("alpha beta gamma delta", "A"), ("zeta eta theta iota", "Z")]
        items = [c._prepare(p, r, as_scope(None), None, (), None) for p, r in prompts]
        requests = [Request((item, c.embed([item["norm"]])[0], None)) for item in items]
        real = c._db.insert
        calls: list[int] = []

        def failing_second(*args: object, **kwargs: object) -> object:
            calls.append(1)
            if len(calls) == 2:
                raise sqlite3.OperationalError("disk I/O error (injected)")
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(c._db, "insert", failing_second)
        with pytest.raises(StoreError, match="injected"):
            c.writer._commit(requests)  # type: ignore[arg-type]
        monkeypatch.setattr(c._db, "insert", real)
        assert requests[0].committed and requests[0].result is not None
        hit = c.lookup("alpha beta gamma delta epsilon")  # a semantic hit, through the index
        assert hit is not None and hit.entry_id == requests[0].result
        assert c.verify() == []


def test_sixteen_threads_of_stores_lose_nothing(tmp_path: Path) -> None:
    cache = SemanticCache(tmp_path, embedder=HashEmbedder())
    ids: list[str] = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        for i in range(40):
            uid = cache.store(f"thread {t} question {i}", f"answer {t}/{i}")
            with lock:
                ids.append(uid)  # type: ignore[arg-type]

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(set(ids)) == 640 and cache.stats()["entries"] == 640
        assert cache.writer.group.requests == 640
        hit = cache.lookup("thread 7 question 31")
        assert hit is not None and hit.response == "answer 7/31"
        assert cache.verify() == []
    finally:
        cache.close()


def test_the_wal_is_checkpointed_off_the_commit_path(tmp_path: Path) -> None:
    """No commit checkpoints the WAL (SQLite's automatic checkpoint is off); the background
    thread copies it into the database, so the WAL does not grow with every write."""
    cache = SemanticCache(tmp_path, embedder=HashEmbedder())
    try:
        assert cache._db.execute("PRAGMA wal_autocheckpoint")[0][0] == 0
        for i in range(1500):  # about 6 dirty pages a write: 35 MB of WAL if never copied
            cache.store(f"question {i}", "x" * 850)
        time.sleep(1.0)
        assert cache._db._checkpointer.runs > 0  # the thread copied it, no commit did
        assert (tmp_path / "semcache.db-wal").stat().st_size < 16 * 2**20
    finally:
        cache.close()
    assert not (tmp_path / "semcache.db-wal").exists() or (
        (tmp_path / "semcache.db-wal").stat().st_size == 0
    )


@pytest.mark.parametrize("writes", [1, 7])
def test_culling_keeps_its_pace_in_batches(tmp_path: Path, writes: int) -> None:
    """Expired entries are culled every few writes, counted by writes, not by commits."""
    cache = SemanticCache(tmp_path, embedder=HashEmbedder(), max_stale=0)
    try:
        for i in range(20):
            cache.store(f"short lived {i}", "x", ttl=0.001)
        time.sleep(0.01)
        for _ in range(16 // writes + 1):
            cache.writer.cull(cache.clock.now(), writes)
        assert cache.stats()["entries"] == 0
    finally:
        cache.close()


def test_switching_to_wal_waits_its_turn_instead_of_failing() -> None:
    """The switch to WAL fails at once, without the busy timeout, while another process creates
    or closes the database; opening retries until it gets its turn (any other error, or a
    turn that never comes, still raises)."""
    from semcache.store import _set_wal

    class Conn:
        def __init__(self, failures: int, message: str = "database is locked") -> None:
            self.failures, self.message, self.calls = failures, message, 0

        def execute(self, sql: str) -> None:
            self.calls += 1
            if self.calls <= self.failures:
                raise sqlite3.OperationalError(self.message)

    busy = Conn(3)
    _set_wal(busy)  # type: ignore[arg-type]
    assert busy.calls == 4
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        _set_wal(Conn(1, "disk I/O error"))  # type: ignore[arg-type]
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _set_wal(Conn(10**6), patience=0.05)  # type: ignore[arg-type]


OPENER = """
import sys
from tests.fakes import HashEmbedder
from semcache import SemanticCache
cache = SemanticCache(sys.argv[1], embedder=HashEmbedder())
for i in range(20):
    cache.store(f"question {i} from {sys.argv[2]}", "answer")
cache.close()
"""


def test_processes_opening_a_new_folder_together_all_open(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for round_ in range(4):
        folder = tmp_path / f"round-{round_}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", OPENER, str(folder), str(i)],
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(4)
        ]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, "\n".join(outs)
        with SemanticCache(folder, embedder=HashEmbedder()) as cache:
            assert cache.stats()["entries"] == 80 and cache.verify() == []


def test_an_interrupted_committer_fails_the_others_with_a_store_error() -> None:
    """A KeyboardInterrupt in the thread committing a batch is that thread's: it gets the
    interrupt, the other writers of the batch a StoreError, and no request is left pending."""
    from semcache.errors import StoreError

    lock = threading.RLock()
    gate = threading.Event()

    def commit(batch: list[Request[int]]) -> None:
        if len(batch) > 1:
            raise KeyboardInterrupt
        for r in batch:
            r.result, r.committed = r.payload, True

    group: GroupCommit[int] = GroupCommit(lock, commit)
    outcomes: dict[int, object] = {}

    def write(n: int) -> None:
        gate.wait()
        try:
            outcomes[n] = group.submit(n)
        except BaseException as exc:  # the test looks at which
            outcomes[n] = type(exc)

    with lock:
        threads = [threading.Thread(target=write, args=(n,)) for n in (1, 2, 3)]
        for t in threads:
            t.start()
        gate.set()
        _queued(group, 3)
    for t in threads:
        t.join()
    assert list(outcomes.values()).count(KeyboardInterrupt) == 1
    assert list(outcomes.values()).count(StoreError) == 2
    assert group._queued == []


def test_a_writer_interrupted_while_waiting_withdraws_its_write() -> None:
    committed: list[int] = []

    class InterruptedLock:
        """The writers' turn, interrupted (as by Ctrl-C) while a writer waits for it."""

        def __enter__(self) -> None:
            raise KeyboardInterrupt

        def __exit__(self, *exc: object) -> None:
            return None

    def commit(batch: list[Request[int]]) -> None:
        committed.extend(r.payload for r in batch)

    group: GroupCommit[int] = GroupCommit(InterruptedLock(), commit)
    with pytest.raises(KeyboardInterrupt):
        group.submit(7)
    assert group._queued == [] and committed == []


def test_a_store_inside_a_transaction_commits_alone(tmp_path: Path) -> None:
    """A write from a thread already inside a store transaction does not take other threads'
    queued writes into a transaction whose fate they do not know."""
    cache = SemanticCache(tmp_path, embedder=HashEmbedder())
    try:
        transactions = _transactions(cache)
        results: dict[str, object] = {}

        def write(prompt: str) -> None:
            results[prompt] = cache.store(prompt, "answer")

        with cache._lock:
            threads = [threading.Thread(target=write, args=(f"queued {i}",)) for i in range(3)]
            for t in threads:
                t.start()
            _queued(cache.writer.group, 3)
            with cache._db.transaction():
                assert cache.store("from inside a transaction", "inner") is not None
        for t in threads:
            t.join()
        assert transactions == [1, 3]
        assert all(results.values()) and cache.stats()["entries"] == 4
    finally:
        cache.close()


def test_the_wal_thread_ends_with_its_store(tmp_path: Path) -> None:
    """A store dropped without close(), or a cache refused for a bad argument, leaves no WAL
    thread (nor its connection) behind."""
    import gc

    from semcache.errors import InvalidInputError
    from semcache.store import Store

    def wal_threads() -> int:
        return sum(t.name == "semcache-wal" and t.is_alive() for t in threading.enumerate())

    before = wal_threads()
    store = Store(tmp_path / "dropped.db")
    assert wal_threads() == before + 1
    del store
    gc.collect()
    with pytest.raises(InvalidInputError):
        SemanticCache(tmp_path / "refused", embedder=HashEmbedder(), log_keep=-1)
    deadline = time.monotonic() + 5
    while wal_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert wal_threads() == before


def test_writers_copy_the_wal_themselves_when_the_thread_is_gone(tmp_path: Path) -> None:
    cache = SemanticCache(tmp_path, embedder=HashEmbedder())
    try:
        cache._db._checkpointer.stop()  # as in a forked child: no thread
        for i in range(1500):
            cache.store(f"question {i}", "x" * 850)
        assert (tmp_path / "semcache.db-wal").stat().st_size < 24 * 2**20
    finally:
        cache.close()


def test_a_burst_of_commits_wakes_the_wal_thread_before_its_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import semcache.store

    monkeypatch.setattr(semcache.store, "WAL_CHECKPOINT_EVERY", 60.0)  # only a nudge can wake it
    cache = SemanticCache(tmp_path, embedder=HashEmbedder())
    try:
        for i in range(semcache.store.WAL_NUDGE_AFTER + 5):
            cache.store(f"question {i}", "answer")
        deadline = time.monotonic() + 10
        while cache._db._checkpointer.runs == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache._db._checkpointer.runs >= 1
    finally:
        cache.close()
