"""The embedding model's own word vectors, to tell which word of one prompt has no match in another.

all-MiniLM-L6-v2 starts from a table of 30,522 word-piece vectors (its input embeddings). A
word's vector here is the mean of its pieces' rows, unit length. They are static (no context),
so they are a weak similarity (``buy``/``purchase`` 0.75, ``python``/``java`` 0.26,
``damaged``/``late`` 0.00), but cheap: one table lookup a word, and the verifier only compares
the few words that are on one side of a pair.

The table is read once from the packaged model's ``model.safetensors`` (float16 in memory,
23 MiB) on first use. Without the file or the ``safetensors`` package every lookup returns
None and the features that use it take their neutral value.

A word's *rarity* comes from the same tokenizer: the WordPiece vocabulary lists whole words
roughly from the most to the least frequent, and a word split into several pieces is rarer
than any whole one, so ``log(id) / log(vocabulary size)`` plus a quarter per extra piece is a
free frequency estimate ("the" 0.74, "capital" 0.78, "kenya" 0.87, "rheumatology" 1.42).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Any

import numpy as np

#: Row of the first real word in the vocabulary ([PAD], [unused*], [CLS]... come before).
_FIRST_WORD_ID = 1996


@lru_cache(maxsize=1)
def _table() -> tuple[Any, np.ndarray] | None:
    """(tokenizer, unit-row float16 matrix) of the packaged model, or None when unavailable."""
    try:
        from safetensors.numpy import safe_open
        from tokenizers import Tokenizer

        from .embed import default_model_path

        folder = default_model_path()
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        with safe_open(os.path.join(folder, "model.safetensors"), "np") as fh:
            mat = fh.get_tensor("embeddings.word_embeddings.weight").astype(np.float32)
    except Exception:  # no model files or no safetensors: features fall back to neutral values
        return None
    tok.no_truncation()
    tok.no_padding()
    return tok, mat.astype(np.float16)


def available() -> bool:
    """Whether the model's word vectors could be loaded."""
    return _table() is not None


@lru_cache(maxsize=65536)
def _pieces(word: str) -> tuple[int, ...]:
    table = _table()
    if table is None:
        return ()
    return tuple(table[0].encode(word, add_special_tokens=False).ids)


@lru_cache(maxsize=65536)
def vector(word: str) -> np.ndarray | None:
    """The unit vector of ``word`` (mean of its word pieces' rows), or None."""
    table = _table()
    ids = _pieces(word)
    if table is None or not ids:
        return None
    v = table[1][list(ids)].astype(np.float32).mean(axis=0)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else None


@lru_cache(maxsize=65536)
def rarity(word: str) -> float:
    """A frequency estimate in about [0.65, 2]: higher is rarer (see the module docstring).

    Without the tokenizer every word gets 1.0.
    """
    ids = _pieces(word)
    table = _table()
    if table is None or not ids:
        return 1.0
    size = table[1].shape[0]
    first = max(ids[0], 2)
    return min(2.0, math.log(first) / math.log(size) + 0.25 * (len(ids) - 1))


def best_matches(words: list[str], others: list[str]) -> list[float]:
    """For each of ``words``, its highest cosine with any of ``others`` (-1.0 with none).

    One matrix product of len(words) x len(others) rows; callers cap both lists, so the cost
    is bounded whatever the texts' length.
    """
    if not words:
        return []
    vb = [v for v in (vector(w) for w in others) if v is not None]
    va = [vector(w) for w in words]
    known = [v for v in va if v is not None]
    if not vb or not known:
        return [-1.0] * len(words)
    best = (np.stack(known) @ np.stack(vb).T).max(axis=1).tolist()
    it = iter(best)
    return [-1.0 if v is None else float(next(it)) for v in va]


def mean_vector(words: list[str]) -> np.ndarray | None:
    """The unit mean of the words' vectors (None when none has one)."""
    vs = [v for v in (vector(w) for w in words) if v is not None]
    if not vs:
        return None
    m = np.mean(vs, axis=0)
    norm = float(np.linalg.norm(m))
    return m / norm if norm > 0 else None
