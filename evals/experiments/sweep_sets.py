"""Diagnostic: wrong answers per lookup and repeatable prompts answered, per set, per point.

Replays (in memory, the cache's decision rule) every validation workload the default is chosen
on and every report workload of ``evals/bench_quality.py`` for a grid of operating points of
the default's shape (guards, then verifier at ``min_similarity`` / ``min_score``), so one can
see where the sets pull the choice apart. Figures that are reported come from
``evals/bench_quality.py``; this only explains them.

    HF_HUB_OFFLINE=1 .venv/bin/python evals/experiments/sweep_sets.py [--model FILE]
        [--sims 0.86,0.9] [--scores 0.5,0.8] [--sets qqp,mrpc]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from choose_default import MemoModel, validation_workloads
from train_verifier import FAMILIES, build_sets

from semcache.embed import SentenceTransformerEmbedder
from semcache.eval.data import split_pairs, texts_of
from semcache.eval.embcache import EmbeddingCache
from semcache.eval.families import load_families, to_groups, to_pairs
from semcache.eval.replay import (
    Workload,
    replay_in_memory,
    workload_from_groups,
    workload_from_pairs,
)
from semcache.eval.sources import load_named
from semcache.nearmiss import GuardedPolicy
from semcache.verifier import SHIPPED_MODEL, VerifierModel, VerifierPolicy


def report_workloads(
    cache: EmbeddingCache, limit: int = 6000, wanted: Callable[[str], bool] = lambda n: True
) -> dict[str, Workload]:
    """The workloads bench_quality reports (same splits, same orders); QQP, MRPC and STS-B
    only when ``wanted(name)``."""
    sets = build_sets(cache, 0)
    test_fams = load_families(FAMILIES, split="test")
    cache.preload(texts_of(to_pairs(test_fams)))  # the same file bench_quality writes
    out: dict[str, Workload] = {
        "families test": workload_from_groups(to_groups(test_fams), seed=0),
        "paws held out": workload_from_pairs(sets["paws_wiki"][1], limit=limit),
    }
    if wanted("qqp"):
        qqp = load_named("qqp_gptcache")
        cache.preload(texts_of(qqp))
        half = split_pairs(qqp, test_fraction=0.5, seed=1)[1]
        out["qqp"] = workload_from_pairs(half, limit=limit)
    for name in [n for n in ("mrpc", "stsb") if wanted(n)]:
        pairs = load_named(name)
        cache.preload(texts_of(pairs))
        test = [p for p in pairs if p.source.startswith(f"{name}:test")]
        out[f"{name} test"] = workload_from_pairs(test, limit=limit)
    for wl in out.values():
        cache.embed([t for t, _ in wl])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHIPPED_MODEL))
    ap.add_argument("--sims", default="0.84,0.86,0.88,0.9,0.92,0.94")
    ap.add_argument("--scores", default="0.3,0.5,0.7,0.8,0.9")
    ap.add_argument("--sets", default="", help="only workloads whose name contains one of these")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = EmbeddingCache(SentenceTransformerEmbedder())
    keys = args.sets.split(",") if args.sets else []

    def wanted(name: str) -> bool:
        return not keys or any(k in name for k in keys)

    workloads = {**validation_workloads(cache), **report_workloads(cache, wanted=wanted)}
    if keys:
        workloads = {n: w for n, w in workloads.items() if any(k in n for k in keys)}
    model = VerifierModel.load(args.model)
    memo = MemoModel(model)
    names = list(workloads)
    print("  cos   p     " + "  ".join(f"{n[:16]:>16s}" for n in names) + "   (wrong% / answered%)")
    for sim in map(float, args.sims.split(",")):
        for score in map(float, args.scores.split(",")):
            t = time.perf_counter()
            policy = GuardedPolicy(VerifierPolicy(sim, score, model=model))
            policy.inner.model = memo  # type: ignore[assignment]
            cells = []
            for n in names:
                r = replay_in_memory(workloads[n], policy, cache._vectors)
                wrong, answered = r.wrong_per_lookup.value, r.answered_repeatable.value
                cells.append(f"{100 * wrong:6.2f}/{100 * answered:5.1f}")
            print(f"  {sim:.2f} {score:.2f}  " + "  ".join(f"{c:>16s}" for c in cells)
                  + f"  ({time.perf_counter() - t:.0f}s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
