"""Core benchmark: lookup latency with and without embedding, store throughput, disk per entry.

Run: ``.venv/bin/python evals/bench_core.py [--sizes 10000 100000]``. Prints figures; asserts
nothing. Stored entries carry synthetic unit vectors (embedding 100k prompts would take minutes
and does not change the index's work), loaded with ``store_many``; then lookups (and the shard
index's own searches) while the index catches up behind the load, 5,000 single stores at that
size, the fence and log-following cost, and lookups once the index has caught up. Lookups
"with embedding" embed real prompts with the real model. A plain FAISS flat search over the same
vectors runs in the same process for comparison. Last, the shard's graph is searched at several
``efSearch`` values, each with its recall of the neighbours above the similarity floor (exact
top-``k`` neighbours at or above ``--floor``, for queries spread from 0.88 to 1.0 similarity to
an entry) beside its latency: the cache's job is finding near-duplicates above the floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from semcache import SemanticCache
from semcache.embed import SentenceTransformerEmbedder


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000, q))


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near_queries(
    rng: np.random.Generator, base: np.ndarray, n: int, lo: float, hi: float
) -> np.ndarray:
    """``n`` queries, each at a similarity drawn from [lo, hi] to a random row of ``base``
    (a random direction added: in high dimension it is nearly orthogonal to the row)."""
    rows = base[rng.integers(0, len(base), n)]
    sims = rng.uniform(lo, hi, n)
    scale = np.sqrt(1.0 / sims**2 - 1.0).astype(np.float32)
    q = rows + unit(rng, n, base.shape[1]) * scale[:, None]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def pending(cache: SemanticCache) -> int:
    return sum(getattr(index, "pending", 0) for _, index in cache.shards.items())


def ef_sweep(index: Any, queries: np.ndarray, floor: float, k: int) -> None:
    """Recall of the exact top-``k`` neighbours at or above ``floor``, and the index's search
    latency, at several ``efSearch`` values of the shard's (fully merged) graph."""
    ids = index.ids()
    exact = faiss.IndexFlatIP(index.dim)
    exact.add(index.vectors(ids))
    gt_sims, gt_rows = exact.search(queries, k)
    want = [
        set(ids[rows[sims >= floor]].tolist()) for sims, rows in zip(gt_sims, gt_rows, strict=True)
    ]
    total = sum(len(w) for w in want)
    print(
        f"efSearch sweep, {len(queries)} queries at similarity 0.88-1.0 to an entry "
        f"({total} neighbours >= {floor} among the exact top {k}):"
    )
    saved = index.ef_search
    try:
        for ef in (16, 24, 32, 48, 64, 96, 128):
            index.ef_search = ef
            lat, found = [], 0
            for q, wanted in zip(queries, want, strict=True):
                t = time.perf_counter()
                _, got = index.search(q, k)
                lat.append(time.perf_counter() - t)
                found += len(wanted & set(got.tolist()))
            print(
                f"  efSearch {ef:3d}{' (default)' if ef == saved else '          '}: recall "
                f"{found / max(total, 1):.2%} ({total - found} missed)  index search "
                f"p50 {pct(lat, 50):.3f} ms  p99 {pct(lat, 99):.3f} ms"
            )
    finally:
        index.ef_search = saved


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def realistic(rng: np.random.Generator, path: Path, n: int) -> np.ndarray:
    """Real all-MiniLM-L6-v2 sentence embeddings (an .npy file), cycled to ``n`` rows with
    small noise and renormalised: the clustered structure of real prompts, at any size."""
    real = np.load(path).astype(np.float32)
    rows = real[np.arange(n) % len(real)]
    noisy = rows + rng.uniform(0.005, 0.03, (n, 1)).astype(np.float32) * rng.standard_normal(
        rows.shape
    ).astype(np.float32)
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def bench(
    size: int,
    embedder: SentenceTransformerEmbedder,
    queries: int,
    real: Path | None,
    floor: float,
) -> None:
    rng = np.random.default_rng(size)
    dim = embedder.dim
    vectors = unit(rng, size, dim) if real is None else realistic(rng, real, size)
    tmp = Path(tempfile.mkdtemp(prefix="semcache-bench-"))
    try:
        cache = SemanticCache(tmp, embedder=embedder, threshold=0.9, checkpoint_every=10**9)
        answer = "x" * 850  # answers of about 850 characters, as in the disk comparison
        t0 = time.perf_counter()
        cache.store_many([(f"synthetic prompt {i}", answer) for i in range(size)], vectors=vectors)
        bulk_s = time.perf_counter() - t0
        # lookups, and the shard index's own searches, while the background merger moves the
        # recent segment into the graph
        shard_index = next(index for _, index in cache.shards.items())
        behind = pending(cache)
        probe = near_queries(rng, vectors, 400, 0.88, 1.0)
        catchup_lat: list[float] = []
        index_lat: list[float] = []
        j = 0
        while pending(cache):  # paced, so the samples span the whole catch-up
            q = probe[j % len(probe)]
            t = time.perf_counter()
            cache.lookup(f"catch-up query {j}", vector=q)
            catchup_lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            shard_index.search(q, cache.k)
            index_lat.append(time.perf_counter() - t)
            j += 1
            time.sleep(0.05)
        ready_s = time.perf_counter() - t0
        extra = unit(rng, 5000, dim)
        t0 = time.perf_counter()
        for i in range(len(extra)):
            cache.store(f"single prompt {i}", answer, vector=extra[i])
        store_s = time.perf_counter() - t0
        while pending(cache):
            time.sleep(0.05)
        # the same from 16 threads: concurrent writers share a commit (group commit)
        threaded = unit(rng, 8000, dim)
        batches0, requests0 = cache.writer.group.batches, cache.writer.group.requests

        def writer(t: int) -> None:
            for i in range(t, len(threaded), 16):
                cache.store(f"threaded prompt {i}", answer, vector=threaded[i])

        workers = [threading.Thread(target=writer, args=(t,)) for t in range(16)]
        t0 = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        threaded_s = time.perf_counter() - t0
        group = cache.writer.group
        mean_batch = (group.requests - requests0) / max(1, group.batches - batches0)
        while pending(cache):
            time.sleep(0.05)
        t0 = time.perf_counter()
        cache.checkpoint()
        checkpoint_s = time.perf_counter() - t0
        disk = folder_bytes(tmp)
        entries = size + len(extra) + len(threaded)
        position_lat, sync_lat = [], []
        for _ in range(2000):
            t = time.perf_counter()
            cache.position()
            position_lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            cache.replica.sync()
            sync_lat.append(time.perf_counter() - t)

        # queries: half near an entry (hits), half random (misses)
        picks = rng.integers(0, size, queries)
        noise = unit(rng, queries, dim) * 0.15
        near = vectors[picks] + noise
        near /= np.linalg.norm(near, axis=1, keepdims=True)
        misses = unit(rng, queries, dim)
        qs = np.concatenate([near, misses])
        lat: list[float] = []
        hits = 0
        for j, q in enumerate(qs):
            t = time.perf_counter()
            hit = cache.lookup(f"query text {j}", vector=q)
            lat.append(time.perf_counter() - t)
            hits += hit is not None

        flat = faiss.IndexFlatIP(dim)
        flat.add(vectors)
        flat_lat = []
        for q in qs:
            t = time.perf_counter()
            flat.search(q[None], 4)
            flat_lat.append(time.perf_counter() - t)

        texts = [
            f"How do I reset the password of account {j} on device {j % 13}?" for j in range(200)
        ]
        embed_lat, full_lat = [], []
        for text in texts:
            t = time.perf_counter()
            embedder.embed([text])
            embed_lat.append(time.perf_counter() - t)
        for text in texts:
            t = time.perf_counter()
            cache.lookup(text + " please")
            full_lat.append(time.perf_counter() - t)

        kind = next(index for _, index in cache.shards.items())
        label = "random unit vectors" if real is None else f"real embeddings from {real.name}"
        print(f"\n== {size:,} entries, {label} (index: {getattr(kind, 'kind', '?')})")
        print(
            f"store_many (vectors given) into the store of record: {size / bulk_s:,.0f} rows/s "
            f"({bulk_s:.1f} s); index caught up (ready to serve from the graph) after "
            f"{ready_s:.1f} s"
        )
        if catchup_lat:
            print(
                f"while the index caught up ({behind:,} vectors behind the load): lookup excl. "
                f"embedding p50 {pct(catchup_lat, 50):.3f} ms  p99 {pct(catchup_lat, 99):.3f} ms"
                f" ({len(catchup_lat)} lookups); the shard index's search alone p50 "
                f"{pct(index_lat, 50):.3f} ms  p99 {pct(index_lat, 99):.3f} ms"
            )
        print(
            f"single store() (vector given, excl. embedding) at {size:,}: "
            f"{len(extra) / store_s:,.0f} stores/s; from 16 threads: "
            f"{len(threaded) / threaded_s:,.0f} stores/s (mean commit batch {mean_batch:.1f}); "
            f"checkpoint {checkpoint_s:.2f} s"
        )
        beyond = (disk - entries * len(answer)) / entries
        print(
            f"disk while open: {disk / entries:,.0f} bytes/entry, {beyond:,.0f} beyond the "
            f"{len(answer)}-character answer ({disk / 2**20:.1f} MiB)"
        )
        print(
            f"fence position: p50 {pct(position_lat, 50) * 1000:.1f} us; log check with nothing "
            f"new: p50 {pct(sync_lat, 50) * 1000:.1f} us"
        )
        print(
            f"lookup excl. embedding: p50 {pct(lat, 50):.3f} ms  p99 {pct(lat, 99):.3f} ms  "
            f"({hits}/{len(qs)} hits)"
        )
        for label, samples in (
            ("plain FAISS flat k=4:  ", flat_lat),
            ("embedding alone:       ", embed_lat),
            ("lookup incl. embedding:", full_lat),
        ):
            print(f"{label} p50 {pct(samples, 50):.3f} ms  p99 {pct(samples, 99):.3f} ms")
        print(
            f"lookup path added to embedding: p50 "
            f"{statistics.median(full_lat) * 1000 - statistics.median(embed_lat) * 1000:.3f} ms"
        )
        if getattr(shard_index, "kind", "") == "hnsw":
            ef_sweep(shard_index, near_queries(rng, vectors, queries, 0.88, 1.0), floor, cache.k)
        cache.close()
        closed = folder_bytes(tmp)
        print(
            f"disk once closed (the WAL copied into the database): {closed / entries:,.0f} "
            f"bytes/entry, {(closed - entries * len(answer)) / entries:,.0f} beyond the answer"
        )
        t0 = time.perf_counter()
        SemanticCache(tmp, embedder=embedder).close()
        print(f"reopen (load persisted index): {time.perf_counter() - t0:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_store_many(embedder: SentenceTransformerEmbedder, n: int = 2000) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="semcache-bench-"))
    try:
        with SemanticCache(tmp, embedder=embedder) as cache:
            items = [
                (f"What is the best way to learn topic number {i}?", f"a{i}") for i in range(n)
            ]
            t0 = time.perf_counter()
            cache.store_many(items)
            dt = time.perf_counter() - t0
        print(f"\nstore_many incl. real embedding: {n / dt:,.0f} stores/s ({n} prompts)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument(
        "--real", type=Path, default=None,
        help="an .npy of real sentence embeddings to build realistic vectors from",
    )  # fmt: skip
    parser.add_argument(
        "--floor", type=float, default=0.9,
        help="the similarity floor whose neighbours the efSearch sweep's recall counts",
    )  # fmt: skip
    args = parser.parse_args()
    embedder = SentenceTransformerEmbedder()
    print(f"faiss threads: {faiss.omp_get_max_threads()}, cpu count: {os.cpu_count()}")
    for size in args.sizes:
        bench(size, embedder, args.queries, args.real, args.floor)
    bench_store_many(embedder)


if __name__ == "__main__":
    main()
