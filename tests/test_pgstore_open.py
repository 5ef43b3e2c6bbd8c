"""open_store: a folder opens the embedded SQLite store, a postgresql:// URL the shared
PostgreSQL one (real PostgreSQL on 127.0.0.1:5432, a fresh schema per test); anything else is a
typed error. default_index_dir: a replica's local index folder, named by the store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from semcache.errors import InvalidInputError, StoreError
from semcache.pgstore import PostgresStore
from semcache.store import Store
from semcache.stores import DB_FILE, default_index_dir, is_store_url, open_store

URL = "postgresql://root@127.0.0.1:5432/test"


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"semcache_test_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")  # type: ignore[arg-type]


def test_a_folder_opens_the_sqlite_store_in_it(tmp_path: Path) -> None:
    for target in (tmp_path / "a" / "b", str(tmp_path / "c")):
        store = open_store(target, synchronous="full")
        assert isinstance(store, Store) and store.path == Path(target) / DB_FILE
        assert store.path.exists()
        store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "POSTGRESQL"])
def test_a_postgres_url_opens_the_shared_store_in_its_schema(schema: str, scheme: str) -> None:
    url = URL.replace("postgresql", scheme, 1)
    store = open_store(url, schema=schema, synchronous="off")
    assert isinstance(store, PostgresStore) and store.schema == schema
    again = open_store(url, schema=schema)
    assert again.store_id == store.store_id  # the same store, seen from a second opening
    with psycopg.connect(URL, autocommit=True) as conn:
        found = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s "
            "AND table_name IN ('entries', 'changes', 'fences', 'meta', 'log_head')",
            (schema,),
        ).fetchone()
    assert found == (5,)
    again.close()
    store.close()


def test_what_is_not_a_folder_or_a_postgres_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="unsupported store URL scheme 'mysql'"):
        open_store("mysql://root@127.0.0.1/test")
    with pytest.raises(InvalidInputError, match="synchronous"):
        open_store(tmp_path, synchronous="sometimes")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="cannot use"):
        open_store(blocker)
    assert not is_store_url(Path("postgresql:"))  # a Path is always a folder
    assert is_store_url(URL)


def test_the_default_index_folder_is_named_by_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_index_dir("abc") == tmp_path / "semcache" / "abc"
    assert default_index_dir("abc") != default_index_dir("abd")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_index_dir("abc") == Path.home() / ".cache" / "semcache" / "abc"


def test_openers_of_a_fresh_index_folder_agree_on_its_replica_id(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from semcache.stores import replica_id

    for attempt in range(5):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        with ThreadPoolExecutor(8) as pool:
            names = set(pool.map(replica_id, [folder] * 8))
        assert len(names) == 1 and replica_id(folder) in names
        assert [p.name for p in folder.iterdir()] == ["replica-id"]  # no temporary file left
