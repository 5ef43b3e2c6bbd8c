"""Embed each text once per run, with an on-disk ``.npz`` cache keyed by model and content.

Embedding ~100k sentences takes minutes on a laptop CPU, and every policy in a comparison must
see the *same* vectors, so the harness embeds through :class:`EmbeddingCache`: an in-memory
dict for the run, backed by an npz file named after the model id and a hash of the texts.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..embed import Embedder


def default_cache_dir() -> Path:
    """``$SEMCACHE_EVAL_CACHE`` or ``<tmp>/semcache-eval-embeddings``."""
    env = os.environ.get("SEMCACHE_EVAL_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / "semcache-eval-embeddings"


def _digest(model_id: str, texts: Sequence[str]) -> str:
    h = hashlib.sha256(model_id.encode())
    for t in texts:
        h.update(b"\0")
        h.update(t.encode("utf-8"))
    return h.hexdigest()[:24]


class EmbeddingCache:
    """Wraps an embedder: ``embed(texts)`` embeds only texts it has not seen this run.

    ``preload(texts)`` embeds a whole dataset in one batch and stores it on disk, so a second
    run (or another script) with the same model and texts reads the file instead.
    It is itself an :class:`~semcache.embed.Embedder`, so it can be handed to the cache.
    """

    def __init__(
        self,
        embedder: Embedder,
        cache_dir: str | Path | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        batch: int = 512,
    ) -> None:
        self.inner = embedder
        self.model_id: str = embedder.model_id
        self.dim: int = embedder.dim
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._vectors: dict[str, np.ndarray] = {}
        self._progress = progress
        self._batch = batch
        self.computed = 0  # texts actually sent to the model this run

    def __len__(self) -> int:
        return len(self._vectors)

    def preload(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` (unique, in order) via the disk cache; returns their matrix."""
        texts = list(dict.fromkeys(texts))
        if all(t in self._vectors for t in texts):
            return self.embed(texts)
        name = f"{self.model_id.replace('/', '__')}-{_digest(self.model_id, texts)}.npz"
        path = self.cache_dir / name
        if path.is_file():
            with np.load(path) as z:
                mat = np.ascontiguousarray(z["vectors"], dtype=np.float32)
            if mat.shape == (len(texts), self.dim):
                self._vectors.update(zip(texts, mat, strict=True))
                return mat
        mat = self.embed(texts)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, vectors=mat)
        os.replace(tmp, path)
        return mat

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for ``texts`` (any order, duplicates allowed); new texts are embedded once."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        for start in range(0, len(missing), self._batch):
            chunk = missing[start : start + self._batch]
            vecs = self.inner.embed(chunk)
            self._vectors.update(zip(chunk, vecs, strict=True))
            self.computed += len(chunk)
            if self._progress is not None:
                self._progress(min(start + len(chunk), len(missing)), len(missing))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts]).astype(np.float32, copy=False)

    def pair_similarities(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each (a[i], b[i]) (rows are unit vectors).

        Texts not seen this run are embedded here; call :meth:`preload` with a whole dataset
        first to use the on-disk cache.
        """
        va, vb = self.embed(a), self.embed(b)
        return np.einsum("ij,ij->i", va, vb).astype(np.float64)
