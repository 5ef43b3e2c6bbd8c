"""Contract tests for semcache.radius: RadiusIndex must return exactly what brute force returns.

The same contract runs against RadiusIndex (with small training/segment sizes so the compressed
path, several segments and the search threads are all exercised) and against NumpyRadiusIndex,
the obviously-correct reference; both are compared with a direct scan of the matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from semcache.errors import InvalidInputError, InvalidVectorError
from semcache.radius import (
    NumpyRadiusIndex,
    RadiusIndex,
    exact_similarities,
    select_within,
)

DIM = 384
RADII = (-1.5, 0.5, 0.7, 0.8, 0.9, 0.95, 0.999, 1.0, 1.5)


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Vectors in tight and loose clusters, so every radius from 0.5 to 0.99 has matches."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(n // 50, 1), dim)))
    which = rng.integers(0, len(centres), n)
    spread = rng.uniform(0.005, 0.08, (n, 1)).astype(np.float32)
    return unit(centres[which] + spread * rng.standard_normal((n, dim)).astype(np.float32))


def brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, r: float) -> set[int]:
    return {int(i) for i in ids[exact_similarities(x, q) >= r]}


def make_fast() -> RadiusIndex:
    return RadiusIndex(DIM, train_size=2000, segment_size=3000)


IMPLEMENTATIONS: dict[str, Callable[[], RadiusIndex | NumpyRadiusIndex]] = {
    "radius": make_fast,
    "numpy": lambda: NumpyRadiusIndex(DIM),
}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered(10_000)
    ids = np.random.default_rng(1).permutation(10_000).astype(np.int64) * 7 + 3
    rng = np.random.default_rng(2)
    queries = np.concatenate(
        [
            x[rng.integers(0, len(x), 6)],  # stored vectors themselves
            unit(x[rng.integers(0, len(x), 6)] + 0.02 * rng.standard_normal((6, DIM))),
            unit(rng.standard_normal((2, DIM))),  # far from everything
        ]
    ).astype(np.float32)
    return x, ids, queries


@pytest.fixture(scope="module", params=sorted(IMPLEMENTATIONS))
def filled(request: pytest.FixtureRequest, data: tuple[np.ndarray, ...]):
    x, ids, _ = data
    index = IMPLEMENTATIONS[request.param]()
    for lo in range(0, len(x), 2500):  # several adds: the fast index trains mid-way
        index.add(ids[lo : lo + 2500], x[lo : lo + 2500])
    return index


# ---------------------------------------------------------------------------- the similarity


def test_exact_similarities_do_not_depend_on_the_batch() -> None:
    x = clustered(3000, seed=5)
    q = x[17]
    full = exact_similarities(x, q)
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = np.sort(rng.choice(len(x), rng.integers(1, 60), replace=False))
        assert np.array_equal(exact_similarities(x[rows], q), full[rows])
    assert np.abs(full - (x.astype(np.float64) @ q.astype(np.float64))).max() < 1e-12


def test_select_within_matches_the_float64_definition_at_ties() -> None:
    x = clustered(2000, seed=6)
    q = x[3]
    sims = exact_similarities(x, q)
    for r in sims[[5, 50, 500]]:  # radius exactly equal to a stored similarity
        pos, got = select_within(x, q, float(r))
        assert set(pos.tolist()) == set(np.flatnonzero(sims >= r).tolist())
        assert float(r) in set(got.tolist())  # the tie is included
        above = np.nextafter(r, np.inf)
        pos, _ = select_within(x, q, float(above))
        assert set(pos.tolist()) == set(np.flatnonzero(sims >= above).tolist())


# ---------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("radius", RADII)
def test_exact_on_10k_vectors(filled, data, radius: float) -> None:
    x, ids, queries = data
    assert len(filled) == len(x)
    for q in queries:
        got_ids, got_sims = filled.search(q, radius)
        expected = brute(x, ids, q, radius)
        assert set(got_ids.tolist()) == expected
        assert len(got_ids) == len(expected)  # no duplicates
        assert got_ids.dtype == np.int64 and got_sims.dtype == np.float32
        if 0 < len(got_ids) <= 2000:
            assert np.all(np.diff(got_sims) <= 0)  # best first
            rows = filled.vectors(got_ids)
            assert np.array_equal(got_sims, exact_similarities(rows, q).astype(np.float32))
        # and the plain float32 scan agrees away from the rounding band around the radius
        s32 = x @ q
        clear = np.abs(s32.astype(np.float64) - radius) > 1e-5
        assert {int(i) for i in ids[clear & (s32 >= radius)]} == expected & set(ids[clear].tolist())


def test_fast_index_uses_codes_and_segments(filled) -> None:
    if isinstance(filled, RadiusIndex):
        segments = list(filled._segments.values())
        assert sum(s.index is not None for s in segments) >= 3  # the tail one may be scanned


def test_both_implementations_agree_bit_for_bit(data) -> None:
    x, ids, queries = data
    fast, ref = make_fast(), NumpyRadiusIndex(DIM)
    fast.add(ids, x)
    ref.add(ids, x)
    for q in queries[:8]:
        for r in (0.7, 0.9):
            a, b = fast.search(q, r), ref.search(q, r)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("factory", sorted(IMPLEMENTATIONS))
def test_near_boundary_vectors_are_never_missed(factory: str) -> None:
    """Hundreds of vectors within 1e-6 of the radius: the margins must hold, both ways."""
    rng = np.random.default_rng(9)
    q = unit(rng.standard_normal(DIM))
    r = 0.8
    noise = rng.standard_normal((3000, DIM)).astype(np.float32)
    noise -= np.outer(noise @ q, q)  # orthogonal to q
    noise = unit(noise)
    wiggle = rng.uniform(-1e-6, 1e-6, (3000, 1))
    cos = r + wiggle
    x = (cos * q + np.sqrt(1 - cos**2) * noise).astype(np.float32)
    x = np.concatenate([x, clustered(3000, seed=10)])
    ids = np.arange(len(x), dtype=np.int64)
    index = IMPLEMENTATIONS[factory]()
    index.add(ids, x)
    got, _ = index.search(q, r)
    assert set(got.tolist()) == brute(x, ids, q, r)
    assert 0 < len(got) < 3000  # the test really straddles the boundary


@pytest.mark.parametrize("factory", sorted(IMPLEMENTATIONS))
def test_vectors_of_any_norm(factory: str) -> None:
    rng = np.random.default_rng(4)
    x = clustered(4000, seed=11) * rng.uniform(0.2, 3.0, (4000, 1)).astype(np.float32)
    ids = np.arange(4000, dtype=np.int64)
    index = IMPLEMENTATIONS[factory]()
    index.add(ids, x)
    for q in (x[0] * 0.5, x[10] * 2.0):
        for r in (0.5, 1.0, 2.0):
            assert set(index.search(q, r)[0].tolist()) == brute(x, ids, q, r)


@pytest.mark.parametrize("factory", sorted(IMPLEMENTATIONS))
def test_replace_remove_and_compaction(factory: str) -> None:
    x = clustered(6000, seed=12)
    ids = np.arange(6000, dtype=np.int64)
    index = IMPLEMENTATIONS[factory]()
    index.add(ids, x)
    moved = clustered(500, seed=13)
    index.add(ids[:500], moved)  # re-adding replaces
    assert len(index) == 6000
    assert np.array_equal(index.vectors(ids[:3]), moved[:3])
    assert index.remove(np.concatenate([ids[:4500], [10**9]])) == 4500  # compacts
    assert index.remove(ids[:10]) == 0
    assert len(index) == 1500 and 4500 in index and 3 not in index
    live_x, live_ids = x[4500:], ids[4500:]
    for q in (x[4600], x[5999], moved[0]):
        for r in (0.6, 0.9):
            assert set(index.search(q, r)[0].tolist()) == brute(live_x, live_ids, q, r)
    index.add(ids[:100], x[:100])  # ids come back after removal
    assert set(index.search(x[0], 0.9)[0].tolist()) == brute(
        np.concatenate([x[:100], live_x]), np.concatenate([ids[:100], live_ids]), x[0], 0.9
    )


@pytest.mark.parametrize("factory", sorted(IMPLEMENTATIONS))
def test_empty_and_invalid_input(factory: str) -> None:
    index = IMPLEMENTATIONS[factory]()
    got_ids, got_sims = index.search(np.ones(DIM, np.float32), 0.5)
    assert got_ids.shape == (0,) and got_sims.shape == (0,)
    assert index.remove(np.array([1, 2])) == 0 and len(index) == 0
    with pytest.raises(InvalidVectorError):
        index.add(np.array([1]), np.ones((1, DIM + 1), np.float32))
    with pytest.raises(InvalidVectorError):
        index.add(np.array([1]), np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(InvalidInputError):
        index.add(np.array([1, 1]), np.ones((2, DIM), np.float32))
    with pytest.raises(InvalidInputError):
        index.add(np.array([1.5]), np.ones((1, DIM), np.float32))
    with pytest.raises(InvalidVectorError):
        index.search(np.ones(DIM - 1, np.float32), 0.5)
    with pytest.raises(InvalidInputError):
        index.search(np.ones(DIM, np.float32), float("nan"))
    with pytest.raises(KeyError):
        index.vectors(np.array([42]))
    assert len(index) == 0


# ---------------------------------------------------------------------------- interleavings

SMALL_DIM = 8


class Interleavings(RuleBasedStateMachine):
    """Random adds, re-adds, removes and searches against the reference, on a tiny index that
    trains after 64 vectors, uses 40-slot segments and compacts often."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = RadiusIndex(SMALL_DIM, train_size=64, segment_size=40)
        self.fast._compact_min = 8  # compact early so compaction is exercised
        self.ref = NumpyRadiusIndex(SMALL_DIM)
        self.rng = np.random.default_rng(0)
        self.centres = unit(self.rng.standard_normal((4, SMALL_DIM)))

    def _vectors(self, n: int) -> np.ndarray:
        which = self.rng.integers(0, 4, n)
        return unit(self.centres[which] + 0.15 * self.rng.standard_normal((n, SMALL_DIM)))

    @rule(ids=st.lists(st.integers(0, 300), min_size=1, max_size=60, unique=True))
    def add(self, ids: list[int]) -> None:
        arr = np.array(ids, dtype=np.int64)
        rows = self._vectors(len(ids))
        self.fast.add(arr, rows)
        self.ref.add(arr, rows)

    @rule(ids=st.lists(st.integers(0, 300), max_size=80))
    def remove(self, ids: list[int]) -> None:
        arr = np.array(ids, dtype=np.int64)
        assert self.fast.remove(arr) == self.ref.remove(arr)

    @precondition(lambda self: len(self.ref) > 0)
    @rule(pick=st.integers(0, 10**6), radius=st.sampled_from([0.3, 0.7, 0.9, 0.99, 1.0]))
    def search(self, pick: int, radius: float) -> None:
        keys = list(self.ref._rows)
        q = self.ref._rows[keys[pick % len(keys)]]
        a, b = self.fast.search(q, radius), self.ref.search(q, radius)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])

    @invariant()
    def same_contents(self) -> None:
        assert len(self.fast) == len(self.ref)
        for i in list(self.ref._rows)[:5]:
            assert i in self.fast
            assert np.array_equal(self.fast.vectors([i])[0], self.ref._rows[i])


