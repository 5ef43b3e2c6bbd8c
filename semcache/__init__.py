"""semcache: a semantic cache for LLM calls.

An answer is served for a prompt when an earlier prompt in exactly the same scope (tenant, model,
decoding parameters, system prompt, conversation) means the same; never across scopes, never
once invalidated. See README.md for the similarity scale, the hit policy and its measured error
rates.
"""

from __future__ import annotations

from .cache import MISSING, SemanticCache
from .clients import wrap
from .clock import Clock, FakeClock, SystemClock
from .embed import Embedder, SentenceTransformerEmbedder
from .errors import (
    CacheClosedError,
    EmbedderError,
    EmbedderMismatchError,
    EntryNotFoundError,
    IndexCorruptError,
    InvalidInputError,
    InvalidPromptError,
    InvalidScopeError,
    InvalidVectorError,
    ReplicationError,
    SemcacheError,
    StoreError,
    UpstreamError,
    UpstreamTimeoutError,
)
from .index import FaissIndex, NumpyIndex, VectorIndex
from .threshold import (
    CalibratedThreshold,
    HitPolicy,
    StaticThreshold,
    calibrate,
    load_policy,
    save_policy,
)
from .types import Entry, Hit, Scope

__version__ = "0.1.0"

__all__ = [
    "MISSING",
    "CacheClosedError",
    "CalibratedThreshold",
    "Clock",
    "Embedder",
    "EmbedderError",
    "EmbedderMismatchError",
    "Entry",
    "EntryNotFoundError",
    "FaissIndex",
    "FakeClock",
    "Hit",
    "HitPolicy",
    "IndexCorruptError",
    "InvalidInputError",
    "InvalidPromptError",
    "InvalidScopeError",
    "InvalidVectorError",
    "NumpyIndex",
    "ReplicationError",
    "Scope",
    "SemanticCache",
    "SemcacheError",
    "SentenceTransformerEmbedder",
    "StaticThreshold",
    "StoreError",
    "SystemClock",
    "UpstreamError",
    "UpstreamTimeoutError",
    "VectorIndex",
    "__version__",
    "calibrate",
    "load_policy",
    "save_policy",
    "wrap",
]
