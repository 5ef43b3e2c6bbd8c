"""The exception hierarchy: every error semcache raises derives from :class:`SemcacheError`.

::

    SemcacheError
    ├── InvalidInputError (also ValueError)      bad arguments; nothing was changed
    │   ├── InvalidPromptError                   empty or non-string prompt
    │   ├── InvalidVectorError                   wrong shape/dimension, NaN or infinite values
    │   └── InvalidScopeError                    scope fields that cannot be serialised
    ├── EntryNotFoundError (also KeyError)       no live entry with that id
    ├── EmbedderMismatchError                    the store was built with another model/dimension
    ├── EmbedderError                            the embedding model failed, or its process died
    ├── IndexCorruptError                        a persisted index file is unreadable or foreign
    ├── StoreError                               the SQLite store failed or is not a semcache store
    │   └── StoreBusyError                       another cache has the folder open (re-embedding)
    ├── CacheClosedError                         the cache was used after close()
    ├── UpstreamError                            the LLM call behind a miss failed
    │   └── UpstreamTimeoutError
    └── ReplicationError                         the change-data-capture consumer cannot go on

Foreign errors (sqlite3, faiss, numpy) are translated where they cross into semcache so callers
only ever need to catch ``SemcacheError``.
"""

from __future__ import annotations


class SemcacheError(Exception):
    """Root of every error raised by semcache."""


class InvalidInputError(SemcacheError, ValueError):
    """An argument was rejected before anything was written."""


class InvalidPromptError(InvalidInputError):
    """The prompt is not a non-empty string."""


class InvalidVectorError(InvalidInputError):
    """A vector has the wrong shape or dimension, or contains NaN/inf."""


class InvalidScopeError(InvalidInputError):
    """A scope field cannot be turned into a stable digest."""


class EntryTooLargeError(InvalidInputError):
    """An entry is larger than ``max_bytes`` on its own, so no eviction could make room."""


class EntryNotFoundError(SemcacheError, KeyError):
    """No live entry has the given id."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "entry not found"


class EmbedderMismatchError(SemcacheError):
    """The store was built with a different embedding model or dimension."""


class EmbedderError(SemcacheError):
    """The embedding model failed to load or to embed, or the process running it died."""


class IndexCorruptError(SemcacheError):
    """A persisted index file cannot be read, or belongs to another store."""


class StoreError(SemcacheError):
    """The SQLite store failed, or the file is not a semcache store."""


class StoreBusyError(StoreError):
    """The operation needs the data folder alone, and another cache has it open."""


class CacheClosedError(SemcacheError):
    """The cache was used after ``close()``."""


class UpstreamError(SemcacheError):
    """The computation behind a miss (an LLM call) failed; nothing was cached."""


class UpstreamTimeoutError(UpstreamError):
    """The upstream did not answer in time; nothing was cached."""


class ReplicationError(SemcacheError):
    """The change-data-capture consumer cannot continue safely."""
