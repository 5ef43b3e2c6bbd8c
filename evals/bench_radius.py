"""Benchmark: exact radius search (semcache.radius.RadiusIndex) vs brute force, same run.

For each distribution, size and radius it prints the median time of one query for
  numpy   brute force: ``np.flatnonzero(X @ q >= radius)`` over the same float32 matrix
  flat    ``faiss.IndexFlatIP.range_search`` over the same vectors
  ours    ``RadiusIndex.search`` (PQ fast-scan candidates + exact re-check)
with the speed-up of ours over numpy, whether ours returned exactly the brute-force set for every
query (the exact float64 definition; ``f32 diff`` counts vectors on which a plain float32 scan
disagrees with it, i.e. sits within rounding of the radius), and the bytes held per vector.

Distributions:
  random     i.i.d. uniform unit vectors (the hard case for any pruning)
  realistic  real all-MiniLM-L6-v2 embeddings of the ~70k distinct sentences in
             ../shared/data/*/ (cached in /tmp), each copied with Gaussian noise of per-vector
             sigma U(0.005, 0.03) per dimension and renormalised (copy-to-original similarity
             0.86-0.995), to reach 1M; queries are other real sentences, lightly perturbed.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python evals/bench_radius.py [--sizes 100000,1000000]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semcache.radius import RadiusIndex, select_within

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EMB_CACHE = Path("/tmp/semcache-bench-radius/minilm-sentences.npy")


def unit_rows(a: np.ndarray) -> np.ndarray:
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a


def real_embeddings() -> np.ndarray:
    """Embeddings of every distinct sentence in ../shared/data (computed once, cached)."""
    if EMB_CACHE.exists():
        return np.load(EMB_CACHE)
    from semcache.embed import SentenceTransformerEmbedder

    texts: set[str] = set()
    for path in sorted(glob.glob(str(DATA / "*" / "*.jsonl"))):
        with open(path) as fh:
            for line in fh:
                row = json.loads(line)
                texts.update(t for t in (row["a"], row["b"]) if t.strip())
    print(f"embedding {len(texts)} sentences (once; cached in {EMB_CACHE}) ...", flush=True)
    vectors = SentenceTransformerEmbedder().embed(sorted(texts))
    EMB_CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.save(EMB_CACHE, vectors)
    return vectors


def make_data(kind: str, n: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dim = 384
    x = np.empty((n, dim), dtype=np.float32)
    if kind == "random":
        for i in range(0, n, 100_000):
            m = min(100_000, n - i)
            x[i : i + m] = unit_rows(rng.standard_normal((m, dim), dtype=np.float32))
        # half the queries near a stored vector (so something is found), half anywhere
        near = x[rng.integers(0, n, nq // 2)] + 0.02 * rng.standard_normal((nq // 2, dim))
        anywhere = rng.standard_normal((nq - nq // 2, dim))
        q = np.concatenate([near, anywhere]).astype(np.float32)
        return x, unit_rows(q)
    real = real_embeddings()
    held_out = rng.permutation(len(real))
    query_src, base = real[held_out[:nq]], real[held_out[nq:]]
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        rows = base[(np.arange(i, i + m)) % len(base)]
        sigma = rng.uniform(0.005, 0.03, (m, 1)).astype(np.float32)
        x[i : i + m] = unit_rows(rows + sigma * rng.standard_normal((m, dim), dtype=np.float32))
    # queries: held-out real sentences (their paraphrases may be stored) and stored sentences
    q = np.concatenate([query_src[: nq // 2], base[rng.integers(0, len(base), nq - nq // 2)]])
    q = q + 0.01 * rng.standard_normal(q.shape).astype(np.float32)
    return x, unit_rows(q.astype(np.float32))


def median_ms(fn, queries: np.ndarray, repeat: int = 1) -> tuple[float, list]:
    times, out = [], []
    for _ in range(repeat):
        for q in queries:
            t0 = time.perf_counter()
            res = fn(q)
            times.append(time.perf_counter() - t0)
            out.append(res)
    return float(np.median(times) * 1e3), out[: len(queries)]


def index_bytes(index: RadiusIndex) -> int:
    """Bytes held by the index: its arrays and FAISS codes, plus the id dict and its ints."""
    return index.nbytes() + sys.getsizeof(index._where) + 2 * 32 * len(index._where)


def bench(kind: str, n: int, radii: list[float], nq: int) -> None:
    x, queries = make_data(kind, n, nq)
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    ours = RadiusIndex(x.shape[1])
    for i in range(0, n, 100_000):
        ours.add(ids[i : i + 100_000], x[i : i + 100_000])
    build = time.perf_counter() - t0
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    per_vec = index_bytes(ours) / n
    print(
        f"\n[{kind}] n={n:,} dim={x.shape[1]}  build {build:.1f}s "
        f"({build / n * 1e6:.0f} us/vector, incl. PQ training)  "
        f"memory {per_vec:.0f} B/vector (float32 alone {4 * x.shape[1]} B, "
        f"{per_vec / (4 * x.shape[1]):.2f}x)",
        flush=True,
    )
    print(
        f"{'radius':>6} {'found':>8} {'numpy ms':>9} {'flat ms':>8} {'ours ms':>8} "
        f"{'speed-up':>8} {'exact':>6} {'f32 diff':>8}"
    )
    for r in radii:
        t_np, res_np = median_ms(lambda q, r=r: np.flatnonzero(x @ q >= r), queries)
        t_flat, _ = median_ms(lambda q, r=r: flat.range_search(q[None], r), queries)
        ours.search(queries[0], r)  # warm the thread pool
        t_ours, res_ours = median_ms(lambda q, r=r: ours.search(q, r), queries, repeat=2)
        exact, f32_diff, found = True, 0, []
        for q, mine, f32 in zip(queries, res_ours, res_np, strict=True):
            pos, _ = select_within(x, q, r)  # the definition (untimed)
            exact &= set(mine[0].tolist()) == set(ids[pos].tolist())
            f32_diff += len(set(f32.tolist()) ^ set(pos.tolist()))
            found.append(len(pos))
        print(
            f"{r:>6} {np.mean(found):>8.1f} {t_np:>9.1f} {t_flat:>8.1f} {t_ours:>8.2f} "
            f"{t_np / t_ours:>7.1f}x {'yes' if exact else 'NO':>6} {f32_diff:>8}",
            flush=True,
        )
    if n >= 100_000:
        mutation(ours, x, queries)
    ours.close()


def mutation(index: RadiusIndex, x: np.ndarray, queries: np.ndarray) -> None:
    """Interleaved single adds and removes, then a compaction, then a search."""
    n = len(index)
    rng = np.random.default_rng(7)
    t0 = time.perf_counter()
    for k in range(1000):
        index.add(np.array([n + k]), x[rng.integers(0, len(x))][None])
        index.remove(np.array([rng.integers(0, n)]))
    per_pair = (time.perf_counter() - t0) / 1000 * 1e6
    victims = rng.choice(n, n // 3, replace=False)
    t0 = time.perf_counter()
    index.remove(victims)  # a third: marked dead; segments compact only past half dead
    compaction = time.perf_counter() - t0
    t0 = time.perf_counter()
    got, _ = index.search(queries[0], 0.8)
    after = (time.perf_counter() - t0) * 1e3
    print(
        f"mutation: one add + one remove {per_pair:.0f} us; removing {len(victims):,} ids "
        f"(lazy) {compaction:.1f}s; a search after it {after:.1f} ms "
        f"({len(got)} found), {len(index):,} live",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--kinds", default="random,realistic")
    ap.add_argument("--radii", default="0.7,0.8,0.9,0.95")
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(
        f"faiss {faiss.__version__}, numpy {np.__version__}, {os.cpu_count()} cores, "
        f"faiss threads {faiss.omp_get_max_threads()}; load average "
        f"{os.getloadavg()[0]:.1f} at start"
    )
    radii = [float(r) for r in args.radii.split(",")]
    for kind in args.kinds.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            bench(kind, n, radii, args.queries)


if __name__ == "__main__":
    main()
