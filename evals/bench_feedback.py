"""Per-entry floors learned from feedback: a workload replay with and without ``cache.feedback``.

Run: ``.venv/bin/python evals/bench_feedback.py [--data QQP.jsonl] [--limit 3000]``. The
replay reports every served hit as right or wrong (a user who notices wrong answers), so the
entries that served wrong answers get their own similarity floors as the replay goes. Data: the
held-out half of QQP (never used to fit anything). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from semcache import StaticThreshold
from semcache.embed import SentenceTransformerEmbedder
from semcache.eval.data import load_pairs, split_pairs
from semcache.eval.embcache import EmbeddingCache
from semcache.eval.replay import replay, workload_from_pairs
from semcache.threshold import default_policy

QQP = Path(__file__).resolve().parents[1].parent / "shared/data/qqp_gptcache/pairs.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(QQP))
    parser.add_argument("--limit", type=int, default=3000)
    args = parser.parse_args()
    _, evaluation = split_pairs(load_pairs(args.data), test_fraction=0.5, seed=1)
    workload = workload_from_pairs(evaluation, limit=args.limit)
    embedder = EmbeddingCache(SentenceTransformerEmbedder())
    embedder.embed([text for text, _ in workload])
    print(f"{len(workload)} prompts from {args.data} (held-out half), store on miss")
    print(f"{'policy':34s} {'wrong/lookup':>14s} {'answered':>10s} {'precision':>10s}")
    for name, policy in (("static 0.85", StaticThreshold(0.85)), ("default (veto)", None)):
        for feedback in (False, True):
            result = replay(
                workload, policy or default_policy(), embedder=embedder, feedback=feedback
            )
            label = f"{name}{' + feedback' if feedback else ''}"
            print(
                f"{label:34s} {result.wrong_per_lookup.value:14.2%} "
                f"{result.answered_repeatable.value:10.1%} {result.hit_precision.value:10.1%}"
            )


if __name__ == "__main__":
    main()
