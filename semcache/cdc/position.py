"""The consumer's durable position: the end LSN of the last transaction whose invalidations
were committed to the cache.

One small JSON file per slot, in the cache's data folder (``<cache path>/cdc/<slot>.json``),
replaced atomically (write a temporary file, fsync, rename, fsync the folder), so after a crash
it holds either the old or the new position, never a torn one. The consumer writes it after
the cache committed a transaction's invalidations and before it confirms the position to
PostgreSQL; on restart it skips transactions that end at or before it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ReplicationError
from .pgoutput import lsn_to_str


@dataclass(frozen=True)
class Position:
    """What the position file records."""

    slot: str
    system_id: str  # pg_control_system().system_identifier: which cluster
    database: str  # which database the slot decodes
    lsn: int  # end LSN of the last applied transaction (or the slot's creation point)
    transactions: int = 0  # applied transactions so far, for diagnostics
    updated_at: float = 0.0
    flush_pending: bool = False  # a lost slot's recovery (new slot + flush) is under way

    @property
    def lsn_text(self) -> str:
        return lsn_to_str(self.lsn)


class PositionStore:
    """Reads and atomically replaces the position file of one slot."""

    def __init__(self, folder: str | os.PathLike[str], slot: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / f"{slot}.json"
        self.slot = slot

    def load(self) -> Position | None:
        """The recorded position, or None when none was ever recorded."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ReplicationError(f"cannot read the CDC position {self.path}: {exc}") from exc
        try:
            data: dict[str, Any] = json.loads(raw)
            return Position(
                slot=str(data["slot"]),
                system_id=str(data["system_id"]),
                database=str(data["database"]),
                lsn=int(data["lsn"]),
                transactions=int(data.get("transactions", 0)),
                updated_at=float(data.get("updated_at", 0.0)),
                flush_pending=bool(data.get("flush_pending", False)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplicationError(
                f"the CDC position file {self.path} is unreadable ({exc}); it must be repaired "
                "or removed, and after removing it the cache should be flushed"
            ) from exc

    def save(self, position: Position) -> None:
        """Durably replace the recorded position (atomic rename, fsynced)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        data = asdict(position)
        data["lsn_text"] = position.lsn_text
        data["updated_at"] = position.updated_at or time.time()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(data, fh, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.folder)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ReplicationError(f"cannot record the CDC position in {self.path}: {exc}") from exc

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        _fsync_dir(self.folder)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
