"""The crash matrix: SIGKILL a process at a seeded random moment of a seeded workload, reopen.

The child (``python -m tests.crash child <json>``) opens a cache and runs a seeded mix of
stores, ``store_many``, updates, deletes, every invalidation kind, ``expire()``, explicit
checkpoints (and automatic ones: ``checkpoint_every`` is small) and close-and-reopen, with
eviction on in ``"evict"`` mode. Around each call it appends a line to a log: ``B`` (begun,
flushed) before, ``A`` (acknowledged, flushed and fsynced) after it returned. The parent kills
it after a seeded random delay (even seeds) or the child kills itself with SIGKILL at a seeded
point inside an operation of one kind (odd seeds: each kind of ``TARGETS`` in turn), and the
parent reopens the folder and checks:

- the cache opens (no ``rebuild=True``) and ``verify() == []``;
- every acknowledged store is present (``get`` and ``lookup`` find it with its latest
  acknowledged answer) unless a later acknowledged operation, the one in flight at the kill,
  eviction (bounded exactly: FIFO never evicts an entry with fewer than ``max_entries`` stores
  after it) or its TTL could have removed it;
- no lookup serves an answer that an acknowledged operation invalidated, replaced or that had
  expired; and nothing that was never written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import ENV, ROOT

N_PROMPTS = 16
NAMESPACES = ("a", "b")
TAGS = ("t0", "t1", "t2")
TTL = 0.4  # seconds; the volatile entries' life
MAX_ENTRIES = 12  # in "evict" mode


def prompt_text(j: int) -> str:
    return f"crash{j}a crash{j}b crash{j}c"


def cache_options(mode: str, seed: int) -> dict[str, Any]:
    options: dict[str, Any] = {"threshold": 0.9, "checkpoint_every": 5 + seed % 20}
    if mode == "evict":
        options.update(max_entries=MAX_ENTRIES, eviction="fifo")
    return options


def _open(path: str, mode: str, seed: int) -> Any:
    from semcache import SemanticCache

    from .fakes import HashEmbedder

    return SemanticCache(path, embedder=HashEmbedder(), **cache_options(mode, seed))


# ------------------------------------------------------------------------------- the child
def next_op(rng: random.Random, counter: list[int], ids: list[str]) -> dict[str, Any]:
    """The next operation of the seeded workload (``ids``: entry ids acknowledged so far)."""
    roll = rng.random()
    j, ns = rng.randrange(N_PROMPTS), rng.choice(NAMESPACES)

    def item() -> dict[str, Any]:
        counter[0] += 1
        return {
            "prompt": rng.randrange(N_PROMPTS),
            "ns": rng.choice(NAMESPACES),
            "tags": sorted(rng.sample(TAGS, rng.randrange(3))),
            "ttl": TTL if rng.random() < 0.15 else None,
            "resp": f"r{counter[0]}",
        }

    if roll < 0.30:
        return {"op": "store", **item()}
    if roll < 0.36:
        return {"op": "store_many", "items": [item() for _ in range(rng.randrange(2, 8))]}
    if roll < 0.46:
        return {"op": "lookup", "prompt": j, "ns": ns}
    if roll < 0.53 and ids:
        counter[0] += 1
        return {"op": "update", "eid": rng.choice(ids), "resp": f"r{counter[0]}"}
    if roll < 0.59 and ids:
        return {"op": "delete", "eid": rng.choice(ids)}
    if roll < 0.65:
        return {"op": "delete_prompt", "prompt": j, "ns": ns}
    if roll < 0.72:
        where = ns if rng.random() < 0.5 else None
        return {"op": "tags", "tags": [rng.choice(TAGS)], "ns": where}
    if roll < 0.75:
        return {"op": "bump", "ns": ns}
    if roll < 0.82:
        return {"op": "similar", "prompt": j, "ns": ns if rng.random() < 0.5 else None}
    if roll < 0.86:
        return {"op": "expire"}
    if roll < 0.94:
        return {"op": "checkpoint"}
    return {"op": "reopen"}


def _apply_to_cache(cache: Any, op: Mapping[str, Any], reopen: Any) -> tuple[Any, Any]:
    """Run one operation; (its result for the log, the cache, which ``reopen`` may replace)."""
    from semcache import EntryNotFoundError, Scope

    kind = op["op"]
    if kind == "store":
        eid = cache.store(
            prompt_text(op["prompt"]), op["resp"], scope=Scope(namespace=op["ns"]),
            tags=op["tags"], ttl=op["ttl"],
        )  # fmt: skip
        return eid, cache
    if kind == "store_many":
        items = [
            {"prompt": prompt_text(i["prompt"]), "response": i["resp"],
             "scope": Scope(namespace=i["ns"]), "tags": i["tags"], "ttl": i["ttl"]}
            for i in op["items"]
        ]  # fmt: skip
        return cache.store_many(items), cache
    if kind == "lookup":
        hit = cache.lookup(prompt_text(op["prompt"]), scope=Scope(namespace=op["ns"]))
        return None if hit is None else hit.response, cache
    if kind == "update":
        try:
            cache.update(op["eid"], response=op["resp"])
        except EntryNotFoundError:
            return "missing", cache
        return "ok", cache
    if kind == "delete":
        return cache.delete(op["eid"]), cache
    if kind == "delete_prompt":
        scope = Scope(namespace=op["ns"])
        return cache.delete_prompt(prompt_text(op["prompt"]), scope=scope), cache
    if kind == "tags":
        return cache.invalidate_tags(*op["tags"], namespace=op["ns"]), cache
    if kind == "bump":
        return cache.bump(op["ns"]), cache
    if kind == "similar":
        scope = None if op["ns"] is None else Scope(namespace=op["ns"])
        return len(cache.invalidate_similar(prompt_text(op["prompt"]), 0.95, scope=scope)), cache
    if kind == "expire":
        return cache.expire(), cache
    if kind == "checkpoint":
        cache.checkpoint()
        return None, cache
    if kind == "reopen":
        cache.close()
        return None, reopen()
    raise ValueError(kind)


#: Operation kinds a targeted run kills inside (with eviction on, "store" evicts too).
TARGETS = (
    "store", "store_many", "update", "delete", "delete_prompt", "tags", "bump", "similar",
    "expire", "checkpoint", "reopen",
)  # fmt: skip


def _kill_after(events: int) -> None:
    """SIGKILL this process after ``events`` more Python or C calls and returns: a seeded point
    inside the operation about to run (between two SQL statements, two file writes...)."""
    left = [events]

    def count(frame: Any, event: str, arg: Any) -> None:
        left[0] -= 1
        if left[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(count)


def child(cfg: Mapping[str, Any]) -> None:
    """The killed process: a seeded workload logging each begun and acknowledged operation."""
    rng = random.Random(int(cfg["seed"]))
    log = open(cfg["log"], "a", encoding="utf-8")  # noqa: SIM115 - lives until the kill

    def reopen() -> Any:
        return _open(cfg["path"], cfg["mode"], int(cfg["seed"]))

    cache = reopen()
    print("ready", flush=True)
    counter = [0]
    ids: list[str] = []
    target = cfg.get("target")
    kill_rng = random.Random(int(cfg["seed"]) * 7 + 1)
    skip, span = kill_rng.randrange(4), 3000
    for _ in range(100_000):
        op = next_op(rng, counter, ids)
        log.write(json.dumps({"B": op, "t": time.time()}) + "\n")
        log.flush()
        armed = op["op"] == target and skip <= 0
        skip -= op["op"] == target
        if armed:  # die at a seeded point inside this call; if it ends first, try a nearer one
            _kill_after(kill_rng.randint(1, span))
        try:
            result, cache = _apply_to_cache(cache, op, reopen)
        finally:
            sys.setprofile(None)
        span = max(1, span // 2) if armed else span
        log.write(json.dumps({"A": op, "result": result, "t": time.time()}) + "\n")
        log.flush()
        os.fsync(log.fileno())
        if op["op"] == "store":
            ids.append(result)
        elif op["op"] == "store_many":
            ids += result
    cache.close()


# ------------------------------------------------------------------------------ the model
@dataclass
class Model:
    """What the store must hold after a sequence of acknowledged operations."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # eid -> entry
    stores_after: dict[str, int] = field(default_factory=dict)  # eid -> rows stored after it
    dead: set[str] = field(default_factory=set)  # responses an acknowledged op invalidated

    def _remove(self, pred: Any) -> None:
        for eid in [e for e, v in self.entries.items() if pred(v)]:
            self.dead.add(self.entries.pop(eid)["resp"])

    def _store(self, item: Mapping[str, Any], eid: str | None, t0: float, t1: float) -> None:
        self._remove(lambda v: (v["prompt"], v["ns"]) == (item["prompt"], item["ns"]))
        for other in self.stores_after:
            self.stores_after[other] += 1
        if eid is None:  # in flight: its id is unknown, and it may or may not have committed
            eid = f"inflight:{item['resp']}"
        self.stores_after[eid] = 0
        self.entries[eid] = {**item, "eid": eid, "t0": t0, "t1": t1}

    def apply(self, op: Mapping[str, Any], result: Any, t0: float, t1: float) -> None:
        kind = op["op"]
        if kind == "store":
            self._store(op, result, t0, t1)
        elif kind == "store_many":
            for i, item in enumerate(op["items"]):
                self._store(item, None if result is None else result[i], t0, t1)
        elif kind == "update":
            entry = self.entries.get(op["eid"])
            if entry is not None and result != "missing":
                self.dead.add(entry["resp"])
                entry["resp"] = op["resp"]
        elif kind == "delete":
            self._remove(lambda v: v["eid"] == op["eid"])
        elif kind == "delete_prompt":
            self._remove(lambda v: (v["prompt"], v["ns"]) == (op["prompt"], op["ns"]))
        elif kind == "tags":
            self._remove(
                lambda v: bool(set(v["tags"]) & set(op["tags"]))
                and op["ns"] in (None, v["ns"])
            )
        elif kind == "bump":
            self._remove(lambda v: v["ns"] == op["ns"])
        elif kind == "similar":
            self._remove(lambda v: v["prompt"] == op["prompt"] and op["ns"] in (None, v["ns"]))


