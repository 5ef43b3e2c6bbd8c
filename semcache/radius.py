"""Exact radius (range) search over a mutable set of vectors, for semantic invalidation.

``cache.invalidate_similar(text_or_vector, radius)`` must remove *every* entry whose similarity
to the query is at least ``radius`` -- not most of them, as an approximate nearest-neighbour
index would. :class:`RadiusIndex` answers that question exactly, several times faster than a
brute-force scan, by pairing compressed codes with a proof that nothing is missed:

1. **Candidates from 4-bit product-quantisation codes** (FAISS fast-scan, AVX2 kernels): each
   stored vector ``x`` has a code ``x̂`` (``M = dim/2`` sub-quantisers of 16 centroids, so
   ``dim/4`` bytes a vector) and a stored residual norm ``e_x = ||x - x̂||``. By Cauchy-Schwarz
   ``|q·x - q·x̂| <= ||q||·e_x``, so every ``x`` with ``q·x >= radius`` has
   ``q·x̂ >= radius - ||q||·e_x``: scanning the codes with that lowered threshold has no false
   negatives. The scan itself computes ``q·x̂`` from look-up tables quantised to uint8; FAISS
   rounds each entry to the nearest step of ``1/a`` (``a = min(255/max_span, 65535/sum_span)``
   over the per-sub-quantiser spans of the table, see ``faiss/utils/quantize_lut.cpp``), so the
   scan's value is within ``M/2·(1/a)`` of ``q·x̂``; its integer threshold is truncated, worth
   one more step. We compute the tables ourselves, take that bound with a 1% margin plus an
   absolute slack for float32 rounding, and lower the threshold by it too.
2. **Exact re-check** of the candidates against the stored float32 vectors (below).

Codes live in segments of at most ``segment_size`` slots; the segments are scanned in parallel
threads (FAISS releases the GIL; a one-query fast-scan search is single-threaded), each with the
threshold of its own largest ``e_x``; candidates are then filtered with their own ``e_x``.

**What "exact" means (the tie rule).** A float32 BLAS dot product rounds differently depending
on where the row sits in the matrix (OpenBLAS's kernels block rows), so ``(X @ q)[i]`` and
``X[[i]] @ q`` can differ in the last bit, and no index can promise to match an arbitrary float32
scan bit for bit. The similarity is therefore *defined* by :func:`exact_similarities`: the
float32 components are multiplied in float64 (each product is exact) and summed per row in
float64 by NumPy's pairwise summation, whose order depends only on the row itself; the result
is within about 1e-13 of the real inner product. A vector matches iff that value
``>= float(radius)`` (ties included). :func:`select_within` computes it cheaply for many rows:
a float32 BLAS pass whose error is provably below ``2·dim·2^-24·||x||·||q||`` discards the rows
that are clearly out, and only the rest are recomputed in float64. :class:`NumpyRadiusIndex`,
the brute-force reference of the contract test, uses the same function, so both return the same
set bit for bit. Against a plain float32 ``X @ q >= radius`` scan the sets can only differ for
vectors whose similarity is within ~1e-6 of ``radius``.

**Mutation.** ``add`` appends (re-adding an id replaces it); ``remove`` only marks slots dead
and the scans skip them; when dead slots exceed a quarter of all slots the storage is compacted
in place and the segments are rebuilt (amortised O(1) per removal). Until ``train_size`` live
vectors exist there are no codes and searches scan the float32 vectors directly (at that size a
scan is already fast); the quantiser is trained once then, and retrained at a compaction when
the live set has grown eight-fold since, because a quantiser fitted to a different distribution
makes the bound looser (more candidates), never wrong.

Memory per vector: the float32 copy (``4·dim`` bytes, needed for the exact re-check) plus the
code (``dim/4`` bytes), the FAISS list id (8), id, norm and ``e_x`` (16) and the id map (a
Python dict, about 100 bytes): about 1.9 kB at dim 384, 1.2x the bare float32 matrix.

Not safe for concurrent mutation by itself: every public method takes an internal lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .errors import InvalidInputError, InvalidVectorError

_U32 = 2.0**-24  # unit roundoff of float32
_FAISS_SLACK = 2e-4  # absolute slack for float32 rounding inside FAISS (tables, sums, biases)
_EXACT_CHUNK = 4096  # rows per float64 block in exact_similarities (bounds temporary memory)


_OMP_LOCK = threading.Lock()
_OMP_DEPTH = 0
_OMP_SAVED = 1


@contextmanager
def _faiss_single_threaded() -> Iterator[None]:
    """Run FAISS calls inside with one OpenMP thread, then restore the previous setting.

    For small or fine-grained work (encoding a few vectors, k-means on 16 centroids) OpenMP's
    fork/join costs more than the work, and on a box whose cores are shared it costs
    milliseconds per region: adding one vector measured 10-17 ms with two threads and 0.5 ms
    with one on this 2-core machine under load. The setting is process-global, so nested and
    concurrent users are counted and the last one out restores it.
    """
    global _OMP_DEPTH, _OMP_SAVED
    with _OMP_LOCK:
        if _OMP_DEPTH == 0:
            _OMP_SAVED = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
        _OMP_DEPTH += 1
    try:
        yield
    finally:
        with _OMP_LOCK:
            _OMP_DEPTH -= 1
            if _OMP_DEPTH == 0:
                faiss.omp_set_num_threads(_OMP_SAVED)


def exact_similarities(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The canonical similarity of each row of ``vectors`` with ``query``, as float64.

    Products of float32 numbers are exact in float64; each row is summed by NumPy's pairwise
    float64 summation, which depends only on that row, so a row gets the same bits whatever
    batch it is computed in. Error against the real inner product: < 1e-13 for unit vectors.
    """
    rows = np.asarray(vectors, dtype=np.float32)
    q64 = np.asarray(query, dtype=np.float32).astype(np.float64)
    out = np.empty(len(rows), dtype=np.float64)
    for i in range(0, len(rows), _EXACT_CHUNK):
        block = rows[i : i + _EXACT_CHUNK].astype(np.float64)
        block *= q64
        out[i : i + len(block)] = block.sum(axis=1)
    return out


