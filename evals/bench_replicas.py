"""Replicas of one PostgreSQL store: how fast a change on one reaches another, and what a lookup
costs beyond the embedding with PostgreSQL as the store of record. Prints; asserts nothing.

**Propagation.** Two replicas, each a ``SemanticCache`` on the same schema in its own process
(the writer in this one, the reader in a child process). Each event: the reader says it is
watching, the writer commits one change, and the reader looks up every 0.2 ms (sleeping between,
so its own listener thread is not starved of the GIL) until a lookup sees the change. The delay
is from the writer's call returning (the change committed and acknowledged) to the return of the
first lookup that saw it, on ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process
on the machine), so it includes that lookup's own time. Event kinds, in turn:

* ``store``: a new entry becomes a semantic hit on the reader (its vector must reach the
  reader's own index: the reader looks up another prompt text with the same vector, so the
  exact tier, which reads the store directly, cannot answer);
* ``delete``, ``tags``, ``bump``, ``similar``: an entry the reader serves from L1 (an exact
  repeat, warmed first) stops being served. (A semantic hit of it stops at once, being
  confirmed against the store; L1 is what waits for the change to arrive.)

The reader runs once with ``consistency="bounded"`` (the default: a LISTEN/NOTIFY listener
applies changes as they are announced) and once with ``"strong"`` (every lookup asks the store
for its log head first). Vectors are random unit vectors given to ``store`` and ``lookup``
(``vector=``): embedding is not part of what is measured.

**Lookup overhead.** ``store_many`` loads N entries (random unit vectors of the model's 384
dimensions, 850-character answers) into a PostgreSQL schema, the index catches up, then
``lookup(prompt, vector=...)`` is timed for 1,000 queries near an entry (hits) and 1,000 random
ones (misses), each with a new prompt text, and for exact repeats (L1): with the bounded replica,
then reopened from its checkpoint in the strong mode, then the same load in an SQLite folder.

    .venv/bin/python evals/bench_replicas.py [--events 1250] [--size 100000]

Needs PostgreSQL on 127.0.0.1:5432 (``--url``); each run makes its own schemas and drops them.
Goals (the issue's): propagation p99 under 50 ms; bounded lookup overhead p99 under 2 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from semcache import Scope, SemanticCache  # noqa: E402
from tests.fakes import HashEmbedder  # noqa: E402

URL = "postgresql://root@127.0.0.1:5432/test"
KINDS = ("store", "delete", "tags", "bump", "similar")
PROP_DIM = 64
DIM = 384  # all-MiniLM-L6-v2's
POLL = 0.0002  # the reader's pause between two lookups
GOAL_PROPAGATION_P99_MS = 50.0
GOAL_OVERHEAD_P99_MS = 2.0


def ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000.0, q))


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ propagation
def reader_main(conn: Connection, url: str, schema: str, index_dir: str, mode: str) -> None:
    """The reader replica (a child process): answers the writer's watch requests."""
    cache = SemanticCache(
        url,
        embedder=HashEmbedder(dim=PROP_DIM),
        schema=schema,
        index_dir=index_dir,
        threshold=0.9,
        consistency=mode,
    )
    try:
        while not cache.stats()["following"] and mode == "bounded":
            time.sleep(0.01)
        conn.send("open")
        while True:
            msg = conn.recv()
            if msg is None:
                conn.send(cache.stats()["index_rebuilds"])
                break
            kind, prompt, vector, namespace = msg
            scope = Scope(namespace=namespace)
            if kind == "appear":  # another text, the same vector: only the index can answer
                probe = "probe " + prompt

                def seen(p: str = probe, s: Scope = scope, v: Any = vector) -> bool:
                    return cache.lookup(p, scope=s, vector=v) is not None

            else:
                for _ in range(2):  # found in the store, then served by L1
                    warm = cache.lookup(prompt, scope=scope, vector=vector)
                    assert warm is not None and warm.tier == "l1", warm

                def seen(p: str = prompt, s: Scope = scope, v: Any = vector) -> bool:
                    return cache.lookup(p, scope=s, vector=v) is None

            conn.send("watching")
            conn.send(_until(seen))
    finally:
        cache.close()


def _until(seen: Any, timeout: float = 10.0) -> tuple[float, float, int]:
    """Poll ``seen()`` until it is truthy: (when that lookup returned, its duration, tries)."""
    deadline = time.monotonic() + timeout
    tries = 0
    while True:
        t0 = time.monotonic()
        ok = seen()
        t1 = time.monotonic()
        tries += 1
        if ok or t1 > deadline:
            return (t1 if ok else float("nan"), t1 - t0, tries)
        time.sleep(POLL)


