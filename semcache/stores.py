"""Choosing the store of record from what the user gave: a folder keeps meaning the embedded
SQLite store (``<folder>/semcache.db``); a ``postgresql://`` URL means the PostgreSQL store that
several replicas share.

PostgreSQL's driver is imported only when a URL asks for it, so a core install (no ``postgres``
extra) opens folders as before.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidInputError, StoreError
from .store import Store

if TYPE_CHECKING:
    from .pgstore import PostgresStore

#: The SQLite store's file inside a data folder.
DB_FILE = "semcache.db"
#: URL schemes that name a PostgreSQL store (libpq accepts both).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
#: The file in a replica's index folder that names it to the shared store.
REPLICA_FILE = "replica-id"


def is_store_url(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` names a PostgreSQL store (a ``Path`` is always a folder)."""
    return isinstance(target, str) and target.lower().startswith(POSTGRES_SCHEMES)


def open_store(
    target: str | os.PathLike[str],
    *,
    synchronous: str = "NORMAL",
    schema: str = "semcache",
) -> Store | PostgresStore:
    """Open the store of record ``target`` names: a :class:`~semcache.pgstore.PostgresStore`
    (in ``schema``) for a ``postgresql://`` URL, else the SQLite :class:`~semcache.store.Store`
    in the folder (made if missing; ``schema`` is not used).

    ``synchronous`` is SQLite's durability level; on PostgreSQL ``OFF`` means
    ``synchronous_commit=off`` and the others keep the server's setting. A string with another
    URL scheme is refused rather than taken for a folder name.
    """
    if not isinstance(synchronous, str) or synchronous.upper() not in SYNCHRONOUS:
        raise InvalidInputError(
            f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got {synchronous!r}"
        )
    if is_store_url(target):
        try:
            from .pgstore import PostgresStore
        except ImportError as exc:
            raise StoreError(
                "a postgresql:// store needs the postgres extra: pip install 'semcache[postgres]'"
                f" ({exc})"
            ) from exc
        scheme, rest = str(target).split("://", 1)
        url = f"{scheme.lower()}://{rest}"  # libpq reads the scheme in lower case only
        return PostgresStore(url, schema=schema, synchronous=synchronous.upper())
    if isinstance(target, str) and "://" in target:
        scheme = target.split("://", 1)[0]
        raise InvalidInputError(
            f"unsupported store URL scheme {scheme!r}: give a folder or a postgresql:// URL"
        )
    folder = Path(target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a read-only disk
        raise StoreError(f"cannot use {folder} as a cache folder: {exc}") from exc
    return Store(folder / DB_FILE, synchronous=synchronous.upper())


def replica_id(index_dir: Path) -> str:
    """This index folder's name as a replica of a shared store (made once, kept in the folder):
    the store keeps each replica's checkpoint token under it."""
    marker = index_dir / REPLICA_FILE
    try:
        name = marker.read_text().strip()
    except FileNotFoundError:
        name = ""
    if not name:
        # a file of its own, linked in only if no other process named the folder first
        tmp = index_dir / f".{REPLICA_FILE}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(uuid.uuid4().hex)
        try:
            os.link(tmp, marker)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        name = marker.read_text().strip()
    return name


def default_index_dir(store_id: str) -> Path:
    """Where a replica of a shared store keeps its local index files when no ``index_dir`` is
    given: ``$XDG_CACHE_HOME/semcache/<store id>`` (``~/.cache`` without it), so two stores
    never share index files and a process reopening the same store finds its checkpoint."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "semcache" / store_id