def _f32_dot_error_factor(dim: int) -> float:
    """Bound factor c with |fl32(x·q) - x·q| <= c·||x||·||q|| for any summation order.

    The classical bound is gamma_dim = dim·u/(1 - dim·u) times sum|x_i q_i| <= ||x||·||q||;
    doubled for margin (and for kernels that round a product before adding it).
    """
    nu = dim * _U32
    return 2.0 * nu / (1.0 - nu) + 1e-12


def select_within(
    vectors: np.ndarray,
    query: np.ndarray,
    radius: float,
    norms: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``vectors`` whose :func:`exact_similarities` value is ``>= radius``.

    Returns (row positions, float64 similarities). ``norms`` are the rows' L2 norms if known
    (otherwise computed); they size the float32 pre-filter's error margin.
    """
    rows = np.asarray(vectors, dtype=np.float32)
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    q = np.asarray(query, dtype=np.float32)
    qnorm = float(np.linalg.norm(q.astype(np.float64)))
    if norms is None:
        norms = np.linalg.norm(rows, axis=1)
    tol = (_f32_dot_error_factor(rows.shape[1]) * qnorm) * (norms.astype(np.float64) * 1.000001)
    approx = rows @ q
    maybe = np.flatnonzero(approx >= radius - tol)
    if len(maybe) == 0:
        return maybe.astype(np.int64), np.zeros(0, dtype=np.float64)
    sims = exact_similarities(rows[maybe], q)
    keep = sims >= radius
    return maybe[keep].astype(np.int64), sims[keep]


def _order(ids: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort results by similarity, highest first, ties by id: both indexes return one order."""
    order = np.lexsort((ids, -sims))
    return ids[order].astype(np.int64), sims[order].astype(np.float32)


def _as_ids(ids: Any) -> np.ndarray:
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"ids must be integers: {exc}") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInputError(f"ids must be a 1-D array of integers, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _as_rows(vectors: Any, dim: int, n: int) -> np.ndarray:
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidVectorError(f"not a numeric vector array: {exc}") from None
    if arr.ndim == 1 and n == 1:
        arr = arr.reshape(1, -1)
    if arr.shape != (n, dim):
        raise InvalidVectorError(f"expected vectors of shape ({n}, {dim}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidVectorError("vectors contain NaN or infinite values")
    return np.ascontiguousarray(arr)


def _as_query(query: Any, dim: int, radius: Any) -> tuple[np.ndarray, float]:
    try:
        q = np.asarray(query, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidVectorError(f"not a numeric vector: {exc}") from None
    if q.ndim == 2 and q.shape[0] == 1:
        q = q[0]
    if q.shape != (dim,):
        raise InvalidVectorError(f"expected a query of shape ({dim},), got {q.shape}")
    if not np.isfinite(q).all():
        raise InvalidVectorError("query contains NaN or infinite values")
    try:
        r = float(radius)
    except (TypeError, ValueError):
        raise InvalidInputError(f"radius must be a number, got {radius!r}") from None
    if math.isnan(r):
        raise InvalidInputError("radius must not be NaN")
    return np.ascontiguousarray(q), r


def _check_unique(ids: np.ndarray) -> None:
    if len(np.unique(ids)) != len(ids):
        raise InvalidInputError("ids passed to one add() call must be unique")


class NumpyRadiusIndex:
    """The brute-force reference: a dict of vectors and a full exact scan per search.

    Same contract and same similarity definition as :class:`RadiusIndex`; used by the contract
    test and as the obviously-correct baseline.
    """

    def __init__(self, dim: int) -> None:
        if int(dim) <= 0:
            raise InvalidInputError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self._rows: dict[int, np.ndarray] = {}

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = _as_ids(ids)
        rows = _as_rows(vectors, self.dim, len(ids))
        _check_unique(ids)
        for i, row in zip(ids.tolist(), rows, strict=True):
            self._rows[i] = row.copy()

    def remove(self, ids: np.ndarray) -> int:
        return sum(self._rows.pop(i, None) is not None for i in _as_ids(ids).tolist())

    def search(self, query: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        q, r = _as_query(query, self.dim, radius)
        if not self._rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        ids = np.fromiter(self._rows.keys(), dtype=np.int64, count=len(self._rows))
        rows = np.stack(list(self._rows.values()))
        pos, sims = select_within(rows, q, r)
        return _order(ids[pos], sims)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, id: object) -> bool:
        return isinstance(id, int | np.integer) and int(id) in self._rows

    def vectors(self, ids: Any) -> np.ndarray:
        out = [self._rows.get(i) for i in _as_ids(ids).tolist()]
        missing = [i for i, row in zip(_as_ids(ids).tolist(), out, strict=True) if row is None]
        if missing:
            raise KeyError(f"ids not in the index: {missing[:5]}")
        return np.stack(out) if out else np.zeros((0, self.dim), dtype=np.float32)


@dataclass
class _Segment:
    """A FAISS fast-scan index over the slots [start, stop); its labels are slot numbers."""

    start: int
    stop: int
    index: Any  # faiss.IndexIVFPQFastScan with one list and no residual
    max_err: float


class RadiusIndex:
    """Exact radius search: PQ fast-scan candidates with a safe margin, exact re-check.

    See the module docstring for the bound, the tie rule and the costs. ``search(q, radius)``
    returns the ids whose similarity (:func:`exact_similarities`) with ``q`` is ``>= radius``,
    highest similarity first.
    """

    _compact_min = 1024  # never compact for fewer dead slots than this

    def __init__(
        self,
        dim: int,
        *,
        train_size: int = 32768,
        segment_size: int = 131072,
        threads: int = 2,
        sub_dim: int = 2,
        seed: int = 1234,
    ) -> None:
        dim = int(dim)
        if dim <= 0 or dim % sub_dim:
            raise InvalidInputError(f"dim must be a positive multiple of {sub_dim}, got {dim}")
        self.dim = dim
        self._m = dim // sub_dim  # number of 4-bit sub-quantisers
        self._train_size = max(int(train_size), 32)
        self._segment_size = max(int(segment_size), 32)
        self._threads = max(int(threads), 1)
        self._seed = seed
        self._lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        cap = 1024
        self._vecs = np.empty((cap, dim), dtype=np.float32)
        self._ids = np.empty(cap, dtype=np.int64)
        self._norms = np.empty(cap, dtype=np.float32)
        self._errs = np.empty(cap, dtype=np.float32)  # PQ residual norm (upper bound)
        self._alive = np.zeros(cap, dtype=bool)
        self._used = 0  # slots [0, _used) hold data, alive or dead
        self._slot: dict[int, int] = {}
        self._template: Any = None  # trained empty fast-scan index, cloned per segment
        self._centroids: np.ndarray | None = None  # (M, 16, sub_dim)
        self._trained_at = 0
        self._segments: list[_Segment] = []

    # ------------------------------------------------------------------ public API

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors under unique ids; an id already present is replaced."""
        ids = _as_ids(ids)
        rows = _as_rows(vectors, self.dim, len(ids))
        _check_unique(ids)
        if len(ids) == 0:
            return
        with self._lock:
            self._kill(ids)
            start = self._used
            self._reserve(start + len(ids))
            stop = start + len(ids)
            self._vecs[start:stop] = rows
            self._ids[start:stop] = ids
            self._norms[start:stop] = np.linalg.norm(rows, axis=1)
            self._alive[start:stop] = True
            self._used = stop
            self._slot.update(zip(ids.tolist(), range(start, stop), strict=True))
            if self._template is None:
                if len(self._slot) >= self._train_size:
                    self._train()
                    self._rebuild_segments()
            else:
                self._append_to_segments(start, stop)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (absent ones are ignored); returns how many were present."""
        ids = _as_ids(ids)
        with self._lock:
            removed = self._kill(ids)
            dead = self._used - len(self._slot)
            if dead > max(self._used // 4, self._compact_min):
                self._compact()
            return removed

    def search(self, query: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """Ids with similarity >= radius and their similarities (float32), best first."""
        q, r = _as_query(query, self.dim, radius)
        with self._lock:
            if not self._slot:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            if self._template is None:
                slots = self._scan_slots(0, self._used)
            else:
                slots = self._candidates(q, r)
            pos, sims = select_within(self._vecs[slots], q, r, self._norms[slots])
            return _order(self._ids[slots[pos]], sims)

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, id: object) -> bool:
        return isinstance(id, int | np.integer) and int(id) in self._slot

    def vectors(self, ids: Any) -> np.ndarray:
        """The stored float32 vectors of ``ids`` (KeyError for an id not present)."""
        ids = _as_ids(ids)
        with self._lock:
            try:
                slots = np.fromiter((self._slot[i] for i in ids.tolist()), np.int64, len(ids))
            except KeyError as exc:
                raise KeyError(f"id not in the index: {exc.args[0]}") from None
            return self._vecs[slots].copy()

    def close(self) -> None:
        """Stop the search threads (the index stays usable; they restart on demand)."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __getstate__(self) -> dict[str, Any]:  # pragma: no cover - guard, not a feature
        raise TypeError("RadiusIndex is an in-memory structure; rebuild it from the store")

    # ------------------------------------------------------------------ search internals

    def _scan_slots(self, start: int, stop: int) -> np.ndarray:
        """Every live slot in [start, stop) as candidates (exact filtering happens later)."""
        return start + np.flatnonzero(self._alive[start:stop])

    def _lut_bounds(self, q: np.ndarray) -> tuple[float, float, float]:
        """(lowest achievable code score, highest, fast-scan rounding bound) for query q."""
        assert self._centroids is not None
        lut = np.einsum("mkd,md->mk", self._centroids, q.reshape(self._m, -1).astype(np.float64))
        mins = lut.min(axis=1)
        spans = lut.max(axis=1) - mins
        step = max(spans.max() / 255.0, spans.sum() / 65535.0)  # 1/a in quantize_lut.cpp
        rounding = (self._m / 2.0 + 1.0) * step * 1.01 + _FAISS_SLACK
        return float(mins.sum()), float(mins.sum() + spans.sum()), rounding

    def _candidates(self, q: np.ndarray, r: float) -> np.ndarray:
        qnorm = float(np.linalg.norm(q.astype(np.float64)))
        low, high, rounding = self._lut_bounds(q)
        margin = 1e-3 + rounding  # distance kept from FAISS's uint16 threshold's edges

        def one(seg: _Segment) -> np.ndarray:
            threshold = r - qnorm * seg.max_err - rounding
            if threshold - low <= margin:
                # the threshold would reach the bottom of FAISS's uint16 scale (and wrap):
                # every vector of the segment is a candidate.
                return self._scan_slots(seg.start, seg.stop)
            if threshold > high + margin:
                return np.zeros(0, dtype=np.int64)
            _, dist, slots = seg.index.range_search(q.reshape(1, -1), threshold)
            keep = self._alive[slots]
            keep &= dist.astype(np.float64) + qnorm * self._errs[slots] + rounding >= r
            return slots[keep]

        segs = self._segments
        if self._threads > 1 and len(segs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="radius")
            parts = list(self._pool.map(one, segs))
        else:
            parts = [one(s) for s in segs]
        covered = segs[-1].stop if segs else 0
        if covered < self._used:  # pragma: no cover - segments always cover every slot
            parts.append(self._scan_slots(covered, self._used))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ mutation internals

    def _kill(self, ids: np.ndarray) -> int:
        slots = [s for s in (self._slot.pop(i, None) for i in ids.tolist()) if s is not None]
        if slots:
            self._alive[np.asarray(slots, dtype=np.int64)] = False
        return len(slots)

    def _reserve(self, needed: int) -> None:
        cap = len(self._ids)
        if needed <= cap:
            return
        new_cap = max(needed, cap * 2)
        vecs = np.empty((new_cap, self.dim), dtype=np.float32)
        vecs[: self._used] = self._vecs[: self._used]
        self._vecs = vecs
        for name in ("_ids", "_norms", "_errs", "_alive"):
            old = getattr(self, name)
            new = np.zeros(new_cap, dtype=old.dtype)
            new[: self._used] = old[: self._used]
            setattr(self, name, new)

    def _train(self) -> None:
        live = np.flatnonzero(self._alive[: self._used])
        rng = np.random.default_rng(self._seed)
        sample = live if len(live) <= 16384 else rng.choice(live, 16384, replace=False)
        coarse = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQFastScan(
            coarse, self.dim, 1, self._m, 4, faiss.METRIC_INNER_PRODUCT
        )
        index.by_residual = False
        index.pq.cp.seed = self._seed
        index.pq.cp.min_points_per_centroid = 1  # 16 centroids need few points; no warnings
        index.pq.cp.niter = 15
        # thousands of tiny k-means steps: OpenMP's barriers only cost time here, and a lot of
        # it when the cores are shared (measured 7x slower with 2 threads on a loaded box).
        with _faiss_single_threaded():
            index.train(np.ascontiguousarray(self._vecs[np.sort(sample)]))
        index.nprobe = 1
        self._template = index
        self._centroids = faiss.vector_to_array(index.pq.centroids).reshape(self._m, 16, -1)
        self._trained_at = len(live)

    def _encode_errors(self, start: int, stop: int) -> None:
        """Residual norms ||x - x̂|| for slots [start, stop), rounded up for float error."""
        pq = self._template.pq
        for i in range(start, stop, 65536):
            j = min(stop, i + 65536)
            rows = self._vecs[i:j]
            recon = pq.decode(pq.compute_codes(rows))
            err = np.linalg.norm((rows - recon).astype(np.float64), axis=1)
            self._errs[i:j] = (err * (1 + 1e-4) + 1e-5).astype(np.float32)

    def _new_segment(self, start: int) -> _Segment:
        return _Segment(start, start, faiss.clone_index(self._template), 0.0)

    def _append_to_segments(self, start: int, stop: int) -> None:
        """Encode slots [start, stop) into the open segment, opening new ones when full."""
        small = stop - start < 4096
        with _faiss_single_threaded() if small else nullcontext():
            self._append_encoded(start, stop)

    def _append_encoded(self, start: int, stop: int) -> None:
        self._encode_errors(start, stop)
        pos = start
        while pos < stop:
            if not self._segments or self._segments[-1].stop - self._segments[-1].start >= (
                self._segment_size
            ):
                self._segments.append(self._new_segment(pos))
            seg = self._segments[-1]
            end = min(stop, seg.start + self._segment_size)
            seg.index.add_with_ids(
                np.ascontiguousarray(self._vecs[pos:end]), np.arange(pos, end, dtype=np.int64)
            )
            seg.max_err = max(seg.max_err, float(self._errs[pos:end].max()))
            seg.stop = end
            pos = end

    def _rebuild_segments(self) -> None:
        self._segments = []
        if self._used:
            self._append_to_segments(0, self._used)

    def _compact(self) -> None:
        """Move live slots to the front (in place, stable) and rebuild the code segments."""
        write = 0
        chunk = 65536
        for start in range(0, self._used, chunk):
            stop = min(self._used, start + chunk)
            live = start + np.flatnonzero(self._alive[start:stop])
            k = len(live)
            if k and not (live[0] == write and live[-1] == write + k - 1):
                # every source row is at or after its destination: copy via a temporary
                self._vecs[write : write + k] = self._vecs[live]
                self._ids[write : write + k] = self._ids[live]
                self._norms[write : write + k] = self._norms[live]
            write += k
        self._used = write
        self._alive[:write] = True
        self._alive[write:] = False
        self._slot = dict(zip(self._ids[:write].tolist(), range(write), strict=True))
        if self._template is not None and len(self._slot) >= 8 * self._trained_at:
            self._train()
        if self._template is None and len(self._slot) >= self._train_size:
            self._train()
        if self._template is not None:
            self._rebuild_segments()
