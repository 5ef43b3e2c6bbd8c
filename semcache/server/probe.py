"""The best candidate's similarity on a miss, for the near-miss histogram of ``/metrics``.

``SemanticCache.lookup`` answers a hit or None; how close a miss came is what tells an operator
whether the threshold is too strict. When the cache offers ``nearest_similarity(prompt, scope)``
it is used; otherwise, when the embedder remembers recent vectors (the batching embedder does),
the prompt's shard index is searched for its nearest vector: one 1-NN search, no embedding.
Any failure yields None: a metric must never fail a request.
"""

from __future__ import annotations

import logging
from typing import Any

from ..keys import normalise
from ..types import Scope

log = logging.getLogger("semcache.server")


def best_similarity(cache: Any, prompt: str, scope: Scope) -> float | None:
    """Similarity of the nearest stored prompt in ``scope`` (None when there is none)."""
    try:
        public = getattr(cache, "nearest_similarity", None)
        if callable(public):
            value = public(prompt, scope=scope)
            return None if value is None else float(value)
        if not getattr(cache.embedder, "memo", 0):
            return None  # no remembered vector: a second embedding is too dear for a metric
        vector = cache.embed([normalise(prompt)])[0]
        with cache._lock:
            index = cache.shards.get(cache._shard(scope))
            if index is None or len(index) == 0:
                return None
            sims, _ = index.search(vector, 1)
        return float(sims[0]) if len(sims) else None
    except Exception as exc:  # a metric must never fail a request
        log.debug("near-miss probe failed: %s", exc)
        return None
