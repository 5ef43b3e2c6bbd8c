"""Separate processes on one data folder, for the multi-process and crash tests.

Two tools, both real OS processes running ``python -m tests.procs``:

- :class:`Worker`: a cache opened in another process and driven call by call over its stdin and
  stdout (one JSON line each way), so a test can say exactly what the other process does and
  when ("B deletes, returns; then A looks up").
- :func:`run_workload` and :func:`stale_serves`: each process writes, invalidates and looks up
  at random for a while, recording every invalidation with the ``time.monotonic()`` its call
  returned and every lookup with the time it began (that clock is shared by all processes on
  one machine); the checker then finds any answer served after an invalidation that covered it
  had returned in some process.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# -------------------------------------------------------------------------------- helpers
def make_embedder(kind: str = "hash", dim: int = 64, model_id: str | None = None) -> Any:
    """The deterministic embedders by name (a process cannot be handed an object)."""
    from .axis_embedder import AxisEmbedder
    from .fakes import HashEmbedder

    if kind == "hash":
        return HashEmbedder(dim=dim, model_id=model_id or "test:hash")
    if kind == "axis":
        return AxisEmbedder(dim=dim, model_id=model_id or "test:axis")
    raise ValueError(f"unknown embedder {kind!r}")


def open_cache(spec: Mapping[str, Any]) -> Any:
    """Open the cache a spec describes: {path, embedder, dim, model_id, options}."""
    from semcache import SemanticCache

    embedder = make_embedder(
        spec.get("embedder", "hash"), spec.get("dim", 64), spec.get("model_id")
    )
    return SemanticCache(spec["path"], embedder=embedder, **spec.get("options", {}))


def _plain(value: Any) -> Any:
    """A JSON-able form of what a cache call returns (Hit, Entry, lists, dicts, scalars)."""
    from semcache import Scope

    if isinstance(value, Scope):
        return value.canonical()
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _args(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    from semcache import Scope

    out = dict(kwargs)
    if isinstance(out.get("scope"), Mapping):
        out["scope"] = Scope.from_dict(out["scope"])
    return out


# ------------------------------------------------------------------ a cache in another process
class WorkerError(Exception):
    """A call in the worker process raised; ``kind`` is the exception's class name."""

    def __init__(self, kind: str, message: str, bases: list[str]) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.bases = bases