def propagation(url: str, events: int, mode: str) -> dict[str, list[float]]:
    schema = "semcache_bench_rep_" + uuid.uuid4().hex[:10]
    tmp = Path(tempfile.mkdtemp(prefix="semcache-bench-rep-"))
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    writer = SemanticCache(
        url,
        embedder=HashEmbedder(dim=PROP_DIM),
        schema=schema,
        index_dir=tmp / "writer",
        threshold=0.9,
    )
    reader = ctx.Process(
        target=reader_main, args=(there, url, schema, str(tmp / "reader"), mode), daemon=True
    )
    reader.start()
    delays: dict[str, list[float]] = {k: [] for k in KINDS}
    delays.update({"_began_" + k: [] for k in KINDS})
    looks: list[float] = []
    rng = np.random.default_rng(7)
    try:
        assert here.recv() == "open"
        vectors = unit(rng, events, PROP_DIM)
        for i in range(events):
            kind = KINDS[i % len(KINDS)]
            v = vectors[i]
            prompt, ns = f"event {i} prompt", f"ns-{kind}"
            if kind == "store":
                here.send(("appear", prompt, v, ns))
                assert here.recv() == "watching"
                began = time.monotonic()
                writer.store(prompt, f"answer {i}", scope=Scope(namespace=ns), vector=v)
            else:
                entry = writer.store(
                    prompt, f"answer {i}", scope=Scope(namespace=ns), vector=v, tags=[f"t{i}"]
                )
                here.send(("vanish", prompt, v, ns))
                assert here.recv() == "watching"
                began = time.monotonic()
                if kind == "delete":
                    writer.delete(entry)  # type: ignore[arg-type]
                elif kind == "tags":
                    writer.invalidate_tags(f"t{i}", namespace=ns)
                elif kind == "bump":
                    writer.bump(ns)
                else:
                    writer.invalidate_similar(v, 0.999, scope=Scope(namespace=ns))
            returned = time.monotonic()
            seen_at, took, _ = here.recv()
            delays[kind].append(seen_at - returned)
            delays["_began_" + kind].append(seen_at - began)
            looks.append(took)
        here.send(None)
        delays["_rebuilds"] = [float(here.recv())]
        reader.join(timeout=60)
    finally:
        if reader.is_alive():
            reader.kill()
        writer.close()
        drop_schema(url, schema)
        shutil.rmtree(tmp, ignore_errors=True)
    delays["_lookup"] = looks
    return delays


def report_propagation(mode: str, delays: dict[str, list[float]]) -> None:
    """Per kind and overall: the delay from the writer's call returning (the commit
    acknowledged; below zero when the reader saw the change before that call returned) and
    from the call beginning (an upper bound: it adds the writer's own transaction)."""

    def seen(values: list[float]) -> list[float]:
        return [v for v in values if not np.isnan(v)]

    every = [d for k in KINDS for d in delays[k]]
    lost = len(every) - len(seen(every))
    print(f"\n== propagation, reader consistency={mode!r}: {len(every)} events ({lost} not seen)")
    print(f"  {'':8s} {'':6s}  from the write's return (ms)    from the write's start (ms)")
    rows = [(kind, delays[kind], delays["_began_" + kind]) for kind in KINDS]
    rows.append(("all", every, [d for k in KINDS for d in delays["_began_" + k]]))
    for kind, after, since in rows:
        after, since = seen(after), seen(since)
        print(
            f"  {kind:8s} n={len(after):4d}  p50 {ms(after, 50):6.2f}  p99 {ms(after, 99):6.2f}  "
            f"max {ms(after, 100):6.2f}    p50 {ms(since, 50):6.2f}  p99 {ms(since, 99):6.2f}  "
            f"max {ms(since, 100):6.2f}"
        )
    bound = ms(seen(rows[-1][2]), 99)
    verdict = "met" if bound < GOAL_PROPAGATION_P99_MS and not lost else "NOT met"
    print(
        f"  goal: propagation p99 < {GOAL_PROPAGATION_P99_MS:.0f} ms: {verdict} "
        f"(p99 {bound:.2f} ms, counted from the write's start)"
    )
    look = delays["_lookup"]
    print(
        f"  (the seeing lookup's own time, included above: p50 {ms(look, 50):.2f} ms, "
        f"p99 {ms(look, 99):.2f} ms; the reader rebuilt its index "
        f"{int(delays['_rebuilds'][0]) - 1} time(s) after opening)"
    )


# ------------------------------------------------------------------------- lookup overhead
def load(cache: SemanticCache, vectors: np.ndarray, chunk: int = 5000) -> tuple[float, float]:
    """store_many every vector; (seconds to commit them all, seconds until the index merged)."""
    answer = "x" * 850
    t0 = time.perf_counter()
    for start in range(0, len(vectors), chunk):
        part = vectors[start : start + chunk]
        items = [(f"synthetic prompt {start + j}", answer) for j in range(len(part))]
        cache.store_many(items, vectors=part)
    stored = time.perf_counter() - t0
    while any(getattr(index, "pending", 0) for _, index in cache.shards.items()):
        time.sleep(0.05)
    return stored, time.perf_counter() - t0


