"""Small fakes that speed up unit tests beside the real-model tests (never instead of them)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np


class HashEmbedder:
    """A deterministic bag-of-words embedder: texts sharing words are similar, others are not.

    It satisfies the Embedder protocol, counts its calls, and needs no model.
    """

    def __init__(self, dim: int = 64, model_id: str = "test:hash") -> None:
        self.dim = dim
        self.model_id = model_id
        self.calls = 0
        self.texts = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
                rng = np.random.default_rng(h)
                out[row] += rng.standard_normal(self.dim).astype(np.float32)
            if not out[row].any():
                out[row, 0] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)
