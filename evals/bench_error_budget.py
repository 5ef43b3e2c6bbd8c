"""``target_error=0.02``: does ErrorBudget hold the rate, and what does learning cost?

Each workload is replayed as ``get_or_compute`` traffic (the LLM's answer is the prompt's
answer id), with ErrorBudget driven through the hooks the facade will call
(``semcache/errorbudget.py``): the nearest candidates above the floor are scored with
``decide``; a would-be hit is served unless ``should_explore`` sends it to the LLM (then the
two answers label it); on a miss the LLM answers, the prompt is stored, and the best refused
candidate that had a score gets a free label (does its answer agree with the new one?).
This is an in-memory replay with the cache's decision rule (``replay_in_memory``'s) calling
the hooks ``SemanticCache(target_error=...)`` calls, so four policies and five workloads take
a minute rather than an hour; it is not ``SemanticCache`` itself.

Printed per workload: wrong answers per lookup after the first 500 lookups (and its exact
95% upper bound), repeatable prompts answered, LLM calls per lookup and how many of them
exploration added, the final operating point; next to the default policy, a static threshold
calibrated offline to the same target (``calibrate`` on held-out shippable pairs: FHR <= 2% at
95%), and vCache-style exploration of every uncertain would-be hit (``explore=1``).

    HF_HUB_OFFLINE=1 .venv/bin/python evals/bench_error_budget.py [--datasets ...] [--limit 3000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_verifier import FAMILIES, build_sets

from semcache.embed import SentenceTransformerEmbedder
from semcache.errorbudget import ErrorBudget
from semcache.eval.compare import fit_calibration, similarities
from semcache.eval.data import split_pairs
from semcache.eval.embcache import EmbeddingCache
from semcache.eval.families import load_families, to_groups
from semcache.eval.metrics import Rate
from semcache.eval.replay import Workload, workload_from_groups, workload_from_pairs
from semcache.eval.sources import load_named
from semcache.threshold import HitPolicy, default_policy
from semcache.verifier import shipped_policy

DATASETS = ("families:validation", "families:test", "mrpc:test", "stsb:test", "qqp_gptcache")
WARMUP = 500
_score = shipped_policy("score")
SCORE_POINT = {"min_similarity": _score.min_similarity, "prior": _score.min_score}


@dataclass
class Outcome:
    lookups: int = 0
    wrong_after: int = 0
    lookups_after: int = 0
    repeatable: int = 0
    answered: int = 0
    llm_calls: int = 0
    explored: int = 0
    point: float = float("nan")


def run(workload: Workload, vectors: dict[str, np.ndarray], policy: HitPolicy) -> Outcome:
    """One replay as get_or_compute traffic; ErrorBudget gets its hooks, others accept()."""
    budget = policy if isinstance(policy, ErrorBudget) else None
    mat = np.stack([vectors[t] for t, _ in workload]).astype(np.float32)
    store = np.zeros_like(mat)
    rows: list[int] = []
    seen_text: set[str] = set()
    stored_ids: set[int] = set()
    out = Outcome()
    for i, (prompt, answer) in enumerate(workload):
        out.lookups += 1
        repeatable = answer in stored_ids
        out.repeatable += repeatable
        served: int | None = None
        refused_score: tuple[float, int] | None = None
        explored = False
        if prompt in seen_text:
            served = answer  # an exact repeat: the exact tier
        elif rows:
            sims = store[: len(rows)] @ mat[i]
            for j in np.argsort(-sims)[:4]:
                sim = min(float(sims[j]), 1.0)
                if sim < policy.min_similarity:
                    break
                cand_prompt, cand_answer = workload[rows[int(j)]]
                if budget is None:
                    if policy.accept(prompt, cand_prompt, sim):
                        served = cand_answer
                        break
                    continue
                d = budget.decide(prompt, cand_prompt, sim)
                if d.serve:
                    if budget.should_explore(d, can_compute=True):
                        explored = True  # the LLM answers; the two answers label the hit
                        budget.observe(cand_answer == answer, d.score or 0.0, source="explore")
                    else:
                        served = cand_answer
                    break
                if d.score is not None and refused_score is None:
                    refused_score = (d.score, cand_answer)
        if served is None:
            out.llm_calls += 1
            out.explored += explored
            if not explored:
                store[len(rows)] = mat[i]
                rows.append(i)
                seen_text.add(prompt)
                stored_ids.add(answer)
                if budget is not None and refused_score is not None:
                    budget.observe(refused_score[1] == answer, refused_score[0], source="free")
        elif served == answer:
            out.answered += repeatable
        if i >= WARMUP:
            out.lookups_after += 1
            out.wrong_after += served is not None and served != answer
    if budget is not None:
        out.point = budget.threshold()
    return out


def workloads(cache: EmbeddingCache, names: list[str], limit: int) -> dict[str, Workload]:
    out: dict[str, Workload] = {}
    for name in names:
        if name.startswith("families:"):
            fams = load_families(FAMILIES, split=name.split(":")[1])
            out[name] = workload_from_groups(to_groups(fams), seed=0)
            continue
        dataset, _, prefix = name.partition(":")
        pairs = load_named(dataset)
        if prefix:
            pairs = [p for p in pairs if p.source.startswith(name)]
        _, evaluation = split_pairs(pairs, test_fraction=0.5, seed=1)
        out[name] = workload_from_pairs(evaluation, limit=limit)
    for wl in out.values():
        cache.embed([t for t, _ in wl])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--limit", type=int, default=3000, help="prompts per pair-set replay")
    ap.add_argument("--target", type=float, default=0.02)
    ap.add_argument("--explore", type=float, default=0.05)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = EmbeddingCache(SentenceTransformerEmbedder())
    held = {k: v[1] for k, v in build_sets(cache, 0).items()}
    calib = held["banking77"] + held["gptcache_mock"] + held["near_miss_intents"]
    static = fit_calibration(calib, similarities(cache, calib), target_fhr=args.target,
                             confidence=0.95, fit_on="held-out shippable")  # fmt: skip
    assert static is not None
    wls = workloads(cache, args.datasets.split(","), args.limit)
    print(f"wrong answers per lookup after the first {WARMUP} lookups (95% upper bound), "
          f"answered of repeatable, LLM calls per lookup (of which exploration)")  # fmt: skip
    for name, wl in wls.items():
        t0 = time.time()
        print(f"\n== {name}: {len(wl)} prompts")
        policies: dict[str, HitPolicy] = {
            "default policy": default_policy(),
            f"static calibrated (cos>={static.threshold:.3f})": static,
            f"target_error={args.target} (explore {args.explore:g})": ErrorBudget(
                args.target, explore=args.explore, seed=0
            ),
            f"target_error={args.target} from score point (explore {args.explore:g})": ErrorBudget(
                args.target, explore=args.explore, seed=0, **SCORE_POINT
            ),
            f"target_error={args.target} (explore every uncertain hit)": ErrorBudget(
                args.target, explore=1.0, seed=0
            ),
        }
        for label, policy in policies.items():
            o = run(wl, cache._vectors, policy)
            wrong = Rate.of(o.wrong_after, o.lookups_after)
            answered = Rate.of(o.answered, o.repeatable)
            point = "" if np.isnan(o.point) else f"  point p>={o.point:.3f}"
            calls = o.llm_calls / o.lookups
            print(f"  {label:48s} wrong {100 * wrong.value:5.2f}% (<= {100 * wrong.hi:5.2f}%)  "
                  f"answered {100 * answered.value:5.1f}%  LLM {calls:.3f}/lookup "
                  f"({o.explored} explored){point}")  # fmt: skip
        print(f"  ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
