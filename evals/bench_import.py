"""Import benchmark: N realistic known answers through the real ``semcache import`` CLI.

Run: ``.venv/bin/python evals/bench_import.py [--n 100000] [--batch-size 1024]``. Prints
figures; asserts nothing. It writes N JSONL lines (distinct support-style questions of 8 to 30
words, answers of one to four sentences, tags, TTLs, a few namespaces), runs
``semcache import FILE --data FRESH_FOLDER`` in a new process exactly as a user would (its
progress bar goes to this terminal), and prints the lines per second, the total seconds (with
and without loading the model) and the split between embedding and storing that the command
reports. The folder is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPENERS = [
    "How do I {a} {p}?",
    "How can I {a} {p} {c}?",
    "What is the fastest way to {a} {p} {c}?",
    "Is it possible to {a} {p} {c}?",
    "I need to {a} {p} {c}, what should I do?",
    "Can you explain how to {a} {p}?",
    "Why can't I {a} {p} {c}?",
    "What happens if I {a} {p} {c}?",
    "Where do I go to {a} {p}?",
    "Help: I tried to {a} {p} {c} and it did not work",
    "Could someone tell me how to {a} {p} {c} without losing data?",
    "Do I have to pay to {a} {p}?",
    "What are the steps to {a} {p} {c}?",
    "My manager asked me to {a} {p} {c}; where is that option?",
    "Is there a limit on how often I can {a} {p}?",
    "After the last update, how do I {a} {p} {c}?",
]
ACTIONS = [
    "reset", "cancel", "renew", "transfer", "export", "delete", "update", "restore", "share",
    "upgrade", "downgrade", "verify", "link", "unlink", "pause", "resume", "archive", "rename",
    "download", "back up", "change the owner of", "set a reminder for", "get a refund for",
    "turn on two-factor login for", "change the billing address on", "merge", "split",
    "report a problem with", "add a second user to", "lock",
]  # fmt: skip
PRODUCTS = [
    "my password", "my subscription", "the annual plan", "my account", "a shared folder",
    "my invoices", "the mobile app", "my debit card", "a pending payment", "my profile photo",
    "the team workspace", "an API key", "my order", "a support ticket", "the family plan",
    "my phone number", "a scheduled transfer", "my savings goal", "the desktop client",
    "a gift card", "my email address", "a recurring invoice", "the trial", "my data export",
    "a calendar", "my loyalty points", "the browser extension", "a saved report",
    "my security questions", "a webhook", "the admin console", "my delivery address",
    "a direct debit", "my notification settings", "a project board", "my tax documents",
    "a refund request", "my storage quota", "the sandbox environment", "my home screen",
]  # fmt: skip
CONTEXTS = [
    "from my phone", "on the website", "while travelling abroad", "for a closed account",
    "before the end of the month", "in the EU region", "after a failed payment",
    "as an administrator", "on a company laptop", "if I forgot my login", "with a screen reader",
    "without contacting support", "for my whole team", "during the free trial",
    "after moving to another country", "on Android", "on an iPad", "from the command line",
    "for an old order", "when the app is offline", "with a prepaid card", "in bulk",
    "for a deceased relative", "before my contract ends",
]  # fmt: skip
ANSWER_PARTS = [
    "Open Settings and choose {p}.",
    "Select the option to {a} it and confirm with the code we send you.",
    "The change takes effect within a few minutes on every device.",
    "If the option is greyed out, an administrator has to allow it first.",
    "You can undo this for 30 days from the same page.",
    "There is no charge for this on any plan.",
    "On the mobile app the same option is under Profile, then Manage.",
    "We email you a receipt once it is done.",
    "If it still fails, sign out, sign back in and try again.",
    "Support can do it for you, but it is faster to do it yourself.",
]
TAGS = ["billing", "account", "security", "mobile", "orders", "teams", "faq", "legal", "api"]
NAMESPACES = ["support", "sales", "internal"]
TTLS = [None, None, 3600, 86_400, 604_800, 2_592_000]


def known_answers(n: int, seed: int = 0) -> list[dict[str, object]]:
    """N distinct question/answer lines as ``semcache import`` reads them."""
    space = len(OPENERS) * len(ACTIONS) * len(PRODUCTS) * len(CONTEXTS)
    if n > space:
        raise SystemExit(f"--n {n} is more than the {space:,} distinct prompts generated")
    rng = random.Random(seed)
    lines: list[dict[str, object]] = []
    seen: set[str] = set()
    for code in rng.sample(range(space), n):
        code, o = divmod(code, len(OPENERS))
        code, a = divmod(code, len(ACTIONS))
        c, p = divmod(code, len(PRODUCTS))
        fields = {"a": ACTIONS[a], "p": PRODUCTS[p], "c": CONTEXTS[c]}
        prompt = OPENERS[o].format(**fields)
        if prompt in seen:  # openers without {c} repeat across contexts
            prompt = f"{prompt[:-1]} {CONTEXTS[c]}?" if prompt.endswith("?") else prompt
        if prompt in seen:
            continue
        seen.add(prompt)
        parts = rng.sample(ANSWER_PARTS, rng.randint(1, 4))
        line: dict[str, object] = {
            "prompt": prompt,
            "response": " ".join(parts).format(**fields),
            "tags": rng.sample(TAGS, rng.randint(0, 2)),
            "ttl": rng.choice(TTLS),
        }
        if rng.random() < 0.6:
            line["scope"] = {"namespace": rng.choice(NAMESPACES)}
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the CLI's")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the folder and the file")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="semcache-import-"))
    source, data = tmp / "known.jsonl", tmp / "data"
    try:
        t = time.perf_counter()
        lines = known_answers(args.n)
        with source.open("w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
        words = sum(len(str(x["prompt"]).split()) for x in lines) / max(1, len(lines))
        print(
            f"wrote {len(lines):,} lines ({source.stat().st_size / 1e6:.1f} MB, "
            f"{words:.1f} words per prompt) in {time.perf_counter() - t:.1f}s",
            flush=True,
        )
        command = [sys.executable, "-c", "from semcache.cli import main; main()", "import"]
        command += [str(source), "--data", str(data), "--precision", args.precision]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        t = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
        wall = time.perf_counter() - t
        print(done.stdout, end="")
        if done.returncode != 0:
            raise SystemExit(f"semcache import exited {done.returncode}")
        summary = re.search(
            r"stored (\d+) entries .* in ([\d.]+)s \((\d+)/s; embedding ([\d.]+)s, storing "
            r"([\d.]+)s, reading ([\d.]+)s; the model loaded in ([\d.]+)s",
            done.stdout,
        )
        if summary is None:
            raise SystemExit("could not read the import's summary line")
        stored, seconds, _rate, embed, store, read, load = summary.groups()
        work = float(embed) + float(store) + float(read)
        print(
            f"\nsemcache import of {int(stored):,} lines "
            f"(precision {args.precision}, batch {args.batch_size or 'default'}):\n"
            f"  {float(stored) / float(seconds):,.0f} lines/s over {float(seconds):.1f}s of "
            f"import ({wall:.1f}s wall for the command, model load {float(load):.1f}s)\n"
            f"  embedding {float(embed):.1f}s ({float(embed) / work:.0%}), storing "
            f"{float(store):.1f}s ({float(store) / work:.0%}), reading and checking lines "
            f"{float(read):.1f}s ({float(read) / work:.0%})"
        )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
