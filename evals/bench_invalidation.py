"""Invalidation benchmark: the cost of each pattern at 100k and 1M entries, and the CDC delay.

Run: ``.venv/bin/python evals/bench_invalidation.py [--sizes 100000 1000000] [--cdc 200]``.
Prints figures; asserts nothing but the exactness of semantic invalidation, which it checks
against the brute-force scan it is timed against. Entries carry random unit vectors (embedding
1M prompts would take most of an hour here); the semantic queries are stored vectors plus noise,
so each radius has real matches. The CDC delay comes from ``evals/bench_cdc.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from semcache import FakeClock, SemanticCache

DIM = 384


class VectorsOnly:
    """An embedder for a benchmark that always passes vectors; texts hash to unit vectors."""

    model_id = "bench:vectors"
    dim = DIM

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.stack(
            [
                np.random.default_rng(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16))
                .standard_normal(DIM)
                .astype(np.float32)
                for t in texts
            ]
        )
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.2f} ms"


def bench(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tmp = Path(tempfile.mkdtemp(prefix="semcache-inv-"))
    clock = FakeClock()
    try:
        cache = SemanticCache(
            tmp,
            embedder=VectorsOnly(),
            clock=clock,
            checkpoint_every=10**9,
            l1_size=0,
        )
        t0 = time.perf_counter()
        items = [
            {
                "prompt": f"p{i}",
                "response": "r",
                "tags": [f"doc:{i % (n // 100)}"],
                "ttl": 60 if i % 100 == 0 else None,
            }
            for i in range(n)
        ]
        ids = cache.store_many(items, vectors=x)
        print(f"\n== {n:,} entries (loaded in {time.perf_counter() - t0:.0f} s)")

        # TTL: 1% of the entries expire; expire() removes them in batches
        clock.advance(61)
        t0 = time.perf_counter()
        expired = cache.expire()
        print(
            f"TTL        expire() of {expired:,} expired entries: {ms(time.perf_counter() - t0)}"
            f"  ({(time.perf_counter() - t0) / max(expired, 1) * 1e6:.0f} us each)"
        )

        # write-through: delete and update single entries
        sample = [ids[i] for i in rng.integers(1, n, 200) if i % 100]
        t0 = time.perf_counter()
        for eid in sample[:100]:
            cache.update(eid, response="new")
        upd = (time.perf_counter() - t0) / 100
        t0 = time.perf_counter()
        for eid in sample[100:200]:
            cache.delete(eid)
        dele = (time.perf_counter() - t0) / max(len(sample[100:200]), 1)
        print(f"write-through  update: {ms(upd)}  delete: {ms(dele)}  (mean of 100)")

        # tags: each tag is carried by 100 entries
        t0 = time.perf_counter()
        removed = cache.invalidate_tags("doc:7")
        print(
            f"tags       invalidate_tags (one tag, {removed} entries): "
            f"{ms(time.perf_counter() - t0)}"
        )

        # versions: O(1) bump
        t0 = time.perf_counter()
        cache.bump("some-other-namespace")
        print(f"versions   bump(): {ms(time.perf_counter() - t0)}")

        _, index = next(iter(cache.shards.items()))
        t0 = time.perf_counter()
        index.range_search(x[0], 0.99)
        print(
            f"semantic   first range search (builds the exact radius mirror on large shards): "
            f"{ms(time.perf_counter() - t0)}"
        )
        # semantic: against a NumPy brute-force scan over the same vectors, same process.
        # Row i was stored i-th in a fresh store, so its row id is i + 1.
        for radius in (0.95, 0.9, 0.8):
            q = x[int(rng.integers(0, n))] + 0.02 * rng.standard_normal(DIM).astype(np.float32)
            q /= np.linalg.norm(q)
            _, index = next(iter(cache.shards.items()))
            alive = np.zeros(n, dtype=bool)
            alive[index.ids() - 1] = True
            t0 = time.perf_counter()
            brute = np.flatnonzero(x @ q >= np.float32(radius))
            brute_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            found, _ = index.range_search(q, radius)
            search_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            gone = cache.invalidate_similar(q, radius)
            call_s = time.perf_counter() - t0
            expected = set(brute[alive[brute]].tolist())
            exact = set((found - 1).tolist()) == expected and len(gone) == len(expected)
            print(
                f"semantic   radius {radius}: {len(gone):3d} removed (exact: {exact}) | range "
                f"search {ms(search_s)} | whole call {ms(call_s)} | NumPy scan {ms(brute_s)} | "
                f"speed-up {brute_s / search_s:4.1f}x"
            )
        problems = cache.verify() if n <= 100_000 else []
        print(f"verify(): {problems or 'clean'}")
        cache.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--cdc", type=int, default=200, help="CDC updates to time (0: skip)")
    args = parser.parse_args()
    for n in args.sizes:
        bench(n)
    if args.cdc:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_cdc

        print("\n== CDC delay, COMMIT to invalidation")
        bench_cdc.main(["--n", str(args.cdc), "--mode", "both"])


if __name__ == "__main__":
    main()
