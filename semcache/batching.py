"""Dynamic batching of embedding work: many concurrent ``embed()`` calls, one model call.

A sentence-transformers model embeds 32 short texts in a fraction of the time 32 separate calls
take (one forward pass instead of 32, and no thread contention on the cores). A server sees
exactly that pattern: many requests, each embedding one prompt, at the same time.
:class:`BatchingEmbedder` wraps any :class:`~semcache.embed.Embedder`, queues the texts of
concurrent callers and embeds them together on one worker thread.

How long a batch waits is bounded: when the worker picks up a request it takes everything that
is already queued; only when that is a single request and callers have recently been concurrent
does it wait up to ``max_wait`` (default 5 ms) for more, stopping early once ``max_batch`` texts
are gathered. A lone caller on an idle embedder is therefore never delayed; under load, requests
that arrive while a batch is being computed form the next batch, with no wait on top.

This module is part of the backends layer: it knows embedders, not the server that uses it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .embed import Embedder, check_texts
from .errors import CacheClosedError, InvalidInputError

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_WAIT_S = 0.005


@dataclass
class _Request:
    texts: list[str]
    future: Future[np.ndarray] = field(default_factory=Future)


@dataclass
class BatchingStats:
    """Counters of a :class:`BatchingEmbedder` (for metrics and benchmarks)."""

    calls: int = 0
    texts: int = 0
    batches: int = 0
    largest_batch: int = 0
    memo_hits: int = 0

    @property
    def mean_batch(self) -> float:
        return self.texts / self.batches if self.batches else 0.0


_STOP = object()


class BatchingEmbedder:
    """An :class:`~semcache.embed.Embedder` that merges concurrent ``embed()`` calls.

    ``embed(texts)`` blocks until the worker thread has embedded the texts (together with those
    of other callers) and returns what ``inner.embed(texts)`` would: same model id, dimension
    and unit rows (remembered texts are not embedded again). If a merged batch fails, each
    request is retried alone so one bad caller cannot fail the others. ``close()`` stops the
    worker; later calls raise :class:`~semcache.errors.CacheClosedError`.
    """

    def __init__(
        self,
        inner: Embedder,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float = DEFAULT_MAX_WAIT_S,
        memo: int = 4096,
    ) -> None:
        if max_batch < 1:
            raise InvalidInputError("max_batch must be at least 1")
        if not 0 <= max_wait <= 1.0:
            raise InvalidInputError("max_wait is in seconds and must be in [0, 1]")
        self.inner = inner
        self.model_id: str = inner.model_id
        self.dim: int = inner.dim
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.stats = BatchingStats()
        self.memo = max(0, int(memo))
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._recently_concurrent = False
        self._worker = threading.Thread(
            target=self._run, name="semcache-embed-batcher", daemon=True
        )
        self._worker.start()

    # -- the Embedder protocol -------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        items, known, todo, request = self._submit(texts)
        if request is not None:
            self._absorb(known, todo, request.future.result())
        return self._rows(items, known)

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        """``embed`` for asyncio: the caller waits on the event loop, holding no thread.

        A server can embed a request's prompt this way before it calls the (blocking) cache,
        whose own ``embed`` then finds the vector remembered.
        """
        items, known, todo, request = self._submit(texts)
        if request is not None:
            self._absorb(known, todo, await asyncio.wrap_future(request.future))
        return self._rows(items, known)

    def _submit(
        self, texts: Sequence[str]
    ) -> tuple[list[str], dict[str, np.ndarray], list[str], _Request | None]:
        items = check_texts(texts)
        known = self._recall(items)
        todo = [t for t in dict.fromkeys(items) if t not in known]
        if not todo:
            if items:
                self.stats.memo_hits += 1
            return items, known, todo, None
        request = _Request(todo)
        with self._lock:
            if self._closed:
                raise CacheClosedError("the batching embedder is closed")
            self.stats.calls += 1
            self._queue.put(request)
        return items, known, todo, request

    def _absorb(self, known: dict[str, np.ndarray], todo: list[str], fresh: np.ndarray) -> None:
        for text, vector in zip(todo, fresh, strict=True):
            known[text] = vector
        self._remember(todo, fresh)

    def _rows(self, items: list[str], known: dict[str, np.ndarray]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([known[t] for t in items]).astype(np.float32, copy=False)

    def _recall(self, items: list[str]) -> dict[str, np.ndarray]:
        if not self.memo:
            return {}
        found: dict[str, np.ndarray] = {}
        with self._memo_lock:
            for text in items:
                vector = self._memo.get(text)
                if vector is not None:
                    self._memo.move_to_end(text)
                    found[text] = vector
        return found

    def _remember(self, texts: list[str], vectors: np.ndarray) -> None:
        if not self.memo:
            return
        with self._memo_lock:
            for text, vector in zip(texts, vectors, strict=True):
                self._memo[text] = vector
                self._memo.move_to_end(text)
            while len(self._memo) > self.memo:
                self._memo.popitem(last=False)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker after the requests already queued; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout=30)

    def __enter__(self) -> BatchingEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"BatchingEmbedder({self.inner!r}, max_batch={self.max_batch}, "
            f"max_wait={self.max_wait})"
        )

    # -- the worker ------------------------------------------------------------------------

    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        """The batch that starts with ``first``, and whether the worker must stop after it."""
        batch = [first]
        size = len(first.texts)
        stop = False
        # Whatever is already queued joins at once.
        while size < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            assert isinstance(item, _Request)
            batch.append(item)
            size += len(item.texts)
        # Wait a little for more only when a lone request arrives while callers have been
        # concurrent lately. An idle embedder with one caller answers at once; a busy one
        # finds its next batch already queued (it gathered while the model computed), and
        # waiting on top of that would only leave the model idle.
        if (
            size < self.max_batch
            and self.max_wait > 0
            and len(batch) == 1
            and self._recently_concurrent
        ):
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                assert isinstance(item, _Request)
                batch.append(item)
                size += len(item.texts)
        self._recently_concurrent = len(batch) > 1
        return batch, stop

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            assert isinstance(item, _Request)
            batch, stop = self._gather(item)
            self._embed_batch(batch)
            if stop:
                break
        # Anything that slipped in after close() was requested is failed, not left hanging.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Request):
                item.future.set_exception(CacheClosedError("the batching embedder is closed"))

    def _embed_batch(self, batch: list[_Request]) -> None:
        texts = [t for request in batch for t in request.texts]
        self.stats.batches += 1
        self.stats.texts += len(texts)
        self.stats.largest_batch = max(self.stats.largest_batch, len(texts))
        try:
            vectors = np.asarray(self.inner.embed(texts), dtype=np.float32)
            if vectors.shape != (len(texts), self.dim):
                raise InvalidInputError(
                    f"inner embedder returned shape {vectors.shape}, "
                    f"expected {(len(texts), self.dim)}"
                )
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.warning("a batch of %d embed requests failed; retrying one by one", len(batch))
            for request in batch:
                self._embed_alone(request)
            return
        start = 0
        for request in batch:
            end = start + len(request.texts)
            request.future.set_result(np.ascontiguousarray(vectors[start:end]))
            start = end

    def _embed_alone(self, request: _Request) -> None:
        try:
            vectors = np.ascontiguousarray(self.inner.embed(request.texts), dtype=np.float32)
        except Exception as exc:
            request.future.set_exception(exc)
        else:
            request.future.set_result(vectors)
