"""The store of record (SQLite): entries, tags, namespace versions, the change log, the fence
log and meta. Every SQL statement semcache runs is in this module.

Three invariants live here:

- Every mutation of ``entries`` is written to the ``changes`` log inside the same transaction
  (updates and deletes by triggers; inserts by :meth:`Store.insert` and
  :meth:`Store.insert_many` themselves, since schema 8, so nothing else may insert into
  ``entries``), so derived state (the FAISS index, L1, the version cache: the replica) can always
  be brought up to date by replaying the log, whichever process made the change. Log positions
  are contiguous (AUTOINCREMENT, never reused), so a follower that sees a gap knows it missed
  something.
- Every invalidation (tags, a version bump, a delete or update of a prompt's entry, a semantic
  radius) is also written to the ``fences`` log in the transaction that performs it. A write that
  carries the fence position its lookup observed (``insert(..., fence=)``) commits only if no
  fence recorded since covers it: an answer computed before an invalidation is never cached
  after it.
- Every error is a :class:`~semcache.errors.StoreError`; no ``sqlite3`` exception escapes.

Counters of entries and bytes are kept in the same transactions (by the same triggers and
statements), so size checks never scan the table.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import operator
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from .errors import StoreBusyError, StoreError
from .folder import LOCK_FILE
from .vectorcodec import decode_many

SCHEMA_VERSION = 8

#: The store connection's page cache, in KiB (taken as it is used, up to this).
CACHE_KIB = 65536
#: Seconds a follower's hold on the change log lasts unless refreshed (wall-clock time: it is
#: compared across processes).
HOLD_TTL = 60.0
#: Bytes the WAL file is truncated to after a checkpoint.
WAL_SIZE_LIMIT = 8 * 2**20
#: Seconds between two checkpoints of the WAL into the database by the background thread.
WAL_CHECKPOINT_EVERY = 0.25
#: Commits after which a writer wakes the background thread before its time.
WAL_NUDGE_AFTER = 64
#: Commits after which a writer checkpoints the WAL itself, should the background thread fall
#: that far behind (a checkpoint never runs on the commit path otherwise).
WAL_INLINE_AFTER = 256
#: Rows per statement where a list of ids or tags is bound (SQLite allows 32,766 variables).
CHUNK = 500

#: Eviction policies as data: the ORDER BY that picks the first entries to go.
EVICTION_POLICIES: dict[str, str] = {
    "lru": "accessed_at ASC, id ASC",
    "lfu": "hits ASC, accessed_at ASC, id ASC",
    "fifo": "id ASC",
}

#: The insert trigger of schemas 6 and 7 (schema 8 has none: inserts log themselves).
_INSERT_TRIGGER = """
CREATE TRIGGER entries_ai AFTER INSERT ON entries
WHEN (SELECT active FROM bulk WHERE id = 0) = 0 BEGIN
  INSERT INTO changes(entry_id, shard, op) VALUES (new.id, new.shard, 'add');
  UPDATE counters SET entries = entries + 1, bytes = bytes + new.size WHERE id = 0;
END"""

_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS entries_ai AFTER INSERT ON entries BEGIN
  INSERT INTO changes(entry_id, shard, op) VALUES (new.id, new.shard, 'add');
  UPDATE counters SET entries = entries + 1, bytes = bytes + new.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS entries_ad AFTER DELETE ON entries BEGIN
  INSERT INTO changes(entry_id, shard, op) VALUES (old.id, old.shard, 'del');
  DELETE FROM tags WHERE entry_id = old.id;
  UPDATE counters SET entries = entries - 1, bytes = bytes - old.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS entries_au_vec AFTER UPDATE OF vector ON entries BEGIN
  INSERT INTO changes(entry_id, shard, op) VALUES (new.id, new.shard, 'vec');
END;
CREATE TRIGGER IF NOT EXISTS entries_au AFTER UPDATE OF response, l1_key, expires_at, size,
    metadata ON entries BEGIN
  INSERT INTO changes(entry_id, shard, op) VALUES (new.id, new.shard, 'upd');
  UPDATE counters SET bytes = bytes - old.size + new.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS namespaces_au AFTER UPDATE OF version ON namespaces BEGIN
  INSERT INTO changes(entry_id, shard, op) VALUES (NULL, new.namespace, 'ver');
END;
"""


@dataclass(frozen=True)
class Row:
    """One entry as the lookup path needs it."""

    id: int
    uid: str
    shard: str
    prompt: str
    response: str
    expires_at: float | None
    metadata: dict[str, Any]
    min_similarity: float | None = None  # learned from feedback; None: the policy decides


@dataclass(frozen=True)
class Change:
    seq: int
    entry_id: int | None
    shard: str
    op: str  # add | del | vec | upd | ver
    current: tuple[str, np.ndarray] | None = None  # add/vec: the entry's shard and vector now


def _row(r: sqlite3.Row | tuple[Any, ...]) -> Row:
    return Row(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else {}, r[7])


_ROW_COLUMNS = "id, uid, shard, prompt, response, expires_at, metadata, min_similarity"


@dataclass(frozen=True)
class Fence:
    """One invalidation as the fence log records it (see :meth:`Store.insert`)."""

    kind: str  # tag | ver | key | similar
    namespace: str | None  # tag: None means every namespace
    key: str | None  # tag: the tag; key: the exact key
    scope_digest: str | None  # similar: None means every scope
    vector: bytes | None
    radius: float | None


#: The text and blob columns an entry's size counts (beside its vector and tags).
_SIZED = (
    "uid",
    "shard",
    "namespace",
    "scope_digest",
    "scope",
    "prompt",
    "l1_key",
    "response",
    "metadata",
)


