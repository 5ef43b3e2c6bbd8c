"""The crash matrix: SIGKILL at seeded random moments, reopen, check; 200+ runs, a summary.

Run: ``.venv/bin/python evals/crash_matrix.py [--runs 200] [--seed 0] [--jobs 2]`` (about two
seconds a run on two idle cores; ``--runs 70 --seed 0``, ``--seed 70``... splits it up).

Each run starts a process doing a seeded workload (stores, ``store_many``, updates, deletes,
tag / namespace-tag / bump / delete_prompt / semantic invalidations, ``expire()``, explicit and
automatic checkpoints, close-and-reopen; FIFO eviction at ``max_entries`` in every third run),
which logs each operation it begins and, fsynced, each one acknowledged. Even seeds: the parent
SIGKILLs it after a seeded random delay; odd seeds: it SIGKILLs itself at a seeded point inside
an operation of one kind (store, store_many, update, delete, delete_prompt, tags, bump,
invalidate_similar, expire, checkpoint, close-and-reopen, in turn). The parent then reopens the
folder and checks that the cache opens without
``rebuild=True``, ``verify()`` is clean, every acknowledged store is present unless a later
acknowledged operation (or the one in flight, eviction or its TTL) could have removed it, and
nothing acknowledged-invalidated is served (``tests/crash.py`` has the model). Prints a summary:
runs, failures, operations killed in flight, and the first failures in full. Exit status 1 when
any run failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.crash import crash_run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the first run's seed")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--max-delay", type=float, default=1.0, help="latest kill, seconds")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="semcache-crash-"))
    started = time.perf_counter()

    def one(seed: int) -> dict[str, Any]:
        folder = base / f"run-{seed}"
        try:
            result = crash_run(folder, seed, args.max_delay)
        except Exception as exc:  # the harness itself failed: count it, keep going
            result = {"seed": seed, "mode": "?", "problems": [f"harness: {exc!r}"]}
        if not result["problems"]:
            shutil.rmtree(folder, ignore_errors=True)
        return result

    seeds = range(args.seed, args.seed + args.runs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(one, seeds))
    elapsed = time.perf_counter() - started
    failed = [r for r in results if r["problems"]]
    inflight = Counter(str(r.get("inflight")) for r in results)
    modes = Counter(r["mode"] for r in results)
    acked = [r.get("acked", 0) for r in results]
    required = [r.get("required", 0) for r in results]
    print(f"crash matrix: {len(results)} runs in {elapsed:.0f} s ({args.jobs} at a time)")
    print(f"  modes: {dict(modes)}")
    print(f"  operations acknowledged before the kill: median {sorted(acked)[len(acked) // 2]}, "
          f"max {max(acked)}, total {sum(acked)}")  # fmt: skip
    print(f"  acknowledged stores checked present after reopen: {sum(required)}")
    print("  operation in flight at the kill: "
          + ", ".join(f"{k} {v}" for k, v in inflight.most_common()))  # fmt: skip
    aimed = [r for r in results if r.get("target")]
    hit = Counter(r["target"] for r in aimed if r.get("inflight") == r["target"])
    print(f"  runs killed inside a chosen operation: {sum(hit.values())} of {len(aimed)} aimed; "
          + ", ".join(f"{k} {v}" for k, v in sorted(hit.items())))  # fmt: skip
    warned = Counter(str(r.get("inflight")) for r in results if r.get("open_warnings"))
    print(f"  reopens that logged a warning (e.g. an index rebuild): {sum(warned.values())}; "
          "by operation in flight: " + ", ".join(f"{k} {v}" for k, v in warned.most_common()))
    examples = sorted({m[:120] for r in results for m in r.get("open_warnings", [])})[:3]
    for m in examples:
        print(f"      e.g. {m}")
    print(f"  runs failed: {len(failed)}")
    for r in failed[:10]:
        print(f"  - seed {r['seed']} ({r['mode']}, in flight: {r.get('inflight')}, "
              f"kill after {r.get('delay')} s): {len(r['problems'])} problems")  # fmt: skip
        for p in r["problems"][:5]:
            print(f"      {p[:400]}")
    if failed:
        print(f"  failed runs' folders kept under {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