class Worker:
    """A SemanticCache opened in a separate Python process, called over a pipe.

    ``Worker(path, options={...})`` returns once the other process has opened the cache (or
    raises :class:`WorkerError` with the error its open raised). ``call("lookup", "q",
    scope={"namespace": "a"})`` runs ``cache.lookup`` there and returns a plain form of its
    result (a Hit becomes a dict). ``close()`` closes the cache there and waits for the exit;
    ``kill()`` SIGKILLs it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        embedder: str = "hash",
        dim: int = 64,
        model_id: str | None = None,
        options: Mapping[str, Any] | None = None,
        timeout: float = 60.0,
    ) -> None:
        spec = {
            "path": str(path),
            "embedder": embedder,
            "dim": dim,
            "model_id": model_id,
            "options": dict(options or {}),
        }
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.procs", "serve", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=ENV,
        )
        reply = self._read()
        if "err" in reply:
            self.proc.wait(timeout=timeout)
            raise WorkerError(reply["err"], reply["msg"], reply.get("bases", []))
        self.pid: int = reply["ready"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=self.timeout)
            raise RuntimeError(f"worker exited with status {code} without answering")
        return json.loads(line)  # type: ignore[no-any-return]

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``cache.<method>(*args, **kwargs)`` in the worker; its result, or WorkerError."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"m": method, "a": list(args), "k": kwargs}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "err" in reply:
            raise WorkerError(reply["err"], reply["msg"], reply.get("bases", []))
        return reply.get("ok")

    def close(self) -> None:
        """Close the cache in the worker (a clean exit) and wait for the process to end."""
        if self.proc.poll() is None:
            self.call("close")
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=self.timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=self.timeout)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            self.kill()


def _serve(spec: Mapping[str, Any]) -> None:
    try:
        cache = open_cache(spec)
    except Exception as exc:
        bases = [c.__name__ for c in type(exc).__mro__]
        print(json.dumps({"err": type(exc).__name__, "msg": str(exc), "bases": bases}), flush=True)
        return
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        method = command["m"]
        try:
            if method == "close":
                cache.close()
                result: Any = None
            else:
                result = getattr(cache, method)(*command["a"], **_args(command["k"]))
            reply = {"ok": _plain(result)}
        except Exception as exc:
            bases = [c.__name__ for c in type(exc).__mro__]
            reply = {"err": type(exc).__name__, "msg": str(exc), "bases": bases}
        print(json.dumps(reply), flush=True)
        if method == "close":
            return


# ---------------------------------------------------------------- the concurrent workload
NAMESPACES = ("a", "b")
N_PROMPTS = 24
N_TAGS = 4


def prompt_text(j: int) -> str:
    """Prompt ``j``: words no other prompt shares, so with HashEmbedder only ``j`` is near it."""
    return f"q{j}x q{j}y q{j}z"


def _wait_for(folder: Path, prefix: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(prefix + "*"))) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(folder.glob(prefix + '*')))} of {n} at {prefix}")
        time.sleep(0.01)


def run_workload(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """One process's share: random stores, invalidations and lookups for ``cfg["seconds"]``.

    All processes start together and stop together (files in ``cfg["sync"]`` are the barrier);
    then each looks up every prompt once more, runs ``verify()`` and closes. Returns the event
    log (times are ``time.monotonic()``), the final answers, verify's problems and any errors.
    """
    me, n = int(cfg["index"]), int(cfg["processes"])
    sync = Path(cfg["sync"])
    rng = random.Random(int(cfg["seed"]) * 1000 + me)
    cache = open_cache(
        {
            "path": cfg["path"],
            "options": {
                "threshold": 0.9,
                "checkpoint_every": int(cfg.get("checkpoint_every", 200)),
                **cfg.get("options", {}),
            },
        }
    )
    from semcache import Scope, SemcacheError

    events: list[dict[str, Any]] = []
    errors: list[str] = []
    mine: list[str] = []  # entry ids this process stored (targets for delete and update)
    counter = 0
    (sync / f"ready-{me}").touch()
    _wait_for(sync, "ready-", n, 120)
    end = time.monotonic() + float(cfg["seconds"])

    def scope(ns: str) -> Any:
        return Scope(namespace=ns)

    # even processes mostly read (so their L1 and index must follow the others' writes, not
    # their own), odd ones mostly write
    reads = 0.97 if me % 2 == 0 else 0.3
    while time.monotonic() < end:
        reading = rng.random() < reads
        roll = 0.5 + rng.random() / 2  # which write: the bands below, 0.5 to 1
        j = rng.randrange(N_PROMPTS)
        ns = rng.choice(NAMESPACES)
        t0 = time.monotonic()
        try:
            if reading:
                hit = cache.lookup(prompt_text(j), scope=scope(ns))
                events.append(
                    {
                        "op": "lookup",
                        "t0": t0,
                        "prompt": j,
                        "ns": ns,
                        "resp": None if hit is None else hit.response,
                        "eid": None if hit is None else hit.entry_id,
                    }
                )
            elif roll < 0.75:
                counter += 1
                resp = f"p{me}-{counter}"
                tags = [f"g{j % N_TAGS}"]
                eid = cache.store(prompt_text(j), resp, scope=scope(ns), tags=tags)
                mine.append(eid)
                events.append(
                    {"op": "store", "t0": t0, "t1": time.monotonic(), "prompt": j, "ns": ns,
                     "tags": tags, "resp": resp, "eid": eid}
                )  # fmt: skip
            elif roll < 0.80:
                cache.delete_prompt(prompt_text(j), scope=scope(ns))
                events.append({"op": "delete_prompt", "t0": t0, "t1": time.monotonic(),
                               "prompt": j, "ns": ns})  # fmt: skip
            elif roll < 0.85:
                tag = f"g{rng.randrange(N_TAGS)}"
                where = ns if rng.random() < 0.5 else None
                cache.invalidate_tags(tag, namespace=where)
                events.append({"op": "tags", "t0": t0, "t1": time.monotonic(), "tags": [tag],
                               "ns": where})  # fmt: skip
            elif roll < 0.86:
                cache.bump(ns)
                events.append({"op": "bump", "t0": t0, "t1": time.monotonic(), "ns": ns})
            elif roll < 0.91:
                where = ns if rng.random() < 0.5 else None
                cache.invalidate_similar(
                    prompt_text(j), 0.95, scope=None if where is None else scope(where)
                )
                events.append({"op": "similar", "t0": t0, "t1": time.monotonic(), "prompt": j,
                               "ns": where})  # fmt: skip
            elif roll < 0.95 and mine:
                eid = rng.choice(mine)
                counter += 1
                resp = f"p{me}-{counter}"
                try:
                    cache.update(eid, response=resp)
                except KeyError:  # EntryNotFoundError: deleted or replaced meanwhile
                    continue
                events.append({"op": "update", "t0": t0, "t1": time.monotonic(), "eid": eid,
                               "resp": resp})  # fmt: skip
            elif mine:
                eid = rng.choice(mine)
                cache.delete(eid)
                events.append({"op": "delete", "t0": t0, "t1": time.monotonic(), "eid": eid})
        except SemcacheError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a foreign exception escaping the API is itself a finding
            errors.append(f"untyped {type(exc).__name__}: {exc}")

    (sync / f"done-{me}").touch()
    _wait_for(sync, "done-", n, 120)
    final: dict[str, str | None] = {}
    for ns in NAMESPACES:
        for j in range(N_PROMPTS):
            t0 = time.monotonic()
            hit = cache.lookup(prompt_text(j), scope=scope(ns))
            resp = None if hit is None else hit.response
            final[f"{ns}/{j}"] = resp
            events.append({"op": "lookup", "t0": t0, "prompt": j, "ns": ns, "resp": resp,
                           "eid": None if hit is None else hit.entry_id})  # fmt: skip
    problems = cache.verify()
    stats = cache.stats()
    (sync / f"verified-{me}").touch()
    _wait_for(sync, "verified-", n, 120)  # nobody closes (and checkpoints) while others verify
    cache.close()
    return {
        "index": me,
        "pid": os.getpid(),
        "events": events,
        "final": final,
        "verify": problems,
        "errors": errors,
        "stats": _plain(stats),
    }


def _keys_of_version(v: Mapping[str, Any]) -> Iterable[tuple[Any, ...]]:
    for tag in v["tags"]:
        yield ("tag", tag, None)
        yield ("tag", tag, v["ns"])
    yield ("bump", v["ns"])
    yield ("prompt", v["prompt"], v["ns"])
    yield ("sim", v["prompt"], None)
    yield ("sim", v["prompt"], v["ns"])
    yield ("eid", v["eid"])


def _keys_of_invalidation(e: Mapping[str, Any]) -> Iterable[tuple[Any, ...]]:
    op = e["op"]
    if op == "tags":
        for tag in e["tags"]:
            yield ("tag", tag, e["ns"])
    elif op == "bump":
        yield ("bump", e["ns"])
    elif op in ("delete_prompt", "store"):  # a store replaces the entry of its exact prompt
        yield ("prompt", e["prompt"], e["ns"])
    elif op == "similar":
        yield ("sim", e["prompt"], e["ns"])
    elif op in ("delete", "update"):
        yield ("eid", e["eid"])


def stale_serves(logs: Iterable[Mapping[str, Any]]) -> tuple[list[str], dict[str, int]]:
    """Every lookup, in any process, that served an answer after an invalidation covering it
    had returned (in any process) before the lookup began; and counts of what was checked.

    An answer ("version") is what a store or an update wrote. An invalidation covers it when it
    began after the version's write returned and matches it: a tag it carries (in its namespace
    if one was given), its namespace's bump, its exact prompt (delete_prompt, or a later store
    of the same prompt, which replaces it), a semantic invalidation of its prompt (in its scope
    if one was given), or a delete or update of its entry id. Overlapping calls are not ordered
    and so never counted.
    """
    versions: dict[str, dict[str, Any]] = {}
    stored: dict[str, dict[str, Any]] = {}  # entry id -> its store event
    invalidations: dict[tuple[Any, ...], list[tuple[float, float]]] = {}
    lookups: list[dict[str, Any]] = []
    all_events = [e for log in logs for e in log["events"]]
    for e in all_events:
        if e["op"] == "store":
            stored[e["eid"]] = e
    for e in all_events:
        if e["op"] == "lookup":
            lookups.append(e)
            continue
        if e["op"] == "store":
            versions[e["resp"]] = dict(e)
        elif e["op"] == "update" and e["eid"] in stored:
            base = stored[e["eid"]]
            versions[e["resp"]] = {**base, "t0": e["t0"], "t1": e["t1"], "resp": e["resp"]}
        for key in _keys_of_invalidation(e):
            invalidations.setdefault(key, []).append((e["t0"], e["t1"]))
    # per key: invalidations sorted by start, with the earliest return among those starting later
    starts: dict[tuple[Any, ...], list[float]] = {}
    suffix_min: dict[tuple[Any, ...], list[float]] = {}
    for key, spans in invalidations.items():
        spans.sort()
        starts[key] = [s for s, _ in spans]
        mins = [0.0] * len(spans)
        best = float("inf")
        for i in range(len(spans) - 1, -1, -1):
            best = min(best, spans[i][1])
            mins[i] = best
        suffix_min[key] = mins
    dead_at: dict[str, float] = {}
    for resp, v in versions.items():
        t = float("inf")
        for key in _keys_of_version(v):
            if key in starts:
                i = bisect.bisect_right(starts[key], v["t1"])
                if i < len(starts[key]):
                    t = min(t, suffix_min[key][i])
        dead_at[resp] = t
    problems: list[str] = []
    served = 0
    for look in lookups:
        resp = look["resp"]
        if resp is None:
            continue
        served += 1
        v = versions.get(resp)
        if v is None:
            problems.append(f"served {resp!r}, which no acknowledged store or update wrote")
            continue
        if (look["prompt"], look["ns"]) != (v["prompt"], v["ns"]):
            problems.append(f"served {resp!r} (prompt {v['prompt']} in {v['ns']}) for "
                            f"prompt {look['prompt']} in {look['ns']}")  # fmt: skip
        elif look["t0"] > dead_at[resp]:
            problems.append(
                f"served {resp!r} for prompt {look['prompt']} in {look['ns']} "
                f"{look['t0'] - dead_at[resp]:.4f}s after an invalidation covering it returned"
            )
    counts = {
        "lookups": len(lookups),
        "served": served,
        "versions": len(versions),
        "invalidations": sum(len(s) for s in invalidations.values()),
        "invalidated_versions": sum(1 for t in dead_at.values() if t != float("inf")),
    }
    return problems, counts


def run_processes(
    folder: Path,
    processes: int,
    seconds: float,
    seed: int = 0,
    *,
    store_url: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Start ``processes`` workload processes on ``folder / "data"`` (or, with ``store_url``,
    replicas of that shared store, each with its own index folder) and return their logs."""
    sync = folder / "sync"
    sync.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(processes):
        extra = dict(options or {})
        if store_url is not None:
            extra["index_dir"] = str(folder / f"replica-{i}")
        cfg = {
            "path": store_url or str(folder / "data"),
            "options": extra,
            "index": i,
            "processes": processes,
            "seconds": seconds,
            "seed": seed,
            "sync": str(sync),
            "out": str(folder / f"log-{i}.json"),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.procs", "workload", json.dumps(cfg)],
                cwd=ROOT,
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    failures = []
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=seconds + 300)
        path = folder / f"log-{i}.json"
        if proc.returncode != 0 or not path.exists():
            failures.append(f"process {i} exited with {proc.returncode}:\n{out[-3000:]}")
            continue
        logs.append(json.loads(path.read_text()))
    if failures:
        raise RuntimeError("\n".join(failures))
    return logs