Interleavings.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestInterleavings = Interleavings.TestCase


def test_a_segment_with_few_live_rows_waits_to_train() -> None:
    """Found by TestInterleavings (this is its failing example, replayed): a segment past
    ``train_size`` whose rows were mostly re-added elsewhere had 14 live rows, fewer than the
    quantiser's 16 centroids, and FAISS refused to train it (a RuntimeError out of add). It is
    scanned directly until it has enough; contents and searches stay exact."""
    machine = Interleavings()
    batches = [[0], [0, *range(2, 14)], *([[0]] * 12), [0, 1], list(range(12))]
    for ids in batches:
        machine.add(ids)
        machine.same_contents()
    for pick in range(12):
        machine.search(pick, 0.5)
    machine.teardown()


def test_fast_scan_rounding_bound_holds_for_this_faiss() -> None:
    """The margin assumes FAISS's LUT quantisation (quantize_lut.cpp); check it on this build:
    every fast-scan score is within the computed rounding bound of the exact code score."""
    x = clustered(5000, seed=21)
    index = RadiusIndex(DIM, train_size=2000, segment_size=5000)
    index.add(np.arange(len(x)), x)
    (seg,) = index._segments.values()
    pq = seg.index.pq
    code_scores = pq.decode(pq.compute_codes(x)).astype(np.float64)
    rng = np.random.default_rng(22)
    for q in np.concatenate([x[:3], unit(rng.standard_normal((3, DIM)))]):
        lut = np.einsum("mkd,md->mk", seg.centroids, q.reshape(index._m, -1).astype(np.float64))
        spans = lut.max(axis=1) - lut.min(axis=1)
        step = max(spans.max() / 255.0, spans.sum() / 65535.0)
        low = lut.min(axis=1).sum()
        _, dist, rows = seg.index.range_search(q[None], float(low) + 2 * step)
        assert len(rows) > len(x) // 2
        err = np.abs(dist.astype(np.float64) - code_scores[rows] @ q.astype(np.float64))
        assert err.max() <= (index._m / 2.0) * step * 1.01 + 1e-5
