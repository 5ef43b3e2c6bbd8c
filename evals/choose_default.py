"""Choose the default policy's operating point on a mix of validation sets (never test sets).

The default policy is ``GuardedPolicy(VerifierPolicy(min_similarity, min_score))``: the
near-miss guards, then the verifier. This script replays each validation workload (lookup,
then store on a miss: the cache's own decision rule, in memory, with each prompt's nearest
earlier prompts found once: ``semcache/eval/fastreplay.py``) for every operating point of a
grid and keeps the one that answers the most repeatable prompts on average while serving at
most ``--target`` wrong answers per lookup on *every* validation set (default 1.5%: the 2%
goal less a margin, because a point chosen at the limit of a few hundred validation lookups
serves more than that on new traffic; chosen at 2%, the retrained verifier's point served
2.72% on QQP's reported half: ``semcache/data/README.md``):

* the ``validation`` split of the generated near-miss families (seeded order);
* the verifier-held-out 30% of BANKING77 pairs, GPTCache mock data (with mined negatives)
  and the hand-written near-miss intents (pair order: each prompt right after its partner);
* the fifth of PAWS-Wiki's fitting part that ``evals/train_verifier.py`` keeps out of
  training (its 30% test part is only reported);

``--paraphrase qqp,mrpc,stsb`` adds, as a check, the splits of the evaluation-only paraphrase
sets that ``evals/bench_quality.py`` does not report (the other half of QQP, MRPC ``train``,
STS-B ``train`` + ``dev``; pair order, at most ``--limit`` prompts each). The shipped choice is
made without them (they may not be shipped, nor anything fit on them); with QQP and MRPC added
(at ``--target 0.02``) it would be cos >= 0.92, p >= 0.7 today, not the shipped cos >= 0.89,
p >= 0.9, which serves 2.38% wrong on QQP's other half: nothing in the validation mix is like
QQP's near-duplicates (see the README). STS-B's captions repeat near-identical sentences that
no pair links, which the replay counts as different answers, so no point of the grid passes on
it.

The examples the README and the test suite promise (:data:`MUST_SERVE`, :data:`MUST_REFUSE`:
"What's France's capital city?" is served from "What is the capital of France?", "Convert 5 km
to miles" is not served from "Convert 5 miles to km") are constraints of the choice too, so
the tests that check those examples show the promise is kept, not that it generalises.

QQP's reported half, MRPC ``test``, STS-B ``test``, PAWS's test part and the ``test``
families are never read here: they are what ``evals/bench_quality.py`` reports. ``--write``
records the choice in the model file (``meta["policy_default"]``), where
:func:`semcache.threshold.default_policy` reads it.

    HF_HUB_OFFLINE=1 .venv/bin/python evals/choose_default.py [--target 0.015] [--write]
        [--model FILE] [--paraphrase qqp,mrpc,stsb] [--dump FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_verifier import FAMILIES, build_sets

from semcache.embed import SentenceTransformerEmbedder
from semcache.errorbudget import _Always
from semcache.eval.data import split_pairs, texts_of
from semcache.eval.embcache import EmbeddingCache
from semcache.eval.families import load_families, to_groups
from semcache.eval.fastreplay import Neighbours, neighbours, replay_neighbours
from semcache.eval.replay import Workload, workload_from_groups, workload_from_pairs
from semcache.eval.sources import load_named
from semcache.nearmiss import GuardedPolicy
from semcache.verifier import SHIPPED_MODEL, VerifierModel, VerifierPolicy

#: (cached prompt, new prompt) pairs the default must serve, and must refuse.
MUST_SERVE = (
    ("What is the capital of France?", "What's France's capital city?"),
    ("What is the capital of France?", "What is the capital city of France?"),
    ("What is the capital of France?", "What is France's capital?"),
    ("Convert 5 miles to km", "Convert 5 miles into km"),
    ("How do I sort a Python list ascending?", "How do I sort a Python list in ascending order?"),
    ("Write an apology email to a customer for a late delivery",
     "Write an apology email to a customer for a delayed delivery"),
)  # fmt: skip
MUST_REFUSE = (
    ("Convert 5 miles to km", "Convert 5 km to miles"),
    ("How do I sort a Python list ascending?", "How do I sort a Python list descending?"),
    ("Write an apology email to a customer for a late delivery",
     "Write an apology email to a customer for a damaged item"),
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("What is the price of item 366?", "What is the price of item 367?"),
)  # fmt: skip
SIMILARITIES = tuple(round(0.80 + 0.01 * i, 2) for i in range(16))  # 0.80 ... 0.95
SCORES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96)


class MemoModel:
    """A verifier model whose scores are remembered per (query, candidate, similarity).

    A score does not depend on the operating point, so a sweep computes each one once.
    """

    def __init__(self, model: VerifierModel) -> None:
        self.model = model
        self.memo: dict[tuple[str, str, float], float] = {}

    def score(self, query: str, candidate: str, similarity: float) -> float:
        key = (query, candidate, similarity)
        got = self.memo.get(key)
        if got is None:
            got = self.memo[key] = self.model.score(query, candidate, similarity)
        return got


def validation_workloads(
    cache: EmbeddingCache,
    *,
    paraphrase: tuple[str, ...] = (),
    limit: int = 4000,
) -> dict[str, Workload]:
    sets = build_sets(cache, 0)
    out = {
        "families (validation)": workload_from_groups(
            to_groups(load_families(FAMILIES, split="validation")), seed=0
        )
    }
    for name in ("banking77", "gptcache_mock", "near_miss_intents"):
        out[f"{name} (held out)"] = workload_from_pairs(sets[name][1])
    out["paws (validation)"] = workload_from_pairs(sets["paws_wiki_validation"][1])
    if "qqp" in paraphrase:
        qqp = load_named("qqp_gptcache")
        cache.preload(texts_of(qqp))
        own_half = split_pairs(qqp, test_fraction=0.5, seed=1)[0]  # bench_quality reports [1]
        out["qqp (other half)"] = workload_from_pairs(own_half, limit=limit)
    for name, splits in (("mrpc", ("mrpc:train",)), ("stsb", ("stsb:train", "stsb:dev"))):
        if name in paraphrase:
            pairs = load_named(name)
            cache.preload(texts_of(pairs))
            chosen = [p for p in pairs if p.source.startswith(splits)]
            label = f"{name} ({'+'.join(s.split(':')[1] for s in splits)})"
            out[label] = workload_from_pairs(chosen, limit=limit)
    for wl in out.values():
        cache.embed([t for t, _ in wl])
    return out


def broken_promises(policy: GuardedPolicy, cache: EmbeddingCache) -> list[tuple[str, str]]:
    """The :data:`MUST_SERVE` pairs ``policy`` refuses and the :data:`MUST_REFUSE` it serves."""
    out = []
    for pairs, expected in ((MUST_SERVE, True), (MUST_REFUSE, False)):
        for cached, new in pairs:
            sim = float(cache.pair_similarities([cached], [new])[0])
            if policy.accept(new, cached, sim) is not expected:
                out.append((cached, new))
    return out


def keeps_promises(policy: GuardedPolicy, cache: EmbeddingCache) -> bool:
    """Whether ``policy`` serves every :data:`MUST_SERVE` pair and refuses every other."""
    return not broken_promises(policy, cache)


class Decider:
    """The default's decision for pair (i, j) of one workload, memoised across the grid: the
    guards' verdict and the verifier's score do not depend on the operating point."""

    def __init__(self, workload: Workload, model: VerifierModel, floor: float) -> None:
        self.workload = workload
        self.model = model
        self.guard = GuardedPolicy(_Always(floor))
        self.memo: dict[tuple[int, int], float] = {}

    def score(self, i: int, j: int, sim: float) -> float:
        """The verifier's score, or -1 when a guard refuses the pair."""
        got = self.memo.get((i, j))
        if got is None:
            q, c = self.workload[i][0], self.workload[j][0]
            if self.guard.reason(q, c, max(sim, self.guard.min_similarity)) is not None:
                got = -1.0
            else:
                got = self.model.score(q, c, sim)
            self.memo[(i, j)] = got
        return got


