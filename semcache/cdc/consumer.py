"""The change-data-capture consumer: PostgreSQL logical replication (pgoutput) -> cache
invalidations.

Flow per transaction: the changes between a Begin and its Commit are turned into one batched
:class:`~semcache.cdc.rules.Invalidation`; at the Commit it is applied to the cache (each cache
call commits to SQLite before returning), the transaction's end LSN is recorded durably in the
cache's data folder, and only then is that LSN confirmed to PostgreSQL (``flush_lsn``). So:

* a crash before the cache committed: PostgreSQL resends the transaction (nothing missed);
* a crash after the record but before the confirmation: PostgreSQL resends it and the consumer
  skips it, because its end LSN is at or before the recorded one (nothing applied twice);
* a crash between the cache commit and the record (a few milliseconds): the transaction is
  applied again, which is harmless: tag and key invalidations are idempotent and a second bump
  only retires the namespace's entries again.

psycopg2's ``LogicalReplicationConnection`` speaks the replication protocol (psycopg 3 does
not). The loop waits on the connection's socket with ``select`` (and on a wake-up pipe for
:meth:`ChangeConsumer.stop`), so a change is applied within milliseconds of its COMMIT.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg2
import psycopg2.errors
import psycopg2.extras
from psycopg2 import sql

from ..errors import InvalidInputError, ReplicationError
from . import pgoutput
from .position import Position, PositionStore
from .rules import Invalidation, Row, Rule

log = logging.getLogger("semcache.cdc")

SlotLostPolicy = Literal["raise", "flush"] | Callable[[Any], None]


class StreamInterruptedError(ReplicationError):
    """The replication connection failed or the slot is busy: :meth:`ChangeConsumer.run`
    retries with backoff; :meth:`ChangeConsumer.run_once` raises it (call it again to
    reconnect). Nothing unconfirmed is lost: PostgreSQL resends from the confirmed position."""


@dataclass
class _Transaction:
    """The invalidations of the transaction being received, applied at its Commit."""

    begin: pgoutput.Begin
    invalidation: Invalidation = field(default_factory=Invalidation)
    changes: int = 0


@dataclass
class ConsumerStats:
    """Counters since the consumer was created."""

    transactions_applied: int = 0
    transactions_skipped: int = 0  # already applied before a restart (commit LSN <= recorded)
    changes_applied: int = 0
    entries_removed: int = 0
    reconnects: int = 0
    last_commit_lsn: int | None = None
    last_commit_time: float | None = None  # the transaction's COMMIT time, epoch seconds
    last_applied_at: float | None = None  # when its invalidations were committed, epoch seconds


def _sql_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """For methods on the ordinary SQL connection: a dropped connection (server restart) is
    reopened and the method retried once (they are all idempotent); other database errors
    become :class:`ReplicationError`."""

    @functools.wraps(method)
    def wrapper(self: ChangeConsumer, *args: Any, **kwargs: Any) -> Any:
        for attempt in (1, 2):
            try:
                return method(self, *args, **kwargs)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                self._reset_sql()
                if attempt == 2:
                    raise ReplicationError(f"PostgreSQL connection failed: {exc}".strip()) from exc
            except psycopg2.Error as exc:
                raise ReplicationError(f"{method.__name__}: {exc}".strip()) from exc
        raise AssertionError("unreachable")

    return wrapper


def default_state_folder(cache: Any) -> Path:
    """Where a cache's CDC positions live: ``<cache path>/cdc`` (beside the file for a
    single-file cache)."""
    path = getattr(cache, "path", None)
    if path is None:
        raise InvalidInputError(
            "the cache has no .path; pass state_dir= to ChangeConsumer to say where the CDC "
            "position is recorded"
        )
    path = Path(path)
    if path.is_file():
        return path.with_name(path.name + ".cdc")
    return path / "cdc"


class ChangeConsumer:
    """Consume a PostgreSQL logical replication slot and invalidate cache entries by rules.

    Args:
        dsn: a libpq connection string or URL for the database whose tables the rules name.
        cache: the ``SemanticCache`` (anything with ``invalidate_tags``, ``delete``, ``bump``).
        rules: the :class:`Rule` list. Changes to other tables are ignored.
        slot: the logical replication slot's name (pgoutput plugin).
        publication: the publication's name.
        state_dir: where the position file goes; default ``<cache path>/cdc``.
        on_slot_lost: what to do when the slot this consumer was reading is gone (dropped, or
            invalidated by ``max_slot_wal_keep_size``): ``"raise"`` (default) raises
            :class:`ReplicationError`, because changes may have been missed and the cache
            should be flushed; ``"flush"`` recreates the slot, then applies every rule's
            TRUNCATE invalidation (table tags and constant namespaces) and carries on; a
            function ``f(cache)`` recreates the slot, then calls it to flush as it sees fit.
        status_interval: seconds between status messages to the server when idle.
        reconnect_initial / reconnect_max: the backoff of :meth:`run` after a lost connection.
    """

    def __init__(
        self,
        dsn: str,
        cache: Any,
        rules: Iterable[Rule],
        *,
        slot: str = "semcache",
        publication: str = "semcache",
        state_dir: str | os.PathLike[str] | None = None,
        on_slot_lost: SlotLostPolicy = "raise",
        status_interval: float = 1.0,
        reconnect_initial: float = 0.5,
        reconnect_max: float = 30.0,
    ) -> None:
        self.rules: list[Rule] = list(rules)
        if not self.rules:
            raise InvalidInputError("ChangeConsumer needs at least one Rule")
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise InvalidInputError(f"not a Rule: {rule!r}")
        if not callable(on_slot_lost) and on_slot_lost not in ("raise", "flush"):
            raise InvalidInputError("on_slot_lost must be 'raise', 'flush' or a function")
        for name in (slot, publication):
            if not name or not isinstance(name, str):
                raise InvalidInputError("slot and publication names must be non-empty strings")
        self.dsn = dsn
        self.cache = cache
        self.slot = slot
        self.publication = publication
        self.on_slot_lost = on_slot_lost
        self.status_interval = status_interval
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        folder = Path(state_dir) if state_dir is not None else default_state_folder(cache)
        self._positions = PositionStore(folder, slot)
        self._by_table: dict[tuple[str, str], list[Rule]] = {}
        for rule in self.rules:
            self._by_table.setdefault((rule.schema, rule.table), []).append(rule)
        self.stats = ConsumerStats()

        self._sql_conn: Any = None  # ordinary connection: setup, lag, drop
        self._repl_conn: Any = None  # replication connection
        self._cursor: Any = None
        self._relations: dict[int, pgoutput.Relation] = {}
        self._txn: _Transaction | None = None
        self._position: Position | None = None
        self._identity: tuple[str, str] | None = None  # (system_id, database)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        # re-entrant: stop() may run in a signal handler that interrupts close() in this thread
        self._wake_lock = threading.RLock()

    # ------------------------------------------------------------------ public API

    @property
    def tables(self) -> list[tuple[str, str]]:
        """The (schema, table) pairs the rules name."""
        return sorted(self._by_table)

    @property
    def position(self) -> int | None:
        """The recorded position (end LSN of the last applied transaction), or None."""
        recorded = self._position or self._positions.load()
        return recorded.lsn if recorded else None

    @property
    def state_file(self) -> Path:
        """The file that records this slot's position."""
        return self._positions.path

    @_sql_errors
    def setup(self) -> None:
        """Create the publication (FOR TABLE the rules' tables) and the pgoutput slot, if
        missing. Idempotent: an existing publication gains the tables it lacks, an existing
        slot is checked (plugin, database) and kept.

        A slot that is missing although this consumer recorded a position for it was dropped
        behind its back: that is handled as ``on_slot_lost`` says (by default a
        :class:`ReplicationError`), never by silently creating a new slot.
        """
        conn = self._sql()
        with conn.cursor() as cur:
            cur.execute("SHOW wal_level")
            (wal_level,) = cur.fetchone()
            if wal_level != "logical":
                raise ReplicationError(
                    f"wal_level is {wal_level!r}; logical replication needs 'logical' "
                    "(ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)"
                )
        self._ensure_publication(conn)
        recorded = self._recorded()  # (completes an interrupted lost-slot recovery first)
        slot = self._slot_row()
        if slot is None:
            if recorded is not None:
                self._slot_lost("it no longer exists")
            else:
                self._create_slot()
        else:
            self._check_slot(slot)
            if slot["wal_status"] == "lost":
                self._slot_lost("PostgreSQL invalidated it (wal_status 'lost')")
            elif recorded is None:
                # A slot someone else created, or ours from before the position file was lost:
                # start recording from where it stands.
                self._record(self._slot_start(slot), transactions=0)

    def run_once(self, timeout: float = 1.0, *, min_changes: int | None = None) -> int:
        """Apply what arrives within ``timeout`` seconds and return the number of row changes
        (and truncates) applied.

        With ``min_changes`` it returns as soon as at least that many changes were applied
        (at a transaction boundary), so a test need not wait out the whole timeout. Connects
        on first use and keeps the connection for the next call. Errors propagate.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        self._ensure_stream()
        return self._pump(deadline, min_changes)

    def run(self, *, handle_signals: bool = True) -> None:
        """Consume until :meth:`stop` is called (or SIGTERM/SIGINT arrive, when running in the
        main thread with ``handle_signals``). A lost connection or a slot busy with another
        consumer is retried with exponential backoff; a lost slot, a broken rule or a cache
        failure raise.

        A :meth:`stop` is kept until a run returns because of it: one that comes before
        ``run`` starts makes it return at once, and one that comes while :meth:`run_once`
        returns for another reason (its timeout) stops the next run.
        """
        previous: dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        delay = self.reconnect_initial
        try:
            while True:
                if self._stop.is_set():
                    self._stopped()
                    return
                try:
                    self._ensure_stream()
                    delay = self.reconnect_initial
                    self._pump(None, None)  # returns only once it honoured a stop
                    return
                except StreamInterruptedError as exc:
                    self._close_stream()
                    self.stats.reconnects += 1
                    log.warning("CDC stream interrupted (%s); retrying in %.1f s", exc, delay)
                    self._wait(delay)
                    delay = min(delay * 2, self.reconnect_max)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close_stream()

    def stop(self) -> None:
        """Ask the running (or else the next) :meth:`run` or :meth:`run_once` to return; safe
        from another thread or a signal handler."""
        self._stop.set()
        with self._wake_lock:  # never a write to a pipe close() has just closed (and reused)
            if not self._closed:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")

    def lag_bytes(self) -> int | None:
        """How far the slot's confirmed position is behind the server's current WAL position,
        in bytes (None when the slot does not exist). WAL from the slot's ``restart_lsn`` on is
        retained for it; ``max_slot_wal_keep_size`` caps that, at the price of invalidating a
        slot that lags further (then ``on_slot_lost`` applies)."""
        status = self.slot_status()
        return None if status is None else status["lag_bytes"]

    @_sql_errors
    def slot_status(self) -> dict[str, Any] | None:
        """The slot as ``pg_replication_slots`` sees it, with lag and retained WAL in bytes."""
        with self._sql().cursor() as cur:
            cur.execute(
                """
                SELECT slot_name, plugin, database, active, active_pid, wal_status,
                       restart_lsn::text, confirmed_flush_lsn::text,
                       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
                       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                       safe_wal_size
                FROM pg_replication_slots WHERE slot_name = %s
                """,
                (self.slot,),
            )
            row = cur.fetchone()
        if row is None:
            return None
        keys = (
            "slot_name", "plugin", "database", "active", "active_pid", "wal_status",
            "restart_lsn", "confirmed_flush_lsn", "lag_bytes", "retained_bytes", "safe_wal_size",
        )  # fmt: skip
        return dict(zip(keys, row, strict=True))

    def close(self) -> None:
        """Close the connections (the slot and the recorded position stay)."""
        if self._closed:
            return
        with self._wake_lock:
            self._closed = True
        self._close_stream()
        if self._sql_conn is not None:
            with contextlib.suppress(Exception):
                self._sql_conn.close()
            self._sql_conn = None
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    @_sql_errors
    def drop(self) -> None:
        """Drop the slot and the publication and forget the recorded position.

        Do this when retiring a consumer: an abandoned slot makes PostgreSQL keep WAL forever.
        """
        self._close_stream()
        conn = self._sql()
        with conn.cursor() as cur:
            for _ in range(50):  # a just-closed walsender may take a moment to release it
                cur.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                    (self.slot,),
                )
                row = cur.fetchone()
                if row is None or row[0] is None:
                    break
                time.sleep(0.1)
            cur.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (self.slot,),
            )
            cur.execute(
                sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.publication))
            )
        self._positions.remove()
        self._position = None

    def __enter__(self) -> ChangeConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ setup helpers

    def _sql(self) -> Any:
        if self._closed:
            raise ReplicationError("the ChangeConsumer is closed")
        if self._sql_conn is None or self._sql_conn.closed:
            try:
                self._sql_conn = psycopg2.connect(self.dsn)
            except psycopg2.Error as exc:
                raise ReplicationError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc
            self._sql_conn.autocommit = True
        return self._sql_conn

    def _reset_sql(self) -> None:
        conn, self._sql_conn = self._sql_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _identity_now(self) -> tuple[str, str]:
        if self._identity is None:
            with self._sql().cursor() as cur:
                cur.execute(
                    "SELECT system_identifier::text, current_database() FROM pg_control_system()"
                )
                system_id, database = cur.fetchone()
            self._identity = (str(system_id), str(database))
        return self._identity

    def _ensure_publication(self, conn: Any) -> None:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT puballtables FROM pg_publication WHERE pubname = %s", (self.publication,)
            )
            row = cur.fetchone()
            tables = [sql.Identifier(s, t) for s, t in self.tables]
            try:
                if row is None:
                    cur.execute(
                        sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                            sql.Identifier(self.publication), sql.SQL(", ").join(tables)
                        )
                    )
                    log.info("created publication %s for %s", self.publication, self.tables)
                    return
                if row[0]:
                    return  # FOR ALL TABLES covers ours
                cur.execute(
                    "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                    (self.publication,),
                )
                present = {(s, t) for s, t in cur.fetchall()}
                missing = [sql.Identifier(s, t) for s, t in self.tables if (s, t) not in present]
                if missing:
                    cur.execute(
                        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                            sql.Identifier(self.publication), sql.SQL(", ").join(missing)
                        )
                    )
                    log.info("added %d table(s) to publication %s", len(missing), self.publication)
            except psycopg2.errors.DuplicateObject:
                pass  # another consumer created it concurrently
            except psycopg2.Error as exc:
                raise ReplicationError(
                    f"cannot set up publication {self.publication!r} for {self.tables}: "
                    f"{exc}".strip()
                ) from exc

    def _slot_row(self) -> dict[str, Any] | None:
        with self._sql().cursor() as cur:
            cur.execute(
                "SELECT plugin, database, wal_status, confirmed_flush_lsn::text, active_pid "
                "FROM pg_replication_slots WHERE slot_name = %s AND slot_type = 'logical'",
                (self.slot,),
            )
            row = cur.fetchone()
        if row is None:
            return None
        return dict(
            zip(
                ("plugin", "database", "wal_status", "confirmed_flush_lsn", "active_pid"),
                row,
                strict=True,
            )
        )

    def _check_slot(self, slot: dict[str, Any]) -> None:
        _, database = self._identity_now()
        if slot["plugin"] != "pgoutput" or slot["database"] != database:
            raise ReplicationError(
                f"replication slot {self.slot!r} exists but uses plugin {slot['plugin']!r} on "
                f"database {slot['database']!r}; semcache needs a pgoutput slot on {database!r}"
            )

    @staticmethod
    def _slot_start(slot: dict[str, Any]) -> int:
        text = slot.get("confirmed_flush_lsn")
        return pgoutput.lsn_from_str(text) if text else 0

    def _create_slot(self) -> None:
        # Record the creation point at once: from now on a vanished slot is detected.
        self._record(self._create_slot_at(), transactions=0)

    def _create_slot_at(self) -> int:
        """Create the slot (or adopt one created concurrently); returns its start LSN."""
        with self._sql().cursor() as cur:
            try:
                cur.execute(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')",
                    (self.slot,),
                )
                (lsn_text,) = cur.fetchone()
                log.info("created replication slot %s at %s", self.slot, lsn_text)
            except psycopg2.errors.DuplicateObject:
                slot = self._slot_row()
                if slot is None:
                    raise
                self._check_slot(slot)
                lsn_text = slot["confirmed_flush_lsn"]
            except psycopg2.Error as exc:
                raise ReplicationError(
                    f"cannot create replication slot {self.slot!r}: {exc}".strip()
                ) from exc
        return pgoutput.lsn_from_str(lsn_text)

    def _recorded(self) -> Position | None:
        """The recorded position if it belongs to this cluster and database."""
        if self._position is None:
            self._position = self._positions.load()
        position = self._position
        if position is None:
            return None
        system_id, database = self._identity_now()
        if (position.system_id, position.database) != (system_id, database):
            raise ReplicationError(
                f"{self._positions.path} records slot {self.slot!r} of database "
                f"{position.database!r} on cluster {position.system_id}, not {database!r} on "
                f"{system_id}; use another slot name or remove the file (and flush the cache)"
            )
        if position.flush_pending:
            log.warning("completing the interrupted recovery of lost slot %s", self.slot)
            self._replace_slot_and_flush()
            return self._position
        return position

    def _record(
        self, lsn: int, *, transactions: int | None = None, flush_pending: bool = False
    ) -> None:
        system_id, database = self._identity_now()
        previous = self._position
        count = (
            transactions
            if transactions is not None
            else ((previous.transactions if previous else 0) + 1)
        )
        position = Position(
            slot=self.slot,
            system_id=system_id,
            database=database,
            lsn=lsn,
            transactions=count,
            updated_at=time.time(),
            flush_pending=flush_pending,
        )
        self._positions.save(position)
        self._position = position

    @_sql_errors
    def _slot_lost(self, why: str) -> None:
        """The slot we were reading is gone: changes since our position may be lost."""
        recorded = self._position
        where = f" (last applied position {recorded.lsn_text})" if recorded else ""
        if self.on_slot_lost == "raise":
            raise ReplicationError(
                f"replication slot {self.slot!r} was lost: {why}{where}. Changes made since may "
                "have been missed, so the cache may hold stale entries: flush what the rules "
                "cover, then run setup() again after drop(), or use on_slot_lost='flush'"
            )
        log.error(
            "replication slot %s was lost (%s)%s; recreating it and flushing", self.slot, why, where
        )
        # Durably note the recovery first: if the process dies before the flush is done, the
        # next start completes it instead of trusting a slot that missed changes.
        recorded_lsn = recorded.lsn if recorded else 0
        self._record(recorded_lsn, transactions=0, flush_pending=True)
        self._replace_slot_and_flush()

    def _replace_slot_and_flush(self) -> None:
        """Drop what is left of the slot, create a new one, flush, then record the new start.

        New slot first, flush second: whatever changes after the flush is in the new slot.
        """
        self._close_stream()
        with self._sql().cursor() as cur:
            cur.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (self.slot,),
            )
        start = self._create_slot_at()
        if callable(self.on_slot_lost):
            self.on_slot_lost(self.cache)
        else:
            flush = Invalidation()
            for rule in self.rules:
                flush = flush | rule.for_truncate()
            flush.apply(self.cache)
        self._record(start, transactions=0)

    # ------------------------------------------------------------------ streaming

    def _ensure_stream(self) -> None:
        if self._cursor is not None:
            return
        if self._closed:
            raise ReplicationError("the ChangeConsumer is closed")
        recorded = self._recorded()
        try:
            conn = psycopg2.connect(
                self.dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection
            )
        except psycopg2.OperationalError as exc:
            raise StreamInterruptedError(f"cannot connect: {exc}".strip()) from exc
        cursor = conn.cursor()
        try:
            cursor.start_replication(
                slot_name=self.slot,
                decode=False,
                # PostgreSQL starts at the later of this and the slot's confirmed position.
                start_lsn=recorded.lsn if recorded else 0,
                options={"proto_version": "1", "publication_names": self.publication},
                status_interval=self.status_interval,
            )
        except psycopg2.Error as exc:
            with contextlib.suppress(Exception):
                conn.close()
            self._start_failed(exc, recorded)
            return
        self._repl_conn, self._cursor = conn, cursor
        self._relations.clear()
        self._txn = None
        log.info(
            "streaming slot %s from %s",
            self.slot,
            recorded.lsn_text if recorded else "its confirmed position",
        )

    def _start_failed(self, exc: psycopg2.Error, recorded: Position | None) -> None:
        message = str(exc).strip()
        if isinstance(exc, psycopg2.errors.UndefinedObject) and "slot" in message:
            if recorded is None:
                raise ReplicationError(
                    f"replication slot {self.slot!r} does not exist; call setup() first"
                ) from exc
            self._slot_lost("it no longer exists")
            self._ensure_stream()
        elif isinstance(exc, psycopg2.errors.ObjectNotInPrerequisiteState) and (
            "can no longer" in message or "invalidated" in message
        ):
            self._slot_lost(message)
            self._ensure_stream()
        elif isinstance(exc, psycopg2.errors.ObjectInUse):
            busy = f"slot {self.slot!r} is in use by another consumer"
            raise StreamInterruptedError(busy) from exc
        elif isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
            raise StreamInterruptedError(message) from exc
        else:
            raise ReplicationError(
                f"cannot start replication from {self.slot!r}: {message}"
            ) from exc

    def _close_stream(self) -> None:
        conn, self._repl_conn, self._cursor = self._repl_conn, None, None
        self._txn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _pump(self, deadline: float | None, min_changes: int | None) -> int:
        """Read and apply messages until the deadline, ``min_changes``, or stop().

        Any failure closes the stream: a transaction that was half received when a rule or
        the cache failed must be received again from its Begin, never resumed mid-way.
        """
        try:
            return self._pump_open(deadline, min_changes)
        except BaseException:
            self._close_stream()
            raise

    def _pump_open(self, deadline: float | None, min_changes: int | None) -> int:
        applied = 0
        cursor = self._cursor
        while True:
            if self._stop.is_set():
                self._stopped()
                return applied
            try:
                msg = cursor.read_message()
            except psycopg2.errors.UndefinedObject as exc:
                if "publication" in str(exc):
                    raise ReplicationError(
                        f"publication {self.publication!r} does not exist; call setup()"
                    ) from exc
                raise ReplicationError(str(exc).strip()) from exc
            except (
                psycopg2.OperationalError,
                psycopg2.InterfaceError,
                psycopg2.DatabaseError,
            ) as exc:
                raise StreamInterruptedError(str(exc).strip() or type(exc).__name__) from exc
            if msg is not None:
                applied += self._handle(msg)
                if min_changes is not None and applied >= min_changes and self._txn is None:
                    return applied
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return applied
            wait = self.status_interval
            if deadline is not None:
                wait = min(wait, deadline - now)
            try:
                ready, _, _ = select.select([cursor, self._wake_r], [], [], max(0.0, wait))
            except InterruptedError:
                continue
            if self._wake_r in ready:
                self._drain_wake()

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 64):
                pass

    def _stopped(self) -> None:
        """A run returns because of a stop: that stop is spent."""
        self._stop.clear()
        with self._wake_lock:
            if not self._closed:
                self._drain_wake()

    def _handle(self, msg: Any) -> int:
        """Handle one replication message; returns the changes applied (at a Commit)."""
        decoded = pgoutput.decode(msg.payload)
        if isinstance(decoded, pgoutput.Begin):
            self._txn = _Transaction(decoded)
        elif isinstance(decoded, pgoutput.Relation):
            self._relations[decoded.relation_id] = decoded
        elif isinstance(decoded, pgoutput.Insert | pgoutput.Update | pgoutput.Delete):
            self._on_row_change(decoded)
        elif isinstance(decoded, pgoutput.Truncate):
            self._on_truncate(decoded)
        elif isinstance(decoded, pgoutput.Commit):
            return self._on_commit(decoded, msg)
        # Origin, Type and logical messages carry nothing to invalidate.
        return 0

    def _txn_or_fail(self) -> _Transaction:
        if self._txn is None:
            raise ReplicationError("pgoutput sent a change outside a transaction")
        return self._txn

    def _relation(self, relation_id: int) -> pgoutput.Relation:
        try:
            return self._relations[relation_id]
        except KeyError:
            raise ReplicationError(
                f"pgoutput sent a change for relation {relation_id} before describing it"
            ) from None

    def _rules_for(self, relation: pgoutput.Relation, op: str) -> list[Rule]:
        rules = self._by_table.get((relation.namespace or "pg_catalog", relation.name), ())
        return [rule for rule in rules if rule.applies_to(op)]

    def _on_row_change(self, change: Any) -> None:
        txn = self._txn_or_fail()
        relation = self._relation(change.relation_id)
        op = {pgoutput.Insert: "insert", pgoutput.Update: "update", pgoutput.Delete: "delete"}[
            type(change)
        ]
        rules = self._rules_for(relation, op)
        if not rules:
            return
        rows: list[tuple[str, Row]] = []
        if isinstance(change, pgoutput.Insert):
            rows.append(("new", _row(relation, change.new, None)))
        elif isinstance(change, pgoutput.Update):
            old = _row(relation, change.old, change.old_kind) if change.old is not None else None
            if old is not None:
                rows.append(("old", old))
            rows.append(("new", _row(relation, change.new, None, fill_from=old)))
        else:
            rows.append(("old", _row(relation, change.old, change.old_kind)))
        invalidation = txn.invalidation
        for rule in rules:
            for which, row in rows:
                invalidation = invalidation | _evaluate(rule, row, op, which, relation)
        txn.invalidation = invalidation
        txn.changes += 1

    def _on_truncate(self, truncate: pgoutput.Truncate) -> None:
        txn = self._txn_or_fail()
        invalidation = txn.invalidation
        for relation_id in truncate.relation_ids:
            relation = self._relation(relation_id)
            rules = self._rules_for(relation, "truncate")
            for rule in rules:
                invalidation = invalidation | rule.for_truncate()
            if rules:
                txn.changes += 1
        txn.invalidation = invalidation

    def _on_commit(self, commit: pgoutput.Commit, msg: Any) -> int:
        txn, self._txn = self._txn, None
        recorded = self._position
        if recorded is not None and commit.end_lsn <= recorded.lsn:
            # Applied before a restart; PostgreSQL resent it because the confirmation was lost.
            if txn is not None and txn.changes:
                self.stats.transactions_skipped += 1
                log.info(
                    "skipping transaction ending at %s: already applied",
                    pgoutput.lsn_to_str(commit.end_lsn),
                )
            self._confirm(commit.end_lsn)
            return 0
        changes = 0
        if txn is not None and txn.invalidation:
            removed = txn.invalidation.apply(self.cache)  # commits to SQLite before returning
            self._record(commit.end_lsn)  # durable before PostgreSQL hears of it
            changes = txn.changes
            self.stats.transactions_applied += 1
            self.stats.changes_applied += changes
            self.stats.entries_removed += removed
            self.stats.last_commit_lsn = commit.end_lsn
            self.stats.last_commit_time = commit.commit_time.timestamp()
            self.stats.last_applied_at = time.time()
        # A transaction with nothing to invalidate is confirmed without a local record: a
        # replay of it would do nothing anyway.
        self._confirm(commit.end_lsn)
        return changes

    def _confirm(self, lsn: int) -> None:
        try:
            self._cursor.send_feedback(flush_lsn=lsn, force=True)
        except (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.DatabaseError) as exc:
            raise StreamInterruptedError(f"cannot confirm position: {exc}".strip()) from exc

    def _wait(self, seconds: float) -> None:
        """Sleep, but wake up at once on stop()."""
        with contextlib.suppress(InterruptedError, OSError, ValueError):
            select.select([self._wake_r], [], [], seconds)

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("signal %d: stopping the CDC consumer", signum)
        self.stop()


def _row(
    relation: pgoutput.Relation,
    values: tuple[Any, ...] | None,
    kind: str | None,
    fill_from: Row | None = None,
) -> Row:
    """Build a :class:`Row` from tuple data. For a key-only old tuple (``'K'``) only the
    replica identity columns are present; unchanged TOAST values are taken from the old row
    when it has them, else they are missing."""
    assert values is not None
    if len(values) != len(relation.columns):
        raise ReplicationError(
            f"{relation.namespace}.{relation.name}: tuple has {len(values)} columns, "
            f"the relation {len(relation.columns)}"
        )
    present: dict[str, Any] = {}
    missing: list[str] = []
    for column, value in zip(relation.columns, values, strict=True):
        if kind == "K" and not column.key:
            missing.append(column.name)
            continue
        if value is pgoutput.UNCHANGED and fill_from is not None and column.name in fill_from:
            present[column.name] = fill_from[column.name]
            continue
        present[column.name] = pgoutput.convert(value, column.type_oid)
    return Row(present, missing)


_IDENTITY = {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": "USING INDEX"}


def _evaluate(
    rule: Rule, row: Row, op: str, which: str, relation: pgoutput.Relation
) -> Invalidation:
    """Run a rule on a row; a failing rule is a ReplicationError (the position is not
    confirmed, so the change is not lost)."""
    try:
        return rule.for_row(row)
    except KeyError as exc:
        column = exc.args[0] if exc.args else "?"
        identity = _IDENTITY.get(relation.replica_identity, relation.replica_identity)
        raise ReplicationError(
            f"{rule!r} reads column {column!r} of the {which} row of an {op.upper()}, but "
            f"PostgreSQL did not send it (REPLICA IDENTITY {identity}: an old row carries only "
            "the replica identity columns, and unchanged TOASTed values are not sent). Make "
            "the rule use key columns only, or run ALTER TABLE "
            f"{relation.namespace}.{relation.name} REPLICA IDENTITY FULL"
        ) from exc
    except Exception as exc:
        raise ReplicationError(
            f"{rule!r} failed on the {which} row of an {op.upper()}: {exc!r}"
        ) from exc
