"""The store of record on PostgreSQL: the same contract as :class:`semcache.store.Store`, shared
by every replica (every process, on every machine) that points at it.

Entries (vectors as ``bytea``), tags, namespace versions, the change log, the fence log, meta and
counters live in a schema of their own (``schema=``, default ``semcache``), which this module
creates and migrates. The invariants are those of the SQLite store:

- Every mutation of ``entries`` is written to the ``changes`` log, by statement-level triggers
  (with transition tables, so a bulk delete writes its log in one statement) inside the same
  transaction. Log positions are contiguous *and in commit order*: a PostgreSQL sequence is
  neither (a rolled-back ``nextval`` leaves a hole, and a transaction that drew a smaller number
  can commit after one that drew a larger), so a follower could not tell a gap from a commit
  still in flight. Instead every write transaction starts by locking the single row of
  ``log_head``, and each log append advances that row's counter (``UPDATE log_head SET changes
  = changes + n``): writers are serialised, as SQLite's ``BEGIN IMMEDIATE`` serialises them, so
  a position is only ever visible after every smaller one is, and a rolled-back transaction
  gives its positions back.
- Every invalidation is written to the ``fences`` log (the same row holds its head) in the
  transaction that performs it, and a fenced insert checks the fences recorded since its
  position while holding that lock, so no invalidation can commit between the check and the
  insert.
- Every driver error, a lost connection included, is a :class:`~semcache.errors.StoreError`.

The driver is psycopg 3 with ``psycopg_pool``: a pool gives each thread its own connection, so
lookups in one thread never wait on a round trip of another (the SQLite store shares one
connection under a lock because SQLite calls cost microseconds; PostgreSQL calls cost a network
round trip); it binds parameters on the server and has a binary ``bytea`` path, and it is the
maintained driver (psycopg2 is kept for the CDC consumer, which needs its replication protocol
support). ``transaction()`` pins one pooled connection to the calling thread until the
outermost block ends, so nested calls (and every read made inside) join that transaction.

Unqualified table names resolve through the ``search_path`` each pooled connection is given;
the trigger functions name their tables with the schema, so a write made by any session (an
administrator's ``DELETE``) is logged too. A pool must not cross ``fork()``: open the store in
the process that uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from .errors import InvalidInputError, StoreError
from .store import (
    HOLD_TTL,
    Change,
    Fence,
    MetaLog,
    Row,
    changes_of_rows,
    eviction_statement,
    gather_vectors,
)
from .vectorcodec import decode_many

#: The PostgreSQL schema's own version (independent of the SQLite store's).
SCHEMA_VERSION = 4
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_ROW_COLUMNS = "id, uid, shard, prompt, response, expires_at, metadata, min_similarity"
#: An entry of its namespace's current version (a namespace never bumped is at version 0).
_CURRENT = (
    "version >= coalesce((SELECT n.version FROM namespaces n "
    "WHERE n.namespace = entries.namespace), 0)"
)
#: Seconds a closing listener's wake-up waits for a pooled connection.
NUDGE_TIMEOUT = 1.0
#: Rows per bulk INSERT statement (one array per column).
_INSERT_CHUNK = 2000
#: The entries columns a caller may give, with their types (bulk inserts cast arrays to them).
_COLUMN_TYPES = {
    "uid": "text",
    "shard": "text",
    "namespace": "text",
    "version": "bigint",
    "scope_digest": "text",
    "scope": "text",
    "prompt": "text",
    "l1_key": "text",
    "response": "text",
    "vector": "bytea",
    "created_at": "float8",
    "updated_at": "float8",
    "accessed_at": "float8",
    "expires_at": "float8",
    "hits": "bigint",
    "size": "bigint",
    "metadata": "text",
    "min_similarity": "float8",
    "feedback_good": "bigint",
    "feedback_bad": "bigint",
}
_SYNCHRONOUS = {"OFF": "off", "NORMAL": None, "FULL": None, "EXTRA": None}
log = logging.getLogger("semcache")


def _row(r: Sequence[Any]) -> Row:
    return Row(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else {}, r[7])


def redact(url: str) -> str:
    """The URL without its password: what logs and error messages show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class PostgresStore(MetaLog):
    """A semcache store of record in one PostgreSQL schema; safe to share between threads.

    ``url`` is a libpq connection string (``postgresql://user@host:5432/db``); ``schema`` the
    schema that holds semcache's tables (made if missing); ``synchronous="OFF"`` commits with
    ``synchronous_commit=off`` (a server crash may lose the last acknowledged writes, never
    consistency), any other level keeps the server's setting. ``pool_size`` bounds the
    connections this process opens. A writer waits at most ``busy_timeout`` seconds for its
    turn (another process may hold it, or be stuck holding it), then gets a ``StoreError``.
    """

    #: SQLite's store keeps the data version its last write transaction began with; here the
    #: data version is the log head, read by a round trip, so a write's catch-up reads it.
    write_data_version: int | None = None

    def __init__(
        self,
        url: str,
        *,
        schema: str = "semcache",
        synchronous: str = "NORMAL",
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        busy_timeout: float = 30.0,
    ) -> None:
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise InvalidInputError(
                f"schema must be a plain identifier (letters, digits, _; at most 63), "
                f"got {schema!r}"
            )
        level = synchronous.upper()
        if level not in _SYNCHRONOUS:
            raise InvalidInputError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}")
        try:
            conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise InvalidInputError(f"not a PostgreSQL connection string: {exc}") from exc
        self.url = url
        self.schema = schema
        self.path = f"{redact(url)} (schema {schema})"
        self._ident = sql.Identifier(schema)
        self._sync = _SYNCHRONOUS[level]
        self._busy_ms = max(1, int(busy_timeout * 1000))
        self._local = threading.local()
        self._closed = False
        self._insert_sql: dict[tuple[str, ...], str] = {}
        try:
            self._pool = ConnectionPool(
                url,
                min_size=1,
                max_size=max(1, pool_size),
                kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout))},
                configure=self._configure,
                open=False,
                name=f"semcache-{schema}",
                timeout=30.0,
            )
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg.Error as exc:
            with contextlib.suppress(Exception):  # stop its reconnection attempts
                self._pool.close()
            raise StoreError(f"cannot connect to the PostgreSQL store {self.path}: {exc}") from exc
        try:
            self._migrate()
            self.store_id = self._identity()
        except BaseException:
            self.close()
            raise

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(sql.SQL("SET search_path TO {}").format(self._ident))
        # a writer waits this long for another's turn (SQLite's busy_timeout), then fails
        conn.execute(sql.SQL("SET lock_timeout TO {}").format(sql.Literal(self._busy_ms)))
        if self._sync is not None:
            conn.execute(sql.SQL("SET synchronous_commit TO {}").format(sql.SQL(self._sync)))

    # -- plumbing -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the PostgreSQL store {self.path} is closed")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The thread's transaction connection when it is in one, else a pooled one."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        self._check_open()
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise StoreError(f"store query failed: {exc}") from exc

    def in_transaction(self) -> bool:
        """This thread is inside :meth:`transaction` (or :meth:`read_snapshot`)."""
        return getattr(self._local, "conn", None) is not None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """One write transaction; nested calls in the same thread join the outer one.

        It begins by locking ``log_head``: writers take turns, so change and fence positions
        are contiguous and in commit order, and row locks are always taken in the same order
        (no deadlocks between writers)."""
        if getattr(self._local, "conn", None) is not None:
            if getattr(self._local, "snapshot", False):
                raise StoreError("a write inside read_snapshot(): the snapshot is read-only")
            yield self._local.conn
            return
        with self._transaction(lock=True) as conn:
            yield conn

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Reads in the block (this thread's) see one consistent state of the store: a
        ``REPEATABLE READ READ ONLY`` transaction on one connection; writers go on meanwhile.
        Inside a write transaction it adds nothing: that transaction holds the log head, so no
        logged change commits while it runs. Writes inside the block are refused."""
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        self._check_open()
        try:
            with self._pool.connection() as conn:
                self._local.conn, self._local.snapshot = conn, True
                try:
                    with conn.transaction():
                        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                        yield
                finally:
                    self._local.conn, self._local.snapshot = None, False
        except psycopg.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self, *, lock: bool) -> Iterator[psycopg.Connection[Any]]:
        self._check_open()
        try:
            with self._pool.connection() as conn:
                self._local.conn = conn
                try:
                    with conn.transaction():
                        if lock:
                            conn.execute("SELECT 1 FROM log_head WHERE id = 0 FOR UPDATE")
                        yield conn
                finally:
                    self._local.conn = None
        except psycopg.Error as exc:
            raise StoreError(f"store write failed: {exc}") from exc

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one statement (``%s`` placeholders); its rows, or [] when it returns none."""
        with self._connection() as conn:
            try:
                cur = conn.execute(sql, params)  # type: ignore[arg-type]
                return cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                raise StoreError(f"store query failed: {exc}") from exc

    def _read(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        """:meth:`execute` for a read: outside a transaction, a read that finds its pooled
        connection dead (a server restart, a failover, an idle timeout) has the pool drop every
        dead connection and runs once more, so one lost connection is not a failed lookup.
        Writes are never retried: a commit may have landed before the connection died."""
        if getattr(self._local, "conn", None) is not None:
            return self.execute(query, params)
        for attempt in (1, 2):
            self._check_open()
            conn: psycopg.Connection[Any] | None = None
            try:
                with self._pool.connection() as conn:
                    cur = conn.execute(query, params)  # type: ignore[arg-type]
                    return cur.fetchall() if cur.description else []
            except psycopg.OperationalError as exc:
                if attempt == 2 or conn is None or not conn.closed:
                    raise StoreError(f"store query failed: {exc}") from exc
                with contextlib.suppress(psycopg.Error):
                    self._pool.check()
            except psycopg.Error as exc:
                raise StoreError(f"store query failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _one(self, query: str, params: Sequence[Any] = ()) -> Any:
        rows = self._read(query, params)
        return rows[0][0] if rows else None

    def data_version(self) -> int:
        """The change log's head: it moves whenever any connection commits a change."""
        return int(self._one("SELECT changes FROM log_head WHERE id = 0"))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._pool.close()

    # -- schema and meta ------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._transaction(lock=False) as conn:
            # one migrator per schema at a time, across processes
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"semcache:{self.schema}",))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(self._ident))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.meta (key TEXT PRIMARY KEY, value TEXT)"
                ).format(self._ident)
            )
            version = int(self.get_meta("schema_version") or 0)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store schema {version} in {self.path} is newer than this semcache "
                    f"({SCHEMA_VERSION}); upgrade semcache"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(
                        sql.SQL(statement).format(  # type: ignore[arg-type]
                            s=self._ident, channel=sql.Literal(self.channel)
                        )
                    )
            self.set_meta("schema_version", str(SCHEMA_VERSION))

    def _identity(self) -> str:
        """This store's identity, made once when the schema is created (see ``Store``)."""
        with self.transaction():
            store_id = self.get_meta("store_id")
            if store_id is None:
                store_id = uuid.uuid4().hex
                self.set_meta("store_id", store_id)
            return store_id

    def get_meta(self, key: str) -> str | None:
        return self._one("SELECT value FROM meta WHERE key = %s", (key,))

    def set_meta(self, key: str, value: str) -> None:
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- namespaces and versions --------------------------------------------------------------
    def version(self, namespace: str) -> int:
        value = self._one("SELECT version FROM namespaces WHERE namespace = %s", (namespace,))
        return int(value) if value is not None else 0

    def bump(self, namespace: str, now: float) -> int:
        """Raise the namespace's version (every older entry is dead at once); fenced."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO namespaces(namespace, version) VALUES (%s, 0) "
                "ON CONFLICT (namespace) DO NOTHING",
                (namespace,),
            )
            row = conn.execute(
                "UPDATE namespaces SET version = version + 1 WHERE namespace = %s "
                "RETURNING version",
                (namespace,),
            ).fetchone()
            self._fence(conn, now, [("ver", namespace, None, None, None, None)])
            assert row is not None
            return int(row[0])

    # -- the fence log ----------------------------------------------------------------------------
    def position(self) -> int:
        """The fence log's position now: what a lookup observed, for a fenced write after it."""
        return int(self._one("SELECT fences FROM log_head WHERE id = 0"))

    @staticmethod
    def _fence(conn: psycopg.Connection[Any], now: float, rows: Sequence[tuple[Any, ...]]) -> None:
        """Append invalidations to the fence log at the next positions (inside a write
        transaction, which holds ``log_head``)."""
        if not rows:
            return
        head = conn.execute(
            "UPDATE log_head SET fences = fences + %s WHERE id = 0 RETURNING fences - %s",
            (len(rows), len(rows)),
        ).fetchone()
        assert head is not None
        columns = list(zip(*rows, strict=True))
        conn.execute(
            "INSERT INTO fences(seq, at, kind, namespace, key, scope_digest, vector, radius) "
            "SELECT %s + f.n, %s, f.kind, f.namespace, f.key, f.scope_digest, f.vector, f.radius "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bytea[], "
            "%s::float8[]) WITH ORDINALITY AS f(kind, namespace, key, scope_digest, vector, "
            "radius, n)",
            (int(head[0]), now, *(list(c) for c in columns)),
        )

    def fences_since(self, position: int) -> list[Fence] | None:
        """The invalidations recorded after ``position``; None when the log no longer reaches
        back that far (so nothing can be proven and a fenced write must not commit)."""
        # one statement, one snapshot: a trim committing meanwhile cannot split the answer
        rows = self._read(
            "SELECT t.trimmed, f.kind, f.namespace, f.key, f.scope_digest, f.vector, f.radius "
            "FROM (SELECT coalesce((SELECT value::bigint FROM meta "
            "WHERE key = 'fences_trimmed'), 0) AS trimmed) t "
            "LEFT JOIN fences f ON f.seq > %s ORDER BY f.seq",
            (position,),
        )
        if position < int(rows[0][0]):
            return None
        return [Fence(*r[1:]) for r in rows if r[1] is not None]

    def trim_fences(self, before: float) -> None:
        """Forget invalidations recorded before ``before``: a flight older than that which
        writes afterwards is simply not cached."""
        with self.transaction() as conn:
            row = conn.execute("SELECT max(seq) FROM fences WHERE at < %s", (before,)).fetchone()
            if row and row[0] is not None:
                conn.execute("DELETE FROM fences WHERE seq <= %s", (row[0],))
                self._raise_meta(conn, "fences_trimmed", int(row[0]))

    @staticmethod
    def _raise_meta(conn: psycopg.Connection[Any], key: str, value: int) -> None:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
            "SET value = greatest(meta.value::bigint, excluded.value::bigint)::text",
            (key, str(value)),
        )

    # -- entries --------------------------------------------------------------------------------
    def _insert_statement(self, cols: tuple[str, ...], *, many: bool) -> str:
        """``INSERT ... RETURNING id, uid`` for these columns: one row of values, or (``many``)
        one array per column (sent in binary), unnested: a bulk insert binds as many parameters
        as there are columns, whatever the number of rows (the driver's parsing of thousands of
        placeholders, and its text escaping of arrays, cost more than the server's insert)."""
        key = (*cols, str(many))
        statement = self._insert_sql.get(key)
        if statement is None:
            unknown = [c for c in cols if c not in _COLUMN_TYPES]
            if unknown:
                raise StoreError(f"entries has no column {', '.join(unknown)}")
            names = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
            if many:
                arrays = sql.SQL(", ").join(
                    sql.SQL("%b::{}[]").format(sql.SQL(_COLUMN_TYPES[c])) for c in cols
                )
                query = sql.SQL(
                    "INSERT INTO entries ({}) SELECT * FROM unnest({}) RETURNING id, uid"
                ).format(names, arrays)
            else:
                marks = sql.SQL(", ").join(sql.Placeholder() for _ in cols)
                query = sql.SQL("INSERT INTO entries ({}) VALUES ({}) RETURNING id, uid").format(
                    names, marks
                )
            statement = self._insert_sql[key] = query.as_string(None)
        return statement

    @staticmethod
    def _add_tags(conn: psycopg.Connection[Any], pairs: Sequence[tuple[str, int]]) -> None:
        if pairs:
            conn.execute(
                "INSERT INTO tags(tag, entry_id) SELECT * FROM unnest(%b::text[], %b::bigint[]) "
                "ON CONFLICT DO NOTHING",
                ([p[0] for p in pairs], [p[1] for p in pairs]),
            )

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
        fence recorded since that covers it, checked while this transaction holds the log head
        so no invalidation can commit in between; otherwise nothing is written and None is
        returned.
        """
        with self.transaction() as conn:
            if fence is not None:
                since = self.fences_since(fence)
                if since is None or (covered is not None and covered(since)):
                    return None
            conn.execute("DELETE FROM entries WHERE l1_key = %s", (values["l1_key"],))
            row = conn.execute(
                self._insert_statement(tuple(values), many=False),  # type: ignore[arg-type]
                tuple(values.values()),
            ).fetchone()
            assert row is not None
            rowid = int(row[0])
            self._add_tags(conn, [(tag, rowid) for tag in tags])
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
        cols = tuple(rows[0])
        ids: dict[str, int] = {}
        with self.transaction() as conn:
            conn.execute("DELETE FROM entries WHERE l1_key = ANY(%b::text[])", (list(last),))
            for start in range(0, len(keep), _INSERT_CHUNK):
                chunk = keep[start : start + _INSERT_CHUNK]
                params = [[rows[i][c] for i in chunk] for c in cols]
                cur = conn.execute(
                    self._insert_statement(cols, many=True),
                    params,  # type: ignore[arg-type]
                )
                ids.update((uid, int(rowid)) for rowid, uid in cur.fetchall())
            self._add_tags(conn, [(tag, ids[rows[i]["uid"]]) for i in keep for tag in tags[i]])
        out = []
        for row in rows:
            winner = rows[last[row["l1_key"]]]["uid"]
            out.append((ids[winner], winner))
        return out

    def _live(self, where: str, params: Sequence[Any], now: float) -> list[Any]:
        """Rows matching ``where`` that are live in the store of record at ``now``: not
        expired, and of their namespace's current version (another replica's bump counts at
        once, even before this replica's version cache hears of it). Each row is
        ``_ROW_COLUMNS`` then its ``l1_key``."""
        return self._read(
            f"SELECT {_ROW_COLUMNS}, l1_key FROM entries WHERE ({where}) "
            f"AND (expires_at IS NULL OR expires_at > %s) AND {_CURRENT}",
            (*params, now),
        )

    def find_exact(self, l1_key: str, now: float) -> Row | None:
        """The live entry with this exact key, confirmed in the store of record."""
        rows = self._live("l1_key = %s", (l1_key,), now)
        return _row(rows[0]) if rows else None

    def candidates(self, ids: Sequence[int], shard: str, now: float) -> dict[int, Row]:
        """The live rows among ``ids`` in ``shard``: the index's answers, re-checked against
        the store of record (deleted, expired and version-bumped rows are not returned)."""
        if not len(ids):
            return {}
        rows = self._live(
            "id = ANY(%s::bigint[]) AND shard = %s", ([int(i) for i in ids], shard), now
        )
        return {int(r[0]): _row(r) for r in rows}

    def lookup_rows(
        self, l1_key: str, ids: Sequence[int], shard: str, now: float
    ) -> tuple[Row | None, dict[int, Row]]:
        """:meth:`find_exact` and :meth:`candidates` in one round trip, for a lookup that has
        its vector already (no embedding to save by looking for the exact repeat first)."""
        wanted = [int(i) for i in ids]
        rows = self._live(
            "l1_key = %s OR (id = ANY(%s::bigint[]) AND shard = %s)", (l1_key, wanted, shard), now
        )
        exact = next((_row(r) for r in rows if r[-1] == l1_key), None)
        among = set(wanted)
        return exact, {int(r[0]): _row(r) for r in rows if int(r[0]) in among and r[2] == shard}

    def get_by_uid(self, uid: str) -> dict[str, Any] | None:
        """Every column of the entry with this uid, or None."""
        with self._connection() as conn:
            try:
                cur = conn.execute("SELECT * FROM entries WHERE uid = %s", (uid,))
                row = cur.fetchone()
                names = [d.name for d in cur.description or ()]
            except psycopg.Error as exc:
                raise StoreError(f"store query failed: {exc}") from exc
        return None if row is None else dict(zip(names, row, strict=True))

    def rowid_of(self, uid: str) -> int | None:
        value = self._one("SELECT id FROM entries WHERE uid = %s", (uid,))
        return int(value) if value is not None else None

    def tags_of(self, rowid: int) -> tuple[str, ...]:
        return tuple(
            r[0]
            for r in self._read(
                'SELECT tag FROM tags WHERE entry_id = %s ORDER BY tag COLLATE "C"', (rowid,)
            )
        )

    def iter_entries(
        self, namespace: str | None = None, batch: int = 1000
    ) -> Iterator[tuple[dict[str, Any], tuple[str, ...]]]:
        """Every entry (all columns but the vector) with its tags, in id order, in batches."""
        last = -1
        where = "" if namespace is None else "AND namespace = %s "
        while True:
            params: tuple[Any, ...] = (last,) if namespace is None else (last, namespace)
            with self._connection() as conn:
                try:
                    cur = conn.execute(
                        "SELECT id, uid, namespace, version, scope, prompt, response, "  # type: ignore[arg-type]
                        "created_at, updated_at, accessed_at, expires_at, hits, metadata "
                        f"FROM entries WHERE id > %s {where}ORDER BY id LIMIT {int(batch)}",
                        params,
                    )
                    rows = cur.fetchall()
                    names = [d.name for d in cur.description or ()]
                except psycopg.Error as exc:
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
        rows = self._read(
            "SELECT id, vector FROM entries WHERE id = ANY(%s::bigint[])", (list(chunk),)
        )
        return [(int(r[0]), r[1]) for r in rows]

    def iter_vectors(
        self, batch: int = 10_000
    ) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        """Every entry's (ids, shards, vectors), in id order, in batches: for rebuilds."""
        last = -1
        while True:
            rows = self._read(
                "SELECT id, shard, vector FROM entries WHERE id > %s ORDER BY id LIMIT %s",
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
            rows = self._read(
                "SELECT id, prompt FROM entries WHERE id > %s ORDER BY id LIMIT %s", (last, batch)
            )
            if not rows:
                return
            yield [(int(r[0]), r[1]) for r in rows]
            last = int(rows[-1][0])

    def set_vectors(self, pairs: Sequence[tuple[int, bytes]]) -> None:
        if not pairs:
            return
        with self.transaction() as conn:
            conn.execute(
                "UPDATE entries e SET vector = v.vector FROM unnest(%s::bigint[], %s::bytea[]) "
                "AS v(id, vector) WHERE e.id = v.id",
                ([int(i) for i, _ in pairs], [bytes(v) for _, v in pairs]),
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
            row = conn.execute("SELECT l1_key FROM entries WHERE id = %s", (rowid,)).fetchone()
            if row is None:
                return
            if "l1_key" in values:  # a new prompt replaces the exact repeat it collides with
                conn.execute(
                    "DELETE FROM entries WHERE l1_key = %s AND id != %s",
                    (values["l1_key"], rowid),
                )
            if values:
                sets = sql.SQL(", ").join(
                    sql.SQL("{} = %s").format(sql.Identifier(col)) for col in values
                )
                conn.execute(
                    sql.SQL("UPDATE entries SET {} WHERE id = %s").format(sets),
                    (*values.values(), rowid),
                )
            if tags is not None:
                conn.execute("DELETE FROM tags WHERE entry_id = %s", (rowid,))
                self._add_tags(conn, [(tag, rowid) for tag in tags])
                # a tag change alone must still reach other processes' L1 (it may matter to them)
                head = conn.execute(
                    "UPDATE log_head SET changes = changes + 1 WHERE id = 0 RETURNING changes"
                ).fetchone()
                assert head is not None
                conn.execute(
                    "INSERT INTO changes(seq, entry_id, shard, op) "
                    "SELECT %s, id, shard, 'upd' FROM entries WHERE id = %s",
                    (int(head[0]), rowid),
                )
            self._fence(conn, now, [("key", None, row[0], None, None, None)])

    # -- deletes --------------------------------------------------------------------------------
    def delete_entry(self, rowid: int, now: float) -> str | None:
        """Delete one entry (write-through); fenced on its exact key. Returns its uid."""
        with self.transaction() as conn:
            row = conn.execute(
                "DELETE FROM entries WHERE id = %s RETURNING uid, l1_key", (rowid,)
            ).fetchone()
            if row is None:
                return None
            self._fence(conn, now, [("key", None, row[1], None, None, None)])
            return str(row[0])

    def delete_prompt(self, l1_key: str, now: float) -> int:
        """Delete the entry stored under an exact key; fenced on that key."""
        with self.transaction() as conn:
            n = conn.execute("DELETE FROM entries WHERE l1_key = %s", (l1_key,)).rowcount
            self._fence(conn, now, [("key", None, l1_key, None, None, None)])
            return n

    def fence_tags(self, tags: Sequence[str], namespace: str | None, now: float) -> None:
        """Record a tag invalidation (before its batches of deletes run)."""
        with self.transaction() as conn:
            self._fence(conn, now, [("tag", namespace, tag, None, None, None) for tag in tags])

    def delete_tagged(self, tags: Sequence[str], namespace: str | None, limit: int) -> int:
        """Delete at most ``limit`` entries carrying any of ``tags`` (of ``namespace`` only, if
        given); returns the count. Call until it returns 0."""
        if not tags or limit <= 0:
            return 0
        if namespace is None:
            select = "SELECT DISTINCT entry_id FROM tags WHERE tag = ANY(%s::text[])"
            params: tuple[Any, ...] = (list(tags),)
        else:
            select = (
                "SELECT DISTINCT t.entry_id FROM tags t JOIN entries e ON e.id = t.entry_id "
                "WHERE t.tag = ANY(%s::text[]) AND e.namespace = %s"
            )
            params = (list(tags), namespace)
        with self.transaction() as conn:
            return conn.execute(
                f"DELETE FROM entries WHERE id IN ({select} LIMIT %s)",  # type: ignore[arg-type]
                (*params, limit),
            ).rowcount

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
            return self._delete_ids(conn, ids)

    @staticmethod
    def _delete_ids(conn: psycopg.Connection[Any], ids: Sequence[int]) -> list[str]:
        if not len(ids):
            return []
        rows = conn.execute(
            "DELETE FROM entries WHERE id = ANY(%s::bigint[]) RETURNING uid",
            ([int(i) for i in ids],),
        ).fetchall()
        return [r[0] for r in rows]

    def delete_ids(self, ids: Sequence[int]) -> list[str]:
        """Delete entries by row id, unfenced (feedback, repairs); returns the uids removed."""
        with self.transaction() as conn:
            return self._delete_ids(conn, ids)

    def delete_expired(self, before: float, limit: int) -> int:
        """Delete at most ``limit`` entries that expired at or before ``before``."""
        with self.transaction() as conn:
            return conn.execute(
                "DELETE FROM entries WHERE id IN (SELECT id FROM entries "
                "WHERE expires_at <= %s LIMIT %s)",
                (before, limit),
            ).rowcount

    def delete_dead_versions(self, limit: int) -> int:
        """Delete at most ``limit`` entries of namespace versions older than the current one."""
        with self.transaction() as conn:
            return conn.execute(
                "DELETE FROM entries WHERE id IN (SELECT e.id FROM namespaces n JOIN entries e "
                "ON e.namespace = n.namespace AND e.version < n.version LIMIT %s)",
                (limit,),
            ).rowcount

    def evict(
        self,
        order: str,
        count: int,
        keep_from: int | None,
        spare: Sequence[tuple[int, int]] = (),
    ) -> int:
        """As :meth:`semcache.store.Store.evict`: the first ``count`` entries in eviction
        ``order`` go, never one from ``keep_from`` on or in the id ranges ``spare``."""
        sql, params = eviction_statement(order, count, keep_from, spare, "%s")
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount  # type: ignore[arg-type]

    # -- access and feedback ------------------------------------------------------------------
    def record_access(self, accesses: dict[int, tuple[int, float]]) -> None:
        """Apply buffered (hit count, last access) updates: LRU/LFU order, never a change."""
        if not accesses:
            return
        ids = sorted(accesses)
        with self.transaction() as conn:
            conn.execute(
                "UPDATE entries e SET hits = e.hits + a.n, "
                "accessed_at = greatest(e.accessed_at, a.at) "
                "FROM unnest(%s::bigint[], %s::bigint[], %s::float8[]) AS a(id, n, at) "
                "WHERE e.id = a.id",
                (ids, [accesses[i][0] for i in ids], [accesses[i][1] for i in ids]),
            )

    def feedback_good(self, rowid: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE entries SET feedback_good = feedback_good + 1 WHERE id = %s", (rowid,)
            )

    def feedback_bad(self, rowid: int, floor: float) -> None:
        """Count a wrong answer and raise the entry's own similarity floor to ``floor``."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE entries SET feedback_bad = feedback_bad + 1, min_similarity = "
                "greatest(coalesce(min_similarity, -1.0), %s) WHERE id = %s",
                (floor, rowid),
            )

    # -- sizes ------------------------------------------------------------------------------------
    def largest_namespaces(self, limit: int) -> dict[str, int]:
        """The ``limit`` namespaces with the most entries (dead versions included), largest
        first."""
        rows = self._read(
            "SELECT namespace, count(*) AS n FROM entries GROUP BY namespace "
            "ORDER BY n DESC, namespace LIMIT %s",
            (limit,),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def counters(self) -> tuple[int, int]:
        entries, size = self._read("SELECT entries, bytes FROM counters WHERE id = 0")[0]
        return int(entries), int(size)

    def recount(self) -> tuple[int, int]:
        """Recompute the counters from the table (``verify(fix=True)``)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM entries").fetchone()
            assert row is not None
            n, size = int(row[0]), int(row[1])
            conn.execute("UPDATE counters SET entries = %s, bytes = %s WHERE id = 0", (n, size))
            return n, size

    # -- the change log ---------------------------------------------------------------------------
    def changes_since(self, seq: int, limit: int = 10_000) -> list[Change]:
        """The log after ``seq``, oldest first; an add or a vector change carries the entry's
        current shard and vector (None when the entry is already gone)."""
        rows = self._read(
            "SELECT c.seq, c.entry_id, c.shard, c.op, e.shard, e.vector FROM changes c "
            "LEFT JOIN entries e ON e.id = c.entry_id AND c.op IN ('add', 'vec') "
            "WHERE c.seq > %s ORDER BY c.seq LIMIT %s",
            (seq, limit),
        )
        return changes_of_rows(rows)

    def last_seq(self) -> int:
        return int(self._one("SELECT changes FROM log_head WHERE id = 0"))

    def trim_changes(self, upto: int) -> None:
        """Forget changes up to ``upto``: an index persisted at that point no longer needs them."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM changes WHERE seq <= %s", (upto,))
            self._raise_meta(conn, "changes_trimmed", upto)

    def record_checkpoint(self, token: str, trim_upto: int, now: float, slot: str = "") -> int:
        """A replica checkpoint is durable: remember its token (so a manifest that is not this
        store's latest checkpoint is never trusted) and trim the log up to ``trim_upto``, but
        never past a position a live follower holds (one whose hold is younger than
        ``HOLD_TTL`` seconds at ``now``). Returns where the log was trimmed to."""
        with self.transaction() as conn:
            self.set_meta(f"checkpoint_token{slot}", token)
            row = conn.execute(
                "SELECT min(seq) FROM holds WHERE at > %s", (now - HOLD_TTL,)
            ).fetchone()
            held = None if row is None else row[0]
            upto = trim_upto if held is None else min(trim_upto, int(held))
            if upto > self.trimmed_upto():
                self.trim_changes(upto)
            return upto

    def hold_log(self, holder: str, seq: int, now: float) -> None:
        """A follower needs the log from ``seq`` on: the owner does not trim past it while the
        hold is refreshed (at least every ``HOLD_TTL`` seconds)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO holds(holder, seq, at) VALUES (%s, %s, %s) ON CONFLICT (holder) "
                "DO UPDATE SET seq = excluded.seq, at = excluded.at",
                (holder, seq, now),
            )
            conn.execute("DELETE FROM holds WHERE at <= %s", (now - 10 * HOLD_TTL,))

    def release_hold(self, holder: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM holds WHERE holder = %s", (holder,))

    # -- flight leases (single-flight between replicas) -------------------------------------------
    def take_lease(self, key: str, owner: str, now: float, ttl: float) -> bool:
        """Lead the computation of ``key``: True when ``owner`` now holds its lease (it was
        free, expired, or already this owner's); False while another owner's lease is live.
        One statement, outside the log: it never waits for the writers' turn."""
        rows = self._read(
            "INSERT INTO leases(key, owner, expires_at) VALUES (%s, %s, %s) ON CONFLICT (key) "
            "DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at "
            "WHERE leases.expires_at <= %s OR leases.owner = excluded.owner RETURNING owner",
            (key, owner, now + ttl, now),
        )
        return bool(rows)

    def lease_owner(self, key: str, now: float) -> str | None:
        """Who holds the live lease on ``key``, or None."""
        return self._one("SELECT owner FROM leases WHERE key = %s AND expires_at > %s", (key, now))

    def release_lease(self, key: str, owner: str) -> None:
        """Give a lease back (only the owner's own)."""
        self.execute("DELETE FROM leases WHERE key = %s AND owner = %s", (key, owner))

    # -- change notifications --------------------------------------------------------------------
    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel the log head announces itself on (one per schema)."""
        return _channel(self.schema)

    def listen(self, on_change: Callable[[], None], poll: float) -> Listener:
        """Call ``on_change`` (in a daemon thread) soon after any transaction that moved the
        change log commits, and every ``poll`` seconds regardless, so a notification lost with
        a dropped connection costs at most ``poll`` seconds. Stop it with ``close()``."""
        self._check_open()

        def nudge() -> None:  # wakes a closing listener now, not at its next poll
            if not self._closed:  # a busy pool is not waited for: the poll ends it then
                with self._pool.connection(timeout=NUDGE_TIMEOUT) as conn:
                    conn.execute("SELECT pg_notify(%s, 'closing')", (self.channel,))

        return Listener(self.url, self.channel, on_change, poll, nudge=nudge)

    def quick_check(self) -> list[str]:
        """What ``verify()`` reports about the store itself: the log heads must be at or past
        every position written (PostgreSQL checks its own pages)."""
        row = self._read(
            "SELECT h.changes, h.fences, (SELECT max(seq) FROM changes), "
            "(SELECT max(seq) FROM fences) FROM log_head h WHERE h.id = 0"
        )
        if not row:
            return ["postgres: the log head row is missing"]
        changes, fences, max_change, max_fence = row[0]
        problems = []
        if max_change is not None and max_change > changes:
            problems.append(f"postgres: change log at {max_change} is past its head {changes}")
        if max_fence is not None and max_fence > fences:
            problems.append(f"postgres: fence log at {max_fence} is past its head {fences}")
        return problems


# Each migration is a list of statements; ``{s}`` is the schema (quoted). The trigger functions
# name their tables with the schema, so they log whichever session's search_path wrote.
# No index on ``shard`` (SQLite has one): the only query that filters on it (``candidates``) has
# the ids, and with such an index the planner, before statistics exist, intersects the pkey
# lookup with a scan of the whole shard (measured: every one of 5,000 shard rows read for 10).
_MIGRATION_1 = [
    """CREATE TABLE {s}.entries (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        uid TEXT NOT NULL UNIQUE,
        shard TEXT NOT NULL,
        namespace TEXT NOT NULL,
        version BIGINT NOT NULL,
        scope_digest TEXT NOT NULL,
        scope TEXT NOT NULL,
        prompt TEXT NOT NULL,
        l1_key TEXT NOT NULL,
        response TEXT NOT NULL,
        vector BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        accessed_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        hits BIGINT NOT NULL DEFAULT 0,
        size BIGINT NOT NULL,
        metadata TEXT,
        min_similarity DOUBLE PRECISION,
        feedback_good BIGINT NOT NULL DEFAULT 0,
        feedback_bad BIGINT NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX entries_l1 ON {s}.entries(l1_key)",
    "CREATE INDEX entries_expiry ON {s}.entries(expires_at) WHERE expires_at IS NOT NULL",
    "CREATE INDEX entries_access ON {s}.entries(accessed_at)",
    "CREATE INDEX entries_namespace ON {s}.entries(namespace, version)",
    "CREATE INDEX entries_lfu ON {s}.entries(hits, accessed_at, id)",
    "CREATE TABLE {s}.tags (tag TEXT NOT NULL, entry_id BIGINT NOT NULL, "
    "PRIMARY KEY (tag, entry_id))",
    "CREATE INDEX tags_entry ON {s}.tags(entry_id)",
    "CREATE TABLE {s}.namespaces (namespace TEXT PRIMARY KEY, version BIGINT NOT NULL)",
    "CREATE TABLE {s}.changes (seq BIGINT PRIMARY KEY, entry_id BIGINT, shard TEXT NOT NULL, "
    "op TEXT NOT NULL)",
    "CREATE TABLE {s}.fences (seq BIGINT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, "
    "kind TEXT NOT NULL, namespace TEXT, key TEXT, scope_digest TEXT, vector BYTEA, "
    "radius DOUBLE PRECISION)",
    "CREATE INDEX fences_at ON {s}.fences(at)",
    "CREATE TABLE {s}.counters (id INTEGER PRIMARY KEY CHECK (id = 0), "
    "entries BIGINT NOT NULL, bytes BIGINT NOT NULL)",
    "INSERT INTO {s}.counters(id, entries, bytes) VALUES (0, 0, 0)",
    # the heads of both logs: every write transaction locks this row first (see the docstring)
    "CREATE TABLE {s}.log_head (id INTEGER PRIMARY KEY CHECK (id = 0), "
    "changes BIGINT NOT NULL, fences BIGINT NOT NULL)",
    "INSERT INTO {s}.log_head(id, changes, fences) VALUES (0, 0, 0)",
    """CREATE FUNCTION {s}.entries_added() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE n bigint; grow bigint; base bigint;
    BEGIN
      SELECT count(*), coalesce(sum(size), 0) INTO n, grow FROM new_rows;
      IF n = 0 THEN RETURN NULL; END IF;
      UPDATE {s}.log_head SET changes = changes + n WHERE id = 0 RETURNING changes - n INTO base;
      INSERT INTO {s}.changes(seq, entry_id, shard, op)
        SELECT base + row_number() OVER (ORDER BY id), id, shard, 'add' FROM new_rows;
      UPDATE {s}.counters SET entries = entries + n, bytes = bytes + grow WHERE id = 0;
      RETURN NULL;
    END $$""",
    """CREATE FUNCTION {s}.entries_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE n bigint; shrink bigint; base bigint;
    BEGIN
      SELECT count(*), coalesce(sum(size), 0) INTO n, shrink FROM old_rows;
      IF n = 0 THEN RETURN NULL; END IF;
      UPDATE {s}.log_head SET changes = changes + n WHERE id = 0 RETURNING changes - n INTO base;
      INSERT INTO {s}.changes(seq, entry_id, shard, op)
        SELECT base + row_number() OVER (ORDER BY id), id, shard, 'del' FROM old_rows;
      DELETE FROM {s}.tags WHERE entry_id IN (SELECT id FROM old_rows);
      UPDATE {s}.counters SET entries = entries - n, bytes = bytes - shrink WHERE id = 0;
      RETURN NULL;
    END $$""",
    # a vector change logs 'vec'; a change the lookup path reads logs 'upd'; hits and access
    # times (record_access) log nothing
    """CREATE FUNCTION {s}.entries_updated() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE ids bigint[]; shards text[]; ops text[]; grow bigint; base bigint;
    BEGIN
      SELECT array_agg(c.id ORDER BY c.id, c.op DESC), array_agg(c.shard ORDER BY c.id, c.op DESC),
             array_agg(c.op ORDER BY c.id, c.op DESC), coalesce(sum(c.grow), 0)
        INTO ids, shards, ops, grow
        FROM (SELECT v.id, v.shard, 'vec' AS op, 0::bigint AS grow
                FROM old_rows o JOIN new_rows v ON v.id = o.id
                WHERE o.vector IS DISTINCT FROM v.vector
              UNION ALL
              SELECT v.id, v.shard, 'upd', v.size - o.size
                FROM old_rows o JOIN new_rows v ON v.id = o.id
                WHERE (o.response, o.l1_key, o.expires_at, o.size, o.metadata)
                  IS DISTINCT FROM (v.response, v.l1_key, v.expires_at, v.size, v.metadata)) c;
      IF ids IS NULL THEN RETURN NULL; END IF;
      UPDATE {s}.log_head SET changes = changes + cardinality(ids) WHERE id = 0
        RETURNING changes - cardinality(ids) INTO base;
      INSERT INTO {s}.changes(seq, entry_id, shard, op)
        SELECT base + u.k, u.id, u.shard, u.op
        FROM unnest(ids, shards, ops) WITH ORDINALITY AS u(id, shard, op, k);
      IF grow <> 0 THEN
        UPDATE {s}.counters SET bytes = bytes + grow WHERE id = 0;
      END IF;
      RETURN NULL;
    END $$""",
    """CREATE FUNCTION {s}.namespaces_updated() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE n bigint; base bigint;
    BEGIN
      SELECT count(*) INTO n FROM old_rows o JOIN new_rows v ON v.namespace = o.namespace
        WHERE v.version IS DISTINCT FROM o.version;
      IF n = 0 THEN RETURN NULL; END IF;
      UPDATE {s}.log_head SET changes = changes + n WHERE id = 0 RETURNING changes - n INTO base;
      INSERT INTO {s}.changes(seq, entry_id, shard, op)
        SELECT base + row_number() OVER (ORDER BY v.namespace), NULL, v.namespace, 'ver'
        FROM old_rows o JOIN new_rows v ON v.namespace = o.namespace
        WHERE v.version IS DISTINCT FROM o.version;
      RETURN NULL;
    END $$""",
    "CREATE TRIGGER entries_ai AFTER INSERT ON {s}.entries REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION {s}.entries_added()",
    "CREATE TRIGGER entries_ad AFTER DELETE ON {s}.entries REFERENCING OLD TABLE AS old_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION {s}.entries_deleted()",
    "CREATE TRIGGER entries_au AFTER UPDATE ON {s}.entries REFERENCING OLD TABLE AS old_rows "
    "NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.entries_updated()",
    "CREATE TRIGGER namespaces_au AFTER UPDATE ON {s}.namespaces REFERENCING OLD TABLE AS "
    "old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.namespaces_updated()",
]

# Followers' holds on the change log (the owner never trims past a live one).
_MIGRATION_2 = [
    "CREATE TABLE {s}.holds (holder TEXT PRIMARY KEY, seq BIGINT NOT NULL, "
    "at DOUBLE PRECISION NOT NULL)",
]

# Flight leases, and a notification of the log head in every transaction that moves it (sent
# at commit, so a follower never wakes for a change it cannot read yet).
_MIGRATION_3 = [
    "CREATE TABLE {s}.leases (key TEXT PRIMARY KEY, owner TEXT NOT NULL, "
    "expires_at DOUBLE PRECISION NOT NULL)",
    """CREATE FUNCTION {s}.log_head_moved() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.changes <> OLD.changes THEN
        PERFORM pg_notify({channel}, NEW.changes::text);
      END IF;
      RETURN NULL;
    END $$""",
    "CREATE TRIGGER log_head_au AFTER UPDATE ON {s}.log_head "
    "FOR EACH ROW EXECUTE FUNCTION {s}.log_head_moved()",
]

# Vectors written in half precision from here on (semcache/vectorcodec.py): a release before
# schema 4 cannot read them, and refuses the schema instead of failing on its first decode.
_MIGRATION_4 = [
    "COMMENT ON SCHEMA {s} IS 'semcache store: entry vectors in half precision since schema 4'",
]

_MIGRATIONS: dict[int, list[str]] = {
    1: _MIGRATION_1,
    2: _MIGRATION_2,
    3: _MIGRATION_3,
    4: _MIGRATION_4,
}


def _channel(schema: str) -> str:
    """A channel name within PostgreSQL's 63 bytes, distinct per schema."""
    return "semcache_" + hashlib.sha1(schema.encode()).hexdigest()[:20]


class Listener:
    """A daemon thread that LISTENs on a store's channel and calls back on each wake-up."""

    def __init__(
        self,
        url: str,
        channel: str,
        on_change: Callable[[], None],
        poll: float,
        *,
        nudge: Callable[[], None] | None = None,
    ) -> None:
        self._url = url
        self._nudge = nudge
        self._channel = channel
        self._on_change = on_change
        self._poll = max(0.01, float(poll))
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.wakeups = 0
        self._thread = threading.Thread(target=self._run, name="semcache-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    self.connected.set()
                    backoff = 0.1
                    self._wake()  # whatever committed before LISTEN took effect
                    while not self._stop.is_set():
                        # one notification (or the poll interval) per wake-up; the callback
                        # catches up on everything committed so far, so a burst needs one
                        for _ in conn.notifies(timeout=self._poll, stop_after=1):
                            pass
                        self._wake()
            except Exception as exc:  # a lost connection: poll meanwhile, then reconnect
                self.connected.clear()
                if self._stop.is_set():
                    return
                log.warning("change listener on %s lost its connection: %s", redact(self._url), exc)
                self._wake()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._poll)
        self.connected.clear()

    def _wake(self) -> None:
        if self._stop.is_set():
            return
        self.wakeups += 1
        try:
            self._on_change()
        except Exception:  # logged; the next wake-up tries again
            log.exception("following the change log failed")

    @property
    def alive(self) -> bool:
        """Listening now: a commit elsewhere reaches this process within milliseconds."""
        return self.connected.is_set() and self._thread.is_alive()

    def close(self) -> None:
        """Stop listening; returns once the thread has ended. The thread waits for a
        notification, so ``nudge`` (one ``NOTIFY`` on the channel) wakes it at once; without
        one, or if it fails, the thread ends at its next poll."""
        self._stop.set()
        if self._nudge is not None and self.connected.is_set():
            try:
                self._nudge()
            except Exception as exc:  # the store is failing: the poll ends the thread
                log.debug("could not wake the change listener: %s", exc)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=self._poll + 5)
