"""The cross-encoder verifier against the current default policy, on data it never saw.

Same evaluation halves as ``evals/bench_quality.py`` (QQP, MRPC test, STS-B test: a 50/50
split by answer group, seed 1, the evaluation half only; BANKING77 / GPTCache mock / PAWS: the
split held out from training, seed 0). Rows:

* RedisVL's default (cosine >= 0.9) and ``default_policy()`` (cosine + lexical verifier veto);
* ``reranker (shipped)``: the cross-encoder at the operating point calibrated on held-out
  shippable data when it was trained (``evals/train_reranker.py``): the honest number;
* ``reranker + veto``: the same, and the lexical verifier may still veto (p < 0.5);
* ``ORACLE``: the best recall at a false-hit rate <= 2% *if the cut were chosen on this
  evaluation set* (over a grid of cosine floors): an upper bound, not a shippable number.

Then the workload replay through ``SemanticCache`` and the cost of one verified candidate on
one torch thread.

    HF_HUB_OFFLINE=1 nice -n 19 .venv/bin/python evals/bench_reranker.py [--delta FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reranker import DEFAULT_DELTA, CrossEncoder, RerankerPolicy, read_meta
from train_verifier import build_sets

from semcache.embed import SentenceTransformerEmbedder
from semcache.eval.data import Pair, split_pairs, texts_of
from semcache.eval.embcache import EmbeddingCache
from semcache.eval.metrics import Confusion
from semcache.eval.policies import decide
from semcache.eval.replay import replay, workload_from_pairs
from semcache.eval.sources import load_named
from semcache.threshold import StaticThreshold, default_policy
from semcache.verifier import shipped_model

DATASETS = ("qqp_gptcache", "mrpc:test", "stsb:test", "banking77", "gptcache_mock", "paws_wiki")
FLOORS = (0.7, 0.75, 0.8, 0.85, 0.9)


class VetoedReranker(RerankerPolicy):
    """Reranker, and the lexical verifier may still veto below ``veto``."""

    def __init__(self, base: RerankerPolicy, veto: float = 0.5) -> None:
        super().__init__(base.min_similarity, base.min_score, model=base.model)
        self.veto = veto

    def accept(self, query: str, candidate: str, similarity: float) -> bool:
        if not super().accept(query, candidate, similarity):
            return False
        return shipped_model().score(query, candidate, similarity) >= self.veto


def evaluation_pairs(name: str, cache: EmbeddingCache, held: dict[str, list[Pair]]) -> list[Pair]:
    if name in held:
        return held[name]
    dataset, _, prefix = name.partition(":")
    pairs = load_named(dataset)
    cache.preload(texts_of(pairs))
    if prefix:
        pairs = [p for p in pairs if p.source.startswith(name)]
    return split_pairs(pairs, test_fraction=0.5, seed=1)[1]


def row(name: str, c: Confusion) -> str:
    return (
        f"  {name:44s} {c.tp + c.fp:6d}  {c.precision.fmt():22s} {c.recall.fmt():22s} "
        f"{c.false_hit_rate.fmt(2):24s}"
    )


def oracle(sims: np.ndarray, prob: np.ndarray, labels: np.ndarray, fhr: float = 0.02):
    """Best recall with point FHR <= ``fhr`` over floors and cuts, chosen on these labels."""
    best = (0.0, 0.0, 0.0, 0.0)
    neg = max(int((labels == 0).sum()), 1)
    pos = max(int(labels.sum()), 1)
    for floor in FLOORS:
        score = np.where(sims >= floor, prob, -1.0)
        order = np.argsort(-score, kind="stable")
        s, y = score[order], labels[order]
        tp, fp = np.cumsum(y == 1), np.cumsum(y == 0)
        ok = (fp / neg <= fhr) & (s >= 0)
        # only cut between distinct scores
        last = np.r_[s[1:] != s[:-1], True]
        ok &= last
        if ok.any():
            i = int(np.flatnonzero(ok)[np.argmax(tp[ok])])
            if tp[i] / pos > best[0]:
                best = (tp[i] / pos, fp[i] / neg, floor, float(s[i]))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delta", default=str(DEFAULT_DELTA))
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--replay-limit", type=int, default=6000)
    ap.add_argument("--replay", default="qqp_gptcache,mrpc:test,stsb:test")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the bulk scoring")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    cache = EmbeddingCache(SentenceTransformerEmbedder())
    sets = build_sets(cache, 0)
    held = {k: v[1] for k, v in sets.items()}
    meta = read_meta(args.delta)
    ce = CrossEncoder(args.delta)
    op = meta["policy"]
    shipped = RerankerPolicy(op["min_similarity"], op["min_score"], model=ce)
    print(f"reranker operating point (calibrated on shippable held-out): {shipped!r}")
    print(f"  {op['info']}")
    policies = [
        ("RedisVL default (cos>=0.9)", StaticThreshold(0.9)),
        ("default_policy() (cos+lexical veto)", default_policy()),
        (f"reranker shipped (cos>={shipped.min_similarity:g}, p>={shipped.min_score:.3f})",
         shipped),
        ("reranker shipped + lexical veto", VetoedReranker(shipped)),
    ]  # fmt: skip
    replay_sets = set(args.replay.split(",")) if args.replay else set()
    for name in args.datasets.split(","):
        t1 = time.time()
        evaluation = evaluation_pairs(name, cache, held)
        sims = cache.pair_similarities([p.a for p in evaluation], [p.b for p in evaluation])
        labels = np.array([p.label for p in evaluation])
        need = np.flatnonzero(sims >= min(FLOORS))
        prob = np.zeros(len(evaluation))
        z = ce.logits([evaluation[i].b for i in need], [evaluation[i].a for i in need])
        prob[need] = 1.0 / (1.0 + np.exp(-z))
        print(
            f"\n== {name}: {len(evaluation)} pairs ({int(labels.sum())} pos / "
            f"{int((labels == 0).sum())} neg); {len(need)} scored by the cross-encoder "
            f"({time.time() - t1:.0f}s)"
        )
        print(f"  {'policy':44s} {'served':>6s}  {'precision':22s} {'recall':22s} FHR")
        for pname, pol in policies:
            c = Confusion.from_decisions(decide(pol, evaluation, sims), labels)
            print(row(pname, c))
        rec, fhr, floor, cut = oracle(sims, prob, labels)
        print(
            f"  ORACLE reranker (cut chosen on THIS data): recall {rec:.3f} at FHR {fhr:.3%} "
            f"(cos>={floor:g}, p>={cut:.3f})"
        )
        rec_c, fhr_c, floor_c, _ = oracle(sims, (sims >= 0).astype(float) * sims, labels)
        print(f"  ORACLE cosine alone: recall {rec_c:.3f} at FHR {fhr_c:.3%} (cos>={floor_c:g})")
        if name in replay_sets and args.replay_limit:
            wl = workload_from_pairs(evaluation, limit=args.replay_limit)
            cache.embed([t for t, _ in wl])
            print(f"  replay: {len(wl)} prompts in pair order, store on miss")
            for pname, pol in policies:
                r = replay(wl, pol, embedder=cache, name=pname)
                print(
                    f"    {pname:44s} wrong/lookup {r.wrong_per_lookup.fmt(2):22s} "
                    f"answered {r.answered_repeatable.fmt():22s} (of {r.repeatable:5d}) "
                    f"precision {r.hit_precision.fmt()} [{r.seconds:.0f}s]"
                )
        print(f"  ({time.time() - t1:.0f}s)")
    latency(args.delta, held["banking77"] + held["near_miss_intents"] + held["paws_wiki"])
    print(f"\ntotal {time.time() - t0:.0f}s")


def latency(delta: str, pairs: list[Pair]) -> None:
    """One verified candidate, one torch thread, texts never scored before (no memo)."""
    import torch

    torch.set_num_threads(1)
    ce = CrossEncoder(delta, memo=0)
    for p in pairs[:5]:
        ce.logit(p.b, p.a)
    times = []
    for p in pairs[5:405]:
        t = time.perf_counter()
        ce.logit(p.b, p.a)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    print(
        f"\nverify one candidate (1 torch thread, {len(ms)} pairs, machine shared): "
        f"p50 {np.percentile(ms, 50):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms, "
        f"p99 {np.percentile(ms, 99):.1f} ms, mean {ms.mean():.1f} ms"
    )


if __name__ == "__main__":
    main()
