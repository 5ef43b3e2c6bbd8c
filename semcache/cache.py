"""``SemanticCache``: the facade that wires the store of record, the replica, the fenced write,
the hit policy, eviction, single-flight, feedback and the sweeper together.

The flow of a lookup: note the store's fence position, catch the replica up with the store's
log, resolve the scope's shard (scope digest plus the namespace's current version); serve an
exact repeat from L1 or the store's exact key; otherwise embed, search the shard's index for
neighbours, re-check each against the store (alive, not expired, same shard) and let the hit
policy accept the best, outside the cache-wide lock. Writes commit to the store first; the
replica then catches up from the log, which is also how changes made by other processes on the
same data folder reach this one. A write after a miss is fenced: it commits only if nothing that
covers it was invalidated after the lookup's position (:mod:`semcache.fence`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .checks import (
    as_scope,
    check_answer,
    check_count,
    check_fn,
    check_metadata,
    check_namespace,
    check_response,
    check_seconds,
    check_tags,
    check_ttl,
    may_be_id,
)
from .clock import Clock, SystemClock
from .embed import Embedder, SentenceTransformerEmbedder, as_unit_matrix, as_unit_vector
from .errors import (
    CacheClosedError,
    EmbedderMismatchError,
    EntryNotFoundError,
    EntryTooLargeError,
    InvalidInputError,
    SemcacheError,
    StoreError,
)
from .eviction import Evictor
from .feedback import Feedback
from .fence import Observed
from .folder import FolderLock
from .index import FaissIndex, VectorIndex
from .keys import exact_key, normalise
from .l1 import L1Cache, L1Item
from .leases import Lead, Leases, poll_lead, release_quietly
from .progress import Progress
from .replica import Replica
from .shards import IndexFactory, ShardSet
from .singleflight import HANDOVER, Flight, SingleFlight
from .store import Row
from .stores import SYNCHRONOUS, default_index_dir, is_store_url, open_store, replica_id
from .sweeper import Sweeper
from .threshold import HitPolicy, as_policy, check_threshold
from .types import Entry, Hit, Scope
from .vectorcodec import encode
from .writer import Writer

log = logging.getLogger("semcache")


class _Missing:
    """Sentinel for "not given" (so that ``ttl=None`` and ``ttl=0`` keep their meanings)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

DB_FILE = "semcache.db"
#: ``consistency=``: "bounded" serves L1 hits and sees other replicas' new entries within the
#: propagation delay; "strong" confirms every lookup against the store of record first.
CONSISTENCY = ("bounded", "strong")
INDEX_DIR = "index"
#: The most neighbours a lookup fetches while it skips dead (expired, deleted) candidates.
MAX_K = 256
#: Entries ``invalidate_tags`` deletes per transaction (each holds the writers' turn).
TAG_BATCH = 1000


async def _call(fn: Callable[[str], Any], prompt: str) -> Any:
    """Call a compute function from asyncio: awaited if async, in a thread if not."""
    if inspect.iscoroutinefunction(fn):
        return await fn(prompt)
    result = await asyncio.to_thread(fn, prompt)
    if inspect.isawaitable(result):
        result = await result
    return result


@dataclass
class _Choice:
    """What the policy made of a lookup's candidates. ``decision`` is a learning policy's
    verdict on the served candidate; ``refused`` the best candidate it refused with a score
    (a free label once the LLM answers the prompt)."""

    served: tuple[int, Hit] | None = None
    decision: Any = None
    refused: tuple[Row, Any] | None = None


@dataclass
class _Looked:
    """One lookup's outcome, with what a fenced write after a miss needs."""

    hit: Hit | None
    vector: np.ndarray | None
    shard: str
    nearest: float | None
    observed: Observed | None  # taken only for a lookup a fenced write may follow
    choice: _Choice | None = None