def read_log(path: Path) -> tuple[list[tuple[dict[str, Any], Any, float, float]], Any]:
    """(acknowledged operations with result and begin/ack times, the op in flight or None)."""
    acked: list[tuple[dict[str, Any], Any, float, float]] = []
    inflight: tuple[dict[str, Any], float] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by the kill: it was never acknowledged
            continue
        if "B" in rec:
            inflight = (rec["B"], rec["t"])
        elif inflight is not None:
            acked.append((rec["A"], rec["result"], inflight[1], rec["t"]))
            inflight = None
    return acked, inflight


class _Warnings(logging.Handler):
    """Collects what the reopen logged at WARNING or above (a rebuild says so)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check(path: str, mode: str, seed: int, log: Path) -> tuple[list[str], dict[str, Any]]:
    """Reopen the killed folder and compare it with the model; (problems, facts)."""
    from semcache import EntryNotFoundError, Scope, SemcacheError

    acked, inflight = read_log(log)
    model = Model()
    for op, result, t0, t1 in acked:
        model.apply(op, result, t0, t1)
    maybe = copy.deepcopy(model)
    if inflight is not None:
        maybe.apply(inflight[0], None, inflight[1], float("inf"))
    facts: dict[str, Any] = {
        "acked": len(acked),
        "inflight": None if inflight is None else inflight[0]["op"],
    }
    problems: list[str] = []
    warnings = _Warnings()
    logger = logging.getLogger("semcache")
    logger.addHandler(warnings)
    try:
        cache = _open(path, mode, seed)
    except SemcacheError as exc:
        return [f"the cache did not reopen: {type(exc).__name__}: {exc}"], facts
    finally:
        logger.removeHandler(warnings)
    facts["open_warnings"] = warnings.messages
    try:
        problems += [f"verify: {p}" for p in cache.verify()]
        now = time.time()
        limit = MAX_ENTRIES if mode == "evict" else None
        # answers that may be served for each (prompt, namespace)
        allowed: dict[tuple[int, str], set[str]] = {}
        for m in (model, maybe):
            for v in m.entries.values():
                if v["ttl"] is not None and now > v["t1"] + v["ttl"]:
                    continue  # expired for certain: must not be served
                allowed.setdefault((v["prompt"], v["ns"]), set()).add(v["resp"])
        required = 0
        for eid, v in model.entries.items():
            same = maybe.entries.get(eid)
            if same is None or same["resp"] != v["resp"] or v["ttl"] is not None:
                continue  # the op in flight may have removed or changed it; or it may expire
            if limit is not None and maybe.stores_after[eid] + 1 > limit:
                continue  # FIFO eviction may have taken it
            required += 1
            try:
                entry = cache.get(eid)
            except EntryNotFoundError:
                problems.append(f"acknowledged store {eid} ({v['resp']}) is lost")
                continue
            if entry.response != v["resp"]:
                problems.append(f"{eid} holds {entry.response!r}, acknowledged {v['resp']!r}")
            hit = cache.lookup(prompt_text(v["prompt"]), scope=Scope(namespace=v["ns"]))
            if hit is None or hit.response != v["resp"]:
                got = None if hit is None else hit.response
                problems.append(f"lookup of {v['resp']!r}'s prompt served {got!r}")
        for j in range(N_PROMPTS):
            for ns in NAMESPACES:
                hit = cache.lookup(prompt_text(j), scope=Scope(namespace=ns))
                if hit is None:
                    continue
                if hit.response not in allowed.get((j, ns), set()):
                    why = "invalidated" if hit.response in model.dead else "not allowed"
                    problems.append(f"prompt {j} in {ns} served {hit.response!r} ({why})")
        if limit is not None and cache.stats()["entries"] > limit:
            problems.append(f"{cache.stats()['entries']} entries over max_entries={limit}")
        problems += [f"verify after lookups: {p}" for p in cache.verify()]
        facts["required"] = required
        facts["entries"] = cache.stats()["entries"]
    except Exception as exc:
        problems.append(f"checking raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        cache.close()
    return problems, facts


def crash_run(folder: Path, seed: int, max_delay: float = 1.0) -> dict[str, Any]:
    """One run: start the child, kill it, reopen and check.

    Even seeds kill after a seeded random delay; odd seeds kill inside an operation of one kind
    (``TARGETS``, in turn), at a seeded point of its calls.
    """
    rng = random.Random(seed)
    mode = "evict" if seed % 3 == 0 else "mixed"
    target = TARGETS[(seed // 2) % len(TARGETS)] if seed % 2 else None
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "ops.log"
    cfg = {
        "path": str(folder / "data"), "seed": seed, "mode": mode, "log": str(log),
        "target": target,
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.crash", "child", json.dumps(cfg)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready = proc.stdout.readline().strip() == "ready"
    delay = rng.uniform(0.02, max_delay)
    died_first = False
    if ready and target is None:
        time.sleep(delay)
        died_first = proc.poll() is not None
    elif ready:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)  # it kills itself inside its target operation
        died_first = proc.poll() is not None and proc.returncode != -signal.SIGKILL
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    result: dict[str, Any] = {
        "seed": seed, "mode": mode, "target": target,
        "delay": None if target else round(delay, 3),
    }  # fmt: skip
    if not ready or died_first:
        result["problems"] = [f"the child failed before the kill:\n{err[-3000:]}"]
        return result
    problems, facts = check(cfg["path"], mode, seed, log)
    result.update(facts)
    result["problems"] = problems
    return result


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(json.loads(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
