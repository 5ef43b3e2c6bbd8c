"""Bulk load: N entries with their vectors into a fresh cache, and how long until it serves.

Run: ``.venv/bin/python evals/bench_load.py [--n 1000000]``. Prints figures; asserts nothing.
Two times are printed: when ``store_many`` returned (every entry acknowledged, committed to the
store of record and searchable, through the recent-writes segment while the graph catches up)
and when the background merger had moved every vector into the HNSW graph (lookups at their
steady-state cost). Vectors are random unit vectors (the graph's work does not depend on where
they came from); answers are 850 characters, as in the issue's disk comparison.

Random vectors are the graph's worst case: with no structure, each insertion's search wanders
(a 1M graph of them took 602 s here, one of real sentence embeddings 251-256 s).
``--real FILE.npy`` loads real all-MiniLM-L6-v2 embeddings instead (``evals/real_vectors.py``
makes the file from the labelled pair sets), cycled to ``--n`` rows with small noise as
``evals/bench_core.py`` does: each sentence then appears ``n / len(file)`` times, as
near-duplicates at similarity 0.86-0.995, which is a cache's traffic at its most repetitive.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from semcache import SemanticCache


class _NoModel:
    """Vectors are given: an embedder that is never called (loading the model is not timed)."""

    model_id = "bench:given-vectors"
    dim = 384

    def embed(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - never called
        raise AssertionError("vectors are given")


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, 384)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--real", type=Path, default=None, help="real embeddings (.npy)")
    args = parser.parse_args()
    real = None if args.real is None else np.load(args.real).astype(np.float32)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="semcache-load-"))
    answer = "x" * 850
    try:
        cache = SemanticCache(tmp, embedder=_NoModel(), threshold=0.9)
        t0 = time.perf_counter()
        for start in range(0, args.n, args.batch):
            n = min(args.batch, args.n - start)
            if real is None:
                v = _unit(rng, n)
            else:  # as evals/bench_core.py's realistic(): real rows, small noise
                v = real[np.arange(start, start + n) % len(real)]
                v = v + rng.uniform(0.005, 0.03, (n, 1)).astype(np.float32) * rng.standard_normal(
                    v.shape
                ).astype(np.float32)
                v /= np.linalg.norm(v, axis=1, keepdims=True)
            cache.store_many([(f"prompt {start + i}", answer) for i in range(n)], vectors=v)
            print(f"  {start + n:,} stored after {time.perf_counter() - t0:.1f} s", flush=True)
        stored = time.perf_counter() - t0
        last = 0.0
        while pending := sum(getattr(index, "pending", 0) for _, index in cache.shards.items()):
            if time.perf_counter() - last >= 30:
                last = time.perf_counter()
                print(f"  {pending:,} not in the graph yet at {last - t0:.0f} s", flush=True)
            time.sleep(0.5)
        ready = time.perf_counter() - t0
        # 1,000 distinct queries: half near an entry of the last batch, half random
        near = v[rng.integers(0, len(v), 500)] + 0.15 * _unit(rng, 500)
        queries = np.concatenate(
            [near / np.linalg.norm(near, axis=1, keepdims=True), _unit(rng, 500)]
        )
        latencies = []
        for j, query in enumerate(queries):
            t = time.perf_counter()
            cache.lookup(f"probe {j}", vector=query)
            latencies.append((time.perf_counter() - t) * 1000)
        lookup_p50, lookup_p99 = np.percentile(latencies, [50, 99])
        cache.close()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kind = "random unit vectors" if real is None else f"real embeddings ({args.real.name})"
        print(
            f"{args.n:,} entries of {kind}: acknowledged in {stored:.1f} s "
            f"({args.n / stored:,.0f} rows/s)"
        )
        print(f"index caught up (every vector in the graph) after {ready:.1f} s")
        print(
            f"lookup excl. embedding once caught up (1,000 new texts, vectors given): "
            f"p50 {lookup_p50:.2f} ms, p99 {lookup_p99:.2f} ms; peak RSS {rss:,.0f} MiB"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
