"""Write the generated near-miss families to ``semcache/data/near_miss_families.jsonl``.

Deterministic (seeded): rerunning it rewrites the same file. See
``semcache/eval/families.py`` for the templates, the kinds and the split.

    .venv/bin/python evals/make_near_miss_families.py [--per-kind 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from semcache.eval.families import generate, save_families
from semcache.eval.sources import PACKAGE_DATA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-kind", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(PACKAGE_DATA / "near_miss_families.jsonl"))
    args = ap.parse_args()
    families = generate(args.per_kind, seed=args.seed)
    save_families(families, args.out)
    counts = Counter((f.split, f.kind) for f in families)
    prompts = Counter(f.split for f in families for g in f.groups for _ in g)
    print(f"wrote {len(families)} families to {args.out}")
    for split in ("train", "validation", "test"):
        kinds = ", ".join(f"{k} {n}" for (s, k), n in sorted(counts.items()) if s == split)
        print(f"  {split:10s} {prompts[split]:5d} prompts; families: {kinds}")


if __name__ == "__main__":
    main()
