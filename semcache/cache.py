"""``SemanticCache``: the facade that composes store, index, L1, policy and single-flight.

The flow of a lookup: normalise the prompt and resolve the scope's shard (scope digest plus the
namespace's current version); serve an exact repeat from L1 or the store's exact key; otherwise
embed, search the shard's index for ``k`` neighbours, re-check each against the store (alive, not
expired, same shard) and let the hit policy accept the best. Writes commit to SQLite first; the
index and L1 then catch up from the store's change log, which is also how changes made by other
processes on the same data folder reach this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .clock import Clock, SystemClock
from .embed import Embedder, SentenceTransformerEmbedder, as_unit_matrix
from .errors import (
    CacheClosedError,
    EmbedderMismatchError,
    EntryNotFoundError,
    InvalidInputError,
    SemcacheError,
    StoreError,
)
from .index import FaissIndex, VectorIndex
from .keys import exact_key, normalise, shard_key
from .l1 import L1Cache, L1Item
from .shards import IndexFactory, ShardSet
from .singleflight import SingleFlight
from .store import EVICTION_POLICIES, Store
from .threshold import HitPolicy, as_policy, check_threshold
from .types import DEFAULT_SCOPE, Entry, Hit, Scope

log = logging.getLogger("semcache")


class _Missing:
    """Sentinel for "not given" (so that ``ttl=None`` and ``ttl=0`` keep their meanings)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

DB_FILE = "semcache.db"
#: How far above a wrongly served similarity an entry's own floor is set by feedback.
FEEDBACK_MARGIN = 0.005
INDEX_DIR = "index"


def _check_ttl(ttl: Any) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise InvalidInputError(f"ttl must be None or a finite number of seconds, not {ttl!r}")
    if ttl < 0:
        raise InvalidInputError(f"ttl must not be negative, got {ttl}")
    return float(ttl)


def _check_tags(tags: Iterable[str] | None) -> tuple[str, ...]:
    if tags is None:
        return ()
    if isinstance(tags, str):
        raise InvalidInputError("tags must be a list of strings, not one string")
    out = tuple(tags)
    for tag in out:
        if not isinstance(tag, str) or not tag:
            raise InvalidInputError(f"a tag must be a non-empty string, not {tag!r}")
    return tuple(dict.fromkeys(out))


