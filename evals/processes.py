"""Multi-process coherence for a full minute: 2 and 4 processes on one data folder.

Run: ``.venv/bin/python evals/processes.py [--seconds 60] [--processes 2 4]``.

The same workload and checker as ``tests/test_processes.py`` (``tests/procs.py``), which runs a
shorter version: each process stores, updates, deletes, invalidates (tags, tags in a namespace,
bump, delete_prompt, invalidate_similar) and looks up at random with HashEmbedder. Prints, per
run: operations per process and per second, answers served, invalidations, answers that an
invalidation covered, stale serves (an answer served after an invalidation covering it had
returned in some process before the lookup began: must be 0), errors, each process's verify(),
and whether all processes agree once writing stops. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.procs import run_processes, stale_serves  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bad = False
    for n in args.processes:
        folder = Path(tempfile.mkdtemp(prefix=f"semcache-procs{n}-"))
        started = time.perf_counter()
        logs = run_processes(folder, n, args.seconds, seed=args.seed + n)
        wall = time.perf_counter() - started
        problems, counts = stale_serves(logs)
        errors = [e for log in logs for e in log["errors"]]
        unverified = [log["index"] for log in logs if log["verify"]]
        first = logs[0]["final"]
        disagree = sum(1 for log in logs[1:] for k, v in first.items() if log["final"][k] != v)
        ops = [len(log["events"]) for log in logs]
        print(f"{n} processes, {args.seconds:.0f} s of workload ({wall:.0f} s wall):")
        print(f"  operations per process: {ops} ({sum(ops) / args.seconds:.0f}/s in all)")
        print(f"  lookups {counts['lookups']}, answers served {counts['served']}, "
              f"answers written {counts['versions']}, invalidations {counts['invalidations']}, "
              f"answers an invalidation covered {counts['invalidated_versions']}")  # fmt: skip
        print(f"  stale serves: {len(problems)}")
        for p in problems[:5]:
            print(f"    {p}")
        print(f"  errors: {len(errors)}" + (f" e.g. {errors[:3]}" if errors else ""))
        print(f"  processes whose verify() was not clean: {unverified}")
        print(f"  final answers that differ between processes: {disagree}")
        bad |= bool(problems or errors or unverified or disagree)
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
