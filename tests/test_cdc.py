"""Change data capture: the pgoutput decoder, the rules, and the consumer against the real
PostgreSQL on 127.0.0.1 (database ``semcache_test``, a schema, slot and publication per test).

Offline tests decode messages captured from PostgreSQL 15 and drive the consumer's transaction
logic with a fake cursor. The ``postgres`` tests need ``wal_level = logical``; the session
fixture runs ``scripts/ensure_postgres_logical.sh`` when it is not, and skips only when the
server cannot be reached at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from semcache import ReplicationError, Scope, SemanticCache
from semcache.cdc import UNCHANGED, ChangeConsumer, DecodeError, Invalidation, Rule
from semcache.cdc import pgoutput as po
from semcache.cdc.position import PositionStore

from .fakes import HashEmbedder

REPO = Path(__file__).resolve().parent.parent
PG_HOST = os.environ.get("SEMCACHE_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SEMCACHE_PG_PORT", "5432"))
PG_USER = os.environ.get("SEMCACHE_PG_USER", "postgres")
TEST_DB = os.environ.get("SEMCACHE_PG_TEST_DB", "semcache_test")
NAME_PREFIX = "semcache_t_"  # slots and publications of these tests: semcache_t_<epoch>_<hex>
STALE_AFTER_S = 3600


def dsn(database: str = TEST_DB) -> str:
    return f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={database} connect_timeout=5"


def unique_name() -> str:
    return f"{NAME_PREFIX}{int(time.time())}_{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------- offline: decoder

# Captured from PostgreSQL 15 (pg_logical_slot_get_binary_changes, proto_version 1) on a table
# scratch.users(id int primary key, name text, big text), relation id 16389.
CAPTURED = {
    "relation_full": "520000400573637261746368007573657273006600030169640000000017ffffffff"
    "016e616d650000000019ffffffff016269670000000019ffffffff",
    "begin_736": "4200000000021ab0c80003042f670c384f000002e0",
    "insert_3": "49000040054e0003740000000133740000000263796e",
    "commit_736": "430000000000021ab0c800000000021ab0f80003042f670c384f",
    "begin_737": "4200000000021ab1400003042f670c4b2b000002e1",
    "delete_full_3": "44000040054f0003740000000133740000000263796e",
    "commit_737": "430000000000021ab14000000000021ab1700003042f670c4b2b",
    "begin_738": "4200000000021abcf80003042f670ca44f000002e2",
    "truncate": "54000000010000004005",
    "commit_738": "430000000000021abcf800000000021abe680003042f670ca44f",
    "delete_key_2": "44000040054b00037400000001326e6e",
}


def raw(name: str) -> bytes:
    return bytes.fromhex(CAPTURED[name])


def test_decode_captured_messages() -> None:
    rel = po.decode(raw("relation_full"))
    assert isinstance(rel, po.Relation)
    assert (rel.relation_id, rel.namespace, rel.name, rel.replica_identity) == (
        16389,
        "scratch",
        "users",
        "f",
    )
    assert [(c.name, c.type_oid, c.type_modifier, c.key) for c in rel.columns] == [
        ("id", 23, -1, True),
        ("name", 25, -1, True),
        ("big", 25, -1, True),
    ]
    begin = po.decode(raw("begin_736"))
    assert isinstance(begin, po.Begin)
    assert (begin.final_lsn, begin.xid) == (0x21AB0C8, 736)
    assert begin.commit_time.year >= 2024
    commit = po.decode(raw("commit_736"))
    assert isinstance(commit, po.Commit)
    assert (commit.flags, commit.commit_lsn, commit.end_lsn) == (0, 0x21AB0C8, 0x21AB0F8)
    assert commit.commit_time == begin.commit_time
    assert po.decode(raw("insert_3")) == po.Insert(16389, ("3", "cy", None))
    assert po.decode(raw("delete_full_3")) == po.Delete(16389, ("3", "cy", None), "O")
    assert po.decode(raw("delete_key_2")) == po.Delete(16389, ("2", None, None), "K")
    assert po.decode(raw("truncate")) == po.Truncate(
        (16389,), cascade=False, restart_identity=False
    )


def test_decode_synthetic_messages_and_errors() -> None:
    # Update with an old key tuple, an unchanged TOAST column and a binary column.
    update = (
        b"U" + (7).to_bytes(4, "big") + b"K" + (2).to_bytes(2, "big") + b"t"
        + (1).to_bytes(4, "big") + b"1" + b"n"
        + b"N" + (2).to_bytes(2, "big") + b"t" + (1).to_bytes(4, "big") + b"2"
        + b"u"
    )  # fmt: skip
    assert po.decode(update) == po.Update(7, ("1", None), "K", ("2", UNCHANGED))
    binary = b"I" + (7).to_bytes(4, "big") + b"N" + (1).to_bytes(2, "big") + b"b"
    binary += (3).to_bytes(4, "big") + b"\x00\x01\x02"
    assert po.decode(binary) == po.Insert(7, (b"\x00\x01\x02",))
    origin = b"O" + (5).to_bytes(8, "big") + b"upstream\0"
    assert po.decode(origin) == po.Origin(5, "upstream")
    typ = b"Y" + (99999).to_bytes(4, "big") + b"public\0mood\0"
    assert po.decode(typ) == po.TypeInfo(99999, "public", "mood")
    message = b"M\x01" + (9).to_bytes(8, "big") + b"pfx\0" + (2).to_bytes(4, "big") + b"hi"
    assert po.decode(message) == po.LogicalMessage(True, 9, "pfx", b"hi")
    for bad in (b"", b"S\x00\x00\x00\x01", raw("commit_736")[:-1], raw("insert_3") + b"x"):
        with pytest.raises(DecodeError):
            po.decode(bad)
    with pytest.raises(DecodeError, match="column kind"):
        po.decode(b"I" + (7).to_bytes(4, "big") + b"N" + (1).to_bytes(2, "big") + b"z")
    assert isinstance(DecodeError("x"), ReplicationError)
    assert po.lsn_from_str(po.lsn_to_str(0x16B374D848)) == 0x16B374D848
    assert po.lsn_to_str(0x16B374D848) == "16/B374D848"


def test_convert_text_values() -> None:
    assert po.convert("42", 23) == 42 and po.convert("-7", 20) == -7
    assert po.convert("t", 16) is True and po.convert("f", 16) is False
    assert po.convert("1.5", 701) == 1.5
    assert str(po.convert("1.10", 1700)) == "1.10"
    assert po.convert("2024-01-01", 1082) == "2024-01-01"
    assert po.convert(None, 23) is None and po.convert(UNCHANGED, 23) is UNCHANGED


# ------------------------------------------------------------------------------- offline: rules


def test_rule_validation_and_outputs() -> None:
    with pytest.raises(ValueError):
        Rule("users")
    with pytest.raises(ValueError):
        Rule("users", tags=lambda r: [], ops=["upsert"])  # type: ignore[list-item]
    rule = Rule("app.users", tags=lambda r: f"user:{r['id']}", namespace="profiles")
    assert (rule.schema, rule.table, rule.table_tag) == ("app", "users", "table:app.users")
    from semcache.cdc import Row

    inv = rule.for_row(Row({"id": 5}))
    assert inv == Invalidation.of(tags="user:5", namespaces="profiles")
    assert rule.for_truncate() == Invalidation.of(tags="table:app.users", namespaces="profiles")
    assert Rule("users", keys=lambda r: [r["k"]]).for_truncate().tags == {"table:users"}
    custom = Rule("users", tags=lambda r: [], on_truncate=["everyone"])
    assert custom.for_truncate() == Invalidation.of(tags=["everyone"])
    partial = Row({"id": 1, "big": UNCHANGED}, missing=["email"])
    assert partial.missing == ("email", "big")
    with pytest.raises(KeyError):
        partial["big"]
    with pytest.raises(TypeError):
        Rule("users", tags=lambda r: [1]).for_row(Row({}))  # type: ignore[list-item]


class FakeCache:
    """invalidate_tags/delete/bump recorded in order (offline consumer tests)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls: list[tuple[str, Any]] = []

    def invalidate_tags(self, *tags: str) -> int:
        self.calls.append(("tags", tags))
        return len(tags)

    def delete(self, key: str) -> bool:
        self.calls.append(("delete", key))
        return True

    def bump(self, namespace: str) -> int:
        self.calls.append(("bump", namespace))
        return 1


