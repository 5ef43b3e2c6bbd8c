"""The store of record's contract, run against every store: the embedded SQLite one and the
shared PostgreSQL one (real PostgreSQL on 127.0.0.1:5432, a fresh schema per test, dropped
afterwards)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from semcache.errors import StoreError
from semcache.fence import Candidate, any_covers
from semcache.store import HOLD_TTL, Store, entry_size
from semcache.vectorcodec import decode, encode

DIM = 8
PG_URL = "postgresql://root@127.0.0.1:5432/test"


def pg_schema(tmp: Path) -> str:
    """The test's own schema, named after its tmp folder (unique per test)."""
    return "semcache_test_" + hashlib.sha1(str(tmp).encode()).hexdigest()[:16]


def open_postgres(tmp: Path) -> Any:
    from semcache.pgstore import PostgresStore

    return PostgresStore(PG_URL, schema=pg_schema(tmp))


def drop_postgres(tmp: Path) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {pg_schema(tmp)} CASCADE")  # type: ignore[arg-type]


# name -> (open the store for a test's tmp folder, clean up after the test)
STORES: dict[str, tuple[Callable[[Path], Any], Callable[[Path], None]]] = {
    "sqlite": (lambda tmp: Store(tmp / "semcache.db"), lambda tmp: None),
    "postgres": (open_postgres, drop_postgres),
}
MARKS = {"postgres": [pytest.mark.postgres]}


@pytest.fixture(params=[pytest.param(name, marks=MARKS.get(name, [])) for name in STORES])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    open_, cleanup = STORES[request.param]
    yield lambda: open_(tmp_path)
    cleanup(tmp_path)


@pytest.fixture
def store(opener: Callable[[], Store]) -> Iterator[Store]:
    s = opener()
    yield s
    s.close()


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def row(prompt: str, *, namespace: str = "ns", version: int = 0, seed: int = 0) -> dict:
    shard = f"digest-{namespace}:{version}"
    values = {
        "uid": uuid.uuid4().hex,
        "shard": shard,
        "namespace": namespace,
        "version": version,
        "scope_digest": f"digest-{namespace}",
        "scope": "{}",
        "prompt": prompt,
        "l1_key": f"{shard}/{prompt}",
        "response": f"answer to {prompt}",
        "vector": encode(unit(seed)),
        "created_at": 0.0,
        "updated_at": 0.0,
        "accessed_at": 0.0,
        "expires_at": None,
        "size": 0,
        "metadata": None,
    }
    values["size"] = entry_size(values, ())
    return values


def candidate(values: dict, tags: tuple[str, ...] = ()) -> Candidate:
    return Candidate(
        values["namespace"],
        values["scope_digest"],
        values["l1_key"],
        tags,
        decode(values["vector"]),
    )


def test_identity_is_made_once_and_kept(opener: Callable[[], Store], tmp_path: Path) -> None:
    first = opener()
    identity = first.store_id
    first.close()
    again = opener()
    assert again.store_id == identity and len(identity) == 32
    again.close()
    other = Store(tmp_path / "other.db")
    assert other.store_id != identity
    other.close()


def test_every_committed_change_has_a_contiguous_log_position(store: Store) -> None:
    a = store.insert(row("a", seed=1), ())
    b = store.insert(row("b", seed=2), ("t",))
    assert a is not None and b is not None
    store.delete_entry(a[0], now=1.0)
    store.bump("ns", now=1.0)
    changes = store.changes_since(0)
    assert [c.seq for c in changes] == list(range(1, len(changes) + 1))
    assert [c.op for c in changes] == ["add", "add", "del", "ver"]
    assert changes[0].current is None  # a is gone: an add carries the vector only while alive
    shard, vector = changes[1].current  # type: ignore[misc]
    assert shard == "digest-ns:0" and np.allclose(vector, unit(2), atol=2e-3)
    assert store.last_seq() == changes[-1].seq
    store.trim_changes(2)
    assert store.trimmed_upto() == 2 and [c.seq for c in store.changes_since(0)] == [3, 4]


def test_vectors_are_kept_once_in_half_precision_and_read_back_as_unit_rows(
    store: Store,
) -> None:
    """The store keeps each vector in half precision (``1 + 2 * dim`` bytes) and reads it back
    as a unit float32 row within a few parts in 10,000 of what was written; rows written as
    raw float32 (before that encoding) still read back; ``vector_matrix`` answers in the
    order asked, with zeros for an id no longer present."""
    a = store.insert(row("a", seed=1), ())
    legacy = row("b", seed=2)
    legacy["vector"] = unit(2).tobytes()
    b = store.insert(legacy, ())
    c = store.insert(row("c", seed=3), ())
    assert a is not None and b is not None and c is not None
    assert len(row("x")["vector"]) == 1 + 2 * DIM
    store.delete_entry(c[0], now=1.0)
    got = store.vector_matrix(np.array([b[0], 999, a[0], c[0]]))
    assert got.shape == (4, DIM) and got.dtype == np.float32
    assert np.allclose(got[0], unit(2), atol=1e-6) and np.allclose(got[2], unit(1), atol=2e-3)
    assert not got[1].any() and not got[3].any()
    assert np.allclose(np.linalg.norm(got[[0, 2]], axis=1), 1.0, atol=1e-6)
    assert float(got[2] @ unit(1)) > 0.9999
    assert store.vector_matrix(np.array([999])).shape == (1, 0)
    ids, _, vectors = next(store.iter_vectors())
    assert ids.tolist() == [a[0], b[0]] and np.allclose(vectors, got[[2, 0]])


