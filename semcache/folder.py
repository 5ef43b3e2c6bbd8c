"""Who has a data folder open: a shared lock per open cache, exclusive for re-embedding.

Every open :class:`~semcache.SemanticCache` holds a shared ``flock`` on ``<folder>/.open``.
Re-embedding the store under another model (``rebuild=True`` with a new embedder) needs the lock
exclusively: while any other cache, in this process or another, has the folder open it would go
on searching with the old model's vectors, so the re-embed is refused instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .errors import StoreBusyError

LOCK_FILE = ".open"


class FolderLock:
    """The shared "open" lock of one data folder, held from open to close."""

    def __init__(self, folder: Path) -> None:
        self._fd: int | None = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    @contextlib.contextmanager
    def exclusive(self, why: str):  # type: ignore[no-untyped-def]
        """Hold the folder alone for the block; StoreBusyError when another cache has it open."""
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # a failed upgrade may have dropped the lock
            raise StoreBusyError(
                f"cannot {why}: another cache (in this or another process) has the folder open; "
                "close it first"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None