class FakeCursor:
    """Records feedback, checking that the cache and the position file were written first."""

    def __init__(self, cache: FakeCache, store: PositionStore) -> None:
        self.cache, self.store = cache, store
        self.flushed: list[tuple[int, int, int]] = []  # (lsn, cache calls, recorded lsn)

    def send_feedback(self, *, flush_lsn: int, force: bool = False) -> None:
        recorded = self.store.load()
        self.flushed.append((flush_lsn, len(self.cache.calls), recorded.lsn if recorded else 0))


class Msg:
    def __init__(self, name: str) -> None:
        self.payload = raw(name)


def test_consumer_applies_at_commit_records_then_confirms_and_skips_replays(
    tmp_path: Path,
) -> None:
    cache = FakeCache(tmp_path)
    rules = [Rule("users", schema="scratch", tags=lambda r: [f"user:{r['id']}"])]
    consumer = ChangeConsumer("dbname=unused", cache, rules, slot="s1", state_dir=tmp_path / "st")
    consumer._identity = ("sys", "db")  # no server: the identity a real one would report
    cursor = FakeCursor(cache, PositionStore(tmp_path / "st", "s1"))
    consumer._cursor = cursor
    feed = consumer._handle
    try:
        assert feed(Msg("begin_736")) == 0
        feed(Msg("relation_full"))
        feed(Msg("insert_3"))
        assert cache.calls == []  # nothing before the commit
        assert feed(Msg("commit_736")) == 1
        assert cache.calls == [("tags", ("user:3",))]
        # Confirmed only after the cache call and the durable record of the same position.
        assert cursor.flushed == [(0x21AB0F8, 1, 0x21AB0F8)]
        for name in ("begin_737", "delete_full_3", "commit_737"):
            feed(Msg(name))
        for name in ("begin_738", "relation_full", "truncate", "commit_738"):
            feed(Msg(name))
        assert cache.calls[1:] == [("tags", ("user:3",)), ("tags", ("table:scratch.users",))]
        assert consumer.position == 0x21ABE68
        # PostgreSQL resends a transaction whose confirmation it never got: skipped.
        for name in ("begin_737", "delete_full_3", "commit_737"):
            feed(Msg(name))
        assert len(cache.calls) == 3
        assert consumer.stats.transactions_skipped == 1
        assert consumer.stats.transactions_applied == 3
        assert cursor.flushed[-1][0] == 0x21AB170
        # A fresh consumer on the same folder knows the position.
        again = ChangeConsumer("dbname=unused", cache, rules, slot="s1", state_dir=tmp_path / "st")
        assert again.position == 0x21ABE68
        again.close()
    finally:
        consumer.close()


