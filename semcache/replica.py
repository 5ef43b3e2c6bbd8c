"""The replica: derived state (index shards, L1, the version cache) that follows the store's log.

A replica reflects the store of record up to a known change-log position, of a known store. It
never guesses: a persisted checkpoint of another store, one the store does not know as its
latest, one ahead of the store, a damaged file or a gap in the log (changes trimmed before this
replica read them) all lead to a rebuild from the vectors in the store, with a warning. So the
cache always opens while the store is sound.

Catching up reads the store's ``data_version`` *before* scanning the log: a commit that lands
during the scan changes it again, so the next :meth:`sync` scans again instead of missing it.

One process at a time owns the folder's checkpoints (an ``flock``); when the owner closes or
dies, the next replica that wants to checkpoint takes the lock over and writes every shard
afresh. Only the owner trims the log, and only up to ``log_keep`` changes behind a checkpoint
it has made durable; a follower further behind finds the gap and rebuilds from a consistent
snapshot of the store. A checkpoint is announced to the store before its files are written and
recorded after, so a crash in between leaves a checkpoint the store still recognises.

Writes land in each graph's small exact segment of recent vectors (see
:class:`~semcache.index.FaissIndex`); a background merger moves them into the graph once writes
pause (or a segment outgrows its bound). It does so outside the replica's lock, so neither a
write nor a lookup waits on a graph insertion.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import numpy as np

from .errors import IndexCorruptError, StoreError
from .keys import shard_key
from .l1 import L1Cache
from .progress import Progress
from .shards import ShardSet, pending_of
from .store import HOLD_TTL, Change, Store
from .types import Scope

log = logging.getLogger("semcache")

#: How long the fence log is kept: a computation running longer than this is not cached.
FENCE_HORIZON = 3600.0
#: Changes kept in the log behind a checkpoint, so a follower a little behind the owner catches
#: up from the log instead of rebuilding.
LOG_KEEP = 10_000
#: Changes between two automatic checkpoints at least and at most, when ``checkpoint_every``
#: is None (in between: a quarter of the entries indexed).
CHECKPOINT_MIN = 20_000
CHECKPOINT_MAX = 100_000
#: Seconds without new vectors before the merger moves the recent segment into the graph.
QUIET_SECONDS = 0.2
#: Snapshots a rebuild takes before it gives up on a log that keeps being trimmed past it.
REBUILD_ATTEMPTS = 5
_EMPTY = (np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64))


class Replica:
    """Index shards, L1 and namespace versions, kept in step with one :class:`Store`."""

    def __init__(
        self,
        store: Store,
        shards: ShardSet,
        l1: L1Cache,
        *,
        checkpoint_every: int | None,
        log_keep: int = LOG_KEEP,
        slot: str = "",
    ) -> None:
        self.store = store
        # a replica of a shared store has a checkpoint slot of its own in the store, and holds
        # its place in the log even while it owns its folder's checkpoints (others trim too)
        self.slot = slot
        self.shared = bool(slot)
        self.listener: Any = None
        self.log_keep = log_keep
        self.shards = shards
        self.l1 = l1
        self.checkpoint_every = checkpoint_every
        self.lock = threading.RLock()
        self.versions: dict[str, int] = {}
        self.data_version = -1
        self.rebuilds = 0
        self._checkpoint_seq = 0
        self._checkpoint_next = CHECKPOINT_MIN  # changes before the entries are counted again
        self._checkpoint_retry = 0  # changes before a non-owner asks for the checkpoints again
        self._holder = uuid.uuid4().hex  # this replica's name for its hold on the log
        self._held: tuple[int, float] | None = None  # (seq, when) of the last hold written
        self._merger: _Merger | None = None
        self.last_add = 0.0  # monotonic time of the last vector added (the merger waits for quiet)

    def start_merger(self, chunk: int = 256, idle: float = 0.05) -> None:
        """Merge recent writes into the graphs in the background (a daemon thread)."""
        if self._merger is None:
            self._merger = _Merger(self, chunk, idle)

    def merge_step(self, chunk: int, *, quiet: bool) -> bool:
        """Merge one chunk of one shard's recent writes: of any shard when writes are
        ``quiet``, else only of a shard whose segment outgrew its ``recent_max`` (bounded search
        cost). False when there is nothing to merge now."""
        with self.lock:
            target = next(
                (
                    index
                    for _, index in self.shards.items()
                    if (pending := pending_of(index))
                    and (quiet or pending > getattr(index, "recent_max", pending))
                ),
                None,
            )
        if target is None:
            return False
        # Each merge copies the graph once, so a large graph takes larger batches (a 32nd of
        # it, at most the bound of the recent segment, which is searched exactly until the
        # merge lands). Outside the replica's lock: the index grows its graph behind its own
        # lock, so lookups and writes (and this replica's catch-ups) go on while it merges.
        bound = getattr(target, "recent_max", chunk)
        target.merge(max(chunk, min(len(target) // 32, bound)))  # type: ignore[attr-defined]
        return True

    def quiet(self, seconds: float) -> bool:
        """No vector was added for ``seconds``."""
        return time.monotonic() - self.last_add >= seconds

    # -- opening ----------------------------------------------------------------------------
    def open(self, *, rebuild: bool) -> None:
        """Load the persisted checkpoint and catch up, or rebuild when it cannot be trusted."""
        with self.lock:
            self.shards.acquire()
            problem = "a rebuild was asked for" if rebuild else self._load()
            if problem is None:
                self.catch_up()
            else:
                if problem:
                    log.warning("rebuilding the index of %s: %s", self.store.path, problem)
                self.rebuild()
            self._checkpoint_seq = self.shards.seq
            self._checkpoint_next = CHECKPOINT_MIN
            self._checkpoint_retry = 0

    def _load(self) -> str | None:
        """Load the checkpoint; None when it is usable, "" when there is none, else why not."""
        try:
            manifest = self.shards.manifest()
            if manifest is None:
                return ""
            # judged before a file is read: loading fills the graphs with the store's vectors
            if manifest.get("store_id") != self.store.store_id:
                return "its files were derived from another store"
            if manifest.get("token") not in self.store.checkpoint_tokens(self.slot):
                return "its files are not the store's latest checkpoint (a restored or older store)"
            if int(manifest.get("seq", 0)) > self.store.last_seq():  # type: ignore[call-overload]
                return "its files are ahead of the store"
            if int(manifest.get("seq", 0)) < self.store.trimmed_upto():  # type: ignore[call-overload]
                return "the store's log was trimmed past its files"
            self.shards.load(self.store.vector_matrix, manifest)
        except (IndexCorruptError, TypeError, ValueError) as exc:
            return str(exc)
        return None

    def rebuild(self) -> None:
        """Rebuild every shard from a consistent snapshot of the store, then catch up; if the
        owner trims the log past the snapshot meanwhile, take a new snapshot (a few times)."""
        with self.lock:
            for _ in range(REBUILD_ATTEMPTS):
                self._hold(self.store.last_seq(), force=True)  # no trim past the snapshot
                with self.store.read_snapshot():
                    seq = self.store.last_seq()
                    self.shards.clear()
                    what = f"rebuilding the index of {self.store.path}"
                    with Progress(what, total=self.store.counters()[0], unit="entries") as done:
                        for ids, shards, vectors in self.store.iter_vectors():
                            groups: dict[str, list[int]] = {}
                            for row, shard in enumerate(shards):
                                groups.setdefault(shard, []).append(row)
                            for shard, rows in groups.items():
                                self.shards.add(shard, ids[rows], vectors[rows])
                            done.advance(len(ids))
                self.shards.seq = seq
                self.l1.clear()
                self.versions.clear()
                self.rebuilds += 1
                try:
                    self._follow(allow_rebuild=False)
                    return
                except _LogMoved as exc:
                    log.warning("the log moved during a rebuild of %s (%s)", self.store.path, exc)
            raise StoreError(
                f"the change log of {self.store.path} kept moving past {REBUILD_ATTEMPTS} "
                "rebuilds of the index"
            )

    # -- following the log ------------------------------------------------------------------
    def follow(self, poll: float) -> bool:
        """Have the store wake this replica when another process commits (a PostgreSQL
        store's LISTEN/NOTIFY, polled every ``poll`` seconds as well); False when the store
        cannot (SQLite: :meth:`sync` asks the file, which costs microseconds)."""
        listen = getattr(self.store, "listen", None)
        if listen is None or self.listener is not None:
            return self.listener is not None
        self.listener = listen(self._woken, poll)
        return True

    def _woken(self) -> None:
        self.sync(fresh=True)

    def sync(self, *, fresh: bool = False) -> None:
        """Catch up if any other connection (another process) committed since the last look.

        While a listener follows the store, it does this on each notification, and a lookup
        skips the round trip unless it asks for ``fresh`` (``consistency="strong"``)."""
        if not fresh and self.listener is not None and self.listener.alive:
            return
        if self.store.data_version() != self.data_version:
            self.catch_up()

    def catch_up(self, *, after_write: bool = False) -> None:
        """Apply every change after this replica's position (after this process's own writes).

        ``after_write``: called right after this process's write transaction, whose start the
        store may have noted its data version at (``write_data_version``); that value, read
        before the log scan as every caught-up version must be, spares the scan a read of it.
        """
        with self.lock:
            self._follow(
                allow_rebuild=True,
                data_version=self.store.write_data_version if after_write else None,
            )
            self._hold(self.shards.seq)
            since = self.shards.seq - self._checkpoint_seq
            due = since >= self._checkpoint_retry and self._checkpoint_due(since)
            if due and not self.checkpoint(None):
                # another process owns the checkpoints: ask again an interval later
                self._checkpoint_retry = since + (self.checkpoint_every or CHECKPOINT_MIN)

    def _checkpoint_due(self, since: int) -> bool:
        """Whether ``since`` changes call for an automatic checkpoint: ``checkpoint_every``
        of them, or by default a quarter of the vectors held, but at least ``CHECKPOINT_MIN``
        and at most ``CHECKPOINT_MAX``. A checkpoint writes whole shards, so a short fixed
        interval makes a bulk load's checkpoints cost quadratic time (a 1M load wrote 50 of
        them, up to 1M vectors' graph each); the cap bounds what a reopen replays from the
        log. The vectors are counted once per interval, not on every write (a count visits
        every shard)."""
        if self.checkpoint_every is not None:
            return since >= self.checkpoint_every
        if since < self._checkpoint_next:
            return False
        self._checkpoint_next = min(CHECKPOINT_MAX, max(CHECKPOINT_MIN, len(self.shards) // 4))
        return since >= self._checkpoint_next

    def _follow(self, *, allow_rebuild: bool, data_version: int | None = None) -> None:
        # before the scan: a later commit changes it again
        dv = self.store.data_version() if data_version is None else data_version
        limit = 10_000
        while True:
            changes = self.store.changes_since(self.shards.seq, limit)
            if not changes:
                # the head, read after the empty scan: every change at or below it committed
                # before this read, so a second scan sees it unless it is trimmed (a change
                # committed between the first scan and this read is simply applied). Only an
                # empty scan pays for these reads: a write's own catch-up makes one log query.
                last = self.store.last_seq()
                if last == self.shards.seq:
                    break
                if last < self.shards.seq:
                    self._gap(allow_rebuild, "the store is behind this replica")
                    return
                changes = self.store.changes_since(self.shards.seq, limit)
                if not changes:  # there were changes, and they are trimmed away
                    self._gap(allow_rebuild, f"the log up to {last} is trimmed")
                    return
            if changes[0].seq != self.shards.seq + 1:
                self._gap(allow_rebuild, f"the log resumes at {changes[0].seq}")
                return
            self._apply(changes)
            if len(changes) < limit:
                break
        self.data_version = dv

    def _gap(self, allow_rebuild: bool, why: str) -> None:
        if not allow_rebuild:
            raise _LogMoved(why)
        log.warning(
            "index of %s missed changes after %d (%s): rebuilding",
            self.store.path,
            self.shards.seq,
            why,
        )
        self.rebuild()

    def _apply(self, changes: list[Change]) -> None:
        present: dict[int, tuple[str, np.ndarray]] = {}
        removed: dict[int, str] = {}
        touched: list[int] = []
        for change in changes:
            op = change.op
            if op == "ver":
                self.versions.pop(change.shard, None)
                continue
            rowid = int(change.entry_id)  # type: ignore[arg-type]
            touched.append(rowid)
            if op == "add" or op == "vec":
                present.pop(rowid, None)  # re-added: its place moves to the latest change
                if change.current is None:  # gone again since: a later change removes it
                    removed[rowid] = change.shard
                else:
                    present[rowid] = change.current
                    removed.pop(rowid, None)
            elif op == "del":
                removed[rowid] = change.shard
                present.pop(rowid, None)
        self.l1.discard_many(touched)
        by_shard: dict[str, list[int]] = {}
        for rowid, shard in removed.items():
            by_shard.setdefault(shard, []).append(rowid)
        for shard, ids in by_shard.items():
            self.shards.remove(shard, np.asarray(ids, dtype=np.int64))
        adds: dict[str, list[tuple[int, np.ndarray]]] = {}
        for rowid, (shard, vector) in present.items():
            adds.setdefault(shard, []).append((rowid, vector))
        for shard, pairs in adds.items():
            ids_ = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
            self.shards.add(shard, ids_, np.stack([p[1] for p in pairs]))
        if adds:
            self.last_add = time.monotonic()
        self.shards.seq = changes[-1].seq

    def _hold(self, seq: int, *, force: bool = False) -> None:
        """Tell the owner not to trim the log past ``seq`` (a follower's position). Written
        when the position moved ``log_keep / 2`` past the last hold, or a third of
        ``HOLD_TTL`` passed: a few writes per minute, not one per change."""
        if self.shards.owner and not force and not self.shared:
            return
        now = time.time()
        if not force and self._held is not None:
            held_seq, at = self._held
            if seq - held_seq < max(1, self.log_keep // 2) and now - at < HOLD_TTL / 3:
                return
        self.store.hold_log(self._holder, seq, now)
        self._held = (seq, now)

    # -- reading ----------------------------------------------------------------------------
    def version(self, namespace: str) -> int:
        """The namespace's version as of this replica's position. A miss reads the store
        under the replica's lock: a bump applied between that read and remembering its result
        would otherwise be forgotten, and the old version kept until the next bump."""
        version = self.versions.get(namespace)
        if version is None:
            with self.lock:
                version = self.versions.get(namespace)
                if version is None:
                    version = self.versions[namespace] = self.store.version(namespace)
        return version

    def shard(self, scope: Scope) -> str:
        """The shard a scope's entries are written to and searched in now: its digest at its
        namespace's version as of this replica's position."""
        return shard_key(scope.digest, self.version(scope.namespace))

    def search(self, shard: str, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's ``k`` nearest (similarities descending, ids); empty when it has none."""
        index = self.shards.get(shard)
        if index is None or len(index) == 0:
            return _EMPTY
        return index.search(vector, k)

    # -- checking -------------------------------------------------------------------------
    def verify(self, *, fix: bool) -> list[str]:
        """Compare the shards with the store (every id in its shard, every vector equal) and
        the store's entry counter with its table; with ``fix``, rebuild and recount when they
        disagree. Returns the problems found before fixing."""
        problems: list[str] = []
        with self.lock:
            self.catch_up()
            expected: dict[str, dict[int, np.ndarray]] = {}
            for ids, shards, vectors in self.store.iter_vectors():
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
            if self.store.counters()[0] != n:
                problems.append(f"entry counter says {self.store.counters()[0]}, table has {n}")
            if fix and problems:
                self.rebuild()
                self.store.recount()
        return problems

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self, now: float | None) -> bool:
        """Persist the shards and trim the log up to them, if this replica owns the folder's
        checkpoints or can take them over; False when another process owns them."""
        with self.lock:
            if not self.shards.owner:
                if not self.shards.acquire():
                    return False
                self.shards.mark_all_dirty()  # trust no file another owner wrote
            token = uuid.uuid4().hex
            # a crash from here on keeps either checkpoint
            self.store.begin_checkpoint(token, self.slot)
            self.shards.save(self.store.store_id, token)
            self.store.record_checkpoint(
                token, max(0, self.shards.seq - self.log_keep), time.time(), self.slot
            )
            if now is not None:
                self.store.trim_fences(now - FENCE_HORIZON)
            self._checkpoint_seq = self.shards.seq
            self._checkpoint_next = CHECKPOINT_MIN
            self._checkpoint_retry = 0
            return True

    def stop_merger(self) -> None:
        """Stop the background merger (call without holding :attr:`lock`: it may be waiting
        for it)."""
        if self._merger is not None:
            self._merger.stop()
            self._merger = None

    def stop_listener(self) -> None:
        """Stop following the store's notifications (call without holding :attr:`lock`: the
        listener may be waiting for it)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def release(self) -> None:
        self.stop_listener()
        self.stop_merger()
        if self._held is not None:
            try:
                self.store.release_hold(self._holder)
            except StoreError as exc:  # the store itself is failing: the hold just expires
                log.warning("could not release the log hold of %s: %s", self.store.path, exc)
            self._held = None
        self.shards.release()


class _LogMoved(StoreError):
    """The log was trimmed past a rebuild's snapshot before it caught up."""


class _Merger:
    def __init__(self, replica: Replica, chunk: int, idle: float) -> None:
        self._replica = replica
        self._chunk = chunk
        self._idle = idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="semcache-merger", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Merging waits for a pause in the writes, like a segment merge (it competes with them
        # for the CPU): during a burst of writes the recent segment grows (searched exactly),
        # up to its bound.
        while not self._stop.wait(self._idle):
            try:
                while self._replica.merge_step(
                    self._chunk, quiet=self._replica.quiet(QUIET_SECONDS)
                ):
                    if self._stop.wait(0.002):  # between merges, a moment for stop()
                        return
            except Exception:  # pragma: no cover - logged; the segment is still searched
                log.exception("merging recent writes failed")

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
