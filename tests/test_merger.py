"""The replica's background merger (semcache.replica): it moves recent writes into the graph
outside the replica's lock, so a merge in progress holds up no write, lookup or catch-up."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from semcache import FaissIndex, SemanticCache

from .fakes import HashEmbedder
from .polling import eventually


class HeldMerge(FaissIndex):
    """A FaissIndex whose merges wait, once entered, until the test lets them go."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, hnsw_threshold=20)
        self.entered = threading.Event()
        self.go = threading.Event()

    def merge(self, limit: int | None = None) -> int:
        self.entered.set()
        assert self.go.wait(60), "the test never released the merge"
        return super().merge(limit)


def test_writes_and_lookups_go_on_while_the_merger_is_inside_a_merge(tmp_path: Path) -> None:
    indexes: list[HeldMerge] = []

    def factory(dim: int) -> HeldMerge:
        indexes.append(HeldMerge(dim))
        return indexes[-1]

    cache = SemanticCache(tmp_path / "c", embedder=HashEmbedder(), index_factory=factory)
    try:
        cache.store_many([(f"stored prompt number {i} here", f"answer {i}") for i in range(40)])
        assert len(indexes) == 1 and indexes[0].pending  # a graph, with writes to merge
        assert indexes[0].entered.wait(30)  # the merger is inside a merge, held there
        done: list[object] = []

        def work() -> None:
            done.append(cache.store("a prompt stored during the merge", "fresh"))
            done.append(cache.lookup("a prompt stored during the merge"))
            done.append(cache.lookup("stored prompt number 7 here", vector=None))

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "a write or lookup waited for the merge"
        entry, fresh, old = done
        assert fresh is not None and fresh.response == "fresh" and fresh.entry_id == entry
        assert old is not None and old.response == "answer 7"
        assert cache.verify() == []
    finally:
        for index in indexes:
            index.go.set()
        cache.close()


def test_a_merge_without_writes_after_it_is_saved_by_the_next_checkpoint(tmp_path: Path) -> None:
    """A checkpoint taken while writes still wait for the graph, then a merge, then no write:
    the next checkpoint saves the merged graph, so a reopened cache does not merge it all again."""

    def factory(dim: int) -> FaissIndex:
        return FaissIndex(dim, hnsw_threshold=200)

    def opened() -> SemanticCache:
        return SemanticCache(tmp_path / "c", embedder=HashEmbedder(), index_factory=factory)

    cache = opened()
    cache.store_many([(f"prompt number {i} on topic {i * 7}", "x") for i in range(260)])
    cache.close()  # the merger is stopped first: the checkpoint holds writes not yet merged
    cache = opened()
    try:
        (_, index), *_ = cache.shards.items()
        assert getattr(index, "pending", 0) > 0
        assert eventually(lambda: getattr(index, "pending", 1) == 0)  # merged, nothing written
    finally:
        cache.close()
    cache = opened()
    try:
        (_, index), *_ = cache.shards.items()
        assert getattr(index, "pending", 1) == 0 and len(index) == 260
        assert cache.verify() == []
    finally:
        cache.close()


def test_the_recent_segment_gives_its_memory_back_once_merged() -> None:
    index = FaissIndex(16, hnsw_threshold=100)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index.add(np.arange(6000), x)  # past the threshold: the whole shard waits in the segment
    assert index.pending == 6000
    while index.merge(2000):
        pass
    assert index.pending == 0 and len(index) == 6000
    assert index._rmat.nbytes < 6000 * 16 * 4 // 4  # not the whole shard's worth any more
    sims, ids = index.search(x[17], 1)
    assert ids.tolist() == [17] and sims[0] > 0.999