def test_consumer_rule_needing_a_column_the_old_row_lacks(tmp_path: Path) -> None:
    cache = FakeCache(tmp_path)
    rules = [Rule("users", schema="scratch", tags=lambda r: [f"name:{r['name']}"])]
    consumer = ChangeConsumer("dbname=unused", cache, rules, slot="s2", state_dir=tmp_path)
    consumer._identity = ("sys", "db")
    # scratch.users as REPLICA IDENTITY DEFAULT describes it: only id is a key column.
    rel = b"R" + (16389).to_bytes(4, "big") + b"scratch\0users\0d" + (3).to_bytes(2, "big")
    for flags, column in ((1, b"id"), (0, b"name"), (0, b"big")):
        rel += bytes([flags]) + column + b"\0" + (25).to_bytes(4, "big") + b"\xff" * 4
    consumer._handle(type("M", (), {"payload": rel})())
    consumer._handle(Msg("begin_737"))
    with pytest.raises(ReplicationError, match="REPLICA IDENTITY FULL"):
        consumer._handle(Msg("delete_key_2"))
    consumer.close()


# ---------------------------------------------------------------------- PostgreSQL fixtures


def _query(dsn_: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn_)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


@pytest.fixture(scope="session")
def pg() -> str:
    """The test database's DSN, with wal_level=logical; stale test slots of crashed runs go."""
    try:
        (wal_level,) = _query(dsn("postgres"), "SHOW wal_level")[0]
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL is unreachable at {PG_HOST}:{PG_PORT}: {exc}".strip())
    has_db = _query(dsn("postgres"), "SELECT 1 FROM pg_database WHERE datname = %s", (TEST_DB,))
    if wal_level != "logical" or not has_db:
        subprocess.run(
            ["bash", str(REPO / "scripts" / "ensure_postgres_logical.sh")],
            check=True,
            timeout=180,
            env={**os.environ, "PGHOST": PG_HOST, "PGPORT": str(PG_PORT), "PGUSER": PG_USER,
                 "SEMCACHE_PG_TEST_DB": TEST_DB},
        )  # fmt: skip
        (wal_level,) = _query(dsn("postgres"), "SHOW wal_level")[0]
        assert wal_level == "logical", "scripts/ensure_postgres_logical.sh did not set wal_level"
    now = time.time()
    for (slot,) in _query(
        dsn("postgres"),
        "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s AND NOT active",
        (NAME_PREFIX + "%",),
    ):
        with contextlib.suppress(ValueError, IndexError, psycopg2.Error):
            if now - int(slot[len(NAME_PREFIX) :].split("_")[0]) > STALE_AFTER_S:
                _query(dsn("postgres"), "SELECT pg_drop_replication_slot(%s)", (slot,))
    return dsn()


@pytest.fixture
def schema(pg: str) -> Iterator[str]:
    """A schema of this test's own with users, counters and docs tables."""
    name = f"cdc_{uuid.uuid4().hex[:10]}"
    _query(
        pg,
        f"""
        CREATE SCHEMA {name};
        CREATE TABLE {name}.users (id int PRIMARY KEY, name text, email text, bio text);
        CREATE TABLE {name}.counters (id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
        CREATE TABLE {name}.docs (id int PRIMARY KEY, entry_id text);
        ALTER TABLE {name}.docs REPLICA IDENTITY FULL;
        ALTER TABLE {name}.users ALTER COLUMN bio SET STORAGE EXTERNAL;
        """,
    )
    try:
        yield name
    finally:
        _query(pg, f"DROP SCHEMA {name} CASCADE")


def run_sql(dsn_: str, *statements: str) -> float:
    """Run statements in one transaction; returns perf_counter() right after COMMIT returned."""
    conn = psycopg2.connect(dsn_)
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
        conn.commit()
        return time.perf_counter()
    finally:
        conn.close()


def drop_slot_and_publication(dsn_: str, name: str) -> None:
    with contextlib.suppress(psycopg2.Error):
        _query(
            dsn_,
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND NOT active",
            (name,),
        )
    with contextlib.suppress(psycopg2.Error):
        _query(dsn_, f'DROP PUBLICATION IF EXISTS "{name}"')


