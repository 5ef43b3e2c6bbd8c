"""FaissIndex under concurrency: merges grow a copy of the graph while searches and writes go on.

A merge inserts into a copy of the published graph outside the index's lock and swaps it in
under the lock; these tests check that nothing is lost or served stale around the swap: with a
merge held between its growth and its swap (deterministic), and with real threads searching,
writing, removing, replacing and persisting while another thread merges (no timing assertions).
"""

from __future__ import annotations

import random
import threading

import faiss
import numpy as np

from semcache import FaissIndex
from semcache.index import load_index

DIM = 32


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class PausedMergeIndex(FaissIndex):
    """A FaissIndex whose merges stop after growing their copy of the graph, before the swap,
    until the test lets them go."""

    def __init__(self, dim: int, hnsw_threshold: int) -> None:
        super().__init__(dim, hnsw_threshold=hnsw_threshold)
        self.grown = threading.Event()
        self.go = threading.Event()

    def _grow(self, graph: faiss.IndexHNSWFlat, vectors: np.ndarray) -> faiss.IndexHNSWFlat:
        grown = FaissIndex._grow(graph, vectors)
        self.grown.set()
        assert self.go.wait(60), "the test never released the merge"
        return grown


def start_merge(index: FaissIndex) -> tuple[threading.Thread, list[int]]:
    left: list[int] = []
    thread = threading.Thread(target=lambda: left.append(index.merge()), daemon=True)
    thread.start()
    return thread, left


def top(index: FaissIndex, q: np.ndarray, k: int = 5) -> dict[int, float]:
    sims, ids = index.search(q, k)
    return dict(zip(ids.tolist(), sims.tolist(), strict=True))


def held_merge(
    merged: np.ndarray, ids: np.ndarray, vectors: np.ndarray
) -> tuple[PausedMergeIndex, threading.Thread, list[int]]:
    """An index whose graph holds ``merged`` (ids 0..n-1), with ``ids``/``vectors`` added
    after and a merge of them held between its growth and its swap."""
    index = PausedMergeIndex(DIM, hnsw_threshold=50)
    index.go.set()
    index.add(np.arange(len(merged)), merged)
    assert index.merge() == 0
    index.go.clear()
    index.add(ids, vectors)
    thread, left = start_merge(index)
    assert index.grown.wait(60)
    return index, thread, left


def test_writes_during_a_merge_are_kept_and_nothing_removed_comes_back() -> None:
    x = unit(400, seed=1)
    index, thread, left = held_merge(x[:200], np.arange(1000, 1100), x[200:300])
    # the merge has grown its copy and not swapped it in: the index serves and takes writes
    assert top(index, x[200])[1000] > 0.999  # still found, in the recent segment
    assert index.remove(np.array([1001, 5])) == 2
    index.add(np.array([1002]), x[300:301])  # replaced while its old vector is merged
    index.add(np.array([2000]), x[301:302])
    copy = load_index(index.to_bytes())
    index.go.set()
    thread.join(60)
    assert left == [2] and index.pending == 2  # 1002's new vector and 2000 are still recent
    assert len(index._tombs) == 3  # 5 (in the graph), and the merged labels of 1001 and 1002
    for idx in (index, copy):
        assert len(idx) == 200 + 100 - 2 + 1
        assert 1001 not in top(idx, x[201]) and 5 not in top(idx, x[5])
        assert top(idx, x[300])[1002] > 0.999
        assert top(idx, x[202]).get(1002, 0.0) < 0.9  # the old vector is not served
        assert top(idx, x[301])[2000] > 0.999
        for i in (0, 150, 1000, 1050, 1099):
            q = x[i] if i < 1000 else x[200 + i - 1000]
            assert top(idx, q, 1) == {i: top(idx, q, 1)[i]}
    assert 1000 in index._label_of and 1000 not in index._rpos  # moved into the graph
    assert index.merge() == 0
    assert top(index, x[300])[1002] > 0.999 and top(index, x[202]).get(1002, 0.0) < 0.9


