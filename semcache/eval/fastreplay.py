"""A replay for sweeping many operating points: neighbours found once, decisions memoised.

:func:`~semcache.eval.replay.replay_in_memory` searches the stored prompts at every step, for
every operating point. Here each prompt's ``depth`` most similar *earlier* prompts are found
once per workload (:func:`neighbours`); a replay then walks them, skipping prompts that were not
stored (they were answered), and offers the first ``k`` stored ones at or above the floor to the
policy, most similar first, as the cache does. It equals ``replay_in_memory`` whenever the ``k``
best stored candidates lie among the ``depth`` nearest earlier prompts (``depth`` 32 against
``k`` 4: nearly always; a test compares the two). Decisions are plain functions of a pair, so a
sweep computes each verifier score once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .replay import ReplayResult, Workload


@dataclass(frozen=True)
class Neighbours:
    """For prompt ``i``: ``idx[i]`` the earlier prompts by similarity (``sim[i]``), -1 padded."""

    workload: Workload
    idx: np.ndarray
    sim: np.ndarray


def neighbours(workload: Workload, vectors: dict[str, np.ndarray], depth: int = 32) -> Neighbours:
    """The ``depth`` most similar earlier prompts of each prompt (blocked matrix products)."""
    mat = np.stack([vectors[t] for t, _ in workload]).astype(np.float32)
    n = len(workload)
    idx = np.full((n, depth), -1, dtype=np.int64)
    sim = np.full((n, depth), -2.0, dtype=np.float32)
    block = 512
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = mat[start:stop] @ mat[:stop].T
        rows = np.arange(start, stop)
        mask = np.arange(stop)[None, :] >= rows[:, None]  # only earlier prompts
        s[mask] = -2.0
        d = min(depth, stop)
        part = np.argpartition(-s, d - 1, axis=1)[:, :d]
        ps = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-ps, axis=1)
        idx[start:stop, :d] = np.take_along_axis(part, order, axis=1)
        sim[start:stop, :d] = np.take_along_axis(ps, order, axis=1)
    idx[sim <= -1.5] = -1
    return Neighbours(workload, idx, sim)


def replay_neighbours(
    nb: Neighbours,
    floor: float,
    accept: Callable[[int, int, float], bool],
    *,
    k: int = 4,
    name: str = "",
) -> ReplayResult:
    """Replay with ``accept(i, j, similarity)`` deciding whether stored prompt ``j`` answers
    prompt ``i``; exact repeats of a stored prompt are hits, as in the cache."""
    wl = nb.workload
    result = ReplayResult(name)
    stored = np.zeros(len(wl), dtype=bool)
    stored_text: dict[str, int] = {}
    stored_ids: set[int] = set()
    idx, sims = nb.idx, nb.sim
    for i, (prompt, answer) in enumerate(wl):
        result.lookups += 1
        repeatable = answer in stored_ids
        result.repeatable += repeatable
        served: int | None = None
        if prompt in stored_text:
            served = wl[stored_text[prompt]][1]
        else:
            offered = 0
            row_i, row_s = idx[i], sims[i]
            for c in range(len(row_i)):
                j = int(row_i[c])
                if j < 0:
                    break
                s = float(row_s[c])
                if s < floor:
                    break
                if not stored[j]:
                    continue
                offered += 1
                if accept(i, j, min(s, 1.0)):
                    served = wl[j][1]
                    break
                if offered >= k:
                    break
        if served is None:
            result.misses += 1
            stored[i] = True
            stored_text.setdefault(prompt, i)
            stored_ids.add(answer)
        elif served == answer:
            result.correct_hits += 1
            result.repeatable_answered += 1
        else:
            result.wrong_hits += 1
    return result
