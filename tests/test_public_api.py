"""The public names are a contract: pin them."""

from __future__ import annotations

import semcache


def test_public_names() -> None:
    for name in (
        "SemanticCache",
        "Scope",
        "Hit",
        "Entry",
        "SemcacheError",
        "wrap",
        "FakeClock",
        "Embedder",
        "HitPolicy",
        "VectorIndex",
        "InvalidInputError",
        "EntryNotFoundError",
    ):
        assert name in semcache.__all__ and hasattr(semcache, name)
    assert all(hasattr(semcache, name) for name in semcache.__all__)
    for method in (
        "lookup",
        "store",
        "store_many",
        "get_or_compute",
        "alookup",
        "astore",
        "aget_or_compute",
        "delete",
        "delete_prompt",
        "update",
        "get",
        "invalidate_tags",
        "bump",
        "version",
        "invalidate_similar",
        "expire",
        "invalidates",
        "cached",
        "stats",
        "verify",
        "close",
    ):
        assert callable(getattr(semcache.SemanticCache, method))