def test_a_merge_of_a_graph_replaced_meanwhile_is_dropped() -> None:
    x = unit(600, seed=2)
    index, thread, left = held_merge(x[:400], np.arange(400, 500), x[400:500])
    index.remove(np.arange(0, 150))  # past a quarter tombstoned: a new graph is started
    assert index.pending == 350
    index.go.set()
    thread.join(60)
    assert left == [350]  # the merge of the old graph was dropped
    assert index.merge() == 0 and len(index) == 350 and not index._tombs
    for i in (150, 399, 400, 499):
        assert top(index, x[i], 1).keys() == {i}


def test_searches_stay_correct_while_another_thread_merges() -> None:
    """A searcher, a writer and a merger thread at once: every added id stays findable, no
    removed id or replaced vector is ever returned, every similarity is the current one, and a
    persisted copy taken at any time holds every id added before it."""
    rng = random.Random(7)
    x = unit(6000, seed=3)
    replacement = unit(6000, seed=4)
    index = FaissIndex(DIM, hnsw_threshold=64)
    index.add(np.arange(1000), x[:1000])  # a graph with everything pending
    lock = threading.Lock()  # guards the bookkeeping lists below, not the index
    kept: list[int] = list(range(1000))  # added, never removed or changed
    gone: list[int] = []  # removed, never added again
    replaced: list[int] = []  # re-added with their replacement vector, never changed again
    churn: list[int] = []  # added, later removed or replaced (the searcher leaves them alone)
    alive = set(kept)
    done = threading.Event()
    failures: list[str] = []
    merges = [0]

    def searcher() -> None:
        while not done.is_set():
            with lock:
                i = rng.choice(kept)
                g = rng.choice(gone) if gone else None
                r = rng.choice(replaced) if replaced else None
            found = top(index, x[i])
            if i not in found or abs(found[i] - 1.0) > 1e-4 or i not in index:
                failures.append(f"{i} not found")
            if g is not None and g in top(index, x[g]):
                failures.append(f"removed {g} returned")
            if r is not None:
                if abs(top(index, replacement[r]).get(r, 0.0) - 1.0) > 1e-4:
                    failures.append(f"replaced {r} not found by its new vector")
                old = top(index, x[r]).get(r)
                if old is not None and abs(old - float(x[r] @ replacement[r])) > 1e-4:
                    failures.append(f"replaced {r} served with its old vector")
            if failures:
                done.set()

    def merger() -> None:
        while True:  # at least one merge, even if the writer is done first
            index.merge(limit=48)
            merges[0] += 1
            if done.is_set():
                return

    threads = [threading.Thread(target=searcher), threading.Thread(target=merger)]
    for thread in threads:
        thread.start()
    try:
        next_id = 1000
        for step in range(250):
            if failures:
                break
            ids = np.arange(next_id, next_id + 16)
            next_id += 16
            index.add(ids, x[ids])
            alive.update(ids.tolist())
            churn.extend(ids[8:].tolist())
            victims = [churn.pop(rng.randrange(len(churn))) for _ in range(3)]
            index.remove(np.array(victims[:2]))
            index.add(np.array(victims[2:]), replacement[victims[2:]])
            alive.difference_update(victims[:2])
            with lock:
                kept.extend(ids[:8].tolist())
                gone.extend(victims[:2])
                replaced.extend(victims[2:])
            if step % 50 == 0:
                copy = load_index(index.to_bytes())
                missing = alive - set(copy.ids().tolist())
                if missing:
                    failures.append(f"a persisted copy lacks {sorted(missing)[:5]}")
    finally:
        done.set()
        for thread in threads:
            thread.join(120)
    assert not failures, failures[:5]
    assert merges[0] >= 1
    assert index.merge() == 0
    assert set(index.ids().tolist()) == alive
    for i in rng.sample(kept, 50):
        assert top(index, x[i], 1).keys() == {i}
    for r in replaced[:50]:
        assert top(index, replacement[r], 1).keys() == {r}
