"""The set of per-shard vector indexes, and its persistence in the data folder.

A shard is one exact scope at one namespace version: a lookup only ever searches its own shard,
so scope isolation is structural and a busy tenant never crowds another's neighbours out of the
top k. The set is saved as one file per shard plus ``manifest.json``, which records the store
it was derived from (its identity and a checkpoint token the store also keeps), the model, the
dimension and the change-log position the files reflect; opening replays only later changes.
A shard file holds no vectors (the store of record keeps each entry's vector, once): an HNSW
shard keeps its graph's links and labels, and loading reads the vectors back from the store.

A checkpoint never rewrites a file the current manifest names: shard files are written under new
names, then the manifest is replaced by an atomic rename (the commit point), and only then are
the files it no longer names removed. A crash at any moment leaves the old checkpoint or the new
one, whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import IndexCorruptError
from .index import Fetch, VectorIndex, load_index

MANIFEST = "manifest.json"
FORMAT = 1

IndexFactory = Callable[[int], VectorIndex]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a no-op where directories cannot be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_name(shard: str, generation: str) -> str:
    return f"{hashlib.sha256(shard.encode()).hexdigest()[:32]}-{generation}.idx"


def pending_of(index: VectorIndex) -> int:
    """Vectors an index holds outside its graph, waiting for a merge (0 for indexes without)."""
    return int(getattr(index, "pending", 0))


class ShardSet:
    """Per-shard indexes with a dirty set, saved and loaded as a unit."""

    def __init__(self, folder: Path, dim: int, model_id: str, factory: IndexFactory) -> None:
        self.folder = folder
        self.dim = dim
        self.model_id = model_id
        self._factory = factory
        self._shards: dict[str, VectorIndex] = {}
        self._dirty: set[str] = set()
        # each shard's recent writes not yet in its graph, as last saved or loaded: a merge
        # since then changes the shard without a write, and makes it worth saving again
        self._saved_pending: dict[str, int] = {}
        self._full = False  # the next save writes every shard afresh
        self.seq = 0  # last change-log seq reflected in the indexes
        self._lock_file: int | None = None
        self.store_id: str | None = None  # identity of the store the loaded files came from
        self.token: str | None = None  # checkpoint token of the loaded files

    # -- access ---------------------------------------------------------------------------
    def get(self, shard: str) -> VectorIndex | None:
        return self._shards.get(shard)

    def ensure(self, shard: str) -> VectorIndex:
        index = self._shards.get(shard)
        if index is None:
            index = self._shards[shard] = self._factory(self.dim)
        return index

    def items(self) -> Iterator[tuple[str, VectorIndex]]:
        return iter(list(self._shards.items()))

    def clear(self) -> None:
        self._shards.clear()
        self._full = True

    def mark_all_dirty(self) -> None:
        """The next save writes every shard and names no earlier file (a new owner trusts no
        file it did not write)."""
        self._full = True

    def __len__(self) -> int:
        return sum(len(index) for index in self._shards.values())

    @property
    def count(self) -> int:
        return len(self._shards)

    # -- ownership: one process writes the files ------------------------------------------
    def acquire(self) -> bool:
        """Take the folder's writer lock; False when another process holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_file = fd
        return True

    @property
    def owner(self) -> bool:
        return self._lock_file is not None

    def release(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                os.close(self._lock_file)
            self._lock_file = None

    # -- persistence ----------------------------------------------------------------------
    def save(self, store_id: str, token: str) -> None:
        """Write a checkpoint of every dirty shard, for store ``store_id``, under ``token``.

        New files get new names; the manifest's atomic replacement commits the checkpoint;
        files the new manifest does not name are removed afterwards.
        """
        try:
            manifest = self._read_manifest() or {}
        except IndexCorruptError:  # damaged on disk: write every shard afresh
            manifest = {}
        if manifest.get("store_id") != store_id or self._full:
            manifest = {}
        if not manifest:
            self._dirty.update(self._shards)
        self._dirty.update(
            shard
            for shard, index in self._shards.items()
            if pending_of(index) != self._saved_pending.get(shard, 0)
        )
        files: dict[str, dict[str, object]] = dict(manifest.get("shards", {}))  # type: ignore[arg-type]
        generation = uuid.uuid4().hex[:12]
        for shard in sorted(self._dirty):
            index = self._shards.get(shard)
            if index is None or len(index) == 0:
                files.pop(shard, None)
                self._saved_pending.pop(shard, None)
                continue
            name = _file_name(shard, generation)
            # read before the snapshot: a merge landing in between only makes it save again
            self._saved_pending[shard] = pending_of(index)
            data = index.to_bytes(vectors=False)  # the store of record keeps them
            _atomic_write(self.folder / name, data)
            files[shard] = {
                "file": name,
                "count": len(index),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        body = {
            "format": FORMAT,
            "store_id": store_id,
            "token": token,
            "model_id": self.model_id,
            "dim": self.dim,
            "seq": self.seq,
            "shards": files,
        }
        _atomic_write(self.folder / MANIFEST, json.dumps(body, indent=1).encode())
        _fsync_dir(self.folder)
        keep = {meta["file"] for meta in files.values()}  # type: ignore[index]
        for path in self.folder.glob("*.idx"):
            if path.name not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()
        for path in self.folder.glob("*.tmp"):
            with contextlib.suppress(OSError):
                path.unlink()
        self._dirty.clear()
        self._full = False
        self.store_id, self.token = store_id, token

    def manifest(self) -> dict[str, object] | None:
        """The persisted checkpoint's manifest (None when there is none), for judging it before
        :meth:`load` reads its files; IndexCorruptError when it is unreadable."""
        return self._read_manifest()

    def _read_manifest(self) -> dict[str, object] | None:
        path = self.folder / MANIFEST
        if not path.exists():
            return None
        try:
            body = json.loads(path.read_text())
            if not isinstance(body, dict) or body.get("format") != FORMAT:
                raise ValueError("unknown manifest format")
            return body
        except (OSError, ValueError) as exc:
            raise IndexCorruptError(f"{path} is unreadable ({exc})") from exc

    def load(self, fetch: Fetch, manifest: dict[str, object] | None = None) -> bool:
        """Load the persisted shards, their vectors from ``fetch`` (the store of record's);
        False when there is nothing persisted. ``manifest`` is the one the caller judged
        (:meth:`manifest`), so the files loaded are the ones it judged."""
        body = self._read_manifest() if manifest is None else manifest
        if body is None:
            return False
        if body.get("model_id") != self.model_id or body.get("dim") != self.dim:
            raise IndexCorruptError(
                f"the index in {self.folder} was built with {body.get('model_id')!r} "
                f"(dim {body.get('dim')}), not {self.model_id!r} (dim {self.dim})"
            )
        shards: dict[str, VectorIndex] = {}
        try:
            entries = dict(body["shards"])  # type: ignore[call-overload]
            for shard, meta in entries.items():
                path = self.folder / meta["file"]
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    raise IndexCorruptError(f"index file {path} is missing ({exc})") from exc
                if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                    raise IndexCorruptError(
                        f"index file {path} does not match its checksum: it is damaged or foreign"
                    )
                index = load_index(data, fetch)
                if index.dim != self.dim:
                    raise IndexCorruptError(f"index file {path} has dimension {index.dim}")
                shards[shard] = index
            seq = int(body["seq"])  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IndexCorruptError(f"the manifest in {self.folder} is malformed ({exc})") from exc
        self._shards = shards
        self._dirty.clear()
        self._saved_pending = {shard: pending_of(index) for shard, index in shards.items()}
        self.seq = seq
        self.store_id = body.get("store_id")  # type: ignore[assignment]
        self.token = body.get("token")  # type: ignore[assignment]
        return True

    def add(self, shard: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.ensure(shard).add(ids, vectors)
        self._dirty.add(shard)

    def remove(self, shard: str, ids: np.ndarray) -> int:
        index = self._shards.get(shard)
        if index is None:
            return 0
        removed = index.remove(ids)
        if removed:
            self._dirty.add(shard)
            if len(index) == 0:
                del self._shards[shard]
        return removed
