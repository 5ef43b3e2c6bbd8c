"""Workload replay through the real SemanticCache, and the per-run embedding cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from semcache.eval.data import IntentGroup, Pair
from semcache.eval.embcache import EmbeddingCache
from semcache.eval.replay import replay, workload_from_groups, workload_from_pairs
from semcache.threshold import StaticThreshold

VECTORS = {
    "q1": [1.0, 0.0, 0.0],
    "q1 paraphrase": [0.99, 0.141, 0.0],  # cos 0.99 with q1, same answer
    "q2 near miss": [0.95, 0.0, 0.312],  # cos 0.95 with q1, different answer
    "q3": [0.0, 0.0, 1.0],
    "q3 paraphrase": [0.0, 0.3, 0.954],  # cos 0.954 with q3, same answer
}
WORKLOAD = [("q1", 0), ("q1 paraphrase", 0), ("q2 near miss", 1), ("q3", 2), ("q3 paraphrase", 2)]


class TableEmbedder:
    """Vectors from a table; counts every text it embeds."""

    model_id = "test:table"
    dim = 3

    def __init__(self) -> None:
        self.embedded: list[str] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded += list(texts)
        m = np.array([VECTORS[t] for t in texts], dtype=np.float32).reshape(len(texts), 3)
        return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_replay_counts_correct_wrong_and_missed(tmp_path: Path) -> None:
    inner = TableEmbedder()
    emb = EmbeddingCache(inner, tmp_path / "emb")
    loose = replay(WORKLOAD, StaticThreshold(0.9), embedder=emb, name="loose")
    assert (loose.lookups, loose.correct_hits, loose.wrong_hits, loose.misses) == (5, 2, 1, 2)
    assert (loose.repeatable, loose.repeatable_answered) == (2, 2)
    assert loose.wrong_examples[0][:2] == ("q2 near miss", "q1")
    assert loose.wrong_per_lookup.value == 0.2
    assert loose.hit_precision.value == 2 / 3
    strict = replay(WORKLOAD, 0.96, embedder=emb, name="strict")
    assert (strict.correct_hits, strict.wrong_hits, strict.misses) == (1, 0, 4)
    assert (strict.repeatable, strict.answered_repeatable.value) == (2, 0.5)
    # Two replays, five distinct texts: each embedded exactly once.
    assert sorted(inner.embedded) == sorted(VECTORS)


def test_embedding_cache_persists_by_model_and_texts(tmp_path: Path) -> None:
    inner = TableEmbedder()
    first = EmbeddingCache(inner, tmp_path)
    m1 = first.preload(list(VECTORS))
    second_inner = TableEmbedder()
    second = EmbeddingCache(second_inner, tmp_path)
    m2 = second.preload(list(VECTORS))
    assert second_inner.embedded == [] and np.array_equal(m1, m2)
    sims = second.pair_similarities(["q1"], ["q1 paraphrase"])
    assert sims[0] == np.float64(np.dot(m1[0], m1[1])).round(6) or abs(sims[0] - 0.99) < 1e-2
    assert second.embed([]).shape == (0, 3)


def test_workload_builders() -> None:
    pairs = [Pair("a", "b", 1), Pair("a", "c", 0), Pair("d", "b", 1)]
    wl = workload_from_pairs(pairs)
    assert [t for t, _ in wl] == ["a", "b", "c", "d"]
    ids = dict(wl)
    assert ids["a"] == ids["b"] == ids["d"] != ids["c"]
    assert sorted(workload_from_pairs(pairs, shuffle=True, seed=1)) == sorted(wl)
    groups = [IntentGroup("x", ("x1", "x2")), IntentGroup("y", ("y1",), "x")]
    wl2 = workload_from_groups(groups, seed=3)
    assert sorted(wl2) == [("x1", 0), ("x2", 0), ("y1", 1)]
    assert len(workload_from_groups(groups, limit=2)) == 2


def test_labelled_wrong_hits_are_split_out(tmp_path: Path) -> None:
    """A wrong hit on a pair the data labels different counts as labelled; others do not."""
    from semcache.eval.replay import labelled_negatives

    negatives = labelled_negatives([Pair("q1", "q2 near miss", 0, "t"), Pair("q1", "q3", 1, "t")])
    assert negatives == {frozenset(("q1", "q2 near miss"))}
    r = replay(WORKLOAD, StaticThreshold(0.9), embedder=TableEmbedder(), negatives=negatives,
               path=tmp_path / "c")  # fmt: skip
    assert r.wrong_hits == 1 and r.wrong_labelled == 1
    r = replay(WORKLOAD, StaticThreshold(0.9), embedder=TableEmbedder(), negatives=set(),
               path=tmp_path / "d")  # fmt: skip
    assert r.wrong_hits == 1 and r.wrong_labelled == 0


def test_fast_replay_matches_the_in_memory_replay() -> None:
    """Neighbours found once, then the same decisions as replay_in_memory, point by point."""
    from semcache.eval.fastreplay import neighbours, replay_neighbours
    from semcache.eval.replay import replay_in_memory

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16))
    texts, vectors = [], {}
    for i in range(400):  # 40 answers, prompts scattered around each, some exact repeats
        g = int(rng.integers(40))
        t = f"prompt {i % 350} of {g}"
        v = centres[g] + rng.normal(scale=0.35, size=16)
        vectors.setdefault(t, (v / np.linalg.norm(v)).astype(np.float32))
        texts.append((t, g))
    nb = neighbours(texts, vectors, depth=32)
    for floor in (0.6, 0.8, 0.9):
        policy = StaticThreshold(floor)
        slow = replay_in_memory(texts, policy, vectors)
        fast = replay_neighbours(nb, floor, lambda i, j, s: True)
        assert (fast.correct_hits, fast.wrong_hits, fast.misses) == (
            slow.correct_hits, slow.wrong_hits, slow.misses,
        )  # fmt: skip
        assert slow.correct_hits + slow.wrong_hits > 0
