"""The stored form of a vector: half precision, read back as a unit float32 vector."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from semcache.errors import StoreError
from semcache.store import SCHEMA_VERSION, Store
from semcache.vectorcodec import decode, decode_many, encode


def _unit(n: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_stored_vector_is_its_original_to_a_few_parts_in_ten_thousand() -> None:
    """769 bytes for 384 dimensions; decoded, a unit vector whose cosine similarity to the
    original, and to any other vector, moves by a few parts in 10,000 at most."""
    vectors, others = _unit(1000), _unit(1000, seed=1)
    blobs = [encode(v) for v in vectors]
    assert {len(b) for b in blobs} == {1 + 2 * 384}
    back = decode_many(blobs)
    assert back.dtype == np.float32
    assert np.allclose(np.linalg.norm(back, axis=1), 1.0, atol=1e-6)
    assert (np.einsum("ij,ij->i", back, vectors) > 0.9999).all()
    moved = np.abs(others @ back.T - others @ vectors.T)
    assert moved.max() < 5e-4
    assert np.array_equal(decode(blobs[3]), back[3])  # one or many: the same bytes, one vector


def test_float32_blobs_written_before_still_decode_even_mixed_with_new_ones() -> None:
    old, new = _unit(2, seed=2)
    back = decode_many([old.tobytes(), encode(new)])
    assert np.allclose(back[0], old, atol=1e-6) and float(back[1] @ new) > 0.9999
    with pytest.raises(ValueError, match="dimensions"):
        decode_many([old.tobytes(), encode(_unit(1, dim=8)[0])])


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """What an older semcache does with a store whose vectors it cannot read: the schema
    number, raised with the half-precision encoding, makes it refuse the store."""
    Store(tmp_path / "s.db").close()
    conn = sqlite3.connect(tmp_path / "s.db")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path / "s.db")
    assert SCHEMA_VERSION >= 7


def test_encoding_a_matrix_is_encoding_each_row() -> None:
    from semcache.vectorcodec import encode_many

    rows = np.random.default_rng(5).standard_normal((7, 384)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    assert encode_many(rows) == [encode(r) for r in rows]
    assert encode_many(np.zeros((0, 384), dtype=np.float32)) == []


def test_an_entry_counts_its_text_in_utf8_bytes_and_new_ids_are_distinct() -> None:
    from semcache.keys import new_uids
    from semcache.store import entry_size

    base = {"uid": "u", "prompt": "abc", "response": "x", "vector": b"\x01" * 9}
    wide = {**base, "prompt": "äbc"}  # one more byte in UTF-8, same length in characters
    assert entry_size(wide, ()) == entry_size(base, ()) + 1
    assert entry_size(base, ("t",)) == entry_size(base, ()) + 1 + 8
    ids = new_uids(1000)
    assert len(set(ids)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
