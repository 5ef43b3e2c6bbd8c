"""A sample of the crash matrix (``evals/crash_matrix.py`` runs 200+): SIGKILL a process at a
seeded random moment of a seeded workload (stores, updates, every invalidation, eviction,
checkpoints, close-and-reopen), reopen and check that the cache opens, ``verify()`` is clean, no
acknowledged store is lost and nothing invalidated is served. See ``tests/crash.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .crash import crash_run

SEEDS = list(range(1000, 1015))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_a_seeded_moment(tmp_path: Path, seed: int) -> None:
    result = crash_run(tmp_path, seed)
    assert result["problems"] == [], result
    assert result["acked"] > 0, result  # the kill came after real work