def test_an_exact_repeat_is_replaced(store: Store) -> None:
    first = store.insert(row("same"), ())
    second = store.insert(row("same"), ())
    assert first is not None and second is not None and first[0] != second[0]
    assert store.rowid_of(first[1]) is None and store.counters()[0] == 1


def test_a_lookups_rows_are_its_exact_repeat_and_its_live_candidates(store: Store) -> None:
    a, b, c = (store.insert(row(p, seed=i), ()) for i, p in enumerate(("a", "b", "c")))
    other = store.insert(row("elsewhere", namespace="ns2"), ())
    expired = row("expired", seed=5)
    expired["expires_at"] = 5.0
    d = store.insert(expired, ())
    assert a and b and c and other and d
    ids = [b[0], c[0], other[0], d[0], 10**9]  # another shard's, an expired and an unknown id
    exact, rows = store.lookup_rows("digest-ns:0/a", ids, "digest-ns:0", now=10.0)
    assert exact is not None and exact.id == a[0] and exact.response == "answer to a"
    assert sorted(rows) == sorted([b[0], c[0]])  # a is not among the ids asked for
    assert (exact, rows) == (
        store.find_exact("digest-ns:0/a", 10.0),
        store.candidates(ids, "digest-ns:0", 10.0),
    )
    exact, rows = store.lookup_rows("digest-ns:0/a", [a[0]], "digest-ns:0", now=10.0)
    assert exact is not None and list(rows) == [a[0]]
    assert store.lookup_rows("digest-ns:0/expired", [], "digest-ns:0", now=10.0) == (None, {})
    assert store.lookup_rows("digest-ns:0/nothing", [b[0]], "digest-ns:0", 10.0)[0] is None


def test_invalidations_are_fenced_and_a_fenced_insert_refuses_what_they_cover(
    store: Store,
) -> None:
    start = store.position()
    store.fence_tags(["policy"], "ns", now=1.0)
    store.bump("other", now=1.0)
    store.delete_prompt("digest-ns:0/gone", now=1.0)
    store.delete_similar([], unit(7), 0.9, None, now=1.0)
    fences = store.fences_since(start)
    assert fences is not None and [f.kind for f in fences] == ["tag", "ver", "key", "similar"]
    assert store.position() == start + 4
    cases = [
        (row("tagged"), ("policy",), True),
        (row("tagged elsewhere", namespace="ns2"), ("policy",), False),  # tag was ns's only
        (row("bumped", namespace="other"), (), True),
        (row("gone"), (), True),
        (row("near", seed=7), (), True),  # inside the semantic radius
        (row("far", seed=8), (), False),
    ]
    for values, tags, covered in cases:
        entry = candidate(values, tags)
        got = store.insert(values, tags, fence=start, covered=lambda f: any_covers(f, entry))  # noqa: B023
        assert (got is None) == covered, values["prompt"]
        assert (store.rowid_of(values["uid"]) is None) == covered
    fresh = row("after the fences")
    assert store.insert(fresh, (), fence=store.position(), covered=lambda f: bool(f)) is not None


def test_a_fence_older_than_the_trimmed_log_refuses(store: Store) -> None:
    position = store.position()
    store.bump("ns", now=1.0)
    store.trim_fences(before=2.0)
    assert store.fences_since(position) is None
    assert store.insert(row("late"), (), fence=position, covered=lambda f: False) is None
    assert store.fences_since(store.position()) == []


def test_tags_are_confined_to_a_namespace_when_asked(store: Store) -> None:
    ours = store.insert(row("ours", namespace="acme"), ("eu:x",))
    theirs = store.insert(row("theirs", namespace="acme:eu"), ("x", "eu:x"))
    assert ours and theirs
    assert store.delete_tagged(["eu:x"], "acme", 1000) == 1
    assert store.rowid_of(theirs[1]) is not None
    assert store.delete_tagged(["eu:x"], None, 1000) == 1  # admin: every namespace


def test_many_tags_at_once(store: Store) -> None:
    tags = [f"tag{i}" for i in range(40_000)]
    for i in range(3):
        store.insert(row(f"p{i}"), (tags[i * 10_000],))
    store.fence_tags(tags, None, now=1.0)
    assert store.delete_tagged(tags, None, 1000) == 3