def _workload_main(cfg: Mapping[str, Any]) -> None:
    try:
        result = run_workload(cfg)
    except BaseException:
        traceback.print_exc()
        (Path(cfg["sync"]) / f"done-{cfg['index']}").touch()  # do not hang the others
        (Path(cfg["sync"]) / f"verified-{cfg['index']}").touch()
        raise
    Path(cfg["out"]).write_text(json.dumps(result))


def _flight_main(cfg: Mapping[str, Any]) -> None:
    """``cfg["threads"]`` threads of this process ask ``cfg["prompt"]`` through
    ``get_or_compute`` at the wall-clock time ``cfg["at"]``; the compute function appends a
    line to ``cfg["calls"]`` (O_APPEND: atomic between processes) and takes ``cfg["compute"]``
    seconds. Prints the answers as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    cache = open_cache(cfg["spec"])

    def compute(prompt: str) -> str:
        with open(cfg["calls"], "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(float(cfg["compute"]))
        return f"answer from {os.getpid()}"

    time.sleep(max(0.0, float(cfg["at"]) - time.time()))
    with ThreadPoolExecutor(int(cfg["threads"])) as pool:
        answers = list(
            pool.map(
                lambda _: cache.get_or_compute(cfg["prompt"], compute),
                range(int(cfg["threads"])),
            )
        )
    stats = cache.stats()
    cache.close()
    print(json.dumps({"answers": answers, "remote": stats["singleflight_remote"]}), flush=True)


if __name__ == "__main__":
    mode, arg = sys.argv[1], json.loads(sys.argv[2])
    if mode == "serve":
        _serve(arg)
    elif mode == "flight":
        _flight_main(arg)
    elif mode == "workload":
        _workload_main(arg)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
