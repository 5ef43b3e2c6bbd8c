"""Workload replay: prompts in order through the real ``SemanticCache``, as a user sees them.

Each prompt carries an answer id (texts that share an answer share the id). On a lookup:
a hit whose stored answer has the prompt's id is a *correct hit*, any other hit a *wrong hit*
(a wrong answer served), and no hit is a *miss*, after which the prompt and its answer are
stored. A prompt is *repeatable* when an entry with its answer id was stored before it: only
those can be answered correctly, so the hit rate is reported over them.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..embed import Embedder
from ..threshold import HitPolicy
from .data import IntentGroup, Pair, pairs_to_groups
from .metrics import Rate

Workload = list[tuple[str, int]]


@dataclass
class ReplayResult:
    """Counts from one replay, and the rates a user would see."""

    policy: str
    lookups: int = 0
    correct_hits: int = 0
    wrong_hits: int = 0
    misses: int = 0
    repeatable: int = 0
    repeatable_answered: int = 0
    wrong_labelled: int = 0  # wrong hits on a pair the data labels as different answers
    seconds: float = 0.0
    wrong_examples: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def wrong_per_lookup(self) -> Rate:
        """Share of all lookups that were served a wrong answer."""
        return Rate.of(self.wrong_hits, self.lookups)

    @property
    def wrong_labelled_per_lookup(self) -> Rate:
        """Share of lookups served the answer of a prompt *labelled* different from theirs.

        The rest of :attr:`wrong_per_lookup` are hits between prompts no pair compares: their
        answer ids differ only because nothing links them (near-identical captions in STS-B,
        duplicate questions QQP never paired), so they may or may not be wrong.
        """
        return Rate.of(self.wrong_labelled, self.lookups)

    @property
    def answered_repeatable(self) -> Rate:
        """Share of repeatable prompts answered correctly from the cache."""
        return Rate.of(self.repeatable_answered, self.repeatable)

    @property
    def hit_precision(self) -> Rate:
        """Share of served hits that were correct."""
        return Rate.of(self.correct_hits, self.correct_hits + self.wrong_hits)


def workload_from_pairs(
    pairs: Sequence[Pair], *, shuffle: bool = False, seed: int = 0, limit: int | None = None
) -> Workload:
    """Texts in pair order (``a`` then ``b``), each once, with answer ids from the positives.

    Pair order puts each ``b`` right after its partner, the hardest order for near misses;
    ``shuffle`` gives a random arrival order instead.
    """
    groups = pairs_to_groups(pairs)
    texts = list(dict.fromkeys(t for p in pairs for t in (p.a, p.b)))
    if shuffle:
        random.Random(seed).shuffle(texts)
    if limit is not None:
        texts = texts[:limit]
    return [(t, groups[t]) for t in texts]


def labelled_negatives(pairs: Sequence[Pair]) -> set[frozenset[str]]:
    """The text pairs labelled as needing different answers (label 0)."""
    return {frozenset((p.a, p.b)) for p in pairs if p.label == 0}


def workload_from_groups(
    groups: Sequence[IntentGroup], *, seed: int = 0, limit: int | None = None
) -> Workload:
    """All prompts of all intent groups in a seeded random order; the id is the group."""
    items = [(p, i) for i, g in enumerate(groups) for p in dict.fromkeys(g.prompts)]
    random.Random(seed).shuffle(items)
    return items[:limit] if limit is not None else items


def replay(
    workload: Workload,
    policy: HitPolicy | float,
    *,
    embedder: Embedder,
    name: str | None = None,
    path: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    keep_examples: int = 20,
    feedback: bool = False,
    negatives: set[frozenset[str]] | None = None,
) -> ReplayResult:
    """Replay ``workload`` through a fresh ``SemanticCache`` using ``policy``.

    Only the public API is used: ``lookup(prompt, threshold=policy)`` then, on a miss,
    ``store(prompt, answer)``. Pass an :class:`~.embcache.EmbeddingCache` as ``embedder`` so
    texts are embedded once per run however many policies replay the same workload.
    With ``feedback=True`` every served hit is reported back through ``cache.feedback`` as a
    user who notices wrong answers would, so per-entry floors are learned as the replay goes.
    ``negatives`` (pairs of texts labelled different, see :func:`labelled_negatives`) splits
    out the wrong hits the data itself labels wrong (:attr:`ReplayResult.wrong_labelled`).
    """
    from .. import SemanticCache

    result = ReplayResult(name or repr(policy))
    stored_ids: set[int] = set()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="semcache-replay-") as tmp:
        folder = Path(path) if path is not None else Path(tmp) / "cache"
        with SemanticCache(folder, embedder=embedder, threshold=policy, l1_size=0) as cache:
            for i, (prompt, answer) in enumerate(workload):
                repeatable = answer in stored_ids
                result.lookups += 1
                result.repeatable += repeatable
                hit = cache.lookup(prompt, threshold=policy)
                if hit is None:
                    result.misses += 1
                    cache.store(prompt, f"answer:{answer}")
                    stored_ids.add(answer)
                elif hit.response == f"answer:{answer}":
                    result.correct_hits += 1
                    result.repeatable_answered += 1
                    if feedback:
                        cache.feedback(hit.entry_id, True)
                else:
                    result.wrong_hits += 1
                    if negatives is not None and frozenset((prompt, hit.prompt)) in negatives:
                        result.wrong_labelled += 1
                    if feedback:
                        cache.feedback(hit.entry_id, False, similarity=hit.similarity)
                    if len(result.wrong_examples) < keep_examples:
                        result.wrong_examples.append((prompt, hit.prompt, hit.similarity))
                if progress is not None and (i % 200 == 0 or i == len(workload) - 1):
                    progress(i + 1, len(workload))
    result.seconds = time.perf_counter() - t0
    return result


def replay_in_memory(
    workload: Workload,
    policy: HitPolicy,
    vectors: dict[str, np.ndarray] | Embedder,
    *,
    k: int = 4,
    name: str | None = None,
) -> ReplayResult:
    """The same replay as :func:`replay`, with the cache's decision rule but no store.

    Exact repeats hit; otherwise the ``k`` most similar stored prompts at or above
    ``policy.min_similarity`` are offered to the policy, most similar first, and the first it
    accepts is served; a miss stores the prompt. It is for sweeping many operating points
    quickly (``evals/choose_default.py``); figures that are reported come from :func:`replay`
    through the real cache.
    """
    texts = [t for t, _ in workload]
    if isinstance(vectors, dict):
        mat = np.stack([vectors[t] for t in texts]).astype(np.float32)
    else:
        mat = np.asarray(vectors.embed(texts), dtype=np.float32)
    result = ReplayResult(name or repr(policy))
    store = np.zeros_like(mat)  # stored vectors, in the order they were stored
    stored_rows: list[int] = []
    stored_text: dict[str, int] = {}
    stored_ids: set[int] = set()
    t0 = time.perf_counter()
    for i, (prompt, answer) in enumerate(workload):
        repeatable = answer in stored_ids
        result.lookups += 1
        result.repeatable += repeatable
        served: int | None = None
        if prompt in stored_text:
            served = workload[stored_text[prompt]][1]
        elif stored_rows:
            sims = store[: len(stored_rows)] @ mat[i]
            top = np.argsort(-sims)[:k] if len(sims) > k else np.argsort(-sims)
            for j in top:
                sim = float(sims[j])
                if sim < policy.min_similarity:
                    break
                row = stored_rows[int(j)]
                if policy.accept(prompt, workload[row][0], min(sim, 1.0)):
                    served = workload[row][1]
                    break
        if served is None:
            result.misses += 1
            store[len(stored_rows)] = mat[i]
            stored_rows.append(i)
            stored_text[prompt] = i
            stored_ids.add(answer)
        elif served == answer:
            result.correct_hits += 1
            result.repeatable_answered += 1
        else:
            result.wrong_hits += 1
    result.seconds = time.perf_counter() - t0
    return result
