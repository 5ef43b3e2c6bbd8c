"""Group commit: concurrent single writes share one transaction, each keeping its own outcome;
and the WAL is checkpointed off the commit path."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from semcache import SemanticCache
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


def test_concurrent_stores_share_commits_each_fenced_on_its_own(tmp_path: Path) -> None:
    """Writes queued while another holds the writers' turn commit together: each gets its own
    id, a fenced one whose invalidation committed after its lookup is refused alone, and
    eviction never takes a write of the batch, so every id returned exists."""
    cache = SemanticCache(tmp_path, embedder=HashEmbedder(), max_entries=2, eviction="fifo")
    try:
        cache.store("an old entry", "old")
        position = cache.position()
        results: dict[str, str | None] = {}

        def write(prompt: str, **kwargs: object) -> None:
            results[prompt] = cache.store(prompt, f"answer to {prompt}", **kwargs)  # type: ignore[arg-type]

        batches = cache._group.batches
        with cache._lock:
            threads = [
                threading.Thread(target=write, args=(f"plain question {i}",)) for i in range(4)
            ]
            threads.append(
                threading.Thread(
                    target=write,
                    args=("a fenced question",),
                    kwargs={"tags": ["doc:1"], "fence": position},
                )
            )
            for t in threads:
                t.start()
            _queued(cache._group, 5)
            cache.invalidate_tags("doc:1")  # committed after the fenced write's position
        for t in threads:
            t.join()
        assert cache._group.batches == batches + 1  # the five shared one commit
        assert results.pop("a fenced question") is None
        assert cache.stats()["fenced"] == 1
        assert all(uid is not None for uid in results.values())
        for prompt, uid in results.items():
            assert cache.get(uid).response == f"answer to {prompt}"  # type: ignore[arg-type]
        assert cache.verify() == []
        cache.store("one more", "x")  # the next write evicts down to the bound
        assert cache.stats()["entries"] == 2
    finally:
        cache.close()


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
        assert cache._group.requests - cache._group.batches >= 0
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
        probe = sqlite3.connect(tmp_path / "semcache.db")
        try:
            busy, log_frames, copied = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            probe.close()
        assert busy == 0 and log_frames == copied  # nothing left to copy: the thread did it
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
            cache._cull(cache.clock.now(), writes)
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
