"""The write path: prepared entries made into store rows and committed, singly or in bulk.

A single write (``store()``, a computed answer) goes through group commit: writers that arrive
while another holds the writers' turn share its next transaction, each fenced on its own
(:mod:`semcache.groupcommit`, :mod:`semcache.fence`). A bulk batch (``store_many``) is one
transaction, unfenced. Either way a write is acknowledged only once it has committed, and the
replica then catches up on it, so the next lookup sees it. On the way, writes cull expired and
version-dead entries in bounded batches, and a bounded cache evicts, never the write's own
entries. An update of a stored entry is a write too: it is checked against ``max_bytes`` and
evicts other entries when it grows the cache past its bounds.

:class:`~semcache.cache.SemanticCache` validates the caller's input (``_prepare``) and hands the
prepared items here; nothing in this module is public API.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .clock import Clock
from .errors import SemcacheError
from .eviction import Evictor
from .fence import Candidate, Observed, any_covers
from .groupcommit import GroupCommit, Request
from .keys import exact_key, new_uids
from .replica import Replica
from .store import Store, entry_size
from .vectorcodec import decode, encode, encode_many

#: Writes between two culls of expired and version-dead entries.
CULL_EVERY = 8

#: A single write as group commit queues it: the prepared item, its vector, the fence.
Write = tuple[dict[str, Any], np.ndarray, "Observed | None"]


class Writer:
    """Commits prepared entries to the store of record and brings the replica up to them.

    Writes and catch-ups take turns under the replica's lock. ``stats`` are the cache's
    counters, which this updates only for writes that committed; ``check_open`` raises once
    the cache is closed; ``flush_access`` records pending hits before an eviction picks its
    victims by them. ``max_ttl``, ``max_stale`` and ``cull_limit`` are the cache's settings
    (its properties of those names read and set them here)."""

    def __init__(
        self,
        store: Store,
        replica: Replica,
        evictor: Evictor,
        clock: Clock,
        stats: Counter[str],
        *,
        check_open: Callable[[], None],
        flush_access: Callable[[], None],
        max_ttl: float | None,
        max_stale: float,
        cull_limit: int,
    ) -> None:
        self._store = store
        self._replica = replica
        self._evictor = evictor
        self._clock = clock
        self._stats = stats
        self._lock = replica.lock
        self._check_open = check_open
        self._flush_access = flush_access
        self.max_ttl = max_ttl
        self.max_stale = max_stale
        self.cull_limit = cull_limit
        self._writes = 0
        self.group: GroupCommit[Write] = GroupCommit(
            self._lock, self._commit, store.in_transaction
        )

    def expiry(self, ttl: float | None, now: float) -> float | None:
        """When an entry with ``ttl`` written at ``now`` expires (``max_ttl`` caps it)."""
        if self.max_ttl is not None:
            ttl = self.max_ttl if ttl is None else min(ttl, self.max_ttl)
        return None if ttl is None else now + ttl

    # -- single writes ----------------------------------------------------------------------
    def write(
        self,
        item: dict[str, Any],
        vector: np.ndarray,
        observed: Observed | None,
    ) -> str | None:
        """Commit one entry (fenced when ``observed`` is given); None when the fence refused.
        Concurrent writers share a transaction (:mod:`semcache.groupcommit`)."""
        payload = (item, np.ascontiguousarray(vector, dtype=np.float32), observed)
        return self.group.submit(payload)  # type: ignore[no-any-return]

    def _commit(self, batch: list[Request[Write]]) -> None:
        """Commit a batch of single writes, each fenced on its own; runs under the lock, called
        by :class:`~semcache.groupcommit.GroupCommit`. One transaction for the batch, or one
        per write when the cache is bounded: a write then evicts older entries at once (the
        bound holds after every commit) and never an entry whose id a caller is about to get."""
        self._check_open()
        now = self._clock.now()
        self._replica.sync(fresh=True)  # written under the namespace's version now
        ready: list[tuple[Request[Write], dict[str, Any], Candidate | None]] = []
        for request in batch:
            item, vector, observed = request.payload
            scope = item["scope"]
            try:
                shard = self._replica.shard(scope)
                # a fenced answer is as old as the lookup it follows: its TTL counts from there
                born = observed.at if observed else now
                values = self._row(
                    item, encode(vector), new_uids(1)[0], shard, scope.to_json(), now, born
                )
            except SemcacheError as exc:  # this write's own fault (its size): not the batch's
                request.error = exc
                continue
            candidate = None
            if observed is not None:  # judged on the vector as stored, as invalidations see it
                stored = decode(values["vector"])
                candidate = Candidate(
                    scope.namespace, scope.digest, values["l1_key"], item["tags"], stored
                )
            ready.append((request, values, candidate))
        groups = [[one] for one in ready] if self._evictor.bounded else [ready] if ready else []
        try:
            for group in groups:
                self._commit_group(group, now)
        finally:
            # also when a later transaction failed: the writes before it are acknowledged, so
            # the next lookup must see them (the data version is a transaction's only if one ran)
            self._replica.catch_up(after_write=bool(groups))
        # L1 fills on the first exact repeat (from the store), never here

    def _commit_group(
        self, group: list[tuple[Request[Write], dict[str, Any], Candidate | None]], now: float
    ) -> None:
        """One transaction for ``group``; counted in the stats only once it committed."""
        first: int | None = None
        written: dict[int, str] = {}  # position in the group -> uid
        evicted = 0
        with self._store.transaction():
            self.cull(now, len(group))  # before the inserts: no entry is culled by its own write
            for n, (request, values, candidate) in enumerate(group):
                observed = request.payload[2]
                row = self._store.insert(
                    values,
                    request.payload[0]["tags"],
                    fence=None if observed is None else observed.position,
                    covered=None
                    if candidate is None
                    else lambda fences, c=candidate: any_covers(fences, c),  # type: ignore[misc]
                )
                if row is not None:
                    first = row[0] if first is None else min(first, row[0])
                    written[n] = row[1]
            if first is not None:  # never evicts a write of this group
                evicted = self._evictor.enforce(first, self._flush_access)
        for n, (request, _, _) in enumerate(group):
            request.result = written.get(n)
            request.committed = True
        self._stats["evictions"] += evicted
        self._stats["stores"] += len(written)
        self._stats["fenced"] += len(group) - len(written)

    # -- updates ----------------------------------------------------------------------------
    def update(
        self, row: dict[str, Any], values: dict[str, Any], tags: list[str] | None, now: float
    ) -> None:
        """Change the stored entry ``row`` to ``values`` (and ``tags``) in one transaction. Its
        new size is checked against ``max_bytes`` first; a bounded cache then evicts other
        entries until it is within its bounds again, never this one. Runs under the lock."""
        values["updated_at"] = now
        merged = {**row, **values}
        size = entry_size(merged, self._store.tags_of(row["id"]) if tags is None else tags)
        self._evictor.check_size(size)
        if size != row["size"]:
            values["size"] = size
        with self._store.transaction():
            self._store.update(row["id"], values, tags, now)
            evicted = self._evictor.enforce(
                None, self._flush_access, spare=[(row["id"], row["id"])]
            )
        self._stats["evictions"] += evicted
        self._stats["updates"] += 1
        self._replica.catch_up(after_write=True)

    # -- bulk -------------------------------------------------------------------------------
    def check_many(self, items: list[dict[str, Any]], dim: int) -> None:
        """Refuse, before anything is written, a bulk write a bounded cache cannot hold: an
        entry larger than ``max_bytes``, or more distinct entries or bytes in the whole write
        than ``max_entries`` / ``max_bytes`` allow (the write never evicts its own entries,
        so it must fit by evicting older ones). Sizes are the ones the write will store."""
        if not self._evictor.bounded:
            return
        blob = encode(np.ones(dim, dtype=np.float32))  # every vector's encoding has this length
        uid = new_uids(1)[0]
        now = self._clock.now()
        with self._lock:  # only for the shards: sizing a large call must not block lookups
            scopes = self._shards_of(items)
        sizes: dict[str, int] = {}  # exact key -> size (a repeat replaces the earlier item)
        for item in items:
            shard, scope_json = scopes[item["scope"].digest]
            values = self._row(item, blob, uid, shard, scope_json, now, now)
            sizes[values["l1_key"]] = values["size"]
        self._evictor.check_batch(len(sizes), sum(sizes.values()))

    def write_many(
        self,
        items: list[dict[str, Any]],
        vectors: np.ndarray,
        *,
        spare: Sequence[tuple[int, int]] = (),
    ) -> list[tuple[int, str]]:
        """Commit a batch of entries in one transaction (unfenced), then catch up; returns
        each entry's (row id, id). A bounded cache evicts neither this batch's entries nor
        those in the id ranges ``spare`` (earlier batches of the same bulk write)."""
        with self._lock:
            self._check_open()
            now = self._clock.now()
            self._replica.sync(fresh=True)  # written under the namespace's version now
            rows: list[dict[str, Any]] = []
            scopes = self._shards_of(items)
            blobs = encode_many(vectors)
            for item, blob, uid in zip(items, blobs, new_uids(len(items)), strict=True):
                shard, scope_json = scopes[item["scope"].digest]
                rows.append(self._row(item, blob, uid, shard, scope_json, now, now))
            with self._store.transaction():
                self.cull(now)  # before the insert: no entry is culled by its own write
                written = self._store.insert_many(rows, [item["tags"] for item in items])
                first = min(rowid for rowid, _ in written)
                self._stats["evictions"] += self._evictor.enforce(
                    first, self._flush_access, spare=spare
                )
            self._stats["stores"] += len(rows)
            self._replica.catch_up(after_write=True)
            return written

    # -- shared -----------------------------------------------------------------------------
    def _shards_of(self, items: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
        """Each distinct scope's (shard, scope JSON) by digest, looked up once; under the
        lock, so the shards are the namespaces' current versions."""
        scopes: dict[str, tuple[str, str]] = {}
        for item in items:
            scope = item["scope"]
            if scope.digest not in scopes:
                scopes[scope.digest] = (self._replica.shard(scope), scope.to_json())
        return scopes

    def _row(
        self,
        item: dict[str, Any],
        blob: bytes,
        uid: str,
        shard: str,
        scope_json: str,
        now: float,
        born: float,
    ) -> dict[str, Any]:
        """The store row of a prepared item in ``shard`` (its vector encoded as ``blob``), its
        size checked against ``max_bytes``; its TTL counts from ``born``."""
        scope = item["scope"]
        values = {
            "uid": uid,
            "shard": shard,
            "namespace": scope.namespace,
            "version": int(shard.rsplit(":", 1)[1]),
            "scope_digest": scope.digest,
            "scope": scope_json,
            "prompt": item["norm"],
            "l1_key": exact_key(shard, item["norm"]),
            "response": item["response"],
            "vector": blob,
            "created_at": now,
            "updated_at": now,
            "accessed_at": now,
            "expires_at": self.expiry(item["ttl"], born),
            "size": 0,
            "metadata": item["metadata"],
        }
        values["size"] = entry_size(values, item["tags"])
        self._evictor.check_size(values["size"])
        return values

    def cull(self, now: float, writes: int = 1) -> None:
        """Bounded clean-up on writes: up to ``cull_limit`` expired or version-dead entries per
        write, in batches every ``CULL_EVERY`` writes (two statements less on most writes)."""
        before, self._writes = self._writes, self._writes + writes
        if self.cull_limit <= 0 or before // CULL_EVERY == self._writes // CULL_EVERY:
            return
        limit = self.cull_limit * CULL_EVERY * -(-writes // CULL_EVERY)
        n = self._store.delete_expired(now - self.max_stale, limit)
        n += self._store.delete_dead_versions(limit)
        self._stats["culled"] += n
