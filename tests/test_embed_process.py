"""The embedder that runs its model in a child process, and the embedding precision option."""

from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np
import pytest

from semcache import SemanticCache
from semcache.embed import (
    DEFAULT_MODEL_ID,
    Embedder,
    SentenceTransformerEmbedder,
    native_bf16,
    resolve_precision,
)
from semcache.embed_process import ProcessEmbedder
from semcache.errors import CacheClosedError, EmbedderError, InvalidInputError, SemcacheError
from tests.fakes import HashEmbedder


def _broken() -> Embedder:
    raise RuntimeError("no model here")


class _Picky(HashEmbedder):
    """Rejects one text the way a real embedder rejects bad input; takes its time on another."""

    def embed(self, texts):  # type: ignore[no-untyped-def]
        if "reject me" in texts:
            raise InvalidInputError("that text is not embeddable")
        if "take your time" in texts:
            time.sleep(30)
        return super().embed(texts)


@pytest.fixture
def hashed() -> ProcessEmbedder:
    with ProcessEmbedder(functools.partial(_Picky, dim=16), torch_threads=0) as emb:
        yield emb


def test_the_real_model_in_a_child_gives_the_same_vectors(
    tmp_path, embedder: SentenceTransformerEmbedder
) -> None:
    texts = ["What is the capital of France?", "How do I reset my password?"]
    with ProcessEmbedder(functools.partial(SentenceTransformerEmbedder)) as emb:
        assert isinstance(emb, Embedder)
        assert (emb.model_id, emb.dim) == (DEFAULT_MODEL_ID, 384)
        assert emb.pid is not None and emb.pid != os.getpid()
        got = emb.embed(texts)
        assert got.dtype == np.float32 and got.shape == (2, 384)
        np.testing.assert_allclose(got, embedder.embed(texts), atol=1e-5)

        cache = SemanticCache(tmp_path / "c", embedder=emb)
        cache.store("What is the capital of France?", "Paris")
        hit = cache.lookup("What's France's capital city?")
        assert hit is not None and hit.response == "Paris"
        assert cache.lookup("What is the capital of Germany?") is None
        assert cache.verify() == []
        cache.close()


def test_a_child_found_dead_is_replaced_before_the_call(hashed: ProcessEmbedder) -> None:
    before = hashed.embed(["alpha beta"])
    old = hashed.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while hashed._proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    # The dead child is noticed before the call and replaced; the answer is unchanged.
    np.testing.assert_allclose(hashed.embed(["alpha beta"]), before)
    assert hashed.pid != old and hashed.restarts == 1


def test_a_child_killed_mid_call_raises_a_typed_error(hashed: ProcessEmbedder) -> None:
    assert hashed._conn is not None
    os.kill(hashed.pid, signal.SIGKILL)  # type: ignore[arg-type]
    hashed._proc.join(timeout=10)
    hashed._proc.is_alive = lambda: True  # type: ignore[method-assign]  # too late to notice
    with pytest.raises(EmbedderError, match="died while embedding"):
        hashed.embed(["alpha"])
    del hashed._proc.is_alive
    assert hashed.embed(["alpha"]).shape == (1, 16)  # the next call starts a new child


def test_an_interrupted_call_never_hands_its_reply_to_the_next(hashed: ProcessEmbedder) -> None:
    old = hashed._proc
    conn = hashed._conn
    assert conn is not None

    def interrupted() -> object:
        raise KeyboardInterrupt

    conn.recv = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        hashed.embed(["first call"])
    assert not old.is_alive()  # its reply was still coming: that child is out of step
    got = hashed.embed(["second call"])
    np.testing.assert_allclose(got, HashEmbedder(dim=16).embed(["second call"]), atol=1e-6)
    assert hashed.restarts == 1


def test_close_ends_a_call_in_flight(hashed: ProcessEmbedder) -> None:
    import threading

    outcome: list[BaseException] = []

    def call() -> None:
        try:
            hashed.embed(["take your time"])
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.3)  # the child is now sleeping on the request
    proc = hashed._proc
    hashed.close()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], CacheClosedError)
    assert not proc.is_alive()


def test_bad_input_is_typed_and_harmless(hashed: ProcessEmbedder) -> None:
    with pytest.raises(InvalidInputError):
        hashed.embed("one string")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="not embeddable"):
        hashed.embed(["fine", "reject me"])
    with pytest.raises(InvalidInputError, match="must be str"):
        hashed.embed(["fine", 3])  # type: ignore[list-item]
    assert hashed.embed([]).shape == (0, 16)
    assert hashed.embed(["still fine"]).shape == (1, 16)
    assert hashed.restarts == 0


def test_a_model_that_fails_to_load_raises_at_construction() -> None:
    with pytest.raises(EmbedderError, match="no model here"):
        ProcessEmbedder(_broken, torch_threads=0)
    with pytest.raises(EmbedderError, match="could not start"):
        ProcessEmbedder(lambda: HashEmbedder(), torch_threads=0)  # cannot be sent to a child


def test_closed_embedder_refuses_work_and_stops_its_child() -> None:
    emb = ProcessEmbedder(functools.partial(HashEmbedder, dim=8), torch_threads=0)
    proc = emb._proc
    emb.close()
    emb.close()  # idempotent
    assert not proc.is_alive()
    with pytest.raises(CacheClosedError):
        emb.embed(["x"])


def test_precision_names_are_checked() -> None:
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") == ("bf16" if native_bf16() else "fp32")
    assert resolve_precision("auto", device="cuda") == "fp32"
    with pytest.raises(InvalidInputError, match="precision"):
        resolve_precision("fp8")
    with pytest.raises(InvalidInputError):
        SentenceTransformerEmbedder(precision="half")  # type: ignore[arg-type]


def test_bf16_vectors_stay_next_to_fp32(embedder: SentenceTransformerEmbedder) -> None:
    # bf16 runs anywhere (emulated where the CPU lacks it, only slower); "auto" picks it
    # only where it is native.
    texts = [
        "Convert 5 miles to km",
        "Convert 5 km to miles",
        "How do I sort a Python list descending?",
        "How do I sort a Python list ascending?",
        "Write an apology email to a customer for a late delivery",
        "Write an apology email to a customer for a damaged item",
        "What is the capital of France?",
        "What is the capital of Germany?",
    ]
    fast = SentenceTransformerEmbedder(precision="bf16")
    assert fast.model_id == embedder.model_id  # the same model: vectors may share a store
    a, b = embedder.embed(texts), fast.embed(texts)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-6)
    assert float((a * b).sum(axis=1).min()) > 0.9999
    # What a cache decides on: the similarity of two prompts moves by far less than the gap
    # between any threshold and the near misses it separates.
    moved = np.abs(a[0::2] @ a[1::2].T - b[0::2] @ b[1::2].T)
    assert float(moved.max()) < 0.005


def test_a_failed_open_stops_the_model_process(tmp_path) -> None:
    import multiprocessing

    from semcache.server.app import _open_cache
    from semcache.server.settings import Settings

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("not a cache")
    with pytest.raises(SemcacheError):
        _open_cache(Settings(data=not_a_folder, embed_process=True, batching=True))
    assert multiprocessing.active_children() == []
