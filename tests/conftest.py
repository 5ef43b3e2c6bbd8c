"""Shared fixtures: the real embedding model once per session, caches in tmp folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from semcache import FakeClock, SemanticCache
from semcache.embed import SentenceTransformerEmbedder

from .fakes import HashEmbedder


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    """The real all-MiniLM-L6-v2, loaded once for the whole run."""
    return SentenceTransformerEmbedder()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hash_embedder() -> HashEmbedder:
    return HashEmbedder()


@pytest.fixture
def cache(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, clock: FakeClock
) -> Iterator[SemanticCache]:
    """A cache on the real model with a fake clock; verify() must be clean when a test ends."""
    c = SemanticCache(tmp_path / "cache", embedder=embedder, clock=clock)
    yield c
    if not c._closed:
        assert c.verify() == []
        c.close()


@pytest.fixture
def fast_cache(
    tmp_path: Path, hash_embedder: HashEmbedder, clock: FakeClock
) -> Iterator[SemanticCache]:
    """A cache on the hash embedder, for mechanics that do not depend on meaning."""
    c = SemanticCache(tmp_path / "fast", embedder=hash_embedder, clock=clock, threshold=0.9)
    yield c
    if not c._closed:
        assert c.verify() == []
        c.close()
