"""How an entry's vector is kept in the store of record: half precision, one copy.

The store is the only place a vector is kept on disk (index files hold the graph, not the
vectors), so its encoding sets the disk cost of every entry. Half precision halves it: 384
dimensions take 769 bytes instead of 1,536, and rounding a unit vector's components to float16
moves a cosine similarity by a few parts in 10,000 at most, far below any threshold's
resolution. Decoding renormalises in float32, so every reader (a replica following the log, a
rebuild, :meth:`~semcache.cache.SemanticCache.verify`) gets the same unit vector from the same
bytes.

A blob is one tag byte then the float16 components, so its length is odd; blobs written before
this encoding are the raw float32 components (a multiple of 4 bytes) and still decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The first byte of a half-precision blob.
FP16 = b"\x01"


def encode(vector: np.ndarray) -> bytes:
    """The stored form of one unit vector."""
    return FP16 + np.ascontiguousarray(vector, dtype=np.float16).tobytes()


def encode_many(matrix: np.ndarray) -> list[bytes]:
    """The stored form of each row of a matrix of unit vectors (as :func:`encode` gives)."""
    halves = np.ascontiguousarray(matrix, dtype=np.float16)
    return [FP16 + row.tobytes() for row in halves]


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    norms[norms == 0] = 1.0
    matrix /= norms[:, None]
    return matrix


def decode(blob: bytes | memoryview) -> np.ndarray:
    """The unit float32 vector a blob holds."""
    return decode_many([blob])[0]


def decode_many(blobs: Sequence[bytes | memoryview]) -> np.ndarray:
    """One unit float32 row per blob (blobs of one dimension; either encoding, or a mix)."""
    if not len(blobs):
        return np.zeros((0, 0), dtype=np.float32)
    size = len(blobs[0])
    if size % 2 == 1 and all(len(b) == size and b[0] == FP16[0] for b in blobs):
        halves = np.frombuffer(b"".join(b[1:] for b in blobs), dtype=np.float16)
        return _unit(halves.reshape(len(blobs), -1).astype(np.float32))
    rows = [
        np.frombuffer(b[1:], dtype=np.float16).astype(np.float32)
        if len(b) % 2 == 1
        else np.frombuffer(b, dtype=np.float32).copy()
        for b in blobs
    ]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("stored vectors of different dimensions")
    return _unit(np.stack(rows))
