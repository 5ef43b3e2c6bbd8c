"""The set of per-shard vector indexes, and its persistence in the data folder.

A shard is one exact scope at one namespace version: a lookup only ever searches its own shard,
so scope isolation is structural and a busy tenant never crowds another's neighbours out of the
top k. The set is saved as one file per shard plus ``manifest.json``, which records the model,
the dimension and the change-log sequence number the files reflect; opening replays only later
changes. Files are written to a temporary name, fsynced and renamed, so a crash leaves either
the old or the new version, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import IndexCorruptError
from .index import VectorIndex, load_index

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


def _file_name(shard: str) -> str:
    return hashlib.sha256(shard.encode()).hexdigest()[:32] + ".idx"


class ShardSet:
    """Per-shard indexes with a dirty set, saved and loaded as a unit."""

    def __init__(self, folder: Path, dim: int, model_id: str, factory: IndexFactory) -> None:
        self.folder = folder
        self.dim = dim
        self.model_id = model_id
        self._factory = factory
        self._shards: dict[str, VectorIndex] = {}
        self._dirty: set[str] = set()
        self.seq = 0  # last change-log seq reflected in the indexes
        self._lock_file: int | None = None

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
        self._dirty.update(self._shards)
        self._shards.clear()

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
    def save(self) -> None:
        """Write dirty shards and then the manifest (the manifest is the commit point)."""
        try:
            manifest = self._read_manifest() or {}
        except IndexCorruptError:  # damaged on disk: write every shard afresh
            manifest = {}
            self._dirty.update(self._shards)
        files: dict[str, dict[str, object]] = dict(manifest.get("shards", {}))  # type: ignore[arg-type]
        for shard in sorted(self._dirty):
            name = _file_name(shard)
            index = self._shards.get(shard)
            if index is None or len(index) == 0:
                files.pop(shard, None)
                continue
            data = index.to_bytes()
            _atomic_write(self.folder / name, data)
            files[shard] = {
                "file": name,
                "count": len(index),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        body = {
            "format": FORMAT,
            "model_id": self.model_id,
            "dim": self.dim,
            "seq": self.seq,
            "shards": files,
        }
        _atomic_write(self.folder / MANIFEST, json.dumps(body, indent=1).encode())
        keep = {meta["file"] for meta in files.values()}  # type: ignore[index]
        for path in self.folder.glob("*.idx"):
            if path.name not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()
        self._dirty.clear()

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
            raise IndexCorruptError(
                f"{path} is unreadable ({exc}); open with rebuild=True to rebuild the index from "
                "the store, or delete the index folder"
            ) from exc

    def load(self) -> bool:
        """Load the persisted shards; False when there is nothing persisted."""
        body = self._read_manifest()
        if body is None:
            return False
        if body.get("model_id") != self.model_id or body.get("dim") != self.dim:
            raise IndexCorruptError(
                f"the index in {self.folder} was built with {body.get('model_id')!r} "
                f"(dim {body.get('dim')}), not {self.model_id!r} (dim {self.dim}); open with "
                "rebuild=True to rebuild it from the store"
            )
        shards: dict[str, VectorIndex] = {}
        for shard, meta in body["shards"].items():  # type: ignore[union-attr]
            path = self.folder / meta["file"]
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise IndexCorruptError(
                    f"index file {path} is missing ({exc}); open with rebuild=True"
                ) from exc
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise IndexCorruptError(
                    f"index file {path} does not match its checksum: it is damaged or foreign; "
                    "open with rebuild=True to rebuild the index from the store"
                )
            index = load_index(data)
            if index.dim != self.dim:
                raise IndexCorruptError(f"index file {path} has dimension {index.dim}")
            shards[shard] = index
        self._shards = shards
        self._dirty.clear()
        self.seq = int(body["seq"])  # type: ignore[call-overload]
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
