"""An embedder that runs its model in a child process.

A model forward pass in a thread of a busy Python server is slowed down by that server's own
Python work: torch hands the GIL back and forth between every operator, and each hand-back waits
for whichever thread holds it. Measured on the 2-core sidecar under 32 clients, a batch of 13
prompts took 103 ms in-process against 37 ms alone. :class:`ProcessEmbedder` moves the model into
a child process with its own interpreter, so the model computes at full speed while the server
parses HTTP, searches the index and talks to SQLite.

It is an :class:`~semcache.embed.Embedder`: ``embed(texts)`` sends the texts over a pipe and waits
for the vectors (one call at a time; wrap it in a
:class:`~semcache.batching.BatchingEmbedder` to serve many callers). The child is built from a
picklable factory (e.g. ``functools.partial(SentenceTransformerEmbedder, precision="bf16")``).
If the child dies, the next call starts a new one; a model that fails to load raises
:class:`~semcache.errors.EmbedderError` at construction.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from .embed import Embedder, check_texts
from .errors import CacheClosedError, EmbedderError, InvalidInputError

log = logging.getLogger(__name__)

EmbedderFactory = Callable[[], Embedder]


def _serve(conn: Connection, factory: EmbedderFactory, torch_threads: int) -> None:
    """The child: build the embedder, then answer ``texts -> vectors`` until told to stop."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when the child
    # stops (close(), or its own death closing the pipe), so the child ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    try:
        embedder = factory()
    except BaseException as exc:  # reported to the parent, which raises it as EmbedderError
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    precision = getattr(embedder, "precision", None)
    conn.send(("ready", (embedder.model_id, int(embedder.dim), precision)))
    while True:
        try:
            texts = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if texts is None:
            return
        try:
            vectors = np.ascontiguousarray(embedder.embed(texts), dtype=np.float32)
        except Exception as exc:
            reply: tuple[str, Any] = ("error", f"{type(exc).__name__}: {exc}")
            if isinstance(exc, InvalidInputError):
                reply = ("invalid", str(exc))
        else:
            reply = ("ok", vectors)
        conn.send(reply)


def _discard(proc: Any, conn: Connection | None) -> None:
    """Close a child's pipe and make sure the child is gone (it is no longer trusted)."""
    if conn is not None:
        conn.close()
    if proc.is_alive():
        proc.kill()
    proc.join(timeout=5)


class ProcessEmbedder:
    """An :class:`~semcache.embed.Embedder` whose model lives in a child process.

    ``factory`` builds the real embedder in the child and must be picklable (the child is
    spawned, not forked, so no lock or thread of the parent leaks into it). ``torch_threads``:
    intra-op threads of the child's torch (0 leaves torch's default). ``model_id``, ``dim`` and
    ``precision`` (None when the child embedder has none) are the child embedder's.
    ``close()`` stops the child; it also exits by itself when the parent dies. As with any
    spawned process, a script that creates one at import time needs an
    ``if __name__ == "__main__":`` guard.
    """

    def __init__(
        self,
        factory: EmbedderFactory,
        *,
        torch_threads: int = 1,
        start_timeout: float = 300.0,
    ) -> None:
        self._factory = factory
        self._torch_threads = int(torch_threads)
        self._start_timeout = float(start_timeout)
        self._lock = threading.Lock()
        self._closed = False
        self._proc: Any = None
        self._conn: Connection | None = None
        self.precision: str | None = None
        self.model_id, self.dim = self._start()
        self.restarts = 0

    def _start(self) -> tuple[str, int]:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_serve,
            args=(child, self._factory, self._torch_threads),
            name="semcache-embedder",
            daemon=True,
        )
        try:
            proc.start()
        except Exception as exc:  # a factory that cannot be pickled, no processes left...
            parent.close()
            child.close()
            raise EmbedderError(
                f"the embedding process could not start: {type(exc).__name__}: {exc}"
            ) from exc
        child.close()
        try:
            if not parent.poll(self._start_timeout):
                raise EmbedderError(
                    f"the embedding process did not start within {self._start_timeout:.0f}s"
                )
            kind, info = parent.recv()
        except (EOFError, OSError) as exc:
            _discard(proc, parent)
            raise EmbedderError(
                f"the embedding process died while starting (exit code {proc.exitcode}); "
                "a script that starts one needs an `if __name__ == '__main__':` guard"
            ) from exc
        except BaseException:
            _discard(proc, parent)
            raise
        if kind != "ready":
            _discard(proc, parent)
            raise EmbedderError(f"the embedding model failed to load in its process: {info}")
        self._proc, self._conn = proc, parent
        model_id, dim, self.precision = info
        return str(model_id), int(dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in the child: float32 rows, one per text, as the child's embedder
        returns them. A child that died before the call is replaced first; one that dies during
        it fails this call with :class:`~semcache.errors.EmbedderError`."""
        items = check_texts(texts)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            if self._closed:
                raise CacheClosedError("the embedding process is closed")
            if self._conn is None or not self._proc.is_alive():
                self._restart()
            conn, proc = self._conn, self._proc
            assert conn is not None
            try:
                conn.send(items)
                while not conn.poll(0.1):  # poll also wakes on EOF: a dead child ends the wait
                    if self._closed:
                        raise CacheClosedError("the embedding process was closed during the call")
                kind, payload = conn.recv()
            except (EOFError, OSError) as exc:
                # The child died mid-call (killed, out of memory): this call fails, the next
                # one starts a new child.
                self._conn = None
                _discard(proc, conn)
                raise EmbedderError(
                    f"the embedding process died while embedding ({type(exc).__name__})"
                ) from exc
            except BaseException:
                # Interrupted between request and reply: the reply would answer the next call,
                # so this child is out of step and must go.
                self._conn = None
                _discard(proc, conn)
                raise
        if kind == "invalid":
            raise InvalidInputError(payload)
        if kind != "ok":
            raise EmbedderError(f"the embedding model failed: {payload}")
        return payload  # type: ignore[no-any-return]

    def _restart(self) -> None:
        log.warning("the embedding process is gone; starting a new one")
        self._stop_child()
        model_id, dim = self._start()
        if (model_id, dim) != (self.model_id, self.dim):  # pragma: no cover - same factory
            raise EmbedderError("the restarted embedding process has another model")
        self.restarts += 1

    def _stop_child(self) -> None:
        """Ask the child to stop, and end it if it does not within seconds."""
        conn, proc, self._conn = self._conn, self._proc, None
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        if proc is not None:
            proc.join(timeout=10)
            _discard(proc, conn)
        elif conn is not None:
            conn.close()

    @property
    def pid(self) -> int | None:
        """The child's process id (for tests and operators)."""
        return None if self._proc is None else int(self._proc.pid)

    def close(self) -> None:
        """Stop the child process; idempotent. Later calls raise CacheClosedError.

        A call in flight ends within a tenth of a second (with CacheClosedError); if the
        lock is still held after 10 s (a child wedged while starting), the child is killed.
        """
        if self._closed:
            return
        self._closed = True
        if self._lock.acquire(timeout=10):
            try:
                self._stop_child()
            finally:
                self._lock.release()
        elif self._proc is not None and self._proc.is_alive():  # pragma: no cover - wedged
            self._proc.kill()

    def __enter__(self) -> ProcessEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ProcessEmbedder(model_id={self.model_id!r}, dim={self.dim}, pid={self.pid})"


__all__ = ["EmbedderFactory", "ProcessEmbedder"]
