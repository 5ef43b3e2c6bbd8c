"""One contract for every VectorIndex: FAISS (flat and HNSW) and the NumPy reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from semcache import FaissIndex, InvalidVectorError, NumpyIndex, VectorIndex
from semcache.errors import IndexCorruptError, StoreError
from semcache.index import load_index

DIM = 32


class MergedFaissIndex(FaissIndex):
    """A FaissIndex whose every add is merged into the graph at once (the merger caught up),
    so the contract runs against the graph itself, not only the exact recent segment."""

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        super().add(ids, vectors)
        self.merge()


FACTORIES: dict[str, Callable[[], VectorIndex]] = {
    "numpy": lambda: NumpyIndex(DIM),
    "faiss-flat": lambda: FaissIndex(DIM, hnsw_threshold=10_000),
    "faiss-hnsw": lambda: MergedFaissIndex(DIM, hnsw_threshold=50),
    "faiss-hnsw-radius-mirror": lambda: MergedFaissIndex(
        DIM, hnsw_threshold=50, radius_mirror_min=60
    ),
    # a graph not merged yet: every vector still in the recent segment (the merger behind a
    # bulk load), past its bound
    "faiss-hnsw-unmerged": lambda: FaissIndex(DIM, hnsw_threshold=50, recent_max=7),
}


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(params=list(FACTORIES))
def index(request: pytest.FixtureRequest) -> VectorIndex:
    return FACTORIES[request.param]()


def test_is_a_vector_index(index: VectorIndex) -> None:
    assert isinstance(index, VectorIndex)


def test_add_search_remove(index: VectorIndex) -> None:
    x = unit(300)
    ids = np.arange(1000, 1300)
    index.add(ids, x)
    assert len(index) == 300 and 1000 in index and 5 not in index
    sims, found = index.search(x[10], 5)
    assert found[0] == 1010 and sims[0] == pytest.approx(1.0, abs=1e-5)
    assert list(sims) == sorted(sims, reverse=True)
    assert index.remove(np.array([1010, 1010, 99999])) == 1
    assert 1010 not in index and len(index) == 299
    _, found = index.search(x[10], 5)
    assert 1010 not in found
    assert index.remove(np.array([1010])) == 0


def test_add_replaces(index: VectorIndex) -> None:
    x = unit(100)
    index.add(np.arange(100), x)
    index.add(np.array([7]), x[50:51])
    assert len(index) == 100
    _, found = index.search(x[50], 2)
    assert set(found.tolist()) == {7, 50}
    np.testing.assert_allclose(index.vectors(np.array([7]))[0], x[50], atol=1e-6)


def test_empty_and_small(index: VectorIndex) -> None:
    _, found = index.search(unit(1)[0], 3)
    assert len(found) == 0
    index.add(np.array([1]), unit(1))
    _, found = index.search(unit(1)[0], 3)
    assert found.tolist() == [1]


def test_bad_vectors(index: VectorIndex) -> None:
    with pytest.raises(InvalidVectorError):
        index.add(np.array([1, 2]), unit(3))
    with pytest.raises(InvalidVectorError):
        index.add(np.array([1, 1]), unit(2))


def test_range_search_is_exact(index: VectorIndex) -> None:
    x = unit(500, seed=1)
    index.add(np.arange(500), x)
    index.remove(np.arange(0, 500, 7))
    alive = np.setdiff1d(np.arange(500), np.arange(0, 500, 7))
    for radius in (0.1, 0.2, 0.3, 0.5):
        q = x[3]
        found, sims = index.range_search(q, radius)
        truth = alive[(x[alive] @ q) >= np.float32(radius)]
        assert set(found.tolist()) == set(truth.tolist())
        assert np.all(sims >= np.float32(radius))


def test_round_trip(index: VectorIndex) -> None:
    x = unit(200)
    index.add(np.arange(200), x)
    index.remove(np.arange(0, 200, 3))
    copy = load_index(index.to_bytes())
    assert sorted(copy.ids().tolist()) == sorted(index.ids().tolist())
    for q in x[:20]:
        assert copy.search(q, 3)[1].tolist() == index.search(q, 3)[1].tolist()
    copy.add(np.array([5000]), x[:1])
    assert 5000 in copy


def test_round_trip_without_vectors(index: VectorIndex) -> None:
    """A file written with ``vectors=False`` holds no vector of a live entry (the store of
    record keeps them) and loads to the same index from a ``fetch`` of them; an id ``fetch``
    no longer has (deleted after the file was written) loads as a zero vector, which no
    search above similarity 0 returns, until the caller removes it."""
    x = unit(200)
    index.add(np.arange(200), x)
    index.remove(np.arange(0, 200, 7))  # tombstones in a graph: under a quarter
    data = index.to_bytes(vectors=False)
    assert len(data) < len(index.to_bytes()) - 100 * DIM * 4
    asked: list[int] = []

    def fetch(ids: np.ndarray) -> np.ndarray:
        asked.extend(ids.tolist())
        out = x[ids].copy()
        out[ids == 8] = 0.0  # gone from the store since the file was written
        return out

    copy = load_index(data, fetch)
    if isinstance(index, FaissIndex) and index.kind == "hnsw" and not index.pending:
        assert len(index._tombs) == 29  # their vectors are in the file, not fetched
    assert set(asked) == set(index.ids().tolist())
    assert sorted(copy.ids().tolist()) == sorted(index.ids().tolist())
    for q in x[20:40]:
        assert copy.search(q, 3)[1].tolist() == index.search(q, 3)[1].tolist()
    assert copy.range_search(x[8], 0.5)[0].tolist() == []
    assert np.allclose(copy.vectors(np.array([9, 199])), x[[9, 199]])
    with pytest.raises(IndexCorruptError, match="no vectors"):
        load_index(data)
    with pytest.raises(IndexCorruptError, match="shape"):
        load_index(data, lambda ids: np.zeros((len(ids), DIM + 1), dtype=np.float32))

    def unreachable(ids: np.ndarray) -> np.ndarray:
        raise StoreError("the store did not answer")

    with pytest.raises(StoreError):  # the store's trouble, not a damaged file: no rebuild
        load_index(data, unreachable)


def test_hnsw_recall_and_tombstone_compaction() -> None:
    index = FaissIndex(DIM, hnsw_threshold=100)
    x = unit(2000, seed=3)
    index.add(np.arange(2000), x)
    assert index.kind == "hnsw" and index.pending == 2000  # the graph grows in merges
    assert index.merge() == 0 and index._hnsw is not None and index._hnsw.ntotal == 2000
    index.remove(np.arange(0, 2000, 2))  # > 25% tombstones: a new graph is started
    assert index.kind == "hnsw" and len(index._tombs) == 0 and index.pending == 1000
    assert index.merge() == 0 and index._hnsw.ntotal == 1000
    hits = sum(index.search(x[i], 1)[1][0] == i for i in range(1, 2000, 2))
    assert hits >= 990
    index.remove(np.arange(1, 2000, 2)[:980])  # below half the threshold: back to flat
    assert index.kind == "flat"


def test_radius_mirror_follows_mutations() -> None:
    index = FaissIndex(DIM, hnsw_threshold=50, radius_mirror_min=100)
    x = unit(3000, seed=5)
    index.add(np.arange(3000), x)
    index.range_search(x[0], 0.5)
    assert index._mirror is not None
    index.remove(np.arange(0, 600))
    index.add(np.arange(5000, 5100), x[:100])
    alive = {i: x[i] for i in range(600, 3000)} | {5000 + j: x[j] for j in range(100)}
    ids = np.fromiter(alive, dtype=np.int64)
    mat = np.stack(list(alive.values()))
    for radius in (0.3, 0.5, 0.9):
        found, _ = index.range_search(x[3], radius)
        assert set(found.tolist()) == set(ids[(mat @ x[3]) >= np.float32(radius)].tolist())


def test_corrupt_bytes() -> None:
    with pytest.raises(IndexCorruptError):
        load_index(b"not an index")


def test_recent_writes_are_searchable_before_and_after_a_merge() -> None:
    """Vectors added to a graph first sit in the exact recent segment: found at once, found
    the same after merge(), removable from either place, and persisted with the index."""
    index = FaissIndex(DIM, hnsw_threshold=50)
    x = unit(120, seed=5)
    index.add(np.arange(50), x[:50])  # becomes a graph, its vectors in the recent segment
    assert index.kind == "hnsw" and index.pending == 50 and index.merge() == 0
    index.add(np.arange(50, 120), x[50:])
    assert index.kind == "hnsw" and index.pending == 70
    for i in (0, 60, 119):
        assert index.search(x[i], 1)[1][0] == i
    index.remove(np.array([60, 10]))
    assert 60 not in index and index.pending == 69
    restored = load_index(index.to_bytes())
    assert restored.pending == 69 and len(restored) == 118
    assert restored.search(x[119], 1)[1][0] == 119
    assert index.merge(limit=30) == 39 and index.merge() == 0
    for i in (0, 61, 119):
        assert index.search(x[i], 1)[1][0] == i
    assert index.search(x[60], 1)[1][0] != 60
    assert sorted(index.ids().tolist()) == sorted(set(range(120)) - {10, 60})
    found, _ = index.range_search(x[70], 0.999)
    assert found.tolist() == [70]