def _check_metadata(metadata: Mapping[str, Any] | None) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidInputError("metadata must be a mapping")
    try:
        return json.dumps(dict(metadata), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata must be JSON-serialisable: {exc}") from None


def _check_response(response: Any) -> str:
    if not isinstance(response, str):
        raise InvalidInputError(f"a response must be a str, not {type(response).__name__}")
    return response


def _scope(scope: Scope | None) -> Scope:
    if scope is None:
        return DEFAULT_SCOPE
    if not isinstance(scope, Scope):
        raise InvalidInputError(f"scope must be a semcache.Scope, not {type(scope).__name__}")
    return scope


class SemanticCache:
    """A semantic cache of LLM answers in a data folder (SQLite store + FAISS index).

    Args:
        path: the data folder; created if missing.
        embedder: any :class:`~semcache.embed.Embedder`; default all-MiniLM-L6-v2, offline.
        threshold: a cosine similarity in [-1, 1] or a :class:`~semcache.threshold.HitPolicy`;
            ``None`` is the default policy (see README for its measured error rates).
        default_ttl: seconds an entry lives when ``store`` is given no ``ttl``; None: forever.
        max_ttl: an upper bound on any entry's life (the maximum staleness); None: unbounded.
        max_entries, max_bytes: size bounds enforced on every write by evicting per ``eviction``
            (``"lru"``, ``"lfu"`` or ``"fifo"``). None: unbounded (nothing is evicted silently).
        clock: the time source for TTLs and LRU order (tests pass a ``FakeClock``).
        k: neighbours fetched per semantic lookup before the policy decides.
        index_factory: builds an empty index for a new shard; default FAISS, exact below
            ``hnsw_threshold`` vectors per shard and HNSW above.
        rebuild: rebuild the index from the store (and re-embed every prompt if the embedder
            changed) instead of refusing to open.
        l1_size: entries held by the in-process exact tier (0 disables it).
        sweep_interval: seconds between background expiry sweeps; None: no sweeper thread.
        checkpoint_every: persist the index after this many changes (and always on close).
        synchronous: SQLite's synchronous setting; NORMAL survives a killed process, FULL
            also a power cut.
        max_stale: stale-while-revalidate window in seconds: ``get_or_compute`` may serve an
            answer expired less than this long ago while one caller refreshes it. ``lookup``
            never serves expired answers. None: off.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "indexes/default",
        *,
        embedder: Embedder | None = None,
        threshold: float | HitPolicy | None = None,
        default_ttl: float | None = None,
        max_ttl: float | None = None,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        eviction: str = "lru",
        clock: Clock | None = None,
        k: int = 4,
        index_factory: IndexFactory | None = None,
        hnsw_threshold: int = 10_000,
        rebuild: bool = False,
        l1_size: int = 10_000,
        sweep_interval: float | None = None,
        checkpoint_every: int = 20_000,
        cull_limit: int = 16,
        synchronous: str = "NORMAL",
        max_stale: float | None = None,
    ) -> None:
        if eviction not in EVICTION_POLICIES:
            raise InvalidInputError(
                f"unknown eviction policy {eviction!r}; choose from {sorted(EVICTION_POLICIES)}"
            )
        for name, value in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"{name} must be a positive int or None")
        if not isinstance(k, int) or k < 1:
            raise InvalidInputError("k must be a positive int")
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise InvalidInputError(f"unknown synchronous setting {synchronous!r}")
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission, a read-only disk
            raise StoreError(f"cannot use {self.path} as a cache folder: {exc}") from exc
        self.embedder: Embedder = (
            embedder if embedder is not None else SentenceTransformerEmbedder()
        )
        if not isinstance(self.embedder, Embedder):
            raise InvalidInputError("embedder must have model_id, dim and embed(texts)")
        self.dim = int(self.embedder.dim)
        self.policy: HitPolicy = as_policy(threshold)
        self.default_ttl = _check_ttl(default_ttl)
        self.max_ttl = _check_ttl(max_ttl)
        self.max_stale = _check_ttl(max_stale) or 0.0
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.eviction = eviction
        self.clock: Clock = clock or SystemClock()
        self.k = k
        self.cull_limit = cull_limit
        self.checkpoint_every = checkpoint_every
        self._lock = threading.RLock()
        self._closed = False
        self._stats: Counter[str] = Counter()
        self._access: dict[int, tuple[int, float]] = {}
        self._versions: dict[str, int] = {}
        self._served: dict[str, float] = {}  # entry id -> similarity of its last semantic hit
        self._flights = SingleFlight()
        self.l1 = L1Cache(l1_size)
        self._checkpoint_seq = 0
        if index_factory is None:
            faiss.omp_set_num_threads(1)  # one query at a time: threads only add latency here

            def index_factory(dim: int) -> VectorIndex:
                return FaissIndex(dim, hnsw_threshold=hnsw_threshold)

        self._db = Store(self.path / DB_FILE, synchronous=synchronous.upper())
        self.shards = ShardSet(
            self.path / INDEX_DIR, self.dim, self.embedder.model_id, index_factory
        )
        try:
            self._check_embedder(rebuild)
            self.shards.acquire()
            self._open_index(rebuild)
        except BaseException:
            self.shards.release()
            with contextlib.suppress(Exception):
                self._db.close()
            raise
        self._data_version = self._db.data_version()
        self._checkpoint_seq = self.shards.seq
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        if sweep_interval is not None:
            self._start_sweeper(float(sweep_interval))

    # ------------------------------------------------------------------------------ opening
    def _check_embedder(self, rebuild: bool) -> None:
        model_id, dim = self._db.get_meta("model_id"), self._db.get_meta("dim")
        if model_id is None:
            self._db.set_meta("model_id", self.embedder.model_id)
            self._db.set_meta("dim", str(self.dim))
            return
        if model_id == self.embedder.model_id and int(dim or 0) == self.dim:
            return
        if not rebuild:
            raise EmbedderMismatchError(
                f"{self.path} was built with {model_id!r} (dim {dim}); this cache uses "
                f"{self.embedder.model_id!r} (dim {self.dim}). Open it with the same embedder, "
                "or pass rebuild=True to re-embed every stored prompt with the new one."
            )
        log.warning("re-embedding %s with %s", self.path, self.embedder.model_id)
        last = -1
        while True:
            rows = self._db.execute(
                "SELECT id, prompt FROM entries WHERE id > ? ORDER BY id LIMIT 256", (last,)
            )
            if not rows:
                break
            vectors = self.embed([r[1] for r in rows])
            with self._db.transaction() as conn:
                conn.executemany(
                    "UPDATE entries SET vector = ? WHERE id = ?",
                    [(v.tobytes(), r[0]) for v, r in zip(vectors, rows, strict=True)],
                )
            last = rows[-1][0]
        self._db.set_meta("model_id", self.embedder.model_id)
        self._db.set_meta("dim", str(self.dim))

    def _open_index(self, rebuild: bool) -> None:
        loaded = False if rebuild else self.shards.load()  # IndexCorruptError propagates
        if not loaded or self.shards.seq < self._db.trimmed_upto():
            self._rebuild_index()
        else:
            self._apply_changes()

    def _rebuild_index(self) -> None:
        """Rebuild every shard from the vectors in the store."""
        seq = self._db.last_seq()
        self.shards.clear()
        for ids, shards, vectors in self._db.iter_vectors():
            groups: dict[str, list[int]] = {}
            for row, shard in enumerate(shards):
                groups.setdefault(shard, []).append(row)
            for shard, rows in groups.items():
                self.shards.add(shard, ids[rows], vectors[rows])
        self.shards.seq = seq
        self.l1.clear()
        self._versions.clear()
        self._apply_changes()

    # ------------------------------------------------------------------------ derived state
    def _apply_changes(self) -> None:
        """Bring index, L1 and the version cache up to the store's change log."""
        with self._lock:
            if self.shards.seq < self._db.trimmed_upto():
                self._rebuild_index()
                return
            while True:
                changes = self._db.changes_since(self.shards.seq)
                if not changes:
                    break
                reindex: dict[int, str] = {}
                removed: dict[int, str] = {}
                for change in changes:
                    if change.op == "ver":
                        self._versions.pop(change.shard, None)
                        continue
                    rowid = int(change.entry_id)  # type: ignore[arg-type]
                    self.l1.discard(rowid)
                    if change.op in ("add", "vec"):
                        reindex[rowid] = change.shard
                        removed.pop(rowid, None)
                    elif change.op == "del":
                        removed[rowid] = change.shard
                        reindex.pop(rowid, None)
                present = self._db.vectors_of(list(reindex))
                for rowid, shard in reindex.items():
                    if rowid not in present:
                        removed[rowid] = shard
                by_shard: dict[str, list[int]] = {}
                for rowid, shard in removed.items():
                    by_shard.setdefault(shard, []).append(rowid)
                for shard, ids in by_shard.items():
                    self.shards.remove(shard, np.asarray(ids, dtype=np.int64))
                adds: dict[str, list[tuple[int, np.ndarray]]] = {}
                for rowid, (shard, vector) in present.items():
                    adds.setdefault(shard, []).append((rowid, vector))
                for shard, pairs in adds.items():
                    ids = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
                    self.shards.add(shard, ids, np.stack([p[1] for p in pairs]))
                self.shards.seq = changes[-1].seq
            self._data_version = self._db.data_version()
            if (
                self.shards.owner
                and self.shards.seq - self._checkpoint_seq >= self.checkpoint_every
            ):
                self._checkpoint_locked()

    def _sync(self) -> None:
        """Catch up with commits made by other connections (other processes)."""
        if self._db.data_version() != self._data_version:
            self._apply_changes()

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError("this SemanticCache is closed; open a new one")

    def _version(self, namespace: str) -> int:
        version = self._versions.get(namespace)
        if version is None:
            version = self._versions[namespace] = self._db.version(namespace)
        return version

    def _shard(self, scope: Scope) -> str:
        return shard_key(scope.digest, self._version(scope.namespace))

    def _policy(self, threshold: float | HitPolicy | None) -> HitPolicy:
        return self.policy if threshold is None else as_policy(threshold)

    # ---------------------------------------------------------------------------- embedding
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with the cache's embedder, checked: (n, dim) float32 unit rows."""
        vectors = self.embedder.embed(list(texts))
        try:
            out = as_unit_matrix(vectors, self.dim)
        except InvalidInputError as exc:
            raise EmbedderMismatchError(f"the embedder returned bad vectors: {exc}") from exc
        if len(out) != len(texts):
            raise EmbedderMismatchError(
                f"the embedder returned {len(out)} vectors for {len(texts)} texts"
            )
        return out

    def _vector(self, text: str, vector: Any) -> np.ndarray:
        if vector is None:
            return self.embed([text])[0]
        return as_unit_matrix(vector, self.dim)[0]

    # ------------------------------------------------------------------------------- lookup
    def lookup(
        self,
        prompt: str,
        *,
        scope: Scope | None = None,
        threshold: float | HitPolicy | None = None,
        vector: Any = None,
    ) -> Hit | None:
        """The cached answer for ``prompt`` in ``scope``, or None.

        A hit is an exact repeat (tier ``"l1"``, similarity 1.0) or the most similar live entry
        of the same scope that the policy accepts (tier ``"semantic"``, its cosine similarity).
        ``vector`` is the prompt's embedding when the caller already has it.
        """
        query = None if vector is None else as_unit_matrix(vector, self.dim)[0]
        hit, _, _, _ = self._lookup(prompt, _scope(scope), self._policy(threshold), query)
        return hit

    def probe(
        self,
        prompt: str,
        *,
        scope: Scope | None = None,
        threshold: float | HitPolicy | None = None,
        vector: Any = None,
    ) -> tuple[Hit | None, float | None]:
        """``lookup``, and the similarity of the nearest indexed prompt it searched.

        The second value tells how close a miss came (for metrics and threshold tuning) at no
        extra cost: it is the same search. It is None for exact repeats, which need no search,
        and for an empty scope.
        """
        query = None if vector is None else as_unit_matrix(vector, self.dim)[0]
        hit, _, _, nearest = self._lookup(prompt, _scope(scope), self._policy(threshold), query)
        return hit, nearest

    def _lookup(
        self, prompt: str, scope: Scope, policy: HitPolicy, vector: np.ndarray | None
    ) -> tuple[Hit | None, np.ndarray | None, str, float | None]:
        """(hit, the prompt's vector if it was needed, shard, nearest similarity searched)."""
        self._check_open()
        norm = normalise(prompt)
        with self._lock:
            self._sync()
            shard = self._shard(scope)
            now = self.clock.now()
            self._stats["lookups"] += 1
            hit = self._exact(norm, shard, now)
        if hit is not None:
            return hit, vector, shard, None
        if vector is None:
            vector = self.embed([norm])[0]
        with self._lock:
            self._sync()  # a bump or delete while we embedded must count
            shard = self._shard(scope)
            found = self._search(vector, shard)
            hit = self._semantic(norm, found, shard, policy, self.clock.now())
            if hit is None:
                self._stats["misses"] += 1
        nearest = float(found[0][0]) if len(found[0]) else None
        return hit, vector, shard, nearest

    def nearest_similarity(
        self, prompt: str, *, scope: Scope | None = None, vector: Any = None
    ) -> float | None:
        """Cosine similarity of the nearest indexed prompt in the scope (None if it is empty).

        For monitoring how close misses come; it serves nothing and changes nothing.
        """
        self._check_open()
        norm = normalise(prompt)
        query = self._vector(norm, vector)
        with self._lock:
            self._sync()
            index = self.shards.get(self._shard(_scope(scope)))
            if index is None or len(index) == 0:
                return None
            sims, _ = index.search(query, 1)
        return float(sims[0]) if len(sims) else None

    def _exact(self, norm: str, shard: str, now: float, *, record: bool = True) -> Hit | None:
        """An exact repeat live at ``now``; ``record=False`` only looks (no L1, stats, LRU)."""
        key = exact_key(shard, norm)
        item = self.l1.get(key, now) if record else None
        if item is None:
            row = self._db.find_exact(key, now)
            if row is None:
                return None
            item = L1Item(row.id, row.uid, row.prompt, row.response, row.expires_at, row.metadata)
            if not record:
                return Hit(item.response, 1.0, item.uid, "l1", item.prompt, item.metadata)
            self.l1.put(key, item)
        self._touch(item.rowid, now)
        self._stats["hits_l1"] += 1
        return Hit(item.response, 1.0, item.uid, "l1", item.prompt, item.metadata)

    def _search(self, vector: np.ndarray, shard: str) -> tuple[np.ndarray, np.ndarray]:
        """The shard's ``k`` nearest (similarities descending, ids); empty when it has none."""
        index = self.shards.get(shard)
        if index is None or len(index) == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        return index.search(vector, self.k)

    def _semantic(
        self,
        norm: str,
        found: tuple[np.ndarray, np.ndarray],
        shard: str,
        policy: HitPolicy,
        now: float,
        *,
        record: bool = True,
    ) -> Hit | None:
        """The best of the ``found`` neighbours (from :meth:`_search`) the policy accepts."""
        sims, ids = found
        if len(sims) == 0:
            return None
        keep = sims >= policy.min_similarity
        if not keep.any():
            self._stats["near_misses"] += int(len(sims) > 0)
            return None
        sims, ids = sims[keep], ids[keep]
        rows = self._db.candidates([int(i) for i in ids], shard, now)
        for sim, rowid in zip(sims.tolist(), ids.tolist(), strict=True):
            row = rows.get(rowid)
            if row is None or (row.min_similarity is not None and sim < row.min_similarity):
                continue
            if not policy.accept(norm, row.prompt, sim):
                continue
            hit = Hit(
                row.response, min(float(sim), 1.0), row.uid, "semantic", row.prompt, row.metadata
            )
            if not record:
                return hit
            self._touch(rowid, now)
            self._served[row.uid] = sim
            if len(self._served) > 10_000:
                self._served.pop(next(iter(self._served)))
            self._stats["hits_semantic"] += 1
            return hit
        self._stats["rejected"] += 1
        return None

    def _touch(self, rowid: int, now: float) -> None:
        count, _ = self._access.get(rowid, (0, now))
        self._access[rowid] = (count + 1, now)
        if len(self._access) >= 256:
            self._flush_access()

    def _flush_access(self) -> None:
        with self._lock:
            pending, self._access = self._access, {}
            self._db.record_access(pending)

    # -------------------------------------------------------------------------------- store
    def store(
        self,
        prompt: str,
        response: str,
        *,
        scope: Scope | None = None,
        ttl: float | None = MISSING,
        tags: Iterable[str] | None = (),
        metadata: Mapping[str, Any] | None = None,
        vector: Any = None,
    ) -> str:
        """Store an answer and return its entry id; an exact repeat in the scope is replaced.

        ``ttl`` is seconds to live: omitted means the cache's ``default_ttl``, ``None`` never
        expires, ``0`` expires at once. ``vector`` skips embedding (it must match the embedder).
        """
        self._check_open()
        norm = normalise(prompt)
        item = self._prepare(norm, response, _scope(scope), ttl, tags, metadata)
        return self._write(item, self._vector(norm, vector))

    def store_many(
        self,
        items: Iterable[tuple[str, str] | Mapping[str, Any]],
        *,
        scope: Scope | None = None,
        ttl: float | None = MISSING,
        tags: Iterable[str] | None = (),
        vectors: Any = None,
    ) -> list[str]:
        """Store many (prompt, response) pairs, embedding them in batches; returns their ids.

        Items may be dicts with ``prompt``, ``response`` and optional ``scope``, ``ttl``,
        ``tags``, ``metadata`` overriding the call's defaults. ``vectors`` (one row per item)
        skips embedding.
        """
        self._check_open()
        prepared: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, Mapping):
                fields = dict(item)
            elif isinstance(item, tuple | list) and len(item) == 2:
                fields = {"prompt": item[0], "response": item[1]}
            else:
                raise InvalidInputError("store_many takes (prompt, response) pairs or dicts")
            norm = normalise(fields.get("prompt"))
            prepared.append(
                self._prepare(
                    norm,
                    fields.get("response"),
                    _scope(fields.get("scope", scope)),
                    fields.get("ttl", ttl),
                    fields.get("tags", tags),
                    fields.get("metadata"),
                )
            )
        given = None if vectors is None else as_unit_matrix(vectors, self.dim)
        if given is not None and len(given) != len(prepared):
            raise InvalidInputError(f"{len(given)} vectors for {len(prepared)} items")
        ids: list[str] = []
        for start in range(0, len(prepared), 256):
            batch = prepared[start : start + 256]
            if given is None:
                batch_vectors = self.embed([p["norm"] for p in batch])
            else:
                batch_vectors = given[start : start + 256]
            with self._lock, self._db.transaction():
                ids += [
                    self._write(p, v, apply=False)
                    for p, v in zip(batch, batch_vectors, strict=True)
                ]
            self._apply_changes()
        return ids

    def _prepare(
        self,
        norm: str,
        response: Any,
        scope: Scope,
        ttl: Any,
        tags: Iterable[str] | None,
        metadata: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        return {
            "norm": norm,
            "response": _check_response(response),
            "scope": scope,
            "ttl": self.default_ttl if ttl is MISSING else _check_ttl(ttl),
            "tags": _check_tags(tags),
            "metadata": _check_metadata(metadata),
        }

    def _expiry(self, ttl: float | None, now: float) -> float | None:
        if self.max_ttl is not None:
            ttl = self.max_ttl if ttl is None else min(ttl, self.max_ttl)
        return None if ttl is None else now + ttl

    def _write(self, item: dict[str, Any], vector: np.ndarray, *, apply: bool = True) -> str:
        norm, scope = item["norm"], item["scope"]
        with self._lock:
            self._check_open()
            now = self.clock.now()
            self._sync()
            version = self._version(scope.namespace)
            shard = shard_key(scope.digest, version)
            key = exact_key(shard, norm)
            values = {
                "uid": uuid.uuid4().hex,
                "shard": shard,
                "namespace": scope.namespace,
                "version": version,
                "scope_digest": scope.digest,
                "scope": scope.to_json(),
                "prompt": norm,
                "l1_key": key,
                "response": item["response"],
                "vector": np.ascontiguousarray(vector, dtype=np.float32).tobytes(),
                "created_at": now,
                "updated_at": now,
                "accessed_at": now,
                "expires_at": self._expiry(item["ttl"], now),
                "size": len(norm.encode())
                + len(item["response"].encode())
                + 4 * self.dim
                + len(item["metadata"] or ""),
                "metadata": item["metadata"],
            }
            with self._db.transaction():
                _, uid = self._db.insert(values, item["tags"])
                self._cull(now)
                self._evict()
            self._stats["stores"] += 1
            if apply:
                self._apply_changes()
            # L1 fills on the first exact repeat (from the store), never here: the row may already
            # be gone (evicted by its own write) or not yet committed (store_many's batch).
            return uid

    def _cull(self, now: float) -> None:
        """Bounded clean-up on each write: a few expired or version-dead entries."""
        if self.cull_limit <= 0:
            return
        n = self._db.delete_where(
            "SELECT id FROM entries WHERE expires_at <= ?", (now - self.max_stale,), self.cull_limit
        )
        n += self._db.delete_where(_DEAD_VERSIONS, (), self.cull_limit)
        self._stats["culled"] += n

    def _evict(self) -> None:
        if self.max_entries is None and self.max_bytes is None:
            return
        entries, size = self._db.counters()
        order = EVICTION_POLICIES[self.eviction]
        for _ in range(1000):  # bounded: each round removes at least one entry
            over = 0
            if self.max_entries is not None and entries > self.max_entries:
                over = entries - self.max_entries
            if self.max_bytes is not None and size > self.max_bytes:
                over = max(over, 1)
            if not over:
                return
            self._flush_access()  # LRU/LFU order must include the hits not yet written
            n = self._db.delete_where(
                f"SELECT id FROM entries ORDER BY {order}", (), min(over, 1000)
            )
            self._stats["evictions"] += n
            if n == 0:
                return
            entries, size = self._db.counters()

    # ------------------------------------------------------------------------ get or compute
    def get_or_compute(
        self,
        prompt: str,
        fn: Callable[[str], str],
        *,
        scope: Scope | None = None,
        ttl: float | None = MISSING,
        tags: Iterable[str] | None = (),
        threshold: float | HitPolicy | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """The cached answer, or ``fn(prompt)`` stored and returned; concurrent misses for the
        same or a near-identical prompt in the same scope call ``fn`` once (single-flight)."""
        scope_, policy = _scope(scope), self._policy(threshold)
        item = self._prepare(normalise(prompt), "", scope_, ttl, tags, metadata)
        hit, vector, shard, _ = self._lookup(prompt, scope_, policy, None)
        if hit is not None:
            return hit.response
        assert vector is not None
        stale = self._stale(item["norm"], vector, shard, policy)
        flight, leader = self._flights.join_or_lead(shard, item["norm"], vector, policy)
        if not leader:
            if stale is not None:  # someone is refreshing it: serve the stale answer meanwhile
                self._stats["stale_served"] += 1
                return stale.response
            self._stats["singleflight_waits"] += 1
            return flight.future.result()
        try:
            with self._lock:
                found = self._search(vector, shard)
                again = self._semantic(item["norm"], found, shard, policy, self.clock.now())
            if again is not None:
                result = again.response
            else:
                result = _check_response(fn(prompt))
                self._stats["computes"] += 1
                self._write({**item, "response": result}, vector)
            flight.future.set_result(result)
            return result
        except BaseException as exc:
            flight.future.set_exception(exc)
            raise
        finally:
            self._flights.land(flight)

    async def aget_or_compute(
        self,
        prompt: str,
        fn: Callable[[str], str | Awaitable[str]],
        *,
        scope: Scope | None = None,
        ttl: float | None = MISSING,
        tags: Iterable[str] | None = (),
        threshold: float | HitPolicy | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """``get_or_compute`` for asyncio: ``fn`` may be sync or async; the event loop never
        blocks on embedding or SQLite."""
        scope_, policy = _scope(scope), self._policy(threshold)
        item = self._prepare(normalise(prompt), "", scope_, ttl, tags, metadata)
        hit, vector, shard, _ = await asyncio.to_thread(self._lookup, prompt, scope_, policy, None)
        if hit is not None:
            return hit.response
        assert vector is not None
        stale = await asyncio.to_thread(self._stale, item["norm"], vector, shard, policy)
        flight, leader = self._flights.join_or_lead(shard, item["norm"], vector, policy)
        if not leader:
            if stale is not None:
                self._stats["stale_served"] += 1
                return stale.response
            self._stats["singleflight_waits"] += 1
            return await asyncio.wrap_future(flight.future)
        try:
            if inspect.iscoroutinefunction(fn):
                result = await fn(prompt)
            else:
                result = await asyncio.to_thread(fn, prompt)
                if inspect.isawaitable(result):
                    result = await result
            result = _check_response(result)
            self._stats["computes"] += 1
            await asyncio.to_thread(self._write, {**item, "response": result}, vector)
            flight.future.set_result(result)
            return result
        except BaseException as exc:
            flight.future.set_exception(exc)
            raise
        finally:
            self._flights.land(flight)

    def _stale(self, norm: str, vector: np.ndarray, shard: str, policy: HitPolicy) -> Hit | None:
        """An answer expired less than ``max_stale`` ago (stale-while-revalidate), or None."""
        if not self.max_stale:
            return None
        with self._lock:
            horizon = self.clock.now() - self.max_stale
            return self._exact(norm, shard, horizon, record=False) or self._semantic(
                norm, self._search(vector, shard), shard, policy, horizon, record=False
            )

    async def alookup(
        self, prompt: str, *, scope: Scope | None = None, threshold: float | HitPolicy | None = None
    ) -> Hit | None:
        """``lookup`` without blocking the event loop."""
        return await asyncio.to_thread(self.lookup, prompt, scope=scope, threshold=threshold)

    async def astore(self, prompt: str, response: str, **kwargs: Any) -> str:
        """``store`` without blocking the event loop."""
        return await asyncio.to_thread(lambda: self.store(prompt, response, **kwargs))

    # ------------------------------------------------------------------------ write-through
    def get(self, entry_id: str) -> Entry:
        """The stored entry (expired or not); EntryNotFoundError when there is none."""
        self._check_open()
        row = self._db.get_by_uid(entry_id) if isinstance(entry_id, str) else None
        if row is None:
            raise EntryNotFoundError(f"no entry {entry_id!r}")
        return Entry(
            entry_id=row["uid"],
            prompt=row["prompt"],
            response=row["response"],
            scope=Scope.from_dict(json.loads(row["scope"])),
            version=row["version"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            accessed_at=row["accessed_at"],
            expires_at=row["expires_at"],
            hits=row["hits"],
            tags=self._db.tags_of(row["id"]),
            metadata=json.loads(row["metadata"]) if row["metadata"] else {},
        )

    def delete(self, entry_id: str) -> bool:
        """Delete one entry by id; True if it existed. Idempotent."""
        self._check_open()
        with self._lock:
            rowid = self._db.rowid_of(entry_id) if isinstance(entry_id, str) else None
            if rowid is None:
                return False
            removed = self._db.delete_ids([rowid])
            self._stats["invalidations_delete"] += len(removed)
            self._apply_changes()
            return bool(removed)

    def delete_prompt(self, prompt: str, *, scope: Scope | None = None) -> int:
        """Delete the entry stored for exactly this prompt (normalised) in the scope."""
        self._check_open()
        norm = normalise(prompt)
        with self._lock:
            self._sync()
            key = exact_key(self._shard(_scope(scope)), norm)
            n = self._db.delete_where("SELECT id FROM entries WHERE l1_key = ?", (key,), 1000)
            self._stats["invalidations_delete"] += n
            self._apply_changes()
            return n

    def update(
        self,
        entry_id: str,
        *,
        response: str = MISSING,
        prompt: str = MISSING,
        ttl: float | None = MISSING,
        tags: Iterable[str] | None = MISSING,
        metadata: Mapping[str, Any] | None = MISSING,
    ) -> None:
        """Change an entry in place; a new prompt is re-embedded. ``ttl`` restarts from now."""
        self._check_open()
        values: dict[str, Any] = {}
        new_vector: np.ndarray | None = None
        if response is not MISSING:
            values["response"] = _check_response(response)
        if prompt is not MISSING:
            values["prompt"] = normalise(prompt)
            new_vector = self.embed([values["prompt"]])[0]
        tag_list = None if tags is MISSING else _check_tags(tags)
        meta = MISSING if metadata is MISSING else _check_metadata(metadata)
        expires = MISSING if ttl is MISSING else _check_ttl(ttl)
        with self._lock:
            row = self._db.get_by_uid(entry_id) if isinstance(entry_id, str) else None
            if row is None:
                raise EntryNotFoundError(f"no entry {entry_id!r}")
            now = self.clock.now()
            if expires is not MISSING:
                values["expires_at"] = self._expiry(expires, now)
            if meta is not MISSING:
                values["metadata"] = meta
            if new_vector is not None:
                values["vector"] = new_vector.tobytes()
                values["l1_key"] = exact_key(row["shard"], values["prompt"])
            if not values and tag_list is None:
                return
            values["updated_at"] = now
            new_size = (
                len(values.get("prompt", row["prompt"]).encode())
                + len(values.get("response", row["response"]).encode())
                + 4 * self.dim
                + len(values.get("metadata", row["metadata"]) or "")
            )
            if new_size != row["size"]:
                values["size"] = new_size
            with self._db.transaction():
                if "l1_key" in values:
                    self._db.delete_where(
                        "SELECT id FROM entries WHERE l1_key = ? AND id != ?",
                        (values["l1_key"], row["id"]),
                        1000,
                    )
                self._db.update(row["id"], values, tag_list)
            self._stats["updates"] += 1
            self._apply_changes()

    def feedback(self, entry_id: str, correct: bool, *, similarity: float | None = None) -> None:
        """Tell the cache whether an answer it served was right; wrong ones tighten that entry.

        A wrong semantic hit at similarity ``s`` gives the entry its own floor just above
        ``s``, so prompts that far from it are never answered by it again (per-entry thresholds
        learned online, in the spirit of vCache); a wrong exact repeat (similarity 1.0) means the
        answer itself is wrong, and the entry is deleted. ``similarity`` defaults to that of the
        entry's last semantic hit in this process.
        """
        self._check_open()
        if not isinstance(correct, bool):
            raise InvalidInputError("correct must be True or False")
        with self._lock:
            rowid = self._db.rowid_of(entry_id) if isinstance(entry_id, str) else None
            if rowid is None:
                raise EntryNotFoundError(f"no entry {entry_id!r}")
            sim = self._served.get(entry_id, 1.0) if similarity is None else similarity
            if isinstance(sim, float) and 1.0 < sim < 1.0 + 1e-5:
                sim = 1.0  # float32 rounding of a unit vector's self-similarity
            sim = check_threshold(sim)
            if correct:
                with self._db.transaction() as conn:
                    conn.execute(
                        "UPDATE entries SET feedback_good = feedback_good + 1 WHERE id = ?",
                        (rowid,),
                    )
                return
            self._stats["feedback_wrong"] += 1
            if sim >= 1.0 - 1e-6:
                self._db.delete_ids([rowid])
                self._apply_changes()
                return
            with self._db.transaction() as conn:
                conn.execute(
                    "UPDATE entries SET feedback_bad = feedback_bad + 1, min_similarity = "
                    "max(coalesce(min_similarity, -1.0), ?) WHERE id = ?",
                    (min(sim + FEEDBACK_MARGIN, 1.0), rowid),
                )

    # ------------------------------------------------------------------------- invalidation
    def invalidate_tags(self, *tags: str) -> int:
        """Delete every entry carrying any of ``tags``; returns how many. Cost grows with the
        entries tagged, not with the cache."""
        self._check_open()
        tag_list = _check_tags(tags)
        if not tag_list:
            return 0
        marks = ", ".join("?" for _ in tag_list)
        total = 0
        while True:
            with self._lock:
                n = self._db.delete_where(
                    f"SELECT entry_id FROM tags WHERE tag IN ({marks})", tag_list, 1000
                )
                self._apply_changes()
            total += n
            if n == 0:
                break
        self._stats["invalidations_tag"] += total
        return total

    def bump(self, namespace: str) -> int:
        """Make every entry of ``namespace`` unreachable at once (O(1)); returns the new
        version. The dead entries are deleted lazily, by writes and ``expire()``."""
        self._check_open()
        if not isinstance(namespace, str) or not namespace:
            raise InvalidInputError("namespace must be a non-empty string")
        with self._lock:
            version = self._db.bump(namespace)
            self._apply_changes()
            self._stats["invalidations_version"] += 1
            return version

    def version(self, namespace: str) -> int:
        """The namespace's current version (0 until first bumped)."""
        self._check_open()
        with self._lock:
            self._sync()
            return self._version(namespace)

    def invalidate_similar(
        self,
        text_or_vector: str | Sequence[float] | np.ndarray,
        radius: float,
        *,
        scope: Scope | None = None,
    ) -> list[str]:
        """Delete every entry whose cosine similarity to the text (embedded) or vector is
        ``>= radius``, in ``scope`` only if given; returns the ids removed. Exact."""
        self._check_open()
        radius = check_threshold(radius)
        if isinstance(text_or_vector, str):
            query = self.embed([normalise(text_or_vector)])[0]
        else:
            query = as_unit_matrix(text_or_vector, self.dim)[0]
        with self._lock:
            self._sync()
            if scope is not None:
                shard = self._shard(_scope(scope))
                targets = [(shard, self.shards.get(shard))]
            else:
                targets = list(self.shards.items())
            ids: list[int] = []
            for _, index in targets:
                if index is not None and len(index):
                    found, _ = index.range_search(query, radius)
                    ids += found.tolist()
            removed = self._db.delete_ids(ids) if ids else []
            self._apply_changes()
        self._stats["invalidations_semantic"] += len(removed)
        return removed

    def expire(self) -> int:
        """Delete every expired and version-dead entry now, in batches; returns the count."""
        self._check_open()
        total = 0
        for sql, params in (
            ("SELECT id FROM entries WHERE expires_at <= ?", (self.clock.now() - self.max_stale,)),
            (_DEAD_VERSIONS, ()),
        ):
            while True:
                with self._lock:
                    n = self._db.delete_where(sql, params, 1000)
                    self._apply_changes()
                total += n
                if n == 0:
                    break
        self._stats["invalidations_ttl"] += total
        return total

    def cached(self, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: answer a function of a prompt (sync or async) from the cache, with
        single-flight; see :func:`semcache.decorators.cached` for the options."""
        from .decorators import cached

        return cached(self, **options)

    def invalidates(
        self,
        *,
        tags: Any = None,
        entries: Any = None,
        namespaces: Any = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: after the wrapped write returns, invalidate the tags, entry ids and
        namespaces it names (lists, or functions of the write's arguments); never if it raises."""
        from .invalidation import invalidates

        return invalidates(self, tags=tags, entries=entries, namespaces=namespaces)

    def _start_sweeper(self, interval: float) -> None:
        def sweep() -> None:
            while not self._stop.wait(interval):
                try:
                    self.expire()
                except CacheClosedError:
                    return
                except SemcacheError:  # pragma: no cover - logged, retried next round
                    log.exception("expiry sweep failed")

        self._sweeper = threading.Thread(target=sweep, name="semcache-sweeper", daemon=True)
        self._sweeper.start()

    # ---------------------------------------------------------------------- maintenance
    def checkpoint(self) -> None:
        """Persist the index now, so a restart replays nothing."""
        self._check_open()
        with self._lock:
            self._apply_changes()
            self._checkpoint_locked()

    def _checkpoint_locked(self) -> None:
        self._flush_access()
        if not self.shards.owner:
            return
        self.shards.save()
        self._db.trim_changes(self.shards.seq)
        self._checkpoint_seq = self.shards.seq

    def verify(self, fix: bool = False) -> list[str]:
        """Check that store and index agree; returns the problems found (empty when sound).

        With ``fix=True`` the index is rebuilt from the store and the counters recomputed; the
        problems found before fixing are still returned.
        """
        self._check_open()
        problems = self._db.quick_check()
        with self._lock:
            self._apply_changes()
            if self._db.get_meta("model_id") != self.embedder.model_id:
                problems.append("store model id differs from the embedder's")
            expected: dict[str, dict[int, np.ndarray]] = {}
            for ids, shards, vectors in self._db.iter_vectors():
                for rowid, shard, vec in zip(ids.tolist(), shards, vectors, strict=True):
                    expected.setdefault(shard, {})[rowid] = vec
            seen = set()
            for shard, index in self.shards.items():
                seen.add(shard)
                want = expected.get(shard, {})
                have = set(index.ids().tolist())
                missing, extra = set(want) - have, have - set(want)
                if missing:
                    problems.append(f"shard {shard}: {len(missing)} entries missing from index")
                if extra:
                    problems.append(f"shard {shard}: {len(extra)} index ids not in the store")
                common = sorted(set(want) & have)
                if common:
                    got = index.vectors(np.asarray(common, dtype=np.int64))
                    ref = np.stack([want[i] for i in common])
                    bad = int((np.abs(got - ref).max(axis=1) > 1e-5).sum())
                    if bad:
                        problems.append(f"shard {shard}: {bad} index vectors differ from store")
            for shard in set(expected) - seen:
                problems.append(f"shard {shard}: {len(expected[shard])} entries not indexed")
            n = sum(len(v) for v in expected.values())
            if self._db.counters()[0] != n:
                problems.append(f"entry counter says {self._db.counters()[0]}, table has {n}")
            if fix and problems:
                self._rebuild_index()
                self._db.recount()
        return problems

    def stats(self) -> dict[str, Any]:
        """Counts for monitoring: sizes, tiers, hit rate, invalidations by pattern."""
        self._check_open()
        with self._lock:
            self._sync()
            entries, size = self._db.counters()
            s = dict(self._stats)
            hits = s.get("hits_l1", 0) + s.get("hits_semantic", 0)
            lookups = s.get("lookups", 0)
            return {
                "entries": entries,
                "bytes": size,
                "shards": self.shards.count,
                "indexed": len(self.shards),
                "l1_entries": len(self.l1),
                "lookups": lookups,
                "hits": hits,
                "hits_l1": s.get("hits_l1", 0),
                "hits_semantic": s.get("hits_semantic", 0),
                "misses": s.get("misses", 0),
                "hit_rate": hits / lookups if lookups else 0.0,
                "stores": s.get("stores", 0),
                "computes": s.get("computes", 0),
                "singleflight_waits": s.get("singleflight_waits", 0),
                "evictions": s.get("evictions", 0),
                "culled": s.get("culled", 0),
                "invalidations": {
                    pattern: s.get(f"invalidations_{pattern}", 0)
                    for pattern in ("ttl", "delete", "tag", "version", "semantic", "cdc")
                },
                "model_id": self.embedder.model_id,
                "dim": self.dim,
                "policy": repr(self.policy),
                "path": str(self.path),
            }

    def close(self) -> None:
        """Persist the index and release the data folder. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        with self._lock:
            try:
                self._apply_changes()
                self._checkpoint_locked()
            finally:
                self._closed = True
                self.shards.release()
                self._db.close()

    def __enter__(self) -> SemanticCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SemanticCache({str(self.path)!r}, policy={self.policy!r})"


# Driven by the (few) namespaces, then the (namespace, version) index: never a table scan.
_DEAD_VERSIONS = (
    "SELECT e.id FROM namespaces n CROSS JOIN entries e "
    "ON e.namespace = n.namespace AND e.version < n.version"
)
