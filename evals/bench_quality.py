"""Hit quality of every policy, per dataset, on the same embeddings: the comparison table.

For each dataset the pairs are split 50/50 by answer group; every policy is reported on the
evaluation half only. Policies:

* GPTCache's rule (cosine >= 0.6) and RedisVL's default (cosine >= 0.9), as peers ship them;
* the old static default (0.85);
* ``calibrated (shippable)``: calibrate() at the target (default FHR <= 2% at 95%, as the
  verifier) on held-out BANKING77 + GPTCache mock + hand-written intents: the same data the
  verifier's operating point was calibrated on;
* ``calibrated (own half)``: calibrate() on the *other* half of the same dataset, i.e. what a
  user gets by calibrating on their own labelled traffic;
* the verifier at its shipped operating point and at a few others, and ``default_policy()``.

BANKING77, GPTCache mock and PAWS rows use the splits the verifier was *not* trained on
(``evals/train_verifier.py``, seed 0). QQP, MRPC and STS-B were never used to train or tune
anything (MRPC and STS-B: their ``test`` splits, halved by answer group as the others). Then
a workload replay (prompts in pair order, store on a miss) through the real ``SemanticCache``
on the evaluation half. A replay's wrong answer is a hit whose answer id differs from the
prompt's; "labelled" counts the part of them where the data labels the two prompts different
(the rest are prompts no pair compares, such as near-identical STS-B captions).

``families:validation`` and ``families:test`` are the generated near-miss families
(``semcache/eval/families.py``): the default's operating point was chosen on the validation
families (``evals/choose_default.py``); the test families come from templates nothing was fit
or chosen on. Their replay is the issue's: every phrasing of every group in a seeded order.

    HF_HUB_OFFLINE=1 .venv/bin/python evals/bench_quality.py [--datasets qqp_gptcache,mrpc:test]
        [--replay-limit 6000] [--target-fhr 0.02] [--scores 0.5,0.8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_verifier import FAMILIES, build_sets

from semcache.embed import SentenceTransformerEmbedder
from semcache.eval.compare import fit_calibration, similarities
from semcache.eval.data import Pair, split_pairs, texts_of
from semcache.eval.embcache import EmbeddingCache
from semcache.eval.families import load_families, to_groups, to_pairs
from semcache.eval.metrics import Confusion
from semcache.eval.policies import NamedPolicy, decide, standard_policies
from semcache.eval.replay import (
    labelled_negatives,
    replay,
    workload_from_groups,
    workload_from_pairs,
)
from semcache.eval.sources import load_named
from semcache.verifier import VerifierPolicy, shipped_policy

ALL = (
    "families:validation", "families:test", "banking77", "gptcache_mock", "paws_wiki",
    "qqp_gptcache", "mrpc:test", "stsb:test",
)  # fmt: skip


def eval_half(name: str, cache: EmbeddingCache, held: dict[str, list[Pair]]) -> list[Pair]:
    """The pairs a dataset is judged on (for shippable sets: their verifier-held-out split)."""
    if name in held:
        return held[name]
    dataset, _, prefix = name.partition(":")  # "mrpc:test": only rows whose source starts so
    pairs = load_named(dataset)
    if prefix:
        pairs = [p for p in pairs if p.source.startswith(name)]
    else:
        cache.preload(texts_of(pairs))
    return pairs


def row(name: str, c: Confusion) -> str:
    return (
        f"  {name:42s} {c.tp + c.fp:6d}  {c.precision.fmt():22s} {c.recall.fmt():22s} "
        f"{c.false_hit_rate.fmt(2):24s} {c.f1:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(ALL))
    ap.add_argument("--target-fhr", type=float, default=0.02)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--replay-limit", type=int, default=6000, help="prompts per replay (0: none)")
    ap.add_argument("--scores", default="", help="extra verifier score cut-offs, e.g. 0.5,0.8")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = EmbeddingCache(SentenceTransformerEmbedder())
    sets = build_sets(cache, 0)
    held = {k: v[1] for k, v in sets.items()}
    families = {
        f"families:{split}": load_families(FAMILIES, split=split)
        for split in ("validation", "test")
    }
    for name, fams in families.items():
        held[name] = to_pairs(fams)
        cache.preload(texts_of(held[name]))
    calib_ship = held["banking77"] + held["gptcache_mock"] + held["near_miss_intents"]
    cal_ship = fit_calibration(
        calib_ship, similarities(cache, calib_ship), target_fhr=args.target_fhr,
        confidence=args.confidence, fit_on="held-out banking77 + gptcache_mock + near_miss",
        model_id=cache.model_id,
    )  # fmt: skip
    assert cal_ship is not None
    print(
        f"calibrated (shippable): cos >= {cal_ship.threshold:.4f} "
        f"(FHR {cal_ship.false_hit_rate:.2%} <= {cal_ship.false_hit_rate_upper:.2%} at "
        f"{cal_ship.confidence:.0%}, hit rate {cal_ship.expected_hit_rate:.1%} on its fit set)"
    )
    ship = shipped_policy("score")
    extra = [
        NamedPolicy(f"verifier (cos>={ship.min_similarity:g}, p>={float(s):g})",
                    VerifierPolicy(ship.min_similarity, float(s)))
        for s in args.scores.split(",") if s
    ]  # fmt: skip
    for name in args.datasets.split(","):
        t0 = time.time()
        pairs = eval_half(name, cache, held)
        if name in families:
            calib, evaluation = [], pairs
            note = "generated families, pairs within each family"
        elif name in held:
            calib, evaluation = [], pairs
            note = "verifier-held-out split"
        else:
            calib, evaluation = split_pairs(pairs, test_fraction=0.5, seed=1)
            note = "50/50 split by answer group"
        sims = similarities(cache, evaluation)
        labels = np.array([p.label for p in evaluation])
        policies = standard_policies()
        policies.insert(3, NamedPolicy(f"calibrated shippable (cos>={cal_ship.threshold:.3f})",
                                       cal_ship))  # fmt: skip
        if calib:
            own = fit_calibration(
                calib, similarities(cache, calib), target_fhr=args.target_fhr,
                confidence=args.confidence, fit_on="own half",
            )  # fmt: skip
            if own is not None:
                policies.insert(4, NamedPolicy(f"calibrated own half (cos>={own.threshold:.3f})",
                                               own))  # fmt: skip
        policies[-1:-1] = extra
        print(
            f"\n== {name}: {len(evaluation)} pairs ({int(labels.sum())} pos / "
            f"{int((labels == 0).sum())} neg), {note}"
        )
        print(
            f"  {'policy':42s} {'served':>6s}  {'precision of hits':22s} {'recall':22s} "
            f"{'false-hit rate':24s} F1"
        )
        for p in policies:
            c = Confusion.from_decisions(decide(p.policy, evaluation, sims), labels)
            print(row(p.name, c))
        if args.replay_limit:
            if name in families:
                wl = workload_from_groups(to_groups(families[name]), seed=0)
                order = "seeded order"
            else:
                wl = workload_from_pairs(evaluation, limit=args.replay_limit)
                order = "pair order"
            cache.embed([t for t, _ in wl])
            print(
                f"  replay: {len(wl)} prompts in {order}, store on miss (wrong answers per "
                f"lookup, of which on pairs labelled different | answered of repeatable | "
                f"precision of hits)"
            )
            negatives = labelled_negatives(evaluation)
            for p in policies:
                r = replay(wl, p.policy, embedder=cache, name=p.name, negatives=negatives)
                print(
                    f"    {p.name:42s} wrong/lookup {r.wrong_per_lookup.fmt(2):22s} "
                    f"labelled {100 * r.wrong_labelled_per_lookup.value:5.2f}%  "
                    f"answered {r.answered_repeatable.fmt():22s} (of {r.repeatable:5d}) "
                    f"precision {r.hit_precision.fmt()}"
                )
        print(f"  ({time.time() - t0:.0f}s)")
    latency(held["banking77"] + held["near_miss_intents"], cache)


def latency(pairs: list[Pair], cache: EmbeddingCache) -> None:
    """Cost of one default-policy decision (features + trees), texts not seen before."""
    from semcache import nearmiss
    from semcache.threshold import default_policy
    from semcache.verifier import _parse

    policy = default_policy()
    sims = similarities(cache, pairs)
    n = 0
    t = time.perf_counter()
    for p, s in zip(pairs[:2000], sims[:2000], strict=True):
        _parse.cache_clear()  # both texts parsed afresh, the worst case
        nearmiss.quantities.cache_clear()
        nearmiss.exceeds_window.cache_clear()
        policy.accept(p.b, p.a, max(float(s), policy.min_similarity))
        n += 1
    per = (time.perf_counter() - t) / n
    print(f"\ndefault policy decision: {1e6 * per:.0f} us per candidate ({n} pairs, uncached)")


if __name__ == "__main__":
    main()
