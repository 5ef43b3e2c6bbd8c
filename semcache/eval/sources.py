"""Where the labelled data lives, and which of it may be used for what.

Shippable sets (``banking77_pairs``, ``gptcache_mock``, our hand-written near-miss intents) are
bundled under ``semcache/data``; PAWS-Wiki is shippable too but read from the shared data
folder. QQP, MRPC and STS-B are *evaluation only*: they are read from the shared folder at eval
time, never copied into the package, and never used to train or tune anything we ship.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import Pair, groups_to_pairs, load_intent_groups, load_pairs

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"

#: Sets a shipped model or default may be trained or calibrated on.
TRAINABLE = ("banking77_pairs", "gptcache_mock", "paws_wiki", "near_miss_intents")
#: Sets we only ever evaluate on.
EVAL_ONLY = ("qqp_gptcache", "mrpc", "stsb")


def shared_data_dir() -> Path:
    """``$SEMCACHE_DATA_DIR``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("SEMCACHE_DATA_DIR")
    if env:
        return Path(env)
    return PACKAGE_DATA.parent.parent.parent / "shared" / "data"


def dataset_path(name: str) -> Path:
    """The JSONL file of a named dataset (bundled copy first, then the shared folder)."""
    bundled = PACKAGE_DATA / name / "pairs.jsonl"
    if bundled.is_file():
        return bundled
    if name == "near_miss_intents":
        return PACKAGE_DATA / "near_miss_intents.jsonl"
    folder = shared_data_dir() / name
    for fname in ("pairs.jsonl", "dev.jsonl", "test.jsonl"):
        if (folder / fname).is_file():
            return folder / fname
    return folder / "pairs.jsonl"


def load_named(name: str) -> list[Pair]:
    """Pairs of a named dataset; the hand-written intents are expanded into pairs."""
    if name == "near_miss_intents":
        return groups_to_pairs(load_intent_groups(dataset_path(name)), source="near_miss_intents")
    return load_pairs(dataset_path(name))


def mine_retrieval_negatives(
    pairs: list[Pair], vectors_a: np.ndarray, vectors_b: np.ndarray, *, source: str
) -> list[Pair]:
    """For positives-only sets (GPTCache's mock data): each ``b``'s nearest *other* ``a``.

    The mock data is used as retrieval (store every ``a``, look up every ``b``), so the
    dangerous negative for ``b`` is whichever other stored prompt is closest to it.
    """
    uniq_a: dict[str, int] = {}
    for p in pairs:
        uniq_a.setdefault(p.a, len(uniq_a))
    a_texts = list(uniq_a)
    idx = [uniq_a[p.a] for p in pairs]
    mat_a = np.zeros((len(a_texts), vectors_a.shape[1]), dtype=np.float32)
    for i, row in zip(idx, vectors_a, strict=True):
        mat_a[i] = row
    sims = vectors_b @ mat_a.T
    out: list[Pair] = []
    positives = {(p.a, p.b) for p in pairs}
    for row, p in enumerate(pairs):
        order = np.argsort(-sims[row])
        for j in order[:3]:
            cand = a_texts[int(j)]
            if cand != p.a and (cand, p.b) not in positives:
                out.append(Pair(cand, p.b, 0, source))
                break
    return out