def time_lookups(
    cache: SemanticCache, queries: np.ndarray
) -> tuple[list[float], int, list[float], list[float]]:
    """(latencies of new-text lookups, hits, of a stored prompt's first exact lookup on this
    replica (L1 is empty: it reads the store), of the same lookup again (served by L1))."""
    lat, hits = [], 0
    for j, q in enumerate(queries):
        t = time.perf_counter()
        hit = cache.lookup(f"query text {j}", vector=q)
        lat.append(time.perf_counter() - t)
        hits += hit is not None
    first, repeat = [], []
    for j in range(500):
        text = f"synthetic prompt {j}"
        for samples in (first, repeat):  # read from the store, then from L1
            t = time.perf_counter()
            hit = cache.lookup(text)
            samples.append(time.perf_counter() - t)
            assert hit is not None and hit.tier == "l1", hit
    return lat, hits, first, repeat


def report_lookups(
    label: str, lat: list[float], hits: int, first: list[float], repeat: list[float]
) -> None:
    goal = ""
    if "bounded" in label:
        verdict = "met" if ms(lat, 99) < GOAL_OVERHEAD_P99_MS else "NOT met"
        goal = f"   goal p99 < {GOAL_OVERHEAD_P99_MS:.0f} ms: {verdict}"
    print(
        f"  {label:34s} new text: p50 {ms(lat, 50):.3f} ms  p99 {ms(lat, 99):.3f} ms "
        f"({hits}/{len(lat)} hits){goal}"
    )
    print(
        f"  {'':34s} stored prompt, first lookup here (read from the store): "
        f"p50 {ms(first, 50):.3f} ms  p99 {ms(first, 99):.3f} ms"
    )
    print(
        f"  {'':34s} the same again (L1): p50 {ms(repeat, 50):.3f} ms  p99 {ms(repeat, 99):.3f} ms"
    )


def round_trips(url: str, n: int = 2000) -> None:
    """The floor under every store read: one ``SELECT 1`` to this PostgreSQL."""
    import psycopg

    lat = []
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(n):
            t = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            lat.append(time.perf_counter() - t)
    print(
        f"  (one PostgreSQL round trip, SELECT 1: p50 {ms(lat, 50):.3f} ms  "
        f"p99 {ms(lat, 99):.3f} ms)"
    )


def overhead(url: str, size: int, queries: int) -> None:
    rng = np.random.default_rng(size)
    vectors = unit(rng, size, DIM)
    picks = rng.integers(0, size, queries)
    near = vectors[picks] + unit(rng, queries, DIM) * 0.15
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    qs = np.concatenate([near, unit(rng, queries, DIM)])
    embedder = HashEmbedder(dim=DIM, model_id="bench:random-384")
    options: dict[str, Any] = {"embedder": embedder, "threshold": 0.9, "checkpoint_every": 10**9}
    schema = "semcache_bench_rep_" + uuid.uuid4().hex[:10]
    tmp = Path(tempfile.mkdtemp(prefix="semcache-bench-rep-"))
    print(f"\n== lookup excluding embedding, {size:,} entries, random unit vectors ({DIM} dims)")
    try:
        cache = SemanticCache(url, schema=schema, index_dir=tmp / "pg", **options)
        stored, merged = load(cache, vectors)
        print(
            f"  PostgreSQL store_many: {size / stored:,.0f} rows/s ({stored:.1f} s); index "
            f"merged after {merged:.1f} s"
        )
        lat, hits, first, repeat = time_lookups(cache, qs)
        report_lookups("PostgreSQL, consistency='bounded'", lat, hits, first, repeat)
        round_trips(url)
        t0 = time.perf_counter()
        cache.close()  # a checkpoint: the strong replica below opens from it
        closed = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache = SemanticCache(
            url, schema=schema, index_dir=tmp / "pg", consistency="strong", **options
        )
        opened = time.perf_counter() - t0
        rebuilds = cache.stats()["index_rebuilds"]
        lat, hits, first, repeat = time_lookups(cache, qs)
        report_lookups("PostgreSQL, consistency='strong'", lat, hits, first, repeat)
        cache.close()
        print(
            f"  (close with checkpoint {closed:.1f} s; reopen {opened:.1f} s, "
            f"{rebuilds} index rebuilds)"
        )
        drop_schema(url, schema)
        cache = SemanticCache(tmp / "sqlite", **options)
        stored, merged = load(cache, vectors)
        print(
            f"  SQLite folder store_many: {size / stored:,.0f} rows/s ({stored:.1f} s); index "
            f"merged after {merged:.1f} s"
        )
        lat, hits, first, repeat = time_lookups(cache, qs)
        report_lookups("SQLite folder", lat, hits, first, repeat)
        cache.close()
    finally:
        drop_schema(url, schema)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=URL)
    parser.add_argument("--events", type=int, default=1250, help="propagation events per mode")
    parser.add_argument("--size", type=int, default=100_000, help="entries for the lookup part")
    parser.add_argument("--queries", type=int, default=1000, help="hits and misses, each")
    parser.add_argument("--skip", choices=("propagation", "overhead"), default=None)
    args = parser.parse_args()
    print(f"cpu count: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    if args.skip != "propagation":
        for mode in ("bounded", "strong"):
            report_propagation(mode, propagation(args.url, args.events, mode))
    if args.skip != "overhead":
        overhead(args.url, args.size, args.queries)


if __name__ == "__main__":
    main()
