"""Separate processes on one data folder stay coherent: no process serves an entry after an
invalidation covering it returned in another, and every process's ``verify()`` is clean.

Each process (a real OS process: ``python -m tests.procs workload``) stores, updates, deletes,
invalidates (tags, namespace-scoped tags, bump, delete_prompt, invalidate_similar) and looks up
at random on the same folder, with HashEmbedder, for ``SEMCACHE_PROC_SECONDS`` seconds (default
12, so that both tests with start-up take about a minute; ``evals/processes.py`` runs the full
minute each). Checkpoints are frequent (``checkpoint_every=200``), so the owner trims the log
while the others follow it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .procs import run_processes, stale_serves

SECONDS = float(os.environ.get("SEMCACHE_PROC_SECONDS", "12"))


PG_URL = "postgresql://root@127.0.0.1:5432/test"


@pytest.fixture
def pg_schema(tmp_path: Path) -> Iterator[str]:
    import psycopg

    name = "semcache_procs_" + uuid.uuid4().hex[:12]
    yield name
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_never_serve_invalidated_answers(tmp_path: Path, processes: int) -> None:
    logs = run_processes(tmp_path, processes, SECONDS, seed=processes)
    check_logs(logs)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_replicas_of_a_postgres_store_never_serve_invalidated_answers(
    tmp_path: Path, pg_schema: str
) -> None:
    """The same workload on three replicas of one PostgreSQL store, each with its own index
    folder, in the strong mode (the mode that promises no stale L1 hit; the bounded mode's
    promise, confirmed semantic hits, is tested in test_shared_store.py)."""
    options = {"schema": pg_schema, "consistency": "strong"}
    logs = run_processes(tmp_path, 3, SECONDS, seed=7, store_url=PG_URL, options=options)
    check_logs(logs)


def check_logs(logs: list[dict[str, Any]]) -> None:
    errors = [f"process {log['index']}: {e}" for log in logs for e in log["errors"]]
    assert errors == [], errors[:10]
    for log in logs:
        assert log["verify"] == [], f"process {log['index']}: {log['verify']}"
    problems, counts = stale_serves(logs)
    assert problems == [], f"{len(problems)} stale serves, e.g. {problems[:5]}; {counts}"
    # the run did exercise what it claims to: answers served, and answers invalidated
    assert counts["served"] > 50 and counts["invalidated_versions"] > 50, counts
    # once every process has stopped writing, all of them see the same answers
    first = logs[0]["final"]
    for log in logs[1:]:
        diff = {k: (v, log["final"][k]) for k, v in first.items() if v != log["final"][k]}
        assert diff == {}, f"process {log['index']} disagrees with process 0: {diff}"
