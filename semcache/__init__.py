"""semcache: a semantic cache for LLM calls.

An answer is served for a prompt when an earlier prompt in exactly the same scope (tenant, model,
decoding parameters, system prompt, conversation) means the same; never across scopes, never
once invalidated. See README.md for the similarity scale, the hit policy and its measured error
rates.

Importing ``semcache`` imports only the core (numpy, FAISS, SQLite, the model's packages when a
cache opens); the sidecar, the OpenAI wrapper, change data capture, evaluation and the LangChain
cache load their optional dependencies when used, and a missing one raises
:class:`MissingExtraError` naming the ``pip install "semcache[...]"`` to run.
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
    EntryTooLargeError,
    IndexCorruptError,
    InvalidInputError,
    InvalidPromptError,
    InvalidScopeError,
    InvalidVectorError,
    ReplicationError,
    SemcacheError,
    StoreBusyError,
    StoreError,
    UpstreamError,
    UpstreamTimeoutError,
)
from .extras import MissingExtraError
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
    "EntryTooLargeError",
    "FaissIndex",
    "FakeClock",
    "Hit",
    "HitPolicy",
    "IndexCorruptError",
    "InvalidInputError",
    "InvalidPromptError",
    "InvalidScopeError",
    "InvalidVectorError",
    "MissingExtraError",
    "NumpyIndex",
    "ReplicationError",
    "Scope",
    "SemanticCache",
    "SemcacheError",
    "SentenceTransformerEmbedder",
    "StaticThreshold",
    "StoreBusyError",
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
