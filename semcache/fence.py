"""The fenced write: an answer computed from what a lookup saw is cached only if nothing that
covers it was invalidated since.

A lookup records the store's fence position (:meth:`~semcache.store.Store.position`) before it
reads. The write that follows a miss carries that position; inside its transaction the store
hands it every invalidation recorded since, and :func:`covers` decides whether one of them
applies to the new entry. If one does, the answer goes back to the caller but is not cached
(the idea of the lease in "Scaling Memcache at Facebook": a delete voids the lease, so the stale
set is refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .store import Fence


@dataclass(frozen=True)
class Observed:
    """What a lookup saw: the fence position before it read, and the clock at that moment
    (a fenced entry's TTL counts from here, so its staleness stays bounded by the TTL)."""

    position: int
    at: float


@dataclass(frozen=True)
class Candidate:
    """The entry a fenced write would create, as the fences see it."""

    namespace: str
    scope_digest: str
    l1_key: str
    tags: Sequence[str]
    vector: np.ndarray


def covers(fence: Fence, entry: Candidate) -> bool:
    """Whether an invalidation recorded after the lookup applies to the entry being written."""
    if fence.kind == "ver":
        return fence.namespace == entry.namespace
    if fence.kind == "tag":
        return fence.key in entry.tags and fence.namespace in (None, entry.namespace)
    if fence.kind == "key":
        return fence.key == entry.l1_key
    if fence.kind == "similar":
        if fence.scope_digest not in (None, entry.scope_digest):
            return False
        assert fence.vector is not None and fence.radius is not None
        vector = np.frombuffer(fence.vector, dtype=np.float32)
        return float(vector @ entry.vector) >= float(np.float32(fence.radius))
    return True  # an unknown kind (a newer semcache wrote it): refuse rather than guess


def any_covers(fences: Sequence[Fence], entry: Candidate) -> bool:
    return any(covers(fence, entry) for fence in fences)
