"""Real sentence embeddings for the benchmarks: every distinct text of the labelled pair sets.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python evals/real_vectors.py OUT.npy [--data ../shared/data]``.
Embeds each distinct ``a``/``b`` text of every ``*.jsonl`` in the data folder's set folders
(``<data>/<set>/*.jsonl``) with the
default model (about 70,000 texts, 4-5 minutes on 2 cores) and saves them as float32 rows, for
``evals/bench_core.py --real`` and ``evals/bench_load.py --real``. Prints what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from semcache.embed import SentenceTransformerEmbedder

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    texts: dict[str, None] = {}
    for path in sorted(args.data.glob("*/*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for key in ("a", "b"):
                    if isinstance(row.get(key), str) and row[key].strip():
                        texts[row[key]] = None
    ordered = list(texts)
    embedder = SentenceTransformerEmbedder()
    t0 = time.perf_counter()
    parts = [embedder.embed(ordered[i : i + 512]) for i in range(0, len(ordered), 512)]
    vectors = np.concatenate(parts).astype(np.float32)
    np.save(args.out, vectors)
    print(f"{len(ordered):,} texts embedded in {time.perf_counter() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
