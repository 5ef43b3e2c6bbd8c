"""Generated near-miss families: deterministic, split without leaks, and the shipped file."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from semcache.errors import InvalidInputError
from semcache.eval.families import (
    KINDS,
    TEMPLATES,
    generate,
    load_families,
    save_families,
    to_groups,
    to_pairs,
)
from semcache.eval.replay import (
    replay,
    replay_in_memory,
    workload_from_groups,
)
from semcache.eval.sources import PACKAGE_DATA
from semcache.nearmiss import GuardedPolicy
from semcache.threshold import StaticThreshold

from .fakes import HashEmbedder

SHIPPED = PACKAGE_DATA / "near_miss_families.jsonl"


def test_the_shipped_file_is_what_the_generator_writes(tmp_path: Path) -> None:
    save_families(generate(), tmp_path / "f.jsonl")
    assert (tmp_path / "f.jsonl").read_bytes() == SHIPPED.read_bytes()


def test_splits_share_no_prompt_and_test_uses_held_out_templates() -> None:
    families = load_families(SHIPPED)
    assert {f.kind for f in families} == set(KINDS)
    prompts: dict[str, str] = {}
    for f in families:
        assert len(f.groups) == 2 and all(len(g) == 4 for g in f.groups)
        for g in f.groups:
            for p in g:
                assert prompts.setdefault(p, f.split) == f.split  # no prompt on two sides
    assert len(prompts) == sum(len(g) for f in families for g in f.groups)  # all distinct
    for split in ("train", "validation", "test"):
        assert {f.kind for f in families if f.split == split} == set(KINDS)
    # test families come only from the last template of each kind, and only they do
    held_out = {TEMPLATES[k][-1](random.Random(0))[0].split()[0] for k in KINDS}
    assert len(held_out) == len(KINDS)
    for f in families:
        template = f.name.split(":", 1)[1].split()[0]
        assert (template in held_out) is (f.split == "test"), f.name


def test_pairs_and_groups() -> None:
    fam = load_families(SHIPPED, split="validation")[:3]
    pairs = to_pairs(fam)
    assert sum(p.label for p in pairs) == 3 * 2 * 6  # C(4, 2) positives per group
    assert sum(1 - p.label for p in pairs) == 3 * 16  # 4 x 4 negatives per family
    groups = to_groups(fam)
    assert len(groups) == 6 and groups[1].near_miss_of == groups[0].intent


def test_bad_files_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        load_families(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"family": "x", "kind": "nope", "split": "test"}\n')
    with pytest.raises(InvalidInputError):
        load_families(tmp_path / "bad.jsonl")
    with pytest.raises(InvalidInputError):
        load_families(SHIPPED, split="dev")
    with pytest.raises(InvalidInputError):
        generate(validation=1.5)


class _WordOrderEmbedder(HashEmbedder):
    """The bag-of-words embedder plus a small part drawn from the whole text.

    Two phrasings with the same words ("What is 5 km in miles" / "What is 5 miles in km")
    would otherwise get one vector, and the order in which tied candidates are offered is the
    index's own, which an in-memory replay cannot reproduce.
    """

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = super().embed(texts)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
            out[row] += 0.1 * np.random.default_rng(seed).standard_normal(self.dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_in_memory_replay_matches_the_cache(tmp_path: Path) -> None:
    """replay_in_memory makes the same decisions as a replay through SemanticCache."""
    wl = workload_from_groups(to_groups(load_families(SHIPPED, split="validation")[:40]), seed=0)
    emb = _WordOrderEmbedder()
    for policy in (StaticThreshold(0.6), GuardedPolicy(StaticThreshold(0.6))):
        real = replay(wl, policy, embedder=emb, path=tmp_path / repr(id(policy)))
        fast = replay_in_memory(wl, policy, emb)
        assert (fast.correct_hits, fast.wrong_hits, fast.misses) == (
            real.correct_hits, real.wrong_hits, real.misses
        )  # fmt: skip
        assert real.correct_hits + real.wrong_hits > 0
