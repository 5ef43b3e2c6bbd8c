"""What one hit decision costs as prompts grow: the policy's own time, embedding excluded.

Two hard shapes from issue 11: the new prompt shares a long pasted document with the stored
one and differs only in the question at the end ("same document"), or shares the first half
and goes on differently ("same first half": many words on one side only, which a pairwise
comparison of words made quadratic). For each length and shape the script times
``policy.accept(query, candidate, similarity)`` with every parse cache cleared (both texts
seen for the first time: the worst case), for

* ``default_policy()`` (the near-miss guards, then the verifier; above the model's window the
  guard decides by the words alone), and
* the bare verifier (``shipped_policy("score")``), which reads the whole of both texts,

and prints the median and the maximum over the repeats. The document is PAWS-Wiki text (many
distinct words and names: the verifier's worst case).

    HF_HUB_OFFLINE=1 .venv/bin/python evals/bench_policy_cost.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from semcache import nearmiss, verifier
from semcache.eval.sources import load_named
from semcache.threshold import HitPolicy, default_policy

LENGTHS = (500, 1_000, 2_000, 4_600, 9_000, 16_000, 21_000, 32_000)


def document(chars: int, sentences: list[str], seed: int) -> str:
    """About ``chars`` characters of distinct wiki sentences, in a seeded order."""
    rng = random.Random(seed)
    out: list[str] = []
    n = 0
    while n < chars:
        s = rng.choice(sentences)
        out.append(s)
        n += len(s) + 1
    return " ".join(out)[:chars]


def clear_caches() -> None:
    verifier._parse.cache_clear()
    nearmiss.quantities.cache_clear()
    nearmiss.exceeds_window.cache_clear()


def time_one(policy: HitPolicy, query: str, candidate: str, repeats: int) -> tuple[float, float]:
    """Median and maximum seconds of one uncached decision."""
    times = []
    for _ in range(repeats):
        clear_caches()
        t = time.perf_counter()
        policy.accept(query, candidate, 0.99)
        times.append(time.perf_counter() - t)
    return statistics.median(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    sentences = list(dict.fromkeys(p.a for p in load_named("paws_wiki")))
    nearmiss._tokenizer()  # loaded once per process; not part of a decision
    policies = {
        "default_policy()": default_policy(),
        "verifier alone": verifier.shipped_policy("score"),
    }
    print(f"policy decision time (median / max of {args.repeats}, caches cleared)")
    print(f"  {'shape':16s} {'chars':>7s}  " + "  ".join(f"{name:>24s}" for name in policies))
    for shape in ("same document", "same first half"):
        for chars in LENGTHS:
            if shape == "same document":
                doc = document(chars, sentences, seed=chars)
                query = doc + "\n\nQuestion: what is the price of item 366 in the table above?"
                candidate = doc + "\n\nQuestion: which supplier delivers item 366 fastest?"
            else:
                doc = document(chars // 2, sentences, seed=chars)
                query = doc + " " + document(chars // 2, sentences, seed=chars + 1)
                candidate = doc + " " + document(chars // 2, sentences, seed=chars + 2)
            cells = []
            for policy in policies.values():
                med, worst = time_one(policy, query, candidate, args.repeats)
                cells.append(f"{1e3 * med:9.2f} / {1e3 * worst:7.2f} ms")
            print(f"  {shape:16s} {len(query):7d}  " + "  ".join(f"{c:>24s}" for c in cells))


if __name__ == "__main__":
    main()