def entry_size(values: dict[str, Any], tags: Iterable[str]) -> int:
    """Bytes an entry costs the store, as ``max_bytes`` counts them: every text and blob it
    keeps (prompt, response, vector, metadata, scope, keys) and its tags."""
    size = 0
    for col in _SIZED:
        value = values.get(col)
        if not value:
            continue
        # an ASCII text's length is its size in bytes (and str.isascii is O(1))
        ascii_ = isinstance(value, bytes) or value.isascii()
        size += len(value) if ascii_ else len(value.encode())
    size += len(values["vector"])
    size += sum(len(tag.encode()) + 8 for tag in tags)
    return size + 64  # the numeric columns and the row's own overhead


def eviction_statement(
    order: str, count: int, keep_from: int | None, spare: Sequence[tuple[int, int]], mark: str
) -> tuple[str, tuple[int, ...]]:
    """The DELETE of :meth:`Store.evict` (either store; ``mark`` is the driver's placeholder)
    and its parameters."""
    kept = "".join(f" AND id NOT BETWEEN {mark} AND {mark}" for _ in spare)
    sql = (
        f"DELETE FROM entries WHERE id IN (SELECT id FROM entries WHERE id < {mark}{kept} "
        f"ORDER BY {EVICTION_POLICIES[order]} LIMIT {mark})"
    )
    first_kept = 2**62 if keep_from is None else keep_from
    return sql, (first_kept, *(bound for pair in spare for bound in pair), count)


class MetaLog:
    """What both stores keep in their ``meta`` table about the log and replicas' checkpoints,
    written once over ``get_meta``/``set_meta``."""

    def get_meta(self, key: str) -> str | None:
        raise NotImplementedError

    def set_meta(self, key: str, value: str) -> None:
        raise NotImplementedError

    def checkpoint_tokens(self, slot: str = "") -> set[str]:
        """The tokens a manifest of replica ``slot`` may carry to be trusted: the last recorded
        checkpoint's and a pending one's (see :meth:`begin_checkpoint`)."""
        keys = (f"checkpoint_token{slot}", f"checkpoint_pending{slot}")
        return {v for v in (self.get_meta(k) for k in keys) if v is not None}

    def begin_checkpoint(self, token: str, slot: str = "") -> None:
        """Replica ``slot`` (``""``: the folder's own index) is about to write a checkpoint
        under ``token``: until it is recorded, a manifest with either this token or the last
        recorded one is this store's. Each replica of a shared store has a slot of its own."""
        self.set_meta(f"checkpoint_pending{slot}", token)

    def trimmed_upto(self) -> int:
        return int(self.get_meta("changes_trimmed") or 0)


