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

Vectors live in segments of at most ``segment_size`` rows, each with its own float32 rows,
its own quantiser (fitted to its first ``train_size`` rows, refitted when it is compacted) and
its own codes. Segments are searched in parallel threads (FAISS releases the GIL; a one-query
fast-scan search is single-threaded), each with the threshold of its own largest ``e_x``;
candidates are then filtered with their own ``e_x`` and re-checked in the same thread.

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

**Mutation.** ``add`` appends to the open segment (re-adding an id replaces it); a segment
holding fewer than ``train_size`` rows has no codes yet and is scanned directly (cheap at that
size). ``remove`` only marks rows dead and the scans skip them; a segment more than half dead
is rewritten with its live rows, its quantiser refitted and its rows re-encoded (so a removal
stalls for at most one segment's re-encode, and the cost is amortised O(1) per removal); an
empty segment is dropped; half-empty segments receive the next adds. A quantiser fitted to a
different distribution only loosens the bound (more candidates), never the exactness.

Memory per vector: the float32 copy (``4·dim`` bytes, needed for the exact re-check), the code
(``dim/4`` bytes), the FAISS list id (8), id, norm and ``e_x`` (16), plus the id map (a Python
dict, about 100 bytes): about 1.8 kB at dim 384, 1.15-1.2x the bare float32 matrix; the arrays
of the open segment grow by doubling, at most ``segment_size`` rows.

Thread-safe: every public method takes an internal lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import faiss
import numpy as np

from .errors import InvalidInputError, InvalidVectorError

_U32 = 2.0**-24  # unit roundoff of float32
PQ_CENTROIDS = 16  # per sub-quantiser: 4-bit codes (FastScan); k-means needs as many points
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


class _Segment:
    """Up to ``segment_size`` vectors with their own storage, quantiser and FAISS codes.

    Rows are addressed by offset; FAISS labels are offsets too. Removed rows stay (``alive``
    False) until the segment is compacted.
    """

    def __init__(self, dim: int, capacity: int) -> None:
        self.vecs = np.empty((capacity, dim), dtype=np.float32)
        self.ids = np.empty(capacity, dtype=np.int64)
        self.norms = np.empty(capacity, dtype=np.float32)
        self.errs = np.empty(capacity, dtype=np.float32)  # ||x - x̂||, rounded up
        self.alive = np.zeros(capacity, dtype=bool)
        self.used = 0
        self.live = 0
        self.index: Any = None  # faiss.IndexIVFPQFastScan, one list, no residual; or None
        self.centroids: np.ndarray | None = None  # (M, 16, sub_dim) of this segment's PQ
        self.max_err = 0.0

    def reserve(self, needed: int, limit: int) -> None:
        cap = len(self.ids)
        if needed <= cap:
            return
        new_cap = min(max(needed, cap * 2), max(limit, needed))
        for name in ("vecs", "ids", "norms", "errs", "alive"):
            old = getattr(self, name)
            new = np.zeros((new_cap, *old.shape[1:]), dtype=old.dtype)
            new[: self.used] = old[: self.used]
            setattr(self, name, new)

    def nbytes(self) -> int:
        arrays = self.vecs.nbytes + self.ids.nbytes + self.norms.nbytes + self.errs.nbytes
        codes = 0 if self.index is None else self.index.ntotal * (self.index.code_size + 8)
        return arrays + self.alive.nbytes + codes


class RadiusIndex:
    """Exact radius search: PQ fast-scan candidates with a safe margin, exact re-check.

    See the module docstring for the bound, the tie rule and the costs. ``search(q, radius)``
    returns the ids whose similarity (:func:`exact_similarities`) with ``q`` is ``>= radius``,
    highest similarity first.

    ``train_size``: a segment scans its float32 rows directly until it holds this many, then
    trains its own quantiser on them; ``segment_size``: rows per segment (the unit of parallel
    search and of compaction); ``threads``: search threads.
    """

    _compact_min = 1024  # never compact a segment for fewer dead rows than this

    def __init__(
        self,
        dim: int,
        *,
        train_size: int = 8192,
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
        self._segment_size = max(int(segment_size), 32)
        self._train_size = min(max(int(train_size), 32), self._segment_size)
        self._threads = max(int(threads), 1)
        self._seed = seed
        self._lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        self._segments: dict[int, _Segment] = {}
        self._next_segment = 0
        self._open: int | None = None  # the segment that receives adds
        self._where: dict[int, int] = {}  # id -> segment number << 32 | offset

    # ------------------------------------------------------------------ public API

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors under unique ids; an id already present is replaced."""
        ids = _as_ids(ids)
        rows = _as_rows(vectors, self.dim, len(ids))
        _check_unique(ids)
        if len(ids) == 0:
            return
        with self._lock:
            touched = self._kill(ids)
            done = 0
            while done < len(ids):
                seg_no, seg = self._open_segment()
                start = seg.used
                stop = min(self._segment_size, start + len(ids) - done)
                k = stop - start
                seg.reserve(stop, self._segment_size)
                chunk = rows[done : done + k]
                seg.vecs[start:stop] = chunk
                seg.ids[start:stop] = ids[done : done + k]
                seg.norms[start:stop] = np.linalg.norm(chunk, axis=1)
                seg.alive[start:stop] = True
                seg.used, seg.live = stop, seg.live + k
                base = seg_no << 32
                self._where.update(
                    zip(
                        ids[done : done + k].tolist(), range(base + start, base + stop), strict=True
                    )
                )
                self._encode(seg, start, stop)
                done += k
            self._maintain(touched)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ids (absent ones are ignored); returns how many were present."""
        ids = _as_ids(ids)
        with self._lock:
            before = len(self._where)
            self._maintain(self._kill(ids))
            return before - len(self._where)

    def search(self, query: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """Ids with similarity >= radius and their similarities (float32), best first."""
        q, r = _as_query(query, self.dim, radius)
        with self._lock:
            segs = [s for s in self._segments.values() if s.live]
            if not segs:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            qnorm = float(np.linalg.norm(q.astype(np.float64)))

            def one(seg: _Segment) -> tuple[np.ndarray, np.ndarray]:
                rows = self._candidates(seg, q, qnorm, r)
                pos, sims = select_within(seg.vecs[rows], q, r, seg.norms[rows])
                return seg.ids[rows[pos]], sims

            if self._threads > 1 and len(segs) > 1:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="radius")
                parts = list(self._pool.map(one, segs))
            else:
                parts = [one(s) for s in segs]
            return _order(
                np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            )

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, id: object) -> bool:
        return isinstance(id, int | np.integer) and int(id) in self._where

    def vectors(self, ids: Any) -> np.ndarray:
        """The stored float32 vectors of ``ids`` (KeyError for an id not present)."""
        ids = _as_ids(ids)
        with self._lock:
            out = np.empty((len(ids), self.dim), dtype=np.float32)
            for i, id_ in enumerate(ids.tolist()):
                try:
                    packed = self._where[id_]
                except KeyError:
                    raise KeyError(f"id not in the index: {id_}") from None
                out[i] = self._segments[packed >> 32].vecs[packed & 0xFFFFFFFF]
            return out

    def nbytes(self) -> int:
        """Bytes held by the arrays and FAISS codes (the id map, a dict, comes on top)."""
        with self._lock:
            return sum(seg.nbytes() for seg in self._segments.values())

    def close(self) -> None:
        """Stop the search threads (the index stays usable; they restart on demand)."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # ------------------------------------------------------------------ search internals

    def _candidates(self, seg: _Segment, q: np.ndarray, qnorm: float, r: float) -> np.ndarray:
        """Offsets in ``seg`` that may be within the radius: a superset of the true answer."""
        if seg.index is None:
            return np.flatnonzero(seg.alive[: seg.used])
        assert seg.centroids is not None
        lut = np.einsum("mkd,md->mk", seg.centroids, q.reshape(self._m, -1).astype(np.float64))
        mins = lut.min(axis=1)
        spans = lut.max(axis=1) - mins
        low, high = float(mins.sum()), float(mins.sum() + spans.sum())
        step = max(spans.max() / 255.0, spans.sum() / 65535.0)  # 1/a in quantize_lut.cpp
        rounding = (self._m / 2.0 + 1.0) * step * 1.01 + _FAISS_SLACK
        margin = 1e-3 + rounding  # distance kept from the edges of FAISS's uint16 scale
        threshold = r - qnorm * seg.max_err - rounding
        if threshold - low <= margin:
            # FAISS's integer threshold would fall below zero (and wrap): scan the segment.
            return np.flatnonzero(seg.alive[: seg.used])
        if threshold > high + margin:
            return np.zeros(0, dtype=np.int64)
        _, dist, rows = seg.index.range_search(q.reshape(1, -1), threshold)
        keep = seg.alive[rows]
        keep &= dist.astype(np.float64) + qnorm * seg.errs[rows] + rounding >= r
        return rows[keep]

    # ------------------------------------------------------------------ mutation internals

    def _open_segment(self) -> tuple[int, _Segment]:
        seg = self._segments.get(self._open) if self._open is not None else None
        if seg is None or seg.used >= self._segment_size:
            # refill a segment that compaction left half empty before opening a new one
            roomy = [n for n, s in self._segments.items() if s.used <= self._segment_size // 2]
            if roomy:
                self._open = min(roomy, key=lambda n: self._segments[n].used)
            else:
                self._open = self._next_segment
                self._next_segment += 1
                self._segments[self._open] = _Segment(self.dim, 1024)
        return self._open, self._segments[self._open]

    def _kill(self, ids: np.ndarray) -> set[int]:
        touched: set[int] = set()
        for id_ in ids.tolist():
            packed = self._where.pop(id_, None)
            if packed is not None:
                seg = self._segments[packed >> 32]
                seg.alive[packed & 0xFFFFFFFF] = False
                seg.live -= 1
                touched.add(packed >> 32)
        return touched

    def _maintain(self, touched: set[int]) -> None:
        """Drop emptied segments; compact those that are mostly dead."""
        for seg_no in touched:
            seg = self._segments[seg_no]
            dead = seg.used - seg.live
            if seg.live == 0:
                del self._segments[seg_no]
                if self._open == seg_no:
                    self._open = None
            elif dead > max(seg.used // 2, self._compact_min):
                self._compact(seg_no, seg)

    def _compact(self, seg_no: int, seg: _Segment) -> None:
        """Rewrite a segment with its live rows only, re-fit its quantiser and re-encode it."""
        keep = np.flatnonzero(seg.alive[: seg.used])
        fresh = _Segment(self.dim, len(keep))
        fresh.vecs[:] = seg.vecs[keep]
        fresh.ids[:] = seg.ids[keep]
        fresh.norms[:] = seg.norms[keep]
        fresh.alive[:] = True
        fresh.used = fresh.live = len(keep)
        self._segments[seg_no] = fresh
        base = seg_no << 32
        self._where.update(zip(fresh.ids.tolist(), range(base, base + len(keep)), strict=True))
        self._encode(fresh, 0, fresh.used)

    def _encode(self, seg: _Segment, start: int, stop: int) -> None:
        """Give rows [start, stop) codes; train the segment's quantiser when it is big enough."""
        if seg.index is None:
            # still small, or too few live rows for the quantiser's 16 centroids (rows replaced
            # or removed since): searched by a direct scan until it has enough
            if seg.used < self._train_size or seg.live < PQ_CENTROIDS:
                return
            start = 0
            small = False
            with _faiss_single_threaded():
                self._train(seg)
        else:
            small = stop - start < 4096
        with _faiss_single_threaded() if small else nullcontext():
            pq = seg.index.pq
            for i in range(start, stop, 65536):
                j = min(stop, i + 65536)
                rows = np.ascontiguousarray(seg.vecs[i:j])
                recon = pq.decode(pq.compute_codes(rows))
                err = np.linalg.norm((rows - recon).astype(np.float64), axis=1)
                seg.errs[i:j] = (err * (1 + 1e-4) + 1e-5).astype(np.float32)
                seg.index.add_with_ids(rows, np.arange(i, j, dtype=np.int64))
                seg.max_err = max(seg.max_err, float(seg.errs[i:j].max()))

    def _train(self, seg: _Segment) -> None:
        """Fit this segment's product quantiser to a sample of its live rows."""
        live = np.flatnonzero(seg.alive[: seg.used])
        rng = np.random.default_rng(self._seed)
        sample = live if len(live) <= 16384 else np.sort(rng.choice(live, 16384, replace=False))
        coarse = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQFastScan(
            coarse, self.dim, 1, self._m, 4, faiss.METRIC_INNER_PRODUCT
        )
        index.by_residual = False
        index.pq.cp.seed = self._seed
        index.pq.cp.min_points_per_centroid = 1  # 16 centroids need few points; no warnings
        index.pq.cp.niter = 15
        # thousands of tiny k-means steps: run single-threaded (see _faiss_single_threaded)
        index.train(np.ascontiguousarray(seg.vecs[sample]))
        index.nprobe = 1
        seg.index = index
        seg.centroids = faiss.vector_to_array(index.pq.centroids).reshape(
            self._m, PQ_CENTROIDS, -1
        )
        seg.max_err = 0.0