def test_eviction_never_takes_the_writes_that_caused_it(store: Store) -> None:
    ids = [store.insert(row(f"p{i}"), ()) for i in range(5)]
    assert store.evict("fifo", 10, ids[3][0]) == 3  # type: ignore[index]
    assert [store.rowid_of(uid) is None for _, uid in ids] == [True] * 3 + [False] * 2  # type: ignore[misc]


def test_eviction_spares_the_id_ranges_it_is_given(store: Store) -> None:
    ids = [store.insert(row(f"p{i}"), ()) for i in range(6)]
    first = ids[0][0]  # type: ignore[index]
    spare = [(first, first), (first + 2, first + 3)]
    assert store.evict("fifo", 2, None, spare=spare) == 2
    gone = [store.rowid_of(uid) is None for _, uid in ids]  # type: ignore[misc]
    assert gone == [False, True, False, False, True, False]


def test_insert_many_replaces_repeats_and_returns_each_rows_id(store: Store) -> None:
    rows = [row("x"), row("y"), row("x")]
    written = store.insert_many(rows, [(), ("t",), ("u",)])
    assert written[0] == written[2] and written[0][1] == rows[2]["uid"]
    assert store.counters()[0] == 2 and store.tags_of(written[2][0]) == ("u",)


def test_errors_are_store_errors(store: Store) -> None:
    with pytest.raises(StoreError), store.transaction() as conn:
        conn.execute("INSERT INTO no_such_table VALUES (1)")
    store.close()
    with pytest.raises(StoreError):
        store.position()


def test_a_read_snapshot_sees_one_state_while_others_commit(
    opener: Callable[[], Store],
) -> None:
    ours, theirs = opener(), opener()
    ours.insert(row("before", seed=1), ())
    with ours.read_snapshot():
        seq, n = ours.last_seq(), ours.counters()[0]
        theirs.insert(row("during", seed=2), ())
        assert ours.last_seq() == seq and ours.counters()[0] == n
        assert sum(len(ids) for ids, _, _ in ours.iter_vectors()) == n
    assert ours.last_seq() == seq + 1 and ours.counters()[0] == n + 1
    theirs.close()
    ours.close()


def test_a_checkpoint_is_announced_then_recorded_and_trims_up_to_live_holds(
    store: Store,
) -> None:
    for i in range(6):
        store.insert(row(f"p{i}", seed=i), ())
    store.begin_checkpoint("first")
    assert store.get_meta("checkpoint_pending") == "first"
    store.hold_log("follower", 2, now=100.0)
    assert store.record_checkpoint("first", 4, now=110.0) == 2  # the live hold wins
    assert store.get_meta("checkpoint_token") == "first" and store.trimmed_upto() == 2
    assert store.record_checkpoint("second", 4, now=100.0 + HOLD_TTL + 1) == 4  # hold expired
    assert [c.seq for c in store.changes_since(0)] == [5, 6]
    store.hold_log("follower", 5, now=1000.0)
    store.release_hold("follower")
    assert store.record_checkpoint("third", 5, now=1000.0) == 5


def test_each_replica_slot_keeps_its_own_checkpoint_tokens(store: Store) -> None:
    store.begin_checkpoint("a1", ":a")
    assert store.checkpoint_tokens(":a") == {"a1"}
    store.record_checkpoint("a1", 0, now=1.0, slot=":a")
    store.begin_checkpoint("b1", ":b")
    store.record_checkpoint("b1", 0, now=1.0, slot=":b")
    # another replica's checkpoint never makes this one's untrusted (or trusted)
    assert store.checkpoint_tokens(":a") == {"a1"}
    assert store.checkpoint_tokens(":b") == {"b1"}
    assert store.checkpoint_tokens("") == set()
    store.begin_checkpoint("a2", ":a")  # announced, not yet recorded: either is trusted
    assert store.checkpoint_tokens(":a") == {"a1", "a2"}


def test_a_lease_has_one_owner_until_released_or_expired(store: Store) -> None:
    assert store.take_lease("k", "one", now=100.0, ttl=10.0)
    assert store.take_lease("k", "one", now=101.0, ttl=10.0)  # its own: renewed
    assert not store.take_lease("k", "two", now=105.0, ttl=10.0)
    assert store.lease_owner("k", now=105.0) == "one"
    assert store.take_lease("other", "two", now=105.0, ttl=10.0)  # keys are independent
    store.release_lease("k", "two")  # not its lease: nothing happens
    assert store.lease_owner("k", now=106.0) == "one"
    store.release_lease("k", "one")
    assert store.lease_owner("k", now=106.0) is None
    assert store.take_lease("k", "two", now=106.0, ttl=10.0)
    # an owner that died: its lease expires and another takes it over
    assert not store.take_lease("k", "three", now=115.0, ttl=10.0)
    assert store.take_lease("k", "three", now=116.0, ttl=10.0)
    assert store.lease_owner("k", now=117.0) == "three"
    assert store.changes_since(0) == []  # coordination, not content: nothing is logged
