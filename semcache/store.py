"""The SQLite store: the source of truth for entries, tags, namespace versions and the change log.

Every mutation of ``entries`` is written to the ``changes`` log by triggers inside the same
transaction, so the FAISS index and the L1 tier (derived state) can always be brought up to date
by replaying the log, whichever process made the change. Counters of entries and bytes are kept
by triggers too, so size checks never scan the table.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from .errors import StoreError

SCHEMA_VERSION = 2

#: Eviction policies as data: the ORDER BY that picks the first entries to go.
EVICTION_POLICIES: dict[str, str] = {
    "lru": "accessed_at ASC, id ASC",
    "lfu": "hits ASC, accessed_at ASC, id ASC",
    "fifo": "id ASC",
}

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


def _row(r: sqlite3.Row | tuple[Any, ...]) -> Row:
    return Row(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else {}, r[7])


_ROW_COLUMNS = "id, uid, shard, prompt, response, expires_at, metadata, min_similarity"


class Store:
    """SQLite (WAL) access for one data folder; safe to share between threads.

    One connection, serialised by a re-entrant lock; ``transaction()`` is ``BEGIN IMMEDIATE`` and
    re-entrant per thread, in the manner of diskcache's ``_transact``.
    """

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        self.path = path
        try:
            self._conn = sqlite3.connect(
                str(path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={synchronous}")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._db = sqlite_utils.Database(self._conn)
            self._lock = threading.RLock()
            self._depth = 0
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path} is not a usable semcache store ({exc}); move it away or open another "
                "data folder"
            ) from exc

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
            except sqlite3.Error as exc:
                raise StoreError(f"cannot start a write transaction: {exc}") from exc
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._depth = 0
                with contextlib.suppress(sqlite3.Error):  # keep the original error
                    self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise StoreError(f"commit failed: {exc}") from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"store query failed: {exc}") from exc

    def data_version(self) -> int:
        """Changes when another connection commits (``PRAGMA data_version``)."""
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            self._conn.close()

    # -- schema -------------------------------------------------------------------------------
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
            for step in range(version + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[step](db)
            self.set_meta("schema_version", str(SCHEMA_VERSION))

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

    def bump(self, namespace: str) -> int:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO namespaces(namespace, version) VALUES (?, 0) "
                "ON CONFLICT(namespace) DO NOTHING",
                (namespace,),
            )
            conn.execute(
                "UPDATE namespaces SET version = version + 1 WHERE namespace = ?", (namespace,)
            )
            return int(
                conn.execute(
                    "SELECT version FROM namespaces WHERE namespace = ?", (namespace,)
                ).fetchone()[0]
            )

    # -- entries --------------------------------------------------------------------------------
    def insert(self, values: dict[str, Any], tags: Iterable[str]) -> tuple[int, str]:
        """Insert one entry (replacing an exact repeat in the same shard); returns (id, uid)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM entries WHERE l1_key = ?", (values["l1_key"],))
            cols = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            cur = conn.execute(
                f"INSERT INTO entries({cols}) VALUES ({marks})", tuple(values.values())
            )
            rowid = int(cur.lastrowid or 0)
            conn.executemany(
                "INSERT OR IGNORE INTO tags(tag, entry_id) VALUES (?, ?)",
                [(tag, rowid) for tag in tags],
            )
            return rowid, values["uid"]

    def find_exact(self, l1_key: str, now: float) -> Row | None:
        rows = self.execute(
            f"SELECT {_ROW_COLUMNS} FROM entries WHERE l1_key = ? "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (l1_key, now),
        )
        return _row(rows[0]) if rows else None

    def candidates(self, ids: Sequence[int], shard: str, now: float) -> dict[int, Row]:
        """The live rows among ``ids`` in ``shard``: the index's answers, re-checked."""
        if not ids:
            return {}
        marks = ", ".join("?" for _ in ids)
        rows = self.execute(
            f"SELECT {_ROW_COLUMNS} FROM entries WHERE id IN ({marks}) AND shard = ? "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (*ids, shard, now),
        )
        return {r[0]: _row(r) for r in rows}

    def get_by_uid(self, uid: str) -> sqlite3.Row | None:
        with self._lock:
            self._conn.row_factory = sqlite3.Row
            try:
                return self._conn.execute("SELECT * FROM entries WHERE uid = ?", (uid,)).fetchone()
            finally:
                self._conn.row_factory = None

    def rowid_of(self, uid: str) -> int | None:
        rows = self.execute("SELECT id FROM entries WHERE uid = ?", (uid,))
        return int(rows[0][0]) if rows else None

    def tags_of(self, rowid: int) -> tuple[str, ...]:
        return tuple(
            r[0]
            for r in self.execute("SELECT tag FROM tags WHERE entry_id = ? ORDER BY tag", (rowid,))
        )

    def vectors_of(self, ids: Sequence[int]) -> dict[int, tuple[str, np.ndarray]]:
        """(shard, vector) of each of ``ids`` still present."""
        out: dict[int, tuple[str, np.ndarray]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            for rowid, shard, blob in self.execute(
                f"SELECT id, shard, vector FROM entries WHERE id IN ({marks})", tuple(chunk)
            ):
                out[int(rowid)] = (shard, np.frombuffer(blob, dtype=np.float32))
        return out

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
            vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32)
            yield ids, [r[1] for r in rows], vectors.reshape(len(rows), -1)
            last = int(ids[-1])

    def update(self, rowid: int, values: dict[str, Any], tags: Iterable[str] | None) -> None:
        with self.transaction() as conn:
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

    def delete_ids(self, ids: Sequence[int]) -> list[str]:
        """Delete entries by row id; returns the uids removed."""
        removed: list[str] = []
        with self.transaction() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ", ".join("?" for _ in chunk)
                removed += [
                    r[0]
                    for r in conn.execute(
                        f"DELETE FROM entries WHERE id IN ({marks}) RETURNING uid", tuple(chunk)
                    ).fetchall()
                ]
        return removed

    def delete_where(self, select_ids_sql: str, params: Sequence[Any], limit: int) -> int:
        """Delete at most ``limit`` entries whose ids the given SELECT yields; returns the count."""
        with self.transaction() as conn:
            cur = conn.execute(
                f"DELETE FROM entries WHERE id IN ({select_ids_sql} LIMIT ?)", (*params, limit)
            )
            return cur.rowcount

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

    # -- sizes ------------------------------------------------------------------------------------
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
        rows = self.execute(
            "SELECT seq, entry_id, shard, op FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [Change(int(r[0]), r[1], r[2], r[3]) for r in rows]

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

    def trimmed_upto(self) -> int:
        return int(self.get_meta("changes_trimmed") or 0)

    def quick_check(self) -> list[str]:
        rows = self.execute("PRAGMA quick_check")
        return [] if rows and rows[0][0] == "ok" else [f"sqlite: {r[0]}" for r in rows]


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


_MIGRATIONS = {1: _migration_1, 2: _migration_2}