@pytest.fixture
def make_consumer(pg: str) -> Iterator[Callable[..., ChangeConsumer]]:
    """Consumers on a slot and publication of their own, dropped at teardown."""
    made: list[ChangeConsumer] = []

    def make(cache: Any, rules: list[Rule], **kwargs: Any) -> ChangeConsumer:
        name = kwargs.pop("name", None) or unique_name()
        consumer = ChangeConsumer(pg, cache, rules, slot=name, publication=name, **kwargs)
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        with contextlib.suppress(Exception):
            consumer.drop()
        consumer.close()
        drop_slot_and_publication(pg, consumer.slot)


@pytest.fixture
def cdc_cache(tmp_path: Path) -> Iterator[SemanticCache]:
    cache = SemanticCache(tmp_path / "cache", embedder=HashEmbedder(), threshold=0.99)
    yield cache
    cache.close()


def prompt(i: int) -> str:
    # Words of their own per entry, so the hash embedder keeps entries apart.
    return f"alpha{i} bravo{i} charlie{i}"


# ------------------------------------------------------------------------ PostgreSQL: decoder


@pytest.mark.postgres
def test_decoder_on_live_server_messages(pg: str, schema: str) -> None:
    """Every message kind the consumer meets, produced by the server now, decodes."""
    name = unique_name()
    _query(pg, f"CREATE PUBLICATION {name} FOR TABLE {schema}.users, {schema}.docs")
    _query(pg, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    big = "".join(uuid.uuid4().hex for _ in range(200))  # 6400 bytes, stored out of line
    try:
        run_sql(pg, f"INSERT INTO {schema}.users VALUES (1, 'ann', 'a@x', '{big}')")
        run_sql(pg, f"UPDATE {schema}.users SET name = 'bob' WHERE id = 1")  # bio unchanged
        run_sql(pg, f"UPDATE {schema}.users SET id = 2 WHERE id = 1")  # key change: old key
        run_sql(pg, f"DELETE FROM {schema}.users WHERE id = 2")
        run_sql(pg, f"INSERT INTO {schema}.docs VALUES (7, 'e7')", f"DELETE FROM {schema}.docs")
        run_sql(pg, f"TRUNCATE {schema}.users, {schema}.docs")
        rows = _query(
            pg,
            "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s)",
            (name, name),
        )
    finally:
        drop_slot_and_publication(pg, name)
    msgs = [po.decode(bytes(r[0])) for r in rows]
    kinds = [type(m).__name__ for m in msgs if not isinstance(m, po.Relation)]
    assert kinds == (["Begin", "Insert", "Commit"] + ["Begin", "Update", "Commit"] * 2
                     + ["Begin", "Delete", "Commit"] + ["Begin", "Insert", "Delete", "Commit"]
                     + ["Begin", "Truncate", "Commit"])  # fmt: skip
    rels = {m.relation_id: m for m in msgs if isinstance(m, po.Relation)}
    users = next(r for r in rels.values() if r.name == "users")
    docs = next(r for r in rels.values() if r.name == "docs")
    assert users.namespace == schema and users.replica_identity == "d"
    assert [c.key for c in users.columns] == [True, False, False, False]
    assert docs.replica_identity == "f"
    changes = [m for m in msgs if isinstance(m, po.Insert | po.Update | po.Delete | po.Truncate)]
    assert changes[0] == po.Insert(users.relation_id, ("1", "ann", "a@x", big))
    assert changes[1] == po.Update(users.relation_id, None, None, ("1", "bob", "a@x", UNCHANGED))
    assert changes[2].old == ("1", None, None, None) and changes[2].old_kind == "K"
    assert changes[2].new[:3] == ("2", "bob", "a@x")
    assert changes[3] == po.Delete(users.relation_id, ("2", None, None, None), "K")
    assert changes[5] == po.Delete(docs.relation_id, ("7", "e7"), "O")
    assert set(changes[6].relation_ids) == {users.relation_id, docs.relation_id}
    commits = [m for m in msgs if isinstance(m, po.Commit)]
    assert all(a.end_lsn < b.end_lsn for a, b in itertools.pairwise(commits))


# ------------------------------------------------------------------------ PostgreSQL: consumer


@pytest.mark.postgres
def test_update_invalidates_user_tag(
    pg: str, schema: str, cdc_cache: SemanticCache, make_consumer: Callable[..., ChangeConsumer]
) -> None:
    run_sql(pg, f"INSERT INTO {schema}.users (id, name) VALUES (1, 'ann'), (2, 'bo')")
    ids = {i: cdc_cache.store(prompt(i), f"answer {i}", tags=[f"user:{i}"]) for i in (1, 2)}
    consumer = make_consumer(
        cdc_cache, [Rule("users", schema=schema, tags=lambda row: [f"user:{row['id']}"])]
    )
    consumer.setup()
    consumer.setup()  # idempotent
    assert consumer.run_once(timeout=0.2) == 0  # connects; nothing to do yet
    committed = run_sql(pg, f"UPDATE {schema}.users SET name = 'anne' WHERE id = 1")
    lag_before = consumer.lag_bytes()
    applied = consumer.run_once(timeout=10, min_changes=1)
    delay_ms = (time.perf_counter() - committed) * 1000
    assert applied == 1
    assert cdc_cache.lookup(prompt(1)) is None
    hit = cdc_cache.lookup(prompt(2))
    assert hit is not None and hit.entry_id == ids[2]
    print(f"\nCDC delay COMMIT -> invalidation visible (one UPDATE, run_once): {delay_ms:.1f} ms")
    assert consumer.position is not None and consumer.stats.transactions_applied == 1
    status = consumer.slot_status()
    assert status is not None and status["plugin"] == "pgoutput"
    assert lag_before is not None and lag_before > 0  # WAL the slot has not confirmed yet
    assert consumer.lag_bytes() is not None


@pytest.mark.postgres
def test_insert_delete_truncate_keys_and_replica_identity(
    pg: str, schema: str, cdc_cache: SemanticCache, make_consumer: Callable[..., ChangeConsumer]
) -> None:
    run_sql(pg, f"INSERT INTO {schema}.users (id, name) VALUES (1, 'a'), (2, 'b')")
    ids = {
        i: cdc_cache.store(prompt(i), f"answer {i}", tags=[f"user:{i}", f"table:{schema}.users"])
        for i in (1, 2, 3, 4)
    }
    doc_entry = cdc_cache.store(prompt(50), "doc answer")
    rules = [
        Rule("users", schema=schema, tags=lambda row: [f"user:{row['id']}"]),
        # docs has REPLICA IDENTITY FULL: a DELETE's old row carries the entry_id column.
        Rule("docs", schema=schema, keys=lambda row: row["entry_id"], ops=["delete"]),
    ]
    consumer = make_consumer(cdc_cache, rules)
    consumer.setup()
    consumer.run_once(timeout=0.2)

    run_sql(pg, f"INSERT INTO {schema}.users (id, name) VALUES (3, 'c')")
    assert consumer.run_once(timeout=10, min_changes=1) == 1
    assert cdc_cache.lookup(prompt(3)) is None
    assert cdc_cache.lookup(prompt(1)) is not None

    run_sql(pg, f"DELETE FROM {schema}.users WHERE id = 2")  # old row: the key (id) only
    assert consumer.run_once(timeout=10, min_changes=1) == 1
    assert cdc_cache.lookup(prompt(2)) is None

    run_sql(
        pg,
        f"INSERT INTO {schema}.docs VALUES (1, '{doc_entry}')",  # insert: not in the rule's ops
        f"DELETE FROM {schema}.docs WHERE id = 1",
    )
    assert consumer.run_once(timeout=10, min_changes=1) == 1
    assert cdc_cache.lookup(prompt(50)) is None

    run_sql(pg, f"TRUNCATE {schema}.users")
    assert consumer.run_once(timeout=10, min_changes=1) == 1
    assert cdc_cache.lookup(prompt(1)) is None and cdc_cache.lookup(prompt(4)) is None
    assert consumer.stats.transactions_applied == 4
    assert all(cdc_cache.lookup(prompt(i)) is None for i in ids)


@pytest.mark.postgres
def test_rule_reading_a_column_the_delete_does_not_carry_stops_the_consumer(
    pg: str, schema: str, cdc_cache: SemanticCache, make_consumer: Callable[..., ChangeConsumer]
) -> None:
    run_sql(pg, f"INSERT INTO {schema}.users (id, email) VALUES (1, 'a@x')")
    rule = Rule("users", schema=schema, tags=lambda row: [f"email:{row['email']}"])
    consumer = make_consumer(cdc_cache, [rule])
    consumer.setup()
    consumer.run_once(timeout=0.2)
    before = consumer.position
    run_sql(pg, f"DELETE FROM {schema}.users WHERE id = 1")
    with pytest.raises(ReplicationError, match="REPLICA IDENTITY FULL"):
        consumer.run_once(timeout=10, min_changes=1)
    assert consumer.position == before  # not confirmed: it is retried, not lost
    with pytest.raises(ReplicationError, match="REPLICA IDENTITY FULL"):
        consumer.run_once(timeout=10, min_changes=1)  # the same change, received again
    assert consumer.position == before


@pytest.mark.postgres
def test_namespace_bump_rules(
    pg: str, schema: str, cdc_cache: SemanticCache, make_consumer: Callable[..., ChangeConsumer]
) -> None:
    run_sql(pg, f"INSERT INTO {schema}.counters (id) VALUES (1), (2), (3)")
    catalog = Scope(namespace="catalog")
    cdc_cache.store(prompt(1), "old catalog answer", scope=catalog)
    rules = [
        Rule("counters", schema=schema, namespace="catalog", ops=["update"]),
        Rule("counters", schema=schema, namespace=lambda row: f"counter:{row['id']}"),
    ]
    consumer = make_consumer(cdc_cache, rules)
    consumer.setup()
    consumer.run_once(timeout=0.2)
    # Three rows in one transaction: one batch, so "catalog" is bumped once.
    run_sql(pg, f"UPDATE {schema}.counters SET n = n + 1")
    assert consumer.run_once(timeout=10, min_changes=3) == 3
    assert cdc_cache.version("catalog") == 1
    assert [cdc_cache.version(f"counter:{i}") for i in (1, 2, 3)] == [1, 1, 1]
    assert cdc_cache.lookup(prompt(1), scope=catalog) is None
    run_sql(pg, f"DELETE FROM {schema}.counters WHERE id = 2")  # not an update: no catalog bump
    assert consumer.run_once(timeout=10, min_changes=1) == 1
    assert cdc_cache.version("catalog") == 1 and cdc_cache.version("counter:2") == 2


@pytest.mark.postgres
def test_unconfirmed_transaction_is_not_applied_twice_after_restart(
    pg: str,
    schema: str,
    cdc_cache: SemanticCache,
    make_consumer: Callable[..., ChangeConsumer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash after the position was recorded but before PostgreSQL got it: the restarted
    consumer neither misses nor repeats the transaction."""
    run_sql(pg, f"INSERT INTO {schema}.counters (id) VALUES (1)")
    rules = [Rule("counters", schema=schema, namespace="counters")]
    name = unique_name()
    first = make_consumer(cdc_cache, rules, name=name)
    first.setup()
    first.run_once(timeout=0.2)
    monkeypatch.setattr(first, "_confirm", lambda lsn: None)  # the confirmation is "lost"
    run_sql(pg, f"UPDATE {schema}.counters SET n = 1")
    assert first.run_once(timeout=10, min_changes=1) == 1
    first.close()  # like a crash: PostgreSQL never heard of the position
    slot = _query(pg, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                      "WHERE slot_name = %s", (name,))  # fmt: skip
    assert po.lsn_from_str(slot[0][0]) < first.position  # type: ignore[operator]
    assert cdc_cache.version("counters") == 1

    second = make_consumer(cdc_cache, rules, name=name)
    run_sql(pg, f"UPDATE {schema}.counters SET n = 2")
    assert second.run_once(timeout=10, min_changes=1) == 1
    assert cdc_cache.version("counters") == 2  # the first bump was not repeated
    assert second.position > first.position  # type: ignore[operator]


@pytest.mark.postgres
def test_dropped_slot_raises_or_flushes(
    pg: str, schema: str, cdc_cache: SemanticCache, make_consumer: Callable[..., ChangeConsumer]
) -> None:
    run_sql(pg, f"INSERT INTO {schema}.counters (id) VALUES (1)")
    entry = cdc_cache.store(prompt(1), "answer", tags=[f"table:{schema}.counters"])
    rules = [Rule("counters", schema=schema, namespace="counters")]
    name = unique_name()
    consumer = make_consumer(cdc_cache, rules, name=name)
    consumer.setup()
    consumer.close()
    _query(pg, "SELECT pg_drop_replication_slot(%s)", (name,))
    strict = make_consumer(cdc_cache, rules, name=name)
    with pytest.raises(ReplicationError, match="missed"):
        strict.setup()
    with pytest.raises(ReplicationError, match="missed"):
        strict.run_once(timeout=1)
    strict.close()
    lenient = make_consumer(cdc_cache, rules, name=name, on_slot_lost="flush")
    lenient.setup()  # recreates the slot, then flushes what the rules cover
    assert cdc_cache.version("counters") == 1
    assert cdc_cache.lookup(prompt(1)) is None and entry
    run_sql(pg, f"UPDATE {schema}.counters SET n = 5")
    assert lenient.run_once(timeout=10, min_changes=1) == 1
    assert cdc_cache.version("counters") == 2
    lenient.close()

    # A recovery interrupted by a crash (flush noted, not done) is completed on the next start,
    # whatever that consumer's on_slot_lost says.
    store = PositionStore(cdc_cache.path / "cdc", name)
    noted = store.load()
    assert noted is not None
    store.save(dataclasses.replace(noted, flush_pending=True))
    _query(pg, "SELECT pg_drop_replication_slot(%s)", (name,))
    resumed = make_consumer(cdc_cache, rules, name=name)
    resumed.setup()
    assert cdc_cache.version("counters") == 3  # flushed
    after = store.load()
    assert after is not None and not after.flush_pending
    run_sql(pg, f"UPDATE {schema}.counters SET n = 6")
    assert resumed.run_once(timeout=10, min_changes=1) == 1
    assert cdc_cache.version("counters") == 4


# --------------------------------------------------------------- PostgreSQL: killed consumer


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def _wait_for(predicate: Callable[[], bool], what: str, proc: subprocess.Popen[bytes],
              timeout: float = 60.0) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"consumer exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.postgres
def test_consumer_killed_with_sigkill_misses_nothing_and_repeats_nothing(
    pg: str, schema: str, tmp_path: Path
) -> None:
    data = tmp_path / "cache"
    with SemanticCache(data, embedder=HashEmbedder(), threshold=0.99) as cache:
        for i in range(1, 9):
            cache.store(prompt(i), f"answer {i}", tags=[f"user:{i}"])
    run_sql(
        pg,
        f"INSERT INTO {schema}.users (id, name) SELECT g, 'u' || g FROM generate_series(1, 8) g",
        f"INSERT INTO {schema}.counters (id) VALUES (1)",
    )
    name = unique_name()
    state_file = data / "cdc" / f"{name}.json"
    args = ["--dsn", pg, "--rules", "tests.cdc_rules:RULES", "--data", str(data), "--slot", name,
            "--publication", name, "--log-level", "WARNING"]  # fmt: skip
    module_command = [sys.executable, "-m", "semcache.cdc", *args]
    # The same command through the `semcache` console app (semcache/cli.py registers it).
    app_command = [sys.executable, "-c", "from semcache.cli import main; main()", "cdc", *args]
    env = {**os.environ, "SEMCACHE_TEST_CDC_SCHEMA": schema, "PYTHONPATH": str(REPO)}
    log = (tmp_path / "consumer.log").open("wb")

    def start(command: list[str] = module_command) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)

    def applied() -> int:
        return int(_read_state(state_file).get("transactions", -1))

    proc = start()
    try:
        _wait_for(lambda: applied() == 0, "the consumer's setup", proc)
        # Phase 1: three transactions, applied; then SIGKILL.
        run_sql(pg, f"UPDATE {schema}.users SET name = 'x' WHERE id = 1")
        run_sql(pg, f"UPDATE {schema}.users SET name = 'x' WHERE id = 2")
        run_sql(pg, f"UPDATE {schema}.counters SET n = n + 1")
        _wait_for(lambda: applied() == 3, "phase 1", proc)
        phase1 = _read_state(state_file)["lsn"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # Phase 2: changes while no consumer runs.
        run_sql(pg, f"UPDATE {schema}.users SET name = 'y' WHERE id = 3")
        run_sql(pg, f"DELETE FROM {schema}.users WHERE id = 4")
        run_sql(pg, f"UPDATE {schema}.counters SET n = n + 1")
        proc = start(app_command)
        _wait_for(lambda: applied() >= 6, "phase 2 after the restart", proc)
        time.sleep(0.3)  # room for a wrongly repeated transaction to show up
        assert applied() == 6, "a transaction was applied twice"
        phase2 = _read_state(state_file)["lsn"]
        assert phase2 > phase1
        # Phase 3: SIGKILL right after a commit, wherever the consumer is (racy on purpose).
        run_sql(pg, f"UPDATE {schema}.users SET name = 'z' WHERE id = 5",
                f"UPDATE {schema}.counters SET n = n + 1")  # fmt: skip
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc = start()
        _wait_for(lambda: applied() >= 7, "phase 3 after the restart", proc)
        # the state file may show phase 3 from before the kill: one more transaction (of an
        # entry already invalidated) shows the restarted consumer is running, so the SIGTERM
        # reaches its handler, not a process still starting up
        run_sql(pg, f"UPDATE {schema}.users SET name = 'w' WHERE id = 5")
        _wait_for(lambda: applied() >= 8, "a transaction after the restart", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        slot = _query(pg, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                          "WHERE slot_name = %s", (name,))  # fmt: skip
        drop_slot_and_publication(pg, name)
    state = _read_state(state_file)
    assert state["lsn"] > phase2
    assert slot and po.lsn_from_str(slot[0][0]) >= state["lsn"]  # confirmed after recording
    with SemanticCache(data, embedder=HashEmbedder(), threshold=0.99) as cache:
        for i in (1, 2, 3, 4, 5):
            assert cache.lookup(prompt(i)) is None, f"user:{i} was not invalidated"
        for i in (6, 7, 8):
            assert cache.lookup(prompt(i)) is not None, f"user:{i} was invalidated for nothing"
        version = cache.version("counters")
    # Phases 1 and 2 bump exactly once each; phase 3's transaction is applied once, or twice
    # if the kill fell between the cache commit and the position record (harmless).
    assert version in (3, 4), version
    print(f"\nSIGKILL test: {state['transactions']} transactions recorded, counters version "
          f"{version}, position {state['lsn_text']}")  # fmt: skip


@pytest.mark.postgres
def test_run_reconnects_after_the_connection_is_lost_and_stops_on_request(
    pg: str, schema: str, cdc_cache: SemanticCache, make_consumer: Callable[..., ChangeConsumer]
) -> None:
    import threading

    run_sql(pg, f"INSERT INTO {schema}.users (id) VALUES (1), (2)")
    for i in (1, 2):
        cdc_cache.store(prompt(i), f"answer {i}", tags=[f"user:{i}"])
    consumer = make_consumer(
        cdc_cache,
        [Rule("users", schema=schema, tags=lambda row: [f"user:{row['id']}"])],
        reconnect_initial=0.05,
    )
    consumer.setup()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run(handle_signals=False)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def walsender() -> int | None:
        status = consumer.slot_status()
        return status["active_pid"] if status and status["active"] else None

    deadline = time.monotonic() + 20
    while walsender() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = walsender()
    assert pid is not None
    run_sql(pg, f"UPDATE {schema}.users SET name = 'a' WHERE id = 1")
    _query(pg, "SELECT pg_terminate_backend(%s)", (pid,))  # the server drops the stream
    run_sql(pg, f"UPDATE {schema}.users SET name = 'b' WHERE id = 2")
    deadline = time.monotonic() + 20
    while consumer.stats.transactions_applied < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    consumer.stop()
    thread.join(timeout=10)
    assert not thread.is_alive() and not errors
    assert consumer.stats.transactions_applied == 2
    assert consumer.stats.reconnects >= 1
    assert cdc_cache.lookup(prompt(1)) is None and cdc_cache.lookup(prompt(2)) is None


@pytest.mark.postgres
def test_a_stop_asked_before_run_starts_is_honoured_once(
    pg: str, schema: str, cdc_cache: SemanticCache, make_consumer: Callable[..., ChangeConsumer]
) -> None:
    """stop() before run() (a thread not yet started, a signal during startup) makes run()
    return at once instead of being forgotten; the next run consumes as usual."""
    import threading

    cdc_cache.store(prompt(1), "answer 1", tags=["user:1"])
    consumer = make_consumer(
        cdc_cache, [Rule("users", schema=schema, tags=lambda row: [f"user:{row['id']}"])]
    )
    consumer.setup()
    consumer.stop()
    thread = threading.Thread(target=consumer.run, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "a stop() asked before run() was lost"
    run_sql(pg, f"INSERT INTO {schema}.users (id) VALUES (1)")
    assert consumer.run_once(timeout=10, min_changes=1) == 1  # the stop was spent
    assert cdc_cache.lookup(prompt(1)) is None
    # a stop that arrives as run_once returns for another reason (its timeout) is kept
    real_pump = consumer._pump

    def pump_then_stop(*args: Any) -> int:
        applied = real_pump(*args)
        consumer.stop()  # from "another thread", just after the timeout ended the pump
        return applied

    consumer._pump = pump_then_stop  # type: ignore[method-assign]
    assert consumer.run_once(timeout=0.1) == 0
    consumer._pump = real_pump  # type: ignore[method-assign]
    thread = threading.Thread(target=consumer.run, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "a stop that came as run_once returned was lost"


def test_sigterm_while_the_cdc_command_starts_stops_it_cleanly(tmp_path: Path) -> None:
    """A SIGTERM that reaches `semcache cdc` while it loads its rules (before the consumer
    exists) ends it with exit status 0 and without touching PostgreSQL: the port given here
    has no server, so any connection attempt would fail the command."""
    marker = tmp_path / "loading"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SEMCACHE_TEST_CDC_MARKER": str(marker),
           "SEMCACHE_TEST_CDC_IMPORT_DELAY": "2"}  # fmt: skip
    no_server = "host=127.0.0.1 port=9 dbname=none connect_timeout=2"
    rules = "tests.cdc_rules_slow:RULES"
    command = [sys.executable, "-m", "semcache.cdc", "--dsn", no_server, "--rules", rules,
               "--data", str(tmp_path / "cache")]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the command never started loading its rules"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, out.decode()
    assert b"stopping the CDC consumer" in out and b"stopped before the cache was opened" in out


@pytest.mark.postgres
def test_the_consumer_invalidates_a_shared_store_for_every_replica(
    pg: str, schema: str, tmp_path: Path, make_consumer: Callable[..., ChangeConsumer]
) -> None:
    """The consumer works unchanged on a replica of a shared PostgreSQL store: another replica
    (another process, its own index) stops serving the entries a source change covers."""
    from .procs import Worker

    store_url = "postgresql://root@127.0.0.1:5432/test"
    store_schema = f"semcache_cdc_{uuid.uuid4().hex[:10]}"
    options = {"threshold": 0.99, "schema": store_schema}
    consumer_cache = SemanticCache(
        store_url, embedder=HashEmbedder(), index_dir=tmp_path / "consumer", **options
    )
    try:
        with Worker(store_url, options={**options, "index_dir": str(tmp_path / "r")}) as reader:
            ids = {i: reader.call("store", prompt(i), f"a{i}", tags=[f"user:{i}"]) for i in (1, 2)}
            consumer = make_consumer(
                consumer_cache,
                [Rule("users", schema=schema, tags=lambda row: [f"user:{row['id']}"])],
            )
            consumer.setup()
            assert consumer.run_once(timeout=0.2) == 0
            run_sql(pg, f"INSERT INTO {schema}.users (id, name) VALUES (1, 'ann')")
            assert consumer.run_once(timeout=10, min_changes=1) == 1
            deadline = time.monotonic() + 5
            while reader.call("lookup", prompt(1)) is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert reader.call("lookup", prompt(1)) is None
            assert reader.call("lookup", prompt(2))["entry_id"] == ids[2]
            assert consumer.state_file.parent == tmp_path / "consumer" / "cdc"
        # `semcache cdc --data postgresql://...` opens such a replica without loading a model
        from semcache.cdc.cli import InvalidationOnlyEmbedder, open_cache, recorded_model

        assert recorded_model(store_url, store_schema) == ("test:hash", 64)
        cli_cache = open_cache(store_url, None, schema=store_schema, index_dir=tmp_path / "cli")
        try:
            assert isinstance(cli_cache.embedder, InvalidationOnlyEmbedder)
            assert cli_cache.invalidate_tags("user:2") == 1
        finally:
            cli_cache.close()
    finally:
        consumer_cache.close()
        _query(dsn("test"), f"DROP SCHEMA IF EXISTS {store_schema} CASCADE")
