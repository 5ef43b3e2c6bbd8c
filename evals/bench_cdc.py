"""CDC delay: from an UPDATE's COMMIT returning to the client until ``cache.lookup`` no longer
serves the entry it invalidates (PostgreSQL logical replication -> semcache.cdc -> cache).

Two deployments, measured in the same run:

* ``thread``: ``ChangeConsumer.run()`` in a background thread of the process that serves
  lookups, sharing its ``SemanticCache``;
* ``process``: the consumer as its own process (``python -m semcache.cdc``, what
  ``semcache cdc`` runs) on the same data folder; the lookups see its deletions through the
  store's change log.

Each round: store an entry tagged ``user:<i>``, UPDATE row i of a ``users`` table and COMMIT,
then poll ``lookup`` (every 0.2 ms) until it misses. The consumer's cache synchronous setting is
the one each deployment uses (NORMAL in-process by default, FULL for the CLI). A hashed embedder
stands in for the model: embedding is not part of the delay being measured.

    HF_HUB_OFFLINE=1 .venv/bin/python evals/bench_cdc.py [--n 200] [--mode both|thread|process]

Needs PostgreSQL on 127.0.0.1 with wal_level=logical (scripts/ensure_postgres_logical.sh).
Target: p99 under 100 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from semcache import SemanticCache  # noqa: E402
from semcache.cdc import ChangeConsumer, Rule  # noqa: E402

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=semcache_test"
WARMUP = 5


class HashedEmbedder:
    """Deterministic unit vectors from a hash of the text (no model)."""

    model_id = "bench:hashed-64"
    dim = 64

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
            out[row] = np.random.default_rng(seed).standard_normal(self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def sql(dsn: str, statement: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(dsn: str, schema: str, cache: SemanticCache, n: int, wait_ready: Any) -> list[float]:
    """Run n (+ warm-up) rounds; returns the delays in milliseconds."""
    conn = psycopg2.connect(dsn)
    delays: list[float] = []
    try:
        wait_ready()
        with conn.cursor() as cur:
            for i in range(1, n + WARMUP + 1):
                text = f"profile of user {i} in {schema}"
                cache.store(text, f"answer {i}", tags=[f"user:{i}"])
                assert cache.lookup(text) is not None
                cur.execute(f"UPDATE {schema}.users SET name = %s WHERE id = %s", (f"v{i}", i))
                conn.commit()
                committed = time.perf_counter()
                deadline = committed + 10.0
                while cache.lookup(text) is not None:
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"round {i}: not invalidated within 10 s")
                    time.sleep(0.0002)
                if i > WARMUP:
                    delays.append((time.perf_counter() - committed) * 1000.0)
    finally:
        conn.close()
    return delays


def run_thread_mode(dsn: str, schema: str, folder: Path, n: int) -> list[float]:
    name = f"semcache_bench_{uuid.uuid4().hex[:8]}"
    cache = SemanticCache(folder, embedder=HashedEmbedder(), threshold=0.99)
    rules = [Rule("users", schema=schema, tags=lambda row: [f"user:{row['id']}"])]
    consumer = ChangeConsumer(dsn, cache, rules, slot=name, publication=name)
    thread = threading.Thread(target=consumer.run, kwargs={"handle_signals": False}, daemon=True)
    try:
        consumer.setup()
        thread.start()

        def ready() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                status = consumer.slot_status()
                if status and status["active"]:
                    return
                time.sleep(0.05)
            raise RuntimeError("the consumer thread did not start streaming")

        return measure(dsn, schema, cache, n, ready)
    finally:
        consumer.stop()
        thread.join(timeout=10)
        with contextlib.suppress(Exception):
            consumer.drop()
        consumer.close()
        cache.close()


def run_process_mode(dsn: str, schema: str, folder: Path, n: int) -> list[float]:
    name = f"semcache_bench_{uuid.uuid4().hex[:8]}"
    cache = SemanticCache(folder, embedder=HashedEmbedder(), threshold=0.99)
    rules_dir = folder.parent / "rules"
    rules_dir.mkdir(exist_ok=True)
    (rules_dir / "bench_cdc_rules.py").write_text(
        "from semcache.cdc import Rule\n"
        f"RULES = [Rule('users', schema={schema!r}, tags=lambda row: [f\"user:{{row['id']}}\"])]\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(rules_dir), str(REPO)])}
    command = [sys.executable, "-m", "semcache.cdc", "--dsn", dsn, "--rules",
               "bench_cdc_rules:RULES", "--data", str(folder), "--slot", name,
               "--publication", name, "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env=env)
    # Only to read the slot's status and drop it afterwards; it never consumes.
    probe = ChangeConsumer(
        dsn,
        cache,
        [Rule("users", schema=schema, tags=lambda row: [])],
        slot=name,
        publication=name,
        state_dir=folder.parent / "probe",
    )
    try:

        def ready() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"the consumer process exited ({proc.returncode})")
                status = probe.slot_status()
                if status and status["active"]:
                    return
                time.sleep(0.05)
            raise RuntimeError("the consumer process did not start streaming")

        return measure(dsn, schema, cache, n, ready)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(Exception):
            probe.drop()
        probe.close()
        cache.close()


def report(mode: str, delays: list[float]) -> None:
    print(
        f"CDC delay COMMIT -> invalidation visible [{mode}, n={len(delays)}]: "
        f"p50 {percentile(delays, 50):.1f} ms, p90 {percentile(delays, 90):.1f} ms, "
        f"p99 {percentile(delays, 99):.1f} ms, max {max(delays):.1f} ms, "
        f"mean {statistics.fmean(delays):.1f} ms"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("SEMCACHE_BENCH_DSN", DEFAULT_DSN))
    parser.add_argument("--n", type=int, default=200, help="measured updates per mode")
    parser.add_argument("--mode", choices=["both", "thread", "process"], default="both")
    args = parser.parse_args(argv)
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    rows = args.n + WARMUP
    sql(args.dsn, f"CREATE SCHEMA {schema}")
    results: dict[str, list[float]] = {}
    try:
        sql(
            args.dsn,
            f"CREATE TABLE {schema}.users (id int PRIMARY KEY, name text); "
            f"INSERT INTO {schema}.users SELECT g, 'u' FROM generate_series(1, {rows}) g",
        )
        modes = ["thread", "process"] if args.mode == "both" else [args.mode]
        with tempfile.TemporaryDirectory(prefix="semcache-bench-cdc-") as tmp:
            for mode in modes:
                folder = Path(tmp) / mode / "cache"
                folder.parent.mkdir(parents=True)
                runner = run_thread_mode if mode == "thread" else run_process_mode
                results[mode] = runner(args.dsn, schema, folder, args.n)
                report(mode, results[mode])
    finally:
        sql(args.dsn, f"DROP SCHEMA {schema} CASCADE")
    target = all(percentile(d, 99) < 100.0 for d in results.values())
    print(f"target p99 < 100 ms: {'met' if target else 'NOT met'}")
    return results


if __name__ == "__main__":
    main()
