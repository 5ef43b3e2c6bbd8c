"""The best candidate's similarity on a miss, for the near-miss histogram of ``/metrics``.

``SemanticCache.lookup`` answers a hit or None; how close a miss came is what tells an operator
whether the threshold is too strict. When the embedder remembers recent vectors (the batching
embedder does), ``cache.nearest_similarity`` costs one 1-NN search and no embedding.
Any failure yields None: a metric must never fail a request.
"""

from __future__ import annotations

import logging
from typing import Any

from ..types import Scope

log = logging.getLogger("semcache.server")


def best_similarity(cache: Any, prompt: str, scope: Scope) -> float | None:
    """Similarity of the nearest stored prompt in ``scope`` (None when there is none)."""
    if not getattr(cache.embedder, "memo", 0):
        return None  # no remembered vector: a second embedding is too dear for a metric
    try:
        return cache.nearest_similarity(prompt, scope=scope)
    except Exception as exc:  # a metric must never fail a request
        log.debug("near-miss probe failed: %s", exc)
        return None