def sweep(
    workloads: dict[str, Workload], model: VerifierModel, cache: EmbeddingCache
) -> list[dict[str, Any]]:
    nbs: dict[str, Neighbours] = {n: neighbours(wl, cache._vectors) for n, wl in workloads.items()}
    deciders = {n: Decider(wl, model, min(SIMILARITIES)) for n, wl in workloads.items()}
    rows = []
    for sim in SIMILARITIES:
        t = time.perf_counter()
        for score in SCORES:
            policy = GuardedPolicy(VerifierPolicy(sim, score, model=model))
            per = {}
            for name in workloads:
                d = deciders[name]
                r = replay_neighbours(
                    nbs[name], sim, lambda i, j, s, d=d, cut=score: d.score(i, j, s) >= cut
                )
                per[name] = (r.wrong_per_lookup.value, r.answered_repeatable.value)
            broken = broken_promises(policy, cache)
            rows.append({"min_similarity": sim, "min_score": score, "per": per,
                         "promises": not broken, "broken": broken})  # fmt: skip
        print(f"  cos>={sim}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHIPPED_MODEL))
    ap.add_argument(
        "--target", type=float, default=0.015, help="wrong answers per lookup, every set"
    )
    ap.add_argument("--write", action="store_true", help="record the choice in the model file")
    ap.add_argument("--show", type=int, default=12, help="operating points printed")
    ap.add_argument("--limit", type=int, default=4000, help="prompts per paraphrase workload")
    ap.add_argument(
        "--paraphrase",
        default="",
        help="eval-only sets whose non-reported splits join the validation ('' none)",
    )
    ap.add_argument("--dump", default="", help="write every operating point's figures (JSON)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    cache = EmbeddingCache(SentenceTransformerEmbedder())
    paraphrase = tuple(x for x in args.paraphrase.split(",") if x)
    workloads = validation_workloads(cache, paraphrase=paraphrase, limit=args.limit)
    model = VerifierModel.load(args.model)
    rows = sweep(workloads, model, cache)
    names = list(workloads)
    for r in rows:
        wrong = [r["per"][n][0] for n in names]
        answered = [r["per"][n][1] for n in names]
        r["feasible"] = max(wrong) <= args.target and r["promises"]
        r["mean_answered"] = float(np.mean(answered))
        r["max_wrong"] = max(wrong)
    feasible = [r for r in rows if r["feasible"]]
    if args.dump:
        Path(args.dump).write_text(json.dumps(rows, indent=1))
    ranked = sorted(
        rows,
        key=lambda r: (not r["feasible"], r["max_wrong"] > args.target, -r["mean_answered"]),
    )
    print("validation workloads: " + ", ".join(f"{n} ({len(workloads[n])})" for n in names))
    print(f"{len(feasible)} of {len(rows)} operating points serve <= {args.target:.1%} wrong "
          f"on every set and keep the README's examples ({time.time() - t0:.0f}s)")  # fmt: skip
    head = "  ".join(f"{n[:22]:>22s}" for n in names)
    print(f"  {'cos>=':>6s} {'p>=':>5s}  {'mean ans.':>9s}  {head}   (wrong / answered)")
    for r in ranked[: args.show]:
        cells = "  ".join(
            f"{100 * r['per'][n][0]:9.2f}% / {100 * r['per'][n][1]:5.1f}%" for n in names
        )
        mark = "" if r["promises"] else f"  (breaks {r['broken'][0]})"
        print(f"  {r['min_similarity']:6.2f} {r['min_score']:5.2f}  "
              f"{100 * r['mean_answered']:8.1f}%  {cells}{mark}")  # fmt: skip
    best = ranked[0]
    print(f"chosen: min_similarity {best['min_similarity']}, min_score {best['min_score']}")
    if args.write:
        model.meta["policy_default"] = {
            "min_similarity": best["min_similarity"],
            "min_score": best["min_score"],
            "info": {
                "shape": "guarded",
                "chosen_on": names,
                "target_wrong_per_lookup": args.target,
                "constraints": "serves MUST_SERVE, refuses MUST_REFUSE (evals/choose_default.py)",
                "validation": {n: {"wrong_per_lookup": round(best["per"][n][0], 5),
                                   "answered_repeatable": round(best["per"][n][1], 5)}
                               for n in names},
            },
        }  # fmt: skip
        model.save(args.model)
        print(f"wrote the choice into {args.model}")


if __name__ == "__main__":
    main()