class SemanticCache:
    """A semantic cache of LLM answers: a store of record (SQLite in a data folder, or a
    PostgreSQL schema shared by replicas) and this process's FAISS index, L1 and version cache.

    Args:
        path: the data folder (created if missing), or a ``postgresql://`` URL: the shared
            store of record that every replica (process, machine) points at.
        embedder: any :class:`~semcache.embed.Embedder`; default all-MiniLM-L6-v2, offline.
        threshold: a cosine similarity in [-1, 1] or a :class:`~semcache.threshold.HitPolicy`;
            ``None`` is the default policy (see README for its measured error rates).
        default_ttl: seconds an entry lives when ``store`` is given no ``ttl``; None: forever.
        max_ttl: an upper bound on any entry's life (the maximum staleness); None: unbounded.
        max_entries, max_bytes: size bounds enforced on every write by evicting per ``eviction``
            (``"lru"``, ``"lfu"`` or ``"fifo"``). None: unbounded (nothing is evicted silently).
            An entry is never evicted by its own write (nor by a later batch of its own
            ``store_many``); one larger than ``max_bytes`` on its own, or a ``store_many``
            that alone exceeds a bound, is refused before anything is written.
        clock: the time source for TTLs and LRU order (tests pass a ``FakeClock``).
        k: live neighbours considered per semantic lookup before the policy decides.
        index_factory: builds an empty index for a new shard; default FAISS, exact below
            ``hnsw_threshold`` vectors per shard and HNSW above.
        rebuild: rebuild the index from the store (and re-embed every prompt if the embedder
            changed, which needs the folder to itself) instead of loading the persisted one.
        l1_size: entries held by the in-process exact tier (0 disables it).
        sweep_interval: seconds between background expiry sweeps; None: no sweeper thread.
        checkpoint_every: persist the index after this many changes (and always on close);
            None (the default): after a quarter of the entries indexed, but at least 20,000
            and at most 100,000 changes (what a reopen replays from the log at most).
        log_keep: changes the checkpoint owner keeps in the store's log behind its checkpoint,
            so another process that far behind catches up from the log instead of rebuilding.
        synchronous: SQLite's synchronous setting; NORMAL survives a killed process, FULL
            also a power cut.
        max_stale: stale-while-revalidate window in seconds: ``get_or_compute`` may serve an
            answer expired less than this long ago while one caller refreshes it. ``lookup``
            never serves expired answers. None: off.
        target_error: hold the rate of wrong answers served at or under this share, at 95%
            confidence, with :class:`~semcache.errorbudget.ErrorBudget` as the hit policy (it
            cannot be combined with ``threshold``). It learns per namespace from labels the
            cache gets on its own traffic (a refused candidate whose prompt the LLM then
            answers, a small share of uncertain hits answered by the LLM anyway where a
            compute function exists, and ``feedback``); its state is kept in the store and
            survives restarts, and ``stats()["policy_state"]`` reports its operating point.
        index_dir: with a ``postgresql://`` store, the folder of this replica's index files;
            default ``$XDG_CACHE_HOME/semcache/<store id>``. A data folder keeps its own.
        schema: the PostgreSQL schema of the shared store (created and migrated on open).
        consistency: ``"bounded"`` (default): a semantic hit is confirmed against the store
            of record before it is served (a deleted, expired or version-bumped entry never
            is), while exact repeats (L1) and new entries of other replicas are seen within
            the propagation delay. ``"strong"``: every lookup first catches up with the
            store, so nothing committed before it began is missed (a round trip per lookup
            on PostgreSQL; the same as bounded on SQLite, whose catch-up check is local).
        poll_interval: seconds between a replica's checks of a shared store when no change
            notification arrives (a notification lost with its connection costs at most this).
        flight_timeout: seconds a computation holds its lease for single-flight between
            processes sharing the store; a waiter computes itself after that long.
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
        checkpoint_every: int | None = None,
        log_keep: int = 10_000,
        cull_limit: int = 16,
        synchronous: str = "NORMAL",
        max_stale: float | None = None,
        target_error: float | None = None,
        index_dir: str | os.PathLike[str] | None = None,
        schema: str = "semcache",
        consistency: str = "bounded",
        poll_interval: float = 1.0,
        flight_timeout: float = 60.0,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise InvalidInputError(
                f"path must be a folder or a postgresql:// URL, not {type(path).__name__}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError("k must be a positive int")
        check_count(l1_size, "l1_size")
        Evictor.check(eviction, max_entries, max_bytes)
        if check_count(hnsw_threshold, "hnsw_threshold") < 1:
            raise InvalidInputError("hnsw_threshold must be a positive int")
        if sweep_interval is not None:
            sweep_interval = check_seconds(sweep_interval, "sweep_interval")
        check_count(log_keep, "log_keep")
        if checkpoint_every is not None and (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, int)
            or checkpoint_every < 1
        ):
            raise InvalidInputError("checkpoint_every must be a positive int or None")
        check_count(cull_limit, "cull_limit")
        if clock is not None and not callable(getattr(clock, "now", None)):
            raise InvalidInputError("clock must have a now() method (see semcache.clock)")
        if not isinstance(synchronous, str) or synchronous.upper() not in SYNCHRONOUS:
            raise InvalidInputError(f"unknown synchronous setting {synchronous!r}")
        if consistency not in CONSISTENCY:
            raise InvalidInputError(
                f"consistency must be one of {', '.join(CONSISTENCY)}, got {consistency!r}"
            )
        poll_interval = check_seconds(poll_interval, "poll_interval")
        flight_timeout = check_seconds(flight_timeout, "flight_timeout")
        self.consistency = consistency
        self.flight_timeout = float(flight_timeout)
        self.shared = is_store_url(path)
        if not self.shared and index_dir is not None:
            raise InvalidInputError(
                "index_dir is for a shared postgresql:// store; a data folder keeps its index "
                "inside it"
            )
        self.embedder: Embedder = (
            embedder if embedder is not None else SentenceTransformerEmbedder()
        )
        if not isinstance(self.embedder, Embedder):
            raise InvalidInputError("embedder must have model_id, dim and embed(texts)")
        self.dim = int(self.embedder.dim)
        if target_error is not None:
            if threshold is not None:
                raise InvalidInputError("give threshold or target_error, not both")
            from .errorbudget import ErrorBudget

            if isinstance(target_error, bool) or not isinstance(target_error, int | float):
                raise InvalidInputError(f"target_error must be a rate, not {target_error!r}")
            threshold = ErrorBudget(float(target_error))
        self.policy: HitPolicy = as_policy(threshold)
        self.default_ttl = check_ttl(default_ttl)
        max_ttl = check_ttl(max_ttl)  # checked before anything is opened
        max_stale = check_ttl(max_stale) or 0.0
        self.clock: Clock = clock or SystemClock()
        self.k = k
        self._closed = False
        self._stats: Counter[str] = Counter()
        self._access: dict[int, tuple[int, float]] = {}
        self._flights = SingleFlight()
        self.l1 = L1Cache(l1_size)
        if index_factory is None:
            faiss.omp_set_num_threads(1)  # one query at a time: threads only add latency here

            def index_factory(dim: int) -> VectorIndex:
                return FaissIndex(dim, hnsw_threshold=hnsw_threshold)

        self._db = open_store(path, synchronous=synchronous, schema=schema)
        try:
            if self.shared:
                #: where this replica keeps its index files (the data folder for SQLite)
                self.path = Path(
                    index_dir if index_dir is not None else default_index_dir(self._db.store_id)
                )
                self.path.mkdir(parents=True, exist_ok=True)
                #: the store of record, as shown to people (a URL without its password)
                self.location = str(self._db.path)
                slot = ":" + replica_id(self.path)
            else:
                self.path = Path(path)
                self.location = str(self.path)
                slot = ""
        except OSError as exc:  # a file in the way, no permission, a read-only disk
            self._db.close()
            raise StoreError(f"cannot use {exc.filename} as an index folder: {exc}") from exc
        self.evictor = Evictor(self._db, eviction, max_entries, max_bytes)  # checked above
        self.shards = ShardSet(
            self.path / INDEX_DIR, self.dim, self.embedder.model_id, index_factory
        )
        self.replica = Replica(
            self._db,
            self.shards,
            self.l1,
            checkpoint_every=checkpoint_every,
            log_keep=log_keep,
            slot=slot,
        )
        self._lock = self.replica.lock
        self.writer = Writer(
            self._db,
            self.replica,
            self.evictor,
            self.clock,
            self._stats,
            check_open=self._check_open,
            flush_access=self._flush_access,
            max_ttl=max_ttl,
            max_stale=max_stale,
            cull_limit=cull_limit,
        )
        self._leases = Leases(self._db, self.flight_timeout)
        self._feedback = Feedback(self._db)
        self._folder: FolderLock | None = None
        try:
            self._folder = FolderLock(self.path)
            reembedded = self._check_embedder(rebuild)
            self.replica.open(rebuild=rebuild or reembedded)
            self._load_policy_state()
            self.replica.start_merger()
            self.replica.follow(float(poll_interval))
        except BaseException:
            self.replica.release()
            if self._folder is not None:
                self._folder.release()
            with contextlib.suppress(Exception):
                self._db.close()
            raise
        self._sweeper = Sweeper(self.expire, float(sweep_interval)) if sweep_interval else None

    # ------------------------------------------------------------------------------ opening
    def _check_embedder(self, rebuild: bool) -> bool:
        """Refuse (or with ``rebuild``, re-embed) a store built with another embedder; True
        when it re-embedded."""
        with self._db.transaction():  # processes opening a new store together: one names it
            model_id, dim = self._db.get_meta("model_id"), self._db.get_meta("dim")
            if model_id is None:
                self._db.set_meta("model_id", self.embedder.model_id)
                self._db.set_meta("dim", str(self.dim))
                return False
        if model_id == self.embedder.model_id and int(dim or 0) == self.dim:
            return False
        if self.shared:  # other replicas would go on searching with the old model's vectors
            raise EmbedderMismatchError(
                f"{self.location} was built with {model_id!r} (dim {dim}); this cache uses "
                f"{self.embedder.model_id!r} (dim {self.dim}). Open it with the same embedder; "
                "a shared store is not re-embedded in place (rebuild=True does not apply): give "
                "the new model a schema of its own (schema=...) and fill it"
            )
        if not rebuild:
            raise EmbedderMismatchError(
                f"{self.location} was built with {model_id!r} (dim {dim}); this cache uses "
                f"{self.embedder.model_id!r} (dim {self.dim}). Open it with the same embedder, "
                "or pass rebuild=True to re-embed every stored prompt with the new one."
            )
        assert self._folder is not None
        with self._folder.exclusive(f"re-embed {self.path} with {self.embedder.model_id}"):
            log.warning("re-embedding %s with %s", self.path, self.embedder.model_id)
            what = f"re-embedding {self.path} with {self.embedder.model_id}"
            with Progress(what, total=self._db.counters()[0], unit="prompts") as done:
                for batch in self._db.iter_prompts():
                    vectors = self.embed([prompt for _, prompt in batch])
                    self._db.set_vectors(
                        [(rowid, encode(v)) for (rowid, _), v in zip(batch, vectors, strict=True)]
                    )
                    done.advance(len(batch))
            self._db.set_meta("model_id", self.embedder.model_id)
            self._db.set_meta("dim", str(self.dim))
        return True

    def _load_policy_state(self) -> None:
        """A learning policy resumes from the labels it had (kept in the store), and keeps
        new ones there in batches as they arrive, so a killed process loses at most one."""
        load = getattr(self.policy, "load_state", None)
        state = self._db.get_meta("policy_state") if load is not None else None
        if state:
            try:
                load(json.loads(state))  # type: ignore[misc]
            except (ValueError, SemcacheError) as exc:
                log.warning("policy state in %s not restored: %s", self.location, exc)
        persist = getattr(self.policy, "persist_to", None)
        if persist is not None:
            persist(lambda state: self._db.set_meta("policy_state", json.dumps(state)))

    def _save_policy_state(self) -> None:
        state_dict = getattr(self.policy, "state_dict", None)
        if state_dict is not None:
            self._db.set_meta("policy_state", json.dumps(state_dict()))

    # -------------------------------------------------------------------- write settings
    @property
    def max_ttl(self) -> float | None:
        """The longest time to live any entry gets, in seconds (None: no cap)."""
        return self.writer.max_ttl

    @max_ttl.setter
    def max_ttl(self, value: float | None) -> None:
        self.writer.max_ttl = check_ttl(value)

    @property
    def max_stale(self) -> float:
        """The stale-while-revalidate window in seconds (0: off)."""
        return self.writer.max_stale

    @max_stale.setter
    def max_stale(self, value: float | None) -> None:
        self.writer.max_stale = check_ttl(value) or 0.0

    @property
    def cull_limit(self) -> int:
        """Expired or version-dead entries each write removes at most."""
        return self.writer.cull_limit

    @cull_limit.setter
    def cull_limit(self, value: int) -> None:
        self.writer.cull_limit = check_count(value, "cull_limit")

    # ------------------------------------------------------------------------ derived state
    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError("this SemanticCache is closed; open a new one")

    def _policy(self, threshold: float | HitPolicy | None) -> HitPolicy:
        return self.policy if threshold is None else as_policy(threshold)

    def position(self) -> int:
        """The store's fence position now. Take it before a lookup and pass it to
        ``store(..., fence=)`` so an answer computed from that lookup is not cached if an
        invalidation that covers it commits in between."""
        self._check_open()
        return self._db.position()

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
        return as_unit_vector(vector, self.dim)

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
        query = None if vector is None else as_unit_vector(vector, self.dim)
        return self._lookup(prompt, as_scope(scope), self._policy(threshold), query).hit

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
        query = None if vector is None else as_unit_vector(vector, self.dim)
        looked = self._lookup(prompt, as_scope(scope), self._policy(threshold), query)
        return looked.hit, looked.nearest

    def _lookup(
        self,
        prompt: str,
        scope: Scope,
        policy: HitPolicy,
        vector: np.ndarray | None,
        *,
        fence: bool = False,
    ) -> _Looked:
        self._check_open()
        norm = normalise(prompt)
        # the fence position before anything is read, only when a write may follow this lookup
        observed = Observed(self._db.position(), self.clock.now()) if fence else None
        strong = self.consistency == "strong"
        # with the vector given, the store's exact row comes with the candidates (one read,
        # one pass under the lock); otherwise it is looked for first, since finding it saves
        # the embedding
        with self._lock:
            self.replica.sync(fresh=strong)
            shard = self.replica.shard(scope)
            self._stats["lookups"] += 1
            now = self.clock.now()
            hit = self._exact(norm, shard, now, store=vector is None)
            if hit is None and vector is not None:  # one look: no embedding to wait for
                key = exact_key(shard, norm)
                nearest, rows, exact = self._candidates(vector, shard, policy, now, key)
                hit = None if exact is None else self._exact_hit(key, exact, now)
        if hit is not None:
            return _Looked(hit, vector, shard, None, observed)
        if vector is None:
            vector = self.embed([norm])[0]
            with self._lock:
                self.replica.sync(fresh=strong)  # a bump or delete while we embedded must count
                shard = self.replica.shard(scope)
                now = self.clock.now()
                nearest, rows, _ = self._candidates(vector, shard, policy, now, None)
        # the policy runs outside the cache-wide lock
        choice = self._choose(norm, rows, policy, scope.namespace)
        with self._lock:
            if choice.served is None:
                self._stats["misses"] += 1
                self._stats["near_misses" if rows else "rejected"] += int(nearest is not None)
            else:
                self._served(*choice.served, now, choice.decision, scope.namespace)
        hit = None if choice.served is None else choice.served[1]
        return _Looked(hit, vector, shard, nearest, observed, choice)

    def nearest_similarity(
        self, prompt: str, *, scope: Scope | None = None, vector: Any = None
    ) -> float | None:
        """Cosine similarity of the nearest indexed prompt in the scope (None if it is empty).

        For monitoring how close misses come; it serves nothing and changes nothing.
        """
        self._check_open()
        query = self._vector(normalise(prompt), vector)
        with self._lock:
            self.replica.sync()
            sims, _ = self.replica.search(self.replica.shard(as_scope(scope)), query, 1)
        return float(sims[0]) if len(sims) else None

    def _exact(
        self, norm: str, shard: str, now: float, *, record: bool = True, store: bool = True
    ) -> Hit | None:
        """An exact repeat live at ``now``; ``record=False`` only looks (no L1, stats, LRU);
        ``store=False`` looks in L1 alone."""
        key = exact_key(shard, norm)
        item = self.l1.get(key, now) if record else None
        if item is not None:
            return self._l1_hit(item, now)
        if not store:
            return None
        row = self._db.find_exact(key, now)
        if row is None:
            return None
        if not record:
            return Hit(row.response, 1.0, row.uid, "l1", row.prompt, row.metadata)
        return self._exact_hit(key, row, now)

    def _exact_hit(self, key: str, row: Row, now: float) -> Hit:
        """Serve an exact repeat read from the store, and keep it in L1."""
        item = L1Item(row.id, row.uid, row.prompt, row.response, row.expires_at, row.metadata)
        self.l1.put(key, item)
        return self._l1_hit(item, now)

    def _l1_hit(self, item: L1Item, now: float) -> Hit:
        self._touch(item.rowid, now)
        self._stats["hits_l1"] += 1
        return Hit(item.response, 1.0, item.uid, "l1", item.prompt, item.metadata)

    def _candidates(
        self, vector: np.ndarray, shard: str, policy: HitPolicy, now: float, key: str | None
    ) -> tuple[float | None, list[tuple[float, Row]], Row | None]:
        """(nearest similarity searched, up to ``k`` live rows above the policy's floor, best
        first, and the live exact repeat with ``key`` when one is asked for and stored). Dead
        neighbours (expired, deleted, another version) are skipped by searching wider, so they
        never hide a live one."""
        k = self.k
        exact = None
        while True:
            sims, ids = self.replica.search(shard, vector, k)
            keep = sims >= policy.min_similarity
            wanted = [int(i) for i in ids[keep]]
            if key is None:
                rows = self._db.candidates(wanted, shard, now)
            else:
                exact, rows = self._db.lookup_rows(key, wanted, shard, now)
                if exact is not None:
                    return None, [], exact
                key = None  # asked once: a wider search needs the candidates alone
            if len(ids) < k or not keep.all() or len(rows) >= self.k or k >= MAX_K:
                break
            k = min(k * 4, MAX_K)
        nearest = float(sims[0]) if len(sims) else None
        live = [
            (float(sim), rows[rowid])
            for sim, rowid in zip(sims[keep].tolist(), ids[keep].tolist(), strict=True)
            if rowid in rows
        ]
        return nearest, live[: self.k], None

    @staticmethod
    def _choose(
        norm: str, rows: list[tuple[float, Row]], policy: HitPolicy, namespace: str
    ) -> _Choice:
        """The best candidate the policy (and the entry's own floor) accepts."""
        decide = getattr(policy, "decide", None)
        choice = _Choice()
        for sim, row in rows:
            if row.min_similarity is not None and sim < row.min_similarity:
                continue
            if decide is None:
                if not policy.accept(norm, row.prompt, sim):
                    continue
            else:
                decision = decide(norm, row.prompt, sim, namespace=namespace)
                if not decision.serve:
                    if choice.refused is None and decision.score is not None:
                        choice.refused = (row, decision)
                    continue
                choice.decision = decision
            hit = Hit(
                row.response, min(float(sim), 1.0), row.uid, "semantic", row.prompt, row.metadata
            )
            choice.served = (row.id, hit)
            return choice
        return choice

    def _served(
        self, rowid: int, hit: Hit, now: float, decision: Any = None, namespace: str = ""
    ) -> None:
        self._touch(rowid, now)
        score = None if decision is None else decision.score
        self._feedback.served(hit.entry_id, hit.similarity, score, namespace)
        self._stats["hits_semantic"] += 1

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
        fence: int | None = None,
    ) -> str | None:
        """Store an answer and return its entry id; an exact repeat in the scope is replaced.

        ``ttl`` is seconds to live: omitted means the cache's ``default_ttl``, ``None`` never
        expires, ``0`` expires at once. ``vector`` skips embedding (it must match the embedder).
        ``fence`` is a :meth:`position` taken before the lookup this answer follows: when an
        invalidation that covers the entry (one of its tags, its namespace's version, its exact
        prompt, a semantic radius around it) committed after it, nothing is stored, None is
        returned and ``stats()["fenced"]`` counts it. Without ``fence`` the store always
        happens.
        """
        self._check_open()
        if fence is not None and (
            isinstance(fence, bool) or not isinstance(fence, int) or not 0 <= fence < 2**63
        ):
            raise InvalidInputError(f"fence must be an int from position(), not {fence!r}")
        norm = normalise(prompt)
        item = self._prepare(norm, response, as_scope(scope), ttl, tags, metadata)
        observed = None if fence is None else Observed(fence, self.clock.now())
        return self.writer.write(item, self._vector(norm, vector), observed)

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
        skips embedding. Every item is checked before anything is written, the bounds
        included. A prompt repeated in the call (same scope) is stored once: each of its
        positions gets the id of the last one.
        """
        self._check_open()
        if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
            raise InvalidInputError(
                f"store_many takes an iterable of items, not {type(items).__name__}"
            )
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
                    as_scope(fields.get("scope", scope)),
                    fields.get("ttl", ttl),
                    fields.get("tags", tags),
                    fields.get("metadata"),
                )
            )
        given = None if vectors is None else as_unit_matrix(vectors, self.dim)
        if given is not None and len(given) != len(prepared):
            raise InvalidInputError(f"{len(given)} vectors for {len(prepared)} items")
        self.writer.check_many(prepared, self.dim)
        ids: list[str] = []
        own: list[tuple[int, int]] = []  # the call's rows so far: no later batch evicts them
        step = 256 if given is None else 5000
        for start in range(0, len(prepared), step):
            batch = prepared[start : start + step]
            if given is None:
                batch_vectors = self.embed([p["norm"] for p in batch])
            else:
                batch_vectors = given[start : start + step]
            written = self.writer.write_many(batch, batch_vectors, spare=own)
            low, high = min(r for r, _ in written), max(r for r, _ in written)
            if own and own[-1][1] + 1 >= low:  # consecutive batches: one range
                own[-1] = (own[-1][0], high)
            else:
                own.append((low, high))
            ids += [uid for _, uid in written]
        # a prompt repeated in a later batch replaced the earlier row: both get the survivor
        last = {(p["scope"].digest, p["norm"]): i for i, p in enumerate(prepared)}
        return [ids[last[(p["scope"].digest, p["norm"])]] for p in prepared]

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
            "response": check_response(response),
            "scope": scope,
            "ttl": self.default_ttl if ttl is MISSING else check_ttl(ttl),
            "tags": check_tags(tags),
            "metadata": check_metadata(metadata),
        }

    # ------------------------------------------------------------------------ get or compute
    def _lead_or_follow(
        self, item: dict[str, Any], prompt: str, policy: HitPolicy
    ) -> tuple[str | None, Flight | None, _Looked | None]:
        """Look up; on a miss join a flight or lead one. Returns (answer, None, None) when
        answered now, (None, flight, looked) for a leader, (None, flight, None) for a follower
        that must wait for ``flight``, and (None, None, looked) for a hit that a learning
        policy wants answered by the LLM anyway, to label it (exploration)."""
        looked = self._lookup(prompt, item["scope"], policy, None, fence=True)
        if looked.hit is not None:
            decision = None if looked.choice is None else looked.choice.decision
            explore = getattr(policy, "should_explore", None)
            if decision is not None and explore is not None and explore(decision, can_compute=True):
                return None, None, looked
            return looked.hit.response, None, None
        assert looked.vector is not None
        stale = self._stale(item["norm"], looked.vector, looked.shard, policy)
        flight, leader = self._flights.join_or_lead(
            looked.shard, item["norm"], looked.vector, policy
        )
        if leader:
            return None, flight, looked
        if stale is not None:  # someone is refreshing it: serve the stale answer meanwhile
            self._stats["stale_served"] += 1
            return stale.response, None, None
        self._stats["singleflight_waits"] += 1
        return None, flight, None

    def _lead(self, norm: str, shard: str, *, wait: bool = True) -> Lead[Hit]:
        """Lead this exact prompt among every process sharing the store, or wait for the one
        that does and take its answer (see :mod:`semcache.leases`)."""

        def answered() -> Hit | None:
            with self._lock:
                return self._exact(norm, shard, self.clock.now())

        lead = self._leases.lead_or_wait(exact_key(shard, norm), answered, wait=wait)
        if lead.hit is not None:
            self._stats["singleflight_remote"] += 1
        return lead

    def lead(self, prompt: str, *, scope: Scope | None = None, wait: bool = True) -> Lead[Hit]:
        """Single-flight between processes for callers that compute outside the cache (the
        sidecar): lead the computation of ``prompt`` in ``scope`` among every process sharing
        the store, or wait while another one computes it. The result's ``hit`` is the answer
        another process stored meanwhile (serve it); if it ``led``, this caller computes,
        stores, and then calls ``release()`` (in a ``finally``); if neither (the wait timed
        out), it computes without a lead. A lead whose holder dies expires after
        ``flight_timeout`` seconds, and a waiter computes anyway after that long.
        ``wait=False`` looks once and never blocks (an event loop polls with it): neither
        ``led`` nor ``hit`` then means another process is computing the answer now."""
        self._check_open()
        scope = as_scope(scope)
        with self._lock:
            shard = self.replica.shard(scope)
        return self._lead(normalise(prompt), shard, wait=wait)

    def _recheck(self, item: dict[str, Any], looked: _Looked, policy: HitPolicy) -> Hit | None:
        """A leader's second look: the answer may have been stored between its lookup and
        its election (by a flight that just landed, here or in another process: the look is
        fresh, whatever the consistency mode)."""
        assert looked.vector is not None
        with self._lock:
            self.replica.sync(fresh=True)
            _, rows, _ = self._candidates(
                looked.vector, looked.shard, policy, self.clock.now(), None
            )
        served = self._choose(item["norm"], rows, policy, item["scope"].namespace).served
        return None if served is None else served[1]

    def _land(self, item: dict[str, Any], looked: _Looked, result: Any, policy: HitPolicy) -> str:
        """A leader's answer: checked, counted and written behind the lookup's fence; a
        candidate the policy refused gets its free label (did the LLM answer the same?)."""
        result = check_answer(result)
        self._stats["computes"] += 1
        assert looked.vector is not None and looked.observed is not None
        # the caller paid for this answer: it gets it even when it cannot be cached
        try:
            check_response(result)
        except InvalidInputError as exc:  # text no store keeps (a NUL, a lone surrogate)
            self._stats["unstorable"] += 1
            log.info("answer returned but not cached: %s", exc)
            return result
        try:
            self.writer.write({**item, "response": result}, looked.vector, looked.observed)
        except EntryTooLargeError as exc:
            self._stats["too_large"] += 1
            log.info("answer returned but not cached: %s", exc)
        refused = None if looked.choice is None else looked.choice.refused
        if refused is not None:
            self._label(policy, refused[0].response, result, refused[1], item, "free")
        return result

    def _explored(
        self, item: dict[str, Any], looked: _Looked, fresh: Any, policy: HitPolicy
    ) -> str:
        """An explored hit: the LLM's answer is returned, and labels the cached one."""
        fresh = check_answer(fresh)
        assert looked.hit is not None and looked.choice is not None
        self._stats["explored"] += 1
        self._label(policy, looked.hit.response, fresh, looked.choice.decision, item, "explore")
        return fresh

    def _label(
        self,
        policy: HitPolicy,
        cached: str,
        fresh: str,
        decision: Any,
        item: dict[str, Any],
        source: str,
    ) -> None:
        observe = getattr(policy, "observe", None)
        if observe is None or decision is None or decision.score is None:
            return
        agree = policy.agree(cached, fresh)  # type: ignore[attr-defined]
        observe(agree, decision.score, namespace=item["scope"].namespace, source=source)
        self._stats[f"labels_{source}"] += 1

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
        same or a near-identical prompt in the same scope call ``fn`` once (single-flight).

        The store is fenced: if an invalidation covering the answer (its tags, its namespace's
        version, its prompt, a semantic radius around it) commits while ``fn`` runs, the answer
        is returned but not cached. So is an answer too large for ``max_bytes`` on its own
        (counted in ``stats()["too_large"]``), and one holding text no store keeps: a NUL
        character or a lone surrogate (``stats()["unstorable"]``).
        """
        check_fn(fn)
        policy = self._policy(threshold)
        item = self._prepare(normalise(prompt), "", as_scope(scope), ttl, tags, metadata)
        while True:
            answer, flight, looked = self._lead_or_follow(item, prompt, policy)
            if flight is None:
                if looked is not None:  # an explored hit
                    return self._explored(item, looked, fn(prompt), policy)
                return answer  # type: ignore[return-value]
            if looked is not None:
                break
            result = flight.future.result()
            if result is not HANDOVER:
                return result
        result, error, lead = None, None, None
        try:
            lead = self._lead(item["norm"], looked.shard)
            again = lead.hit or self._recheck(item, looked, policy)
            if again is not None:
                result = again.response
            else:
                result = self._land(item, looked, fn(prompt), policy)
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._flights.finish(flight, result, error)
            self._flights.land(flight)
            release_quietly(lead)  # after the flight: a failing store never strands it

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
        blocks on embedding or SQLite. A cancelled leader hands its flight over to a follower."""
        check_fn(fn)
        policy = self._policy(threshold)
        item = self._prepare(normalise(prompt), "", as_scope(scope), ttl, tags, metadata)
        while True:
            answer, flight, looked = await asyncio.to_thread(
                self._lead_or_follow, item, prompt, policy
            )
            if flight is None:
                if looked is not None:  # an explored hit
                    fresh = await _call(fn, prompt)
                    return await asyncio.to_thread(self._explored, item, looked, fresh, policy)
                return answer  # type: ignore[return-value]
            if looked is not None:
                break
            result = await asyncio.wrap_future(flight.future)
            if result is not HANDOVER:
                return result
        result, error, lead = None, None, None
        try:
            lead = await self._alead(item["norm"], looked.shard)
            again = lead.hit or await asyncio.to_thread(self._recheck, item, looked, policy)
            if again is not None:
                result = again.response
                return result
            computed = await _call(fn, prompt)
            result = await asyncio.to_thread(self._land, item, looked, computed, policy)
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._flights.finish(flight, result, error)
            self._flights.land(flight)
            if lead is not None and lead.led:  # in a thread of its own: nothing to await here
                threading.Thread(target=release_quietly, args=(lead,), daemon=True).start()

    async def _alead(self, norm: str, shard: str) -> Lead[Hit]:
        """:meth:`_lead` for asyncio: polls the lease from the event loop (no thread waits
        on another process), and a lease taken by a look the caller was cancelled during is
        given back, not left to expire."""

        async def look() -> Lead[Hit]:
            return await asyncio.to_thread(self._lead, norm, shard, wait=False)

        deadline = asyncio.get_running_loop().time() + self.flight_timeout
        return await poll_lead(look, deadline)

    def _stale(self, norm: str, vector: np.ndarray, shard: str, policy: HitPolicy) -> Hit | None:
        """An answer expired less than ``max_stale`` ago (stale-while-revalidate), or None."""
        if not self.max_stale:
            return None
        with self._lock:
            horizon = self.clock.now() - self.max_stale
            exact = self._exact(norm, shard, horizon, record=False)
            if exact is not None:
                return exact
            _, rows, _ = self._candidates(vector, shard, policy, horizon, None)
        served = self._choose(norm, rows, policy, "").served
        return None if served is None else served[1]

    async def alookup(
        self, prompt: str, *, scope: Scope | None = None, threshold: float | HitPolicy | None = None
    ) -> Hit | None:
        """``lookup`` without blocking the event loop."""
        return await asyncio.to_thread(self.lookup, prompt, scope=scope, threshold=threshold)

    async def astore(self, prompt: str, response: str, **kwargs: Any) -> str | None:
        """``store`` without blocking the event loop."""
        return await asyncio.to_thread(lambda: self.store(prompt, response, **kwargs))

    # ------------------------------------------------------------------------ write-through
    def _row_by_uid(self, entry_id: Any) -> dict[str, Any]:
        row = self._db.get_by_uid(entry_id) if may_be_id(entry_id) else None
        if row is None:
            raise EntryNotFoundError(f"no entry {entry_id!r}")
        return row

    def _entry(self, row: Mapping[str, Any], tags: tuple[str, ...]) -> Entry:
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
            tags=tags,
            metadata=json.loads(row["metadata"]) if row["metadata"] else {},
        )

    def get(self, entry_id: str) -> Entry:
        """The stored entry (expired or not); EntryNotFoundError when there is none."""
        self._check_open()
        row = self._row_by_uid(entry_id)
        return self._entry(row, self._db.tags_of(row["id"]))

    def iter_entries(self, *, namespace: str | None = None) -> Iterator[Entry]:
        """Every stored entry (of ``namespace`` only, if given), in the order they were first
        stored; for export and inspection. Expired entries not yet removed are included."""
        self._check_open()
        if namespace is not None:
            check_namespace(namespace)
        for row, tags in self._db.iter_entries(namespace):
            yield self._entry(row, tags)

    def delete(self, entry_id: str) -> bool:
        """Delete one entry by id; True if it existed. Idempotent."""
        self._check_open()
        with self._lock:
            rowid = self._db.rowid_of(entry_id) if may_be_id(entry_id) else None
            if rowid is None:
                return False
            removed = self._db.delete_entry(rowid, self.clock.now())
            self._stats["invalidations_delete"] += int(removed is not None)
            self.replica.catch_up()
            return removed is not None

    def delete_prompt(self, prompt: str, *, scope: Scope | None = None) -> int:
        """Delete the entry stored for exactly this prompt (normalised) in the scope."""
        self._check_open()
        norm = normalise(prompt)
        with self._lock:
            self.replica.sync()
            key = exact_key(self.replica.shard(as_scope(scope)), norm)
            n = self._db.delete_prompt(key, self.clock.now())
            self._stats["invalidations_delete"] += n
            self.replica.catch_up()
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
            values["response"] = check_response(response)
        if prompt is not MISSING:
            values["prompt"] = normalise(prompt)
            new_vector = self.embed([values["prompt"]])[0]
        tag_list = None if tags is MISSING else check_tags(tags)
        meta = MISSING if metadata is MISSING else check_metadata(metadata)
        expires = MISSING if ttl is MISSING else check_ttl(ttl)
        with self._lock:
            row = self._row_by_uid(entry_id)
            now = self.clock.now()
            if expires is not MISSING:
                values["expires_at"] = self.writer.expiry(expires, now)
            if meta is not MISSING:
                values["metadata"] = meta
            if new_vector is not None:
                values["vector"] = encode(new_vector)
                values["l1_key"] = exact_key(row["shard"], values["prompt"])
            if not values and tag_list is None:
                return
            self.writer.update(row, values, tag_list, now)

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
        if similarity is not None:  # checked before anything is counted or learned
            similarity = self._feedback.check_similarity(similarity)
        with self._lock:
            rowid = self._db.rowid_of(entry_id) if may_be_id(entry_id) else None
            if rowid is None:
                raise EntryNotFoundError(f"no entry {entry_id!r}")
            if not correct:
                self._stats["feedback_wrong"] += 1
            observe = getattr(self.policy, "observe", None)
            score, namespace = self._feedback.score_of(entry_id)
            if observe is not None and score is not None:
                observe(correct, score, namespace=namespace, source="feedback")
            if self._feedback.apply(rowid, entry_id, correct, similarity):
                self.replica.catch_up()

    # ------------------------------------------------------------------------- invalidation
    def invalidate_tags(self, *tags: str, namespace: str | None = None) -> int:
        """Delete every entry carrying any of ``tags`` (only ``namespace``'s entries, if given);
        returns how many. Cost grows with the entries tagged, not with the cache. Answers being
        computed for such entries when this is called are not cached afterwards."""
        self._check_open()
        tag_list = check_tags(tags)
        if namespace is not None:
            check_namespace(namespace)
        if not tag_list:
            return 0
        self._db.fence_tags(tag_list, namespace, self.clock.now())
        total = 0
        while True:
            with self._lock:
                n = self._db.delete_tagged(tag_list, namespace, TAG_BATCH)
                self.replica.catch_up()
            total += n
            if n < TAG_BATCH:  # fewer than asked for: none left (one transaction, not two)
                break
        self._stats["invalidations_tag"] += total
        return total

    def bump(self, namespace: str) -> int:
        """Make every entry of ``namespace`` unreachable at once (O(1)); returns the new
        version. The dead entries are deleted lazily, by writes and ``expire()``."""
        self._check_open()
        check_namespace(namespace)
        with self._lock:
            version = self._db.bump(namespace, self.clock.now())
            self.replica.catch_up()
            self._stats["invalidations_version"] += 1
            return version

    def version(self, namespace: str) -> int:
        """The namespace's current version (0 until first bumped)."""
        self._check_open()
        check_namespace(namespace)
        # no lock while the version is cached and nothing new is in the log: the sidecar asks
        # on each request (a catch-up or a store read takes the replica's lock, which is the
        # cache's)
        self.replica.sync(fresh=self.consistency == "strong")
        return self.replica.version(namespace)

    def invalidate_similar(
        self,
        text_or_vector: str | Sequence[float] | np.ndarray,
        radius: float,
        *,
        scope: Scope | None = None,
    ) -> list[str]:
        """Delete every entry whose cosine similarity to the text (embedded) or vector is
        ``>= radius``, in ``scope`` only if given; returns the ids removed. Exact. Answers
        being computed for prompts inside the radius are not cached afterwards."""
        self._check_open()
        radius = check_threshold(radius)
        if isinstance(text_or_vector, str):
            query = self.embed([normalise(text_or_vector)])[0]
        else:
            query = as_unit_vector(text_or_vector, self.dim)
        scope_ = None if scope is None else as_scope(scope)
        with self._lock:
            self.replica.sync()
            if scope_ is not None:
                shard = self.replica.shard(scope_)
                targets = [(shard, self.shards.get(shard))]
            else:
                targets = list(self.shards.items())
            ids: list[int] = []
            for _, index in targets:
                if index is not None and len(index):
                    found, _ = index.range_search(query, radius)
                    ids += found.tolist()
            removed = self._db.delete_similar(
                ids, query, radius, None if scope_ is None else scope_.digest, self.clock.now()
            )
            self.replica.catch_up()
        self._stats["invalidations_semantic"] += len(removed)
        return removed

    def expire(self) -> int:
        """Delete every version-dead entry and every entry expired for longer than
        ``max_stale`` (the stale-while-revalidate window; 0 by default) now, in batches;
        returns the count."""
        self._check_open()
        total = 0
        before = self.clock.now() - self.max_stale
        for delete in (
            lambda: self._db.delete_expired(before, 1000),
            lambda: self._db.delete_dead_versions(1000),
        ):
            while True:
                with self._lock:
                    n = delete()
                    self.replica.catch_up()
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

    # ---------------------------------------------------------------------- maintenance
    def checkpoint(self) -> None:
        """Persist the index now, so a restart replays nothing (when this process owns the
        folder's checkpoints, or takes them over from an owner that has gone)."""
        self._check_open()
        with self._lock:
            self.replica.catch_up()
            self._flush_access()
            self._save_policy_state()
            self.replica.checkpoint(self.clock.now())

    def verify(self, fix: bool = False) -> list[str]:
        """Check that store and index agree; returns the problems found (empty when sound).

        With ``fix=True`` the index is rebuilt from the store and the counters recomputed; the
        problems found before fixing are still returned.
        """
        self._check_open()
        problems = self._db.quick_check()
        if self._db.get_meta("model_id") != self.embedder.model_id:
            problems.append("store model id differs from the embedder's")
        return problems + self.replica.verify(fix=fix)

    def stats(self) -> dict[str, Any]:
        """Counts for monitoring: sizes, tiers, hit rate, invalidations by pattern."""
        self._check_open()
        with self._lock:
            self.replica.sync()
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
                "fenced": s.get("fenced", 0),
                "computes": s.get("computes", 0),
                "too_large": s.get("too_large", 0),
                "unstorable": s.get("unstorable", 0),
                "singleflight_waits": s.get("singleflight_waits", 0),
                "evictions": s.get("evictions", 0),
                "feedback_wrong": s.get("feedback_wrong", 0),
                "namespaces": self._db.largest_namespaces(10),
                "culled": s.get("culled", 0),
                "index_rebuilds": self.replica.rebuilds,
                "log_position": self.shards.seq,
                "invalidations": {
                    pattern: s.get(f"invalidations_{pattern}", 0)
                    for pattern in ("ttl", "delete", "tag", "version", "semantic", "cdc")
                },
                "model_id": self.embedder.model_id,
                "dim": self.dim,
                "policy": repr(self.policy),
                "policy_state": self._policy_stats(),
                "explored": s.get("explored", 0),
                "labels": {src: s.get(f"labels_{src}", 0) for src in ("free", "explore")},
                "path": str(self.path),
                "store": self.location,
                "consistency": self.consistency,
                "following": self.replica.listener is not None and self.replica.listener.alive,
                "singleflight_remote": s.get("singleflight_remote", 0),
            }

    def _policy_stats(self) -> dict[str, Any] | None:
        """A learning policy's operating point per namespace, with the labels behind it."""
        report = getattr(self.policy, "stats", None)
        state_dict = getattr(self.policy, "state_dict", None)
        if report is None or state_dict is None:
            return None
        namespaces = {"default", *state_dict().get("namespaces", {})}
        return {ns: report(ns) for ns in sorted(namespaces)}

    def close(self) -> None:
        """Persist the index and release the data folder. Idempotent."""
        if self._closed:
            return
        if self._sweeper is not None:
            self._sweeper.stop()
        self.replica.stop_listener()
        self.replica.stop_merger()
        with self._lock:
            try:
                self.replica.catch_up()
                self._flush_access()
                self._save_policy_state()
                self.replica.checkpoint(self.clock.now())
            finally:
                self._closed = True
                self.replica.release()
                if self._folder is not None:
                    self._folder.release()
                self._db.close()

    def __enter__(self) -> SemanticCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SemanticCache({self.location!r}, policy={self.policy!r})"