class Store(MetaLog):
    """SQLite (WAL) access for one data folder; safe to share between threads.

    One connection, serialised by a re-entrant lock; ``transaction()`` is ``BEGIN IMMEDIATE`` and
    re-entrant per thread, in the manner of diskcache's ``_transact``. Any ``sqlite3`` error,
    inside a transaction or not, is raised as :class:`StoreError` and rolls the transaction back.
    """

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        self.path = path
        try:
            self._conn = sqlite3.connect(
                str(path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
            _set_wal(self._conn)
            self._conn.execute(f"PRAGMA synchronous={synchronous}")
            self._conn.execute("PRAGMA busy_timeout=30000")
            # a page cache of up to CACHE_KIB (SQLite's default is 2 MiB): the indexes on
            # random keys (uid, exact key) outgrow the default at about 50k entries, and
            # every insert then reads their pages back from the OS. It is this connection's
            # memory, taken as pages are read, so a large store's process grows by up to it
            self._conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            # a large batch grows the WAL file; after each checkpoint it shrinks back to this
            self._conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # copying the WAL into the database is half the cost of a small commit: a
            # background thread does it (see _WalCheckpointer), not the committing writer
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
            self._db = sqlite_utils.Database(self._conn)
            self._lock = threading.RLock()
            self._depth = 0
            self.commits = 0  # since the WAL was last checkpointed
            #: ``PRAGMA data_version`` as of the last write transaction's start
            self.write_data_version: int | None = None
            self._page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
            self._migrate()
            self.store_id = self._identity()
            self._checkpointer = _WalCheckpointer(self, synchronous)
        except BaseException as exc:
            conn = getattr(self, "_conn", None)
            if conn is not None:  # a store refused (unusable, newer) leaves nothing open
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(
                    f"{path} is not a usable semcache store ({exc}); move it away or open "
                    "another data folder"
                ) from exc
            raise

    # -- plumbing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; nested calls join the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                # as of the transaction's start: read inside it, this costs no snapshot
                version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise StoreError(f"cannot start a write transaction: {exc}") from exc
            self.write_data_version = version
            self._depth = 1
            try:
                yield self._conn
            except BaseException as exc:
                self._depth = 0
                with contextlib.suppress(sqlite3.Error):  # keep the original error
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store write failed: {exc}") from exc
                raise
            self._depth = 0
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise StoreError(f"commit failed: {exc}") from exc
            self.commits += 1
            if self.commits == WAL_NUDGE_AFTER:
                self._checkpointer.nudge()
            elif self.commits >= WAL_INLINE_AFTER:  # the background thread fell far behind
                self.checkpoint_wal(self._conn)

    def checkpoint_wal(self, conn: sqlite3.Connection) -> None:
        """Copy what the WAL holds into the database (PASSIVE: waits for no reader or
        writer, and leaves what it cannot copy yet for the next time). A write starts the WAL
        over only after a copy that caught up with it, which a copy running beside writes
        rarely does: once the WAL outgrows ``WAL_SIZE_LIMIT`` the copy is finished between
        two of this store's transactions, so the file stays bounded under steady writes."""
        self.commits = 0
        with contextlib.suppress(sqlite3.Error):
            _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames * self._page_size > WAL_SIZE_LIMIT:  # writes went on while it copied
                with self._lock:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def in_transaction(self) -> bool:
        """This thread is inside :meth:`transaction` or :meth:`read_snapshot` (they hold the
        connection's lock throughout)."""
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"store query failed: {exc}") from exc

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Reads in the block see one consistent state of the store (a read transaction);
        writers in other processes go on meanwhile. Not for use inside a write transaction."""
        with self._lock:
            if self._depth:  # inside a write transaction: already one consistent state
                yield
                return
            try:
                self._conn.execute("BEGIN")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot start a read transaction: {exc}") from exc
            try:
                yield
            finally:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("COMMIT")

    def data_version(self) -> int:
        """Changes when another connection commits (``PRAGMA data_version``). Each call
        outside a transaction starts a read snapshot; the value as of the last write
        transaction's start is kept in ``write_data_version`` for free."""
        return int(self.execute("PRAGMA data_version")[0][0])

    def close(self) -> None:
        self._checkpointer.stop()
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()

    # -- schema and meta ------------------------------------------------------------------------
    def _migrate(self) -> None:
        db = self._db
        with self.transaction():
            if not db["meta"].exists():
                db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            version = int(self.get_meta("schema_version") or 0)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store schema {version} is newer than this semcache ({SCHEMA_VERSION}); "
                    "upgrade semcache"
                )
            with self._alone_to_upgrade(version):
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    _MIGRATIONS[step](db)
            self.set_meta("schema_version", str(SCHEMA_VERSION))

    @contextlib.contextmanager
    def _alone_to_upgrade(self, version: int) -> Iterator[None]:
        """Hold the folder alone while an existing store is upgraded across schema 8.

        Schema 8 moved the logging of inserts from a trigger into this module's statements: a
        process of an older release still open on the folder would, once the trigger is gone,
        insert entries that no log records and no replica ever indexes. Every open cache holds
        the folder's shared open lock (:mod:`semcache.folder`), so the upgrade takes it
        exclusively and is refused while any other cache has the folder open."""
        if not 0 < version < 8:
            yield
            return
        fd = os.open(self.path.parent / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise StoreBusyError(
                    f"cannot upgrade {self.path} from schema {version} to {SCHEMA_VERSION}: "
                    "another cache (an older semcache, in this or another process) has the "
                    "folder open; close every process using it, then open it again"
                ) from None
            yield
        finally:
            os.close(fd)  # releases the lock

    def _identity(self) -> str:
        """This store's identity: made once, when the store is created; a replica's files name
        the store they were derived from, so a new or replaced database is never confused with
        the one an index was built for."""
        with self.transaction():
            store_id = self.get_meta("store_id")
            if store_id is None:
                store_id = uuid.uuid4().hex
                self.set_meta("store_id", store_id)
            return store_id

    def get_meta(self, key: str) -> str | None:
        rows = self.execute("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- namespaces and versions --------------------------------------------------------------
    def version(self, namespace: str) -> int:
        rows = self.execute("SELECT version FROM namespaces WHERE namespace = ?", (namespace,))
        return int(rows[0][0]) if rows else 0

    def bump(self, namespace: str, now: float) -> int:
        """Raise the namespace's version (every older entry is dead at once); fenced."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO namespaces(namespace, version) VALUES (?, 0) "
                "ON CONFLICT(namespace) DO NOTHING",
                (namespace,),
            )
            conn.execute(
                "UPDATE namespaces SET version = version + 1 WHERE namespace = ?", (namespace,)
            )
            self._fence(conn, now, [("ver", namespace, None, None, None, None)])
            return int(
                conn.execute(
                    "SELECT version FROM namespaces WHERE namespace = ?", (namespace,)
                ).fetchone()[0]
            )

    # -- the fence log ----------------------------------------------------------------------------
    def position(self) -> int:
        """The fence log's position now: what a lookup observed, for a fenced write after it."""
        rows = self.execute("SELECT seq FROM sqlite_sequence WHERE name = 'fences'")
        return int(rows[0][0]) if rows else 0

    @staticmethod
    def _fence(conn: sqlite3.Connection, now: float, rows: Sequence[tuple[Any, ...]]) -> None:
        conn.executemany(
            "INSERT INTO fences(at, kind, namespace, key, scope_digest, vector, radius) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(now, *row) for row in rows],
        )

    def fences_since(self, position: int) -> list[Fence] | None:
        """The invalidations recorded after ``position``; None when the log no longer reaches
        back that far (so nothing can be proven and a fenced write must not commit)."""
        with self._lock:
            if position < int(self.get_meta("fences_trimmed") or 0):
                return None
            rows = self.execute(
                "SELECT kind, namespace, key, scope_digest, vector, radius FROM fences "
                "WHERE seq > ? ORDER BY seq",
                (position,),
            )
        return [Fence(*r) for r in rows]

    def trim_fences(self, before: float) -> None:
        """Forget invalidations recorded before ``before``: a flight older than that which
        writes afterwards is simply not cached."""
        with self.transaction() as conn:
            row = conn.execute("SELECT max(seq) FROM fences WHERE at < ?", (before,)).fetchone()
            if row and row[0] is not None:
                conn.execute("DELETE FROM fences WHERE seq <= ?", (row[0],))
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('fences_trimmed', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(row[0]),),
                )

    # -- entries --------------------------------------------------------------------------------
    def insert(
        self,
        values: dict[str, Any],
        tags: Sequence[str],
        *,
        covered: Callable[[list[Fence]], bool] | None = None,
        fence: int | None = None,
    ) -> tuple[int, str] | None:
        """Insert one entry (replacing an exact repeat in the same shard); returns (id, uid).

        With ``fence`` (a :meth:`position`), the insert commits only if ``covered`` finds no
        fence recorded since that covers it, checked inside the write transaction so nothing
        can slip in between; otherwise nothing is written and None is returned.
        """
        with self.transaction() as conn:
            if fence is not None:
                since = self.fences_since(fence)
                if since is None or (covered is not None and covered(since)):
                    return None
            conn.execute("DELETE FROM entries WHERE l1_key = ?", (values["l1_key"],))
            cols = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            cur = conn.execute(
                f"INSERT INTO entries({cols}) VALUES ({marks})", tuple(values.values())
            )
            rowid = int(cur.lastrowid or 0)
            # the insert logs itself (schema 8): an insert trigger cost a bulk row as much as
            # the insert, even when it had nothing to do
            conn.execute(
                "INSERT INTO changes(entry_id, shard, op) VALUES (?, ?, 'add')",
                (rowid, values["shard"]),
            )
            conn.execute(
                "UPDATE counters SET entries = entries + 1, bytes = bytes + ? WHERE id = 0",
                (values["size"],),
            )
            if tags:
                conn.executemany(
                    "INSERT OR IGNORE INTO tags(tag, entry_id) VALUES (?, ?)",
                    [(tag, rowid) for tag in tags],
                )
            return rowid, values["uid"]

    def insert_many(
        self, rows: Sequence[dict[str, Any]], tags: Sequence[Sequence[str]]
    ) -> list[tuple[int, str]]:
        """Insert many entries in one transaction (unfenced: bulk loads); an exact repeat,
        stored before or earlier in ``rows``, is replaced by the later one. Returns each row's
        (id, uid); rows replaced within the batch get the id of the one that replaced them."""
        if not rows:
            return []
        last: dict[str, int] = {}
        for i, row in enumerate(rows):
            last[row["l1_key"]] = i
        keep = sorted(last.values())
        cols = list(rows[0])
        sql = f"INSERT INTO entries({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        with self.transaction() as conn:
            conn.executemany("DELETE FROM entries WHERE l1_key = ?", [(key,) for key in last])
            first = (
                int(
                    conn.execute(
                        "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'entries'"
                    ).fetchone()[0]
                )
                + 1
            )
            values = operator.itemgetter(*cols)
            conn.executemany(sql, [values(rows[i]) for i in keep])
            # AUTOINCREMENT in one transaction hands out consecutive ids: check, never assume
            got = conn.execute(
                "SELECT count(*), min(id), max(id), coalesce(sum(size), 0) FROM entries "
                "WHERE id >= ?",
                (first,),
            ).fetchone()
            if tuple(got[:3]) != (len(keep), first, first + len(keep) - 1):
                raise StoreError("bulk insert ids were not consecutive")
            conn.execute(
                "INSERT INTO changes(entry_id, shard, op) "
                "SELECT id, shard, 'add' FROM entries WHERE id >= ? ORDER BY id",
                (first,),
            )
            conn.execute(
                "UPDATE counters SET entries = entries + ?, bytes = bytes + ? WHERE id = 0",
                (len(keep), int(got[3])),
            )
            ids = {i: first + n for n, i in enumerate(keep)}
            conn.executemany(
                "INSERT OR IGNORE INTO tags(tag, entry_id) VALUES (?, ?)",
                [(tag, ids[i]) for i in keep for tag in tags[i]],
            )
        return [(ids[last[row["l1_key"]]], rows[last[row["l1_key"]]]["uid"]) for row in rows]

    def find_exact(self, l1_key: str, now: float) -> Row | None:
        rows = self.execute(
            f"SELECT {_ROW_COLUMNS} FROM entries WHERE l1_key = ? "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (l1_key, now),
        )
        return _row(rows[0]) if rows else None

    def candidates(self, ids: Sequence[int], shard: str, now: float) -> dict[int, Row]:
        """The live rows among ``ids`` in ``shard``: the index's answers, re-checked."""
        out: dict[int, Row] = {}
        for chunk in _chunks(ids):
            marks = ", ".join("?" for _ in chunk)
            rows = self.execute(
                f"SELECT {_ROW_COLUMNS} FROM entries WHERE id IN ({marks}) AND shard = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (*chunk, shard, now),
            )
            out.update((r[0], _row(r)) for r in rows)
        return out

    def lookup_rows(
        self, l1_key: str, ids: Sequence[int], shard: str, now: float
    ) -> tuple[Row | None, dict[int, Row]]:
        """:meth:`find_exact` and :meth:`candidates` together, for a lookup that has its
        vector already (no embedding to save by looking for the exact repeat first): a shared
        store answers both in one round trip."""
        return self.find_exact(l1_key, now), self.candidates(ids, shard, now)

    def get_by_uid(self, uid: str) -> dict[str, Any] | None:
        """Every column of the entry with this uid, or None."""
        with self._lock:
            try:
                cur = self._conn.execute("SELECT * FROM entries WHERE uid = ?", (uid,))
                row = cur.fetchone()
                names = [d[0] for d in cur.description]
            except sqlite3.Error as exc:
                raise StoreError(f"store query failed: {exc}") from exc
        return None if row is None else dict(zip(names, row, strict=True))

    def rowid_of(self, uid: str) -> int | None:
        rows = self.execute("SELECT id FROM entries WHERE uid = ?", (uid,))
        return int(rows[0][0]) if rows else None

    def tags_of(self, rowid: int) -> tuple[str, ...]:
        return tuple(
            r[0]
            for r in self.execute("SELECT tag FROM tags WHERE entry_id = ? ORDER BY tag", (rowid,))
        )

    def iter_entries(
        self, namespace: str | None = None, batch: int = 1000
    ) -> Iterator[tuple[dict[str, Any], tuple[str, ...]]]:
        """Every entry (all columns but the vector) with its tags, in id order, in batches."""
        last = -1
        where = "" if namespace is None else "AND namespace = ? "
        while True:
            params: tuple[Any, ...] = (last,) if namespace is None else (last, namespace)
            with self._lock:
                try:
                    cur = self._conn.execute(
                        "SELECT id, uid, namespace, version, scope, prompt, response, "
                        "created_at, updated_at, accessed_at, expires_at, hits, metadata "
                        f"FROM entries WHERE id > ? {where}ORDER BY id LIMIT {int(batch)}",
                        params,
                    )
                    rows = cur.fetchall()
                    names = [d[0] for d in cur.description]
                except sqlite3.Error as exc:
                    raise StoreError(f"store query failed: {exc}") from exc
            if not rows:
                return
            for r in rows:
                yield dict(zip(names, r, strict=True)), self.tags_of(r[0])
            last = int(rows[-1][0])

    def vector_matrix(self, ids: np.ndarray) -> np.ndarray:
        """The vectors of ``ids``, one row each, zeros for an id no longer present: how a
        replica fills the index files it loads (they hold no vectors)."""
        return gather_vectors(ids, self._vector_rows)

    def _vector_rows(self, chunk: Sequence[int]) -> list[tuple[int, bytes]]:
        marks = ", ".join("?" for _ in chunk)
        return self.execute(f"SELECT id, vector FROM entries WHERE id IN ({marks})", tuple(chunk))

    def iter_vectors(
        self, batch: int = 10_000
    ) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        """Every entry's (ids, shards, vectors), in id order, in batches: for rebuilds."""
        last = -1
        while True:
            rows = self.execute(
                "SELECT id, shard, vector FROM entries WHERE id > ? ORDER BY id LIMIT ?",
                (last, batch),
            )
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, [r[1] for r in rows], decode_many([r[2] for r in rows])
            last = int(ids[-1])

    def iter_prompts(self, batch: int = 256) -> Iterator[list[tuple[int, str]]]:
        """Every entry's (id, prompt), in id order, in batches: for re-embedding."""
        last = -1
        while True:
            rows = self.execute(
                "SELECT id, prompt FROM entries WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
            )
            if not rows:
                return
            yield [(int(r[0]), r[1]) for r in rows]
            last = int(rows[-1][0])

    def set_vectors(self, pairs: Sequence[tuple[int, bytes]]) -> None:
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE entries SET vector = ? WHERE id = ?", [(v, i) for i, v in pairs]
            )

    def update(
        self,
        rowid: int,
        values: dict[str, Any],
        tags: Sequence[str] | None,
        now: float,
    ) -> None:
        """Change an entry in place; fenced on its old exact key (a flight computing that
        prompt's answer from before the update must not overwrite it)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT l1_key FROM entries WHERE id = ?", (rowid,)).fetchone()
            if row is None:
                return
            if "l1_key" in values:  # a new prompt replaces the exact repeat it collides with
                conn.execute(
                    "DELETE FROM entries WHERE l1_key = ? AND id != ?", (values["l1_key"], rowid)
                )
            if values:
                sets = ", ".join(f"{col} = ?" for col in values)
                conn.execute(f"UPDATE entries SET {sets} WHERE id = ?", (*values.values(), rowid))
            if tags is not None:
                conn.execute("DELETE FROM tags WHERE entry_id = ?", (rowid,))
                conn.executemany(
                    "INSERT OR IGNORE INTO tags(tag, entry_id) VALUES (?, ?)",
                    [(tag, rowid) for tag in tags],
                )
                # a tag change alone must still reach other processes' L1 (it may matter to them)
                conn.execute(
                    "INSERT INTO changes(entry_id, shard, op) "
                    "SELECT id, shard, 'upd' FROM entries WHERE id = ?",
                    (rowid,),
                )
            self._fence(conn, now, [("key", None, row[0], None, None, None)])

    # -- deletes --------------------------------------------------------------------------------
    def delete_entry(self, rowid: int, now: float) -> str | None:
        """Delete one entry (write-through); fenced on its exact key. Returns its uid."""
        with self.transaction() as conn:
            row = conn.execute(
                "DELETE FROM entries WHERE id = ? RETURNING uid, l1_key", (rowid,)
            ).fetchone()
            if row is None:
                return None
            self._fence(conn, now, [("key", None, row[1], None, None, None)])
            return str(row[0])

    def delete_prompt(self, l1_key: str, now: float) -> int:
        """Delete the entry stored under an exact key; fenced on that key."""
        with self.transaction() as conn:
            n = conn.execute("DELETE FROM entries WHERE l1_key = ?", (l1_key,)).rowcount
            self._fence(conn, now, [("key", None, l1_key, None, None, None)])
            return n

    def fence_tags(self, tags: Sequence[str], namespace: str | None, now: float) -> None:
        """Record a tag invalidation (before its batches of deletes run)."""
        with self.transaction() as conn:
            self._fence(conn, now, [("tag", namespace, tag, None, None, None) for tag in tags])

    def delete_tagged(self, tags: Sequence[str], namespace: str | None, limit: int) -> int:
        """Delete at most ``limit`` entries carrying any of ``tags`` (of ``namespace`` only, if
        given); returns the count. Call until it returns 0."""
        total = 0
        with self.transaction() as conn:
            for chunk in _chunks(tags):
                if total >= limit:
                    break
                marks = ", ".join("?" for _ in chunk)
                if namespace is None:
                    select = f"SELECT DISTINCT entry_id FROM tags WHERE tag IN ({marks})"
                    params: tuple[Any, ...] = tuple(chunk)
                else:
                    select = (
                        "SELECT DISTINCT t.entry_id FROM tags t JOIN entries e "
                        f"ON e.id = t.entry_id WHERE t.tag IN ({marks}) AND e.namespace = ?"
                    )
                    params = (*chunk, namespace)
                total += conn.execute(
                    f"DELETE FROM entries WHERE id IN ({select} LIMIT ?)",
                    (*params, limit - total),
                ).rowcount
        return total

    def delete_similar(
        self,
        ids: Sequence[int],
        vector: np.ndarray,
        radius: float,
        scope_digest: str | None,
        now: float,
    ) -> list[str]:
        """Delete the entries a range search found; fenced on the radius, so an answer being
        computed for a prompt inside it is not cached afterwards. Returns the uids removed."""
        with self.transaction() as conn:
            blob = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
            self._fence(conn, now, [("similar", None, None, scope_digest, blob, float(radius))])
            return self.delete_ids(ids)

    def delete_ids(self, ids: Sequence[int]) -> list[str]:
        """Delete entries by row id, unfenced (feedback, repairs); returns the uids removed."""
        removed: list[str] = []
        with self.transaction() as conn:
            for chunk in _chunks(ids):
                marks = ", ".join("?" for _ in chunk)
                removed += [
                    r[0]
                    for r in conn.execute(
                        f"DELETE FROM entries WHERE id IN ({marks}) RETURNING uid", tuple(chunk)
                    ).fetchall()
                ]
        return removed

    def delete_expired(self, before: float, limit: int) -> int:
        """Delete at most ``limit`` entries that expired at or before ``before``."""
        with self.transaction() as conn:
            return conn.execute(
                "DELETE FROM entries WHERE id IN (SELECT id FROM entries WHERE expires_at <= ? "
                "LIMIT ?)",
                (before, limit),
            ).rowcount

    def delete_dead_versions(self, limit: int) -> int:
        """Delete at most ``limit`` entries of namespace versions older than the current one."""
        with self.transaction() as conn:
            return conn.execute(
                f"DELETE FROM entries WHERE id IN ({_DEAD_VERSIONS} LIMIT ?)", (limit,)
            ).rowcount

    def evict(
        self,
        order: str,
        count: int,
        keep_from: int | None,
        spare: Sequence[tuple[int, int]] = (),
    ) -> int:
        """Delete the first ``count`` entries in eviction ``order`` (a key of
        :data:`EVICTION_POLICIES`), never a row whose id is ``keep_from`` or later (the writes
        that caused it), nor one in the id ranges ``spare`` (an entry being updated, earlier
        batches of the same bulk write)."""
        sql, params = eviction_statement(order, count, keep_from, spare, "?")
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    # -- access and feedback ------------------------------------------------------------------
    def record_access(self, accesses: dict[int, tuple[int, float]]) -> None:
        """Apply buffered (hit count, last access) updates: LRU/LFU order, never a change."""
        if not accesses:
            return
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE entries SET hits = hits + ?, accessed_at = max(accessed_at, ?) "
                "WHERE id = ?",
                [(n, at, rowid) for rowid, (n, at) in accesses.items()],
            )

    def feedback_good(self, rowid: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE entries SET feedback_good = feedback_good + 1 WHERE id = ?", (rowid,)
            )

    def feedback_bad(self, rowid: int, floor: float) -> None:
        """Count a wrong answer and raise the entry's own similarity floor to ``floor``."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE entries SET feedback_bad = feedback_bad + 1, min_similarity = "
                "max(coalesce(min_similarity, -1.0), ?) WHERE id = ?",
                (floor, rowid),
            )

    # -- sizes ------------------------------------------------------------------------------------
    def largest_namespaces(self, limit: int) -> dict[str, int]:
        """The ``limit`` namespaces with the most entries (dead versions included), largest
        first; one scan of the (namespace, version) index."""
        rows = self.execute(
            "SELECT namespace, count(*) AS n FROM entries GROUP BY namespace "
            "ORDER BY n DESC, namespace LIMIT ?",
            (limit,),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def counters(self) -> tuple[int, int]:
        entries, size = self.execute("SELECT entries, bytes FROM counters WHERE id = 0")[0]
        return int(entries), int(size)

    def recount(self) -> tuple[int, int]:
        """Recompute the counters from the table (``verify(fix=True)``)."""
        with self.transaction() as conn:
            n, size = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM entries"
            ).fetchone()
            conn.execute("UPDATE counters SET entries = ?, bytes = ? WHERE id = 0", (n, size))
            return int(n), int(size)

    # -- the change log ---------------------------------------------------------------------------
    def changes_since(self, seq: int, limit: int = 10_000) -> list[Change]:
        """The log after ``seq``, oldest first; an add or a vector change carries the entry's
        current shard and vector (None when the entry is already gone)."""
        rows = self.execute(
            "SELECT c.seq, c.entry_id, c.shard, c.op, e.shard, e.vector FROM changes c "
            "LEFT JOIN entries e ON e.id = c.entry_id AND c.op IN ('add', 'vec') "
            "WHERE c.seq > ? ORDER BY c.seq LIMIT ?",
            (seq, limit),
        )
        return changes_of_rows(rows)

    def last_seq(self) -> int:
        rows = self.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'")
        return int(rows[0][0]) if rows else 0

    def trim_changes(self, upto: int) -> None:
        """Forget changes up to ``upto``: an index persisted at that point no longer needs them."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM changes WHERE seq <= ?", (upto,))
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('changes_trimmed', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = max(CAST(value AS INTEGER), "
                "CAST(excluded.value AS INTEGER))",
                (str(upto),),
            )

    def record_checkpoint(self, token: str, trim_upto: int, now: float, slot: str = "") -> int:
        """A replica checkpoint is durable: remember its token (so a manifest that is not this
        store's latest checkpoint is never trusted) and trim the log up to ``trim_upto``, but
        never past a position a live follower holds (one whose hold is younger than
        ``HOLD_TTL`` seconds at ``now``). Returns where the log was trimmed to."""
        with self.transaction() as conn:
            self.set_meta(f"checkpoint_token{slot}", token)
            held = conn.execute(
                "SELECT min(seq) FROM holds WHERE at > ?", (now - HOLD_TTL,)
            ).fetchone()[0]
            upto = trim_upto if held is None else min(trim_upto, int(held))
            if upto > self.trimmed_upto():
                self.trim_changes(upto)
            return upto

    def hold_log(self, holder: str, seq: int, now: float) -> None:
        """A follower needs the log from ``seq`` on: the owner does not trim past it while the
        hold is refreshed (at least every ``HOLD_TTL`` seconds)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO holds(holder, seq, at) VALUES (?, ?, ?) ON CONFLICT(holder) "
                "DO UPDATE SET seq = excluded.seq, at = excluded.at",
                (holder, seq, now),
            )
            conn.execute("DELETE FROM holds WHERE at <= ?", (now - 10 * HOLD_TTL,))

    def release_hold(self, holder: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM holds WHERE holder = ?", (holder,))

    # -- flight leases (single-flight between processes) ------------------------------------------
    def take_lease(self, key: str, owner: str, now: float, ttl: float) -> bool:
        """Lead the computation of ``key``: True when ``owner`` now holds its lease (it was
        free, expired, or already this owner's); False while another owner's lease is live.
        A lease is not logged: it is coordination, not cache content."""
        rows = self.execute(
            "INSERT INTO leases(key, owner, expires_at) VALUES (?, ?, ?) ON CONFLICT(key) DO "
            "UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at "
            "WHERE leases.expires_at <= ? OR leases.owner = excluded.owner RETURNING owner",
            (key, owner, now + ttl, now),
        )
        return bool(rows)

    def lease_owner(self, key: str, now: float) -> str | None:
        """Who holds the live lease on ``key``, or None."""
        rows = self.execute("SELECT owner FROM leases WHERE key = ? AND expires_at > ?", (key, now))
        return rows[0][0] if rows else None

    def release_lease(self, key: str, owner: str) -> None:
        """Give a lease back (only the owner's own; an expired one taken over stays)."""
        self.execute("DELETE FROM leases WHERE key = ? AND owner = ?", (key, owner))

    def quick_check(self) -> list[str]:
        rows = self.execute("PRAGMA quick_check")
        return [] if rows and rows[0][0] == "ok" else [f"sqlite: {r[0]}" for r in rows]


def _set_wal(conn: sqlite3.Connection, patience: float = 30.0) -> None:
    """Switch to WAL. The switch needs the database alone for a moment and gives up at once,
    without the busy timeout, when another process is creating or closing it: several
    processes opening a new folder together take turns instead of failing."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _WalCheckpointer:
    """A daemon thread, with its own connection, that checkpoints the store's WAL every
    ``WAL_CHECKPOINT_EVERY`` seconds after commits (sooner in a burst), so no commit pays for
    it (SQLite's automatic checkpoint runs inside the commit that crosses its threshold). A
    commit is as durable as before: the WAL is the database until it is copied. The thread
    holds its store weakly and ends with it, closed or not."""

    def __init__(self, store: Store, synchronous: str) -> None:
        self._store = weakref.ref(store)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.runs = 0  # checkpoints this thread made
        self._conn = sqlite3.connect(
            str(store.path), check_same_thread=False, isolation_level=None, timeout=1.0
        )
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._thread = threading.Thread(target=self._run, name="semcache-wal", daemon=True)
        self._thread.start()
        weakref.finalize(store, self.stop)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(WAL_CHECKPOINT_EVERY)
                self._wake.clear()
                store = self._store()
                if store is None:
                    return
                if store.commits and not self._stop.is_set():
                    store.checkpoint_wal(self._conn)
                    self.runs += 1
                del store  # never keep the store alive between two looks
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()

    def nudge(self) -> None:
        """Checkpoint now: a burst of commits is filling the WAL."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (it closes its connection); waits ``timeout`` seconds at most."""
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def changes_of_rows(rows: Sequence[Sequence[Any]]) -> list[Change]:
    """Log rows (seq, entry_id, shard, op, the entry's shard now, its vector now) as changes,
    every vector decoded in one pass."""
    live = [i for i, r in enumerate(rows) if r[5] is not None]
    vectors = decode_many([rows[i][5] for i in live]) if live else None
    current: dict[int, tuple[str, np.ndarray]] = {
        i: (rows[i][4], vectors[n])
        for n, i in enumerate(live)  # type: ignore[index]
    }
    return [
        Change(int(r[0]), None if r[1] is None else int(r[1]), r[2], r[3], current.get(i))
        for i, r in enumerate(rows)
    ]


def gather_vectors(
    ids: np.ndarray, read: Callable[[Sequence[int]], Sequence[tuple[int, bytes]]]
) -> np.ndarray:
    """Rows of the vectors ``read`` returns for ``ids`` (chunk by chunk), in ``ids``' order;
    zeros where an id is absent (an empty matrix of width 0 when none is present)."""
    wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
    found_ids: list[int] = []
    blobs: list[bytes] = []
    for chunk in _chunks(wanted.tolist()):
        for rowid, blob in read(chunk):
            found_ids.append(int(rowid))
            blobs.append(blob)
    if not blobs:
        return np.zeros((len(wanted), 0), dtype=np.float32)
    found = decode_many(blobs)
    order = np.argsort(np.asarray(found_ids, dtype=np.int64), kind="stable")
    sorted_ids = np.asarray(found_ids, dtype=np.int64)[order]
    at = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
    hit = sorted_ids[at] == wanted
    out = np.zeros((len(wanted), found.shape[1]), dtype=np.float32)
    out[hit] = found[order[at[hit]]]
    return out


# Driven by the (few) namespaces, then the (namespace, version) index: never a table scan.
_DEAD_VERSIONS = (
    "SELECT e.id FROM namespaces n CROSS JOIN entries e "
    "ON e.namespace = n.namespace AND e.version < n.version"
)


def _migration_1(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE entries (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            uid TEXT NOT NULL UNIQUE,
            shard TEXT NOT NULL,
            namespace TEXT NOT NULL,
            version INTEGER NOT NULL,
            scope_digest TEXT NOT NULL,
            scope TEXT NOT NULL,
            prompt TEXT NOT NULL,
            l1_key TEXT NOT NULL,
            response TEXT NOT NULL,
            vector BLOB NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            accessed_at REAL NOT NULL,
            expires_at REAL,
            hits INTEGER NOT NULL DEFAULT 0,
            size INTEGER NOT NULL,
            metadata TEXT
        )"""
    )
    db.execute("CREATE INDEX entries_shard ON entries(shard)")
    db.execute("CREATE INDEX entries_l1 ON entries(l1_key)")
    db.execute("CREATE INDEX entries_expiry ON entries(expires_at) WHERE expires_at IS NOT NULL")
    db.execute("CREATE INDEX entries_access ON entries(accessed_at)")
    db.execute("CREATE INDEX entries_namespace ON entries(namespace, version)")
    db.execute(
        "CREATE TABLE tags (tag TEXT NOT NULL, entry_id INTEGER NOT NULL, "
        "PRIMARY KEY (tag, entry_id)) WITHOUT ROWID"
    )
    db.execute("CREATE INDEX tags_entry ON tags(entry_id)")
    db.execute("CREATE TABLE namespaces (namespace TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    db.execute(
        "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, entry_id INTEGER, "
        "shard TEXT NOT NULL, op TEXT NOT NULL)"
    )
    db.execute(
        "CREATE TABLE counters (id INTEGER PRIMARY KEY CHECK (id = 0), entries INTEGER NOT NULL, "
        "bytes INTEGER NOT NULL)"
    )
    db.execute("INSERT INTO counters(id, entries, bytes) VALUES (0, 0, 0)")
    for statement in _TRIGGERS.split("END;"):
        if statement.strip():
            db.execute(statement + "END;")


def _migration_2(db: sqlite_utils.Database) -> None:
    """Per-entry similarity floors learned from feedback (``cache.feedback``)."""
    db.execute("ALTER TABLE entries ADD COLUMN min_similarity REAL")
    db.execute("ALTER TABLE entries ADD COLUMN feedback_good INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE entries ADD COLUMN feedback_bad INTEGER NOT NULL DEFAULT 0")


def _migration_3(db: sqlite_utils.Database) -> None:
    """The fence log (invalidations, for fenced writes) and an index for LFU eviction."""
    db.execute(
        "CREATE TABLE fences (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, "
        "kind TEXT NOT NULL, namespace TEXT, key TEXT, scope_digest TEXT, vector BLOB, "
        "radius REAL)"
    )
    db.execute("CREATE INDEX fences_at ON fences(at)")
    db.execute("CREATE INDEX entries_lfu ON entries(hits, accessed_at, id)")


def _migration_4(db: sqlite_utils.Database) -> None:
    """Followers' holds on the change log (the owner never trims past a live one)."""
    db.execute(
        "CREATE TABLE holds (holder TEXT PRIMARY KEY, seq INTEGER NOT NULL, at REAL NOT NULL)"
    )


def _migration_5(db: sqlite_utils.Database) -> None:
    """Flight leases: single-flight between processes sharing the store."""
    db.execute(
        "CREATE TABLE leases (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL)"
    )


def _migration_6(db: sqlite_utils.Database) -> None:
    """A bulk insert logs its rows in one statement: the per-row log trigger skips them."""
    db.execute("CREATE TABLE bulk (id INTEGER PRIMARY KEY CHECK (id = 0), active INTEGER NOT NULL)")
    db.execute("INSERT INTO bulk(id, active) VALUES (0, 0)")
    db.execute("DROP TRIGGER IF EXISTS entries_ai")
    db.execute(_INSERT_TRIGGER)


def _migration_7(db: sqlite_utils.Database) -> None:
    """Vectors written in half precision from here on (``semcache/vectorcodec.py``): a release
    before schema 7 cannot read them, and refuses the store instead of failing on a decode."""
    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('vector_encoding', 'fp16')")


def _migration_8(db: sqlite_utils.Database) -> None:
    """No insert trigger: :meth:`Store.insert` and :meth:`Store.insert_many` write the log
    and the counters themselves. The trigger, even skipped for a bulk batch by its ``WHEN``,
    cost about as much per bulk row as the insert itself (``evals/bench_core.py``'s
    ``store_many`` at 100k: 10,812 rows/s with it, 16,148-18,495 without, with the other
    changes of that release)."""
    db.execute("DROP TRIGGER IF EXISTS entries_ai")
    db.execute("DROP TABLE IF EXISTS bulk")


_MIGRATIONS = {
    1: _migration_1,
    2: _migration_2,
    3: _migration_3,
    4: _migration_4,
    5: _migration_5,
    6: _migration_6,
    7: _migration_7,
    8: _migration_8,
}
