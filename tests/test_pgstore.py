"""What the PostgreSQL store promises beyond the shared contract (tests/test_store_contract.py):
positions that stay contiguous and in commit order with writers in several processes, fenced
inserts that hold against invalidations committed by another process, a per-thread re-entrant
transaction over a pool, schema isolation and migration, typed errors, and a core import that
never loads the driver. Real PostgreSQL on 127.0.0.1:5432, a fresh schema per test."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from semcache import pgstore
from semcache.errors import InvalidInputError, StoreError
from semcache.fence import Candidate, any_covers
from semcache.pgstore import PostgresStore, redact
from semcache.store import entry_size

pytestmark = pytest.mark.postgres

URL = "postgresql://root@127.0.0.1:5432/test"
DIM = 8


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"semcache_test_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")  # type: ignore[arg-type]


@pytest.fixture
def store(schema: str) -> Iterator[PostgresStore]:
    s = PostgresStore(URL, schema=schema)
    yield s
    s.close()


def values(prompt: str, *, namespace: str = "ns", version: int = 0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vector = rng.standard_normal(DIM).astype(np.float32)
    shard = f"d-{namespace}:{version}"
    row = {
        "uid": uuid.uuid4().hex,
        "shard": shard,
        "namespace": namespace,
        "version": version,
        "scope_digest": f"d-{namespace}",
        "scope": "{}",
        "prompt": prompt,
        "l1_key": f"{shard}/{prompt}",
        "response": f"answer to {prompt}",
        "vector": (vector / np.linalg.norm(vector)).tobytes(),
        "created_at": 0.0,
        "updated_at": 0.0,
        "accessed_at": 0.0,
        "expires_at": None,
        "size": 0,
        "metadata": None,
    }
    row["size"] = entry_size(row, ())
    return row


# -- several processes ------------------------------------------------------------------------
def _fenced_writer(schema: str, name: str, count: int) -> None:
    """Fenced inserts, each with the version it read after taking its position (the cache's
    order), so an entry committed after a bump of its namespace must be refused."""
    store = PostgresStore(URL, schema=schema, pool_size=2)
    for i in range(count):
        position = store.position()
        version = store.version("ns")
        row = values(f"{name}-{i}", version=version, seed=i)
        entry = Candidate(
            "ns",
            row["scope_digest"],
            row["l1_key"],
            (),
            np.frombuffer(row["vector"], dtype=np.float32),
        )
        store.insert(row, (), fence=position, covered=lambda f: any_covers(f, entry))  # noqa: B023
    store.close()


def _bumper(schema: str, count: int) -> None:
    store = PostgresStore(URL, schema=schema, pool_size=1)
    for _ in range(count):
        store.bump("ns", now=time.time())
        time.sleep(0.003)
    store.close()


def test_writers_in_several_processes_keep_the_log_contiguous_and_fenced(
    store: PostgresStore, schema: str
) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_fenced_writer, args=(schema, f"w{n}", 80)) for n in range(3)]
    procs.append(ctx.Process(target=_bumper, args=(schema, 60)))
    for p in procs:
        p.start()
    # a follower reading while they write never sees a position before an earlier one
    seen = 0
    gaps: list[tuple[int, int]] = []
    while any(p.is_alive() for p in procs) or store.last_seq() > seen:
        for change in store.changes_since(seen):
            if change.seq != seen + 1:
                gaps.append((seen, change.seq))
            seen = change.seq
        time.sleep(0.001)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert gaps == []
    assert seen == store.last_seq() == store.data_version()
    changes = store.changes_since(0)
    assert [c.seq for c in changes] == list(range(1, seen + 1))
    assert store.position() == 60  # one fence per bump, contiguous too
    # replaying the commit-ordered log: every entry carries the version current at its commit
    versions = {int(r[0]): int(r[1]) for r in store.execute("SELECT id, version FROM entries")}
    current, stale = 0, []
    for change in changes:
        if change.op == "ver":
            current += 1
        elif change.op == "add" and versions[change.entry_id] != current:  # type: ignore[index]
            stale.append((change.entry_id, versions[change.entry_id], current))  # type: ignore[index]
    assert current == 60 and stale == []
    assert 0 < len(versions) <= 240 and store.counters()[0] == len(versions)


# -- one process, several threads -------------------------------------------------------------
def test_transactions_are_per_thread_re_entrant_and_isolated(store: PostgresStore) -> None:
    inside, release = threading.Event(), threading.Event()
    first = values("first")
    second = values("second", seed=1)
    order: list[str] = []

    def holder() -> None:
        with store.transaction():
            store.insert(first, ("t",))  # nested: joins the outer transaction
            assert store.rowid_of(first["uid"]) is not None  # its own reads see it
            inside.set()
            release.wait(10)
            order.append("first")

    def writer() -> None:
        inside.wait(10)
        store.insert(second, ())  # waits for the holder's commit (writers take turns)
        order.append("second")

    threads = [threading.Thread(target=holder), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    inside.wait(10)
    assert store.rowid_of(first["uid"]) is None  # not committed: other threads do not see it
    time.sleep(0.2)
    assert order == []  # the second writer is waiting
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["first", "second"]
    assert [c.op for c in store.changes_since(0)] == ["add", "add"]


def test_an_error_inside_a_nested_call_rolls_back_the_whole_transaction(
    store: PostgresStore,
) -> None:
    row = values("kept out")
    with pytest.raises(StoreError), store.transaction():
        store.insert(row, ("t",))
        store.insert({**values("bad"), "no_such_column": 1}, ())
    assert store.rowid_of(row["uid"]) is None
    assert store.last_seq() == 0 and store.counters() == (0, 0)
    assert store.insert(values("after"), ()) is not None  # the store is still usable
    assert [c.seq for c in store.changes_since(0)] == [1]  # positions given back, no hole


def test_data_version_moves_when_another_connection_commits(
    store: PostgresStore, schema: str
) -> None:
    other = PostgresStore(URL, schema=schema)
    before = store.data_version()
    other.insert(values("from elsewhere"), ())
    assert store.data_version() != before
    moved = store.data_version()
    other.bump("ns", now=1.0)
    assert store.data_version() != moved
    other.close()


def test_updates_log_only_what_followers_need(store: PostgresStore) -> None:
    written = store.insert(values("p"), ("a",))
    assert written is not None
    rowid = written[0]
    store.record_access({rowid: (3, 5.0)})  # access order only: no change logged
    assert store.last_seq() == 1
    store.update(rowid, {"response": "new answer", "size": 500}, None, now=1.0)
    store.set_vectors([(rowid, values("p", seed=9)["vector"])])
    store.update(rowid, {}, ("b",), now=2.0)
    assert [c.op for c in store.changes_since(1)] == ["upd", "vec", "upd"]
    assert store.tags_of(rowid) == ("b",)
    assert store.counters() == (1, 500)
    assert store.get_by_uid(written[1])["hits"] == 3  # type: ignore[index]
    store.delete_ids([rowid])
    assert store.counters() == (0, 0) and store.tags_of(rowid) == ()
    assert store.quick_check() == []


def test_an_administrators_delete_in_another_session_is_logged(
    store: PostgresStore, schema: str
) -> None:
    written = store.insert(values("p"), ())
    assert written is not None
    with psycopg.connect(URL, autocommit=True) as conn:  # default search_path: not the schema
        conn.execute(f"DELETE FROM {schema}.entries")  # type: ignore[arg-type]
    assert [c.op for c in store.changes_since(0)] == ["add", "del"]
    assert store.counters() == (0, 0)


# -- schemas, migrations, errors --------------------------------------------------------------
def test_each_schema_is_a_store_of_its_own(store: PostgresStore, schema: str) -> None:
    store.insert(values("mine"), ())
    other_schema = schema + "_b"
    try:
        other = PostgresStore(URL, schema=other_schema)
        assert other.store_id != store.store_id
        assert other.counters() == (0, 0) and other.last_seq() == 0
        other.close()
    finally:
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {other_schema} CASCADE")  # type: ignore[arg-type]


def test_a_newer_schema_is_refused(store: PostgresStore, schema: str) -> None:
    store.set_meta("schema_version", "99")
    with pytest.raises(StoreError, match="newer than this semcache"):
        PostgresStore(URL, schema=schema)


def test_bad_names_and_unreachable_servers_are_typed_errors() -> None:
    with pytest.raises(InvalidInputError):
        PostgresStore(URL, schema="semcache; DROP TABLE x")
    with pytest.raises(InvalidInputError):
        PostgresStore(URL, synchronous="sometimes")
    with pytest.raises(StoreError, match="cannot connect"):
        PostgresStore("postgresql://root@127.0.0.1:1/test", connect_timeout=2)


def test_a_closed_store_raises_store_errors(store: PostgresStore) -> None:
    store.close()
    store.close()  # twice is fine
    with pytest.raises(StoreError):
        store.data_version()
    with pytest.raises(StoreError), store.transaction():
        pass


def test_passwords_stay_out_of_what_is_shown() -> None:
    assert redact("postgresql://u:secret@db:5433/x") == "postgresql://u@db:5433/x"
    assert redact(URL) == URL


def test_importing_semcache_does_not_import_the_driver() -> None:
    code = "import sys, semcache; print('psycopg' in sys.modules, 'psycopg_pool' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_malformed_connection_string_is_a_typed_error() -> None:
    with pytest.raises(InvalidInputError, match="connection string"):
        PostgresStore("host=127.0.0.1 port")


def _terminate(pid: int) -> None:
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_lost_connection_is_recovered_and_a_broken_write_is_a_store_error(
    schema: str,
) -> None:
    store = PostgresStore(URL, schema=schema, pool_size=1)  # one connection: the one we kill
    try:
        kept = store.insert(values("kept"), ())
        assert kept is not None
        _terminate(store.execute("SELECT pg_backend_pid()")[0][0])
        assert store.counters()[0] == 1  # a read on a dead connection runs again on a new one
        lost = values("lost")
        with pytest.raises(StoreError), store.transaction() as conn:
            store.insert(lost, ())
            _terminate(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            store.insert(values("after the kill"), ())
        assert store.rowid_of(lost["uid"]) is None  # never committed
        assert store.insert(values("next"), ()) is not None  # the store carries on
        assert [c.seq for c in store.changes_since(0)] == [1, 2]
    finally:
        store.close()


def test_a_bulk_insert_larger_than_one_statement(store: PostgresStore) -> None:
    rows = [values(f"p{i % 4000}", seed=i) for i in range(4500)]  # 500 repeats, 3 statements
    tags = [(f"t{i % 7}",) for i in range(4500)]
    written = store.insert_many(rows, tags)
    assert len(written) == 4500 and len({rowid for rowid, _ in written}) == 4000
    assert written[0] == written[4000] and written[0][1] == rows[4000]["uid"]
    assert store.counters()[0] == 4000
    assert store.tags_of(written[4000][0]) == ("t3",)  # 4000 % 7: the later row's tags
    changes = store.changes_since(0)
    assert [c.seq for c in changes] == list(range(1, 4001))
    assert {c.op for c in changes} == {"add"}
    with pytest.raises(StoreError, match="no column"):
        store.insert_many([{**values("x"), "colour": "red"}], [()])
    assert store.counters()[0] == 4000


def test_a_write_inside_a_read_snapshot_is_refused(store: PostgresStore) -> None:
    with pytest.raises(StoreError, match="read-only"), store.read_snapshot():
        store.insert(values("p"), ())
    assert store.insert(values("p"), ()) is not None  # the store carries on
    with store.transaction(), store.read_snapshot():  # inside a write: adds nothing
        assert store.counters()[0] == 1


def test_an_older_schema_is_migrated_in_place(store: PostgresStore, schema: str) -> None:
    kept = store.insert(values("kept"), ("t",))
    with store.transaction() as conn:  # the schema as version 1 left it
        conn.execute("DROP TABLE holds")
        conn.execute("DROP TABLE leases")  # and what version 3 added
        conn.execute("DROP TRIGGER log_head_au ON log_head")
        conn.execute("DROP FUNCTION log_head_moved()")
    store.set_meta("schema_version", "1")
    store.close()
    again = PostgresStore(URL, schema=schema)
    assert again.get_meta("schema_version") == str(pgstore.SCHEMA_VERSION)
    assert again.store_id == store.store_id
    again.hold_log("follower", 1, now=1.0)  # the table version 2 added
    assert again.take_lease("k", "me", now=1.0, ttl=5.0)  # and the one version 3 added
    assert again.rowid_of(kept[1]) == kept[0] and again.tags_of(kept[0]) == ("t",)  # type: ignore[index]
    again.close()


def _open_and_report(schema: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    store = PostgresStore(URL, schema=schema, pool_size=1)
    out.put(store.store_id)
    store.close()


def test_processes_creating_one_schema_at_once_agree_on_one_store(schema: str) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_open_and_report, args=(schema, out)) for _ in range(4)]
    for p in procs:
        p.start()
    ids = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(set(ids)) == 1 and len(ids[0]) == 32


def test_a_writer_stuck_holding_its_turn_makes_others_fail_not_hang(
    store: PostgresStore, schema: str
) -> None:
    other = PostgresStore(URL, schema=schema, busy_timeout=0.5)
    with psycopg.connect(URL) as stuck:  # a replica that stopped mid-transaction
        stuck.execute(f"SELECT 1 FROM {schema}.log_head FOR UPDATE")  # type: ignore[arg-type]
        with pytest.raises(StoreError, match="lock timeout"):
            other.insert(values("waits"), ())
        assert other.counters() == (0, 0)  # reads never wait
        stuck.rollback()
    assert other.insert(values("after"), ()) is not None
    other.close()


def test_a_listener_wakes_on_commits_and_closing_it_does_not_wait_for_its_poll(
    store: PostgresStore,
) -> None:
    woken = threading.Event()
    listener = store.listen(woken.set, poll=600.0)  # polling alone would take ten minutes
    assert listener.connected.wait(20)
    deadline = time.monotonic() + 20
    while listener.wakeups < 1 and time.monotonic() < deadline:  # its first look, on connecting
        time.sleep(0.01)
    woken.clear()
    store.insert(values("a commit elsewhere"), ())
    assert woken.wait(20)  # the notification, not the poll
    closer = threading.Thread(target=listener.close)
    closer.start()
    closer.join(20)
    assert not closer.is_alive() and not listener.alive
