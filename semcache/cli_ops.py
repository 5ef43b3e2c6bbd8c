"""Operator commands on a cache's data folder: ``stats``, ``verify``, ``import``, ``export``,
``invalidate``.

They open the same folder or shared store the sidecar serves (``--data``, or ``SEMCACHE_DATA``
as for ``semcache serve``; a ``postgresql://`` store is opened as one more replica, in the
schema ``SEMCACHE_SCHEMA`` names, with its index in ``SEMCACHE_INDEX_DIR`` or the default
folder under the user's cache directory) through the public :class:`~semcache.SemanticCache`
API; the store is shared between processes, so they can run while the sidecar does. Commands
that never embed (stats, verify, export, invalidate by tag or namespace) open the cache with a
stand-in that carries the store's recorded model id and dimension, so they start without
loading the model; ``import`` and ``invalidate --similar`` load it.

Only typer is imported at module level (``semcache --help`` stays fast); rich, numpy and the
cache load when a command runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import numpy as np

    from .cache import SemanticCache

DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        envvar="SEMCACHE_DATA",
        help="the cache's data folder or postgresql:// store, as for `semcache serve` (env "
        "SEMCACHE_DATA; a store's schema and index folder come from SEMCACHE_SCHEMA and "
        "SEMCACHE_INDEX_DIR)",
    ),
]
DEFAULT_DATA = "indexes/default"
IMPORT_FIELDS = frozenset({"prompt", "response", "scope", "tags", "ttl", "metadata"})
SCOPE_FIELDS = frozenset({"namespace", "model", "params", "system", "context"})
MAX_TTL = 1e12  # seconds (about 31,700 years): anything longer is a mistake; null never expires


def _fail(command: str, message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"semcache {command}: {message}", err=True)
    return typer.Exit(code)


def _open(
    data: str, command: str, *, embed: bool, precision: str = "fp32", progress: bool = True
) -> SemanticCache:
    """Open the cache in ``data``; without ``embed`` no model is loaded (see module doc).
    A rebuild of the index on opening shows a progress bar unless ``progress`` is False."""
    from .cache import SemanticCache
    from .cdc.cli import InvalidationOnlyEmbedder, recorded_model
    from .embed import SentenceTransformerEmbedder
    from .errors import SemcacheError
    from .pgstore import redact
    from .stores import is_store_url

    where: dict[str, Any] = {}
    if is_store_url(data):
        where["schema"] = os.environ.get("SEMCACHE_SCHEMA", "semcache")
        where["index_dir"] = os.environ.get("SEMCACHE_INDEX_DIR") or None
    try:
        recorded = recorded_model(data, where.get("schema", "semcache"))
    except SemcacheError as exc:
        raise _fail(command, str(exc)) from None
    if recorded is None and not embed:
        shown = redact(data) if is_store_url(data) else data
        raise _fail(command, f"no cache in {shown} (no store there yet)")
    try:
        with _bars(progress):  # opening rebuilds the index when it cannot be trusted
            if embed:
                model = SentenceTransformerEmbedder(precision=precision)  # type: ignore[arg-type]
                return SemanticCache(data, embedder=model, **where)
            stand_in = InvalidationOnlyEmbedder(*recorded)  # type: ignore[misc]
            return SemanticCache(data, embedder=stand_in, **where)
    except SemcacheError as exc:
        raise _fail(command, str(exc)) from None


def _bars(show: bool = True) -> AbstractContextManager[None]:
    """Long work inside (index rebuilds, re-embedding, the import itself) draws a progress bar
    with an ETA on stderr, so stdout stays the command's output (JSON, JSONL); with ``show``
    False it only logs (see :mod:`semcache.progress`)."""
    from rich.console import Console

    if not show:
        return contextlib.nullcontext()

    from .progress import bars

    return bars(Console(stderr=True))


# --------------------------------------------------------------------------------------------
# stats, verify
# --------------------------------------------------------------------------------------------


def stats(
    data: DataOption = DEFAULT_DATA,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Print the cache's counts: entries, bytes, shards, invalidations by pattern, model."""
    cache = _open(data, "stats", embed=False)
    try:
        numbers = cache.stats()
    finally:
        cache.close()
    if as_json:
        typer.echo(json.dumps(numbers, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"semcache {cache.location}", show_header=False)
    table.add_column("name", style="bold")
    table.add_column("value", justify="right")
    for name, value in numbers.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(name, str(value))
    Console().print(table)


def verify(
    data: DataOption = DEFAULT_DATA,
    fix: Annotated[
        bool, typer.Option("--fix", help="rebuild the index from the store when unsound")
    ] = False,
) -> None:
    """Check that the store and the index agree; exit 1 when they do not.

    With --fix the index is rebuilt from the store and the counters recomputed; the exit code
    is then 1 only when they still disagree.
    """
    cache = _open(data, "verify", embed=False)
    try:
        with _bars():  # --fix rebuilds the index from the store
            problems = cache.verify(fix=fix)
        for problem in problems:
            typer.echo(f"problem: {problem}")
        if not problems:
            typer.echo("ok: store and index agree")
            return
        if not fix:
            raise _fail("verify", f"{len(problems)} problem(s); run with --fix to repair")
        left = cache.verify()
        if left:
            for problem in left:
                typer.echo(f"still: {problem}")
            raise _fail("verify", f"{len(left)} problem(s) left after --fix")
        typer.echo(f"fixed: {len(problems)} problem(s) repaired; store and index agree")
    finally:
        cache.close()


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------


class BadLine(Exception):
    """One line of an import file that cannot be stored (the message says why)."""


def parse_line(text: str) -> dict[str, Any]:
    """One import line as ``store_many`` item: a JSON object with ``prompt`` and ``response``
    (strings) and optional ``scope`` (a Scope as a dict), ``tags`` (list of strings), ``ttl``
    (seconds, or null for never) and ``metadata`` (an object). Raises :class:`BadLine`."""
    from .errors import SemcacheError
    from .keys import normalise
    from .types import Scope

    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise BadLine("not a JSON object")
    unknown = set(raw) - IMPORT_FIELDS
    if unknown:
        raise BadLine(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(IMPORT_FIELDS)}")
    item: dict[str, Any] = {}
    for name in ("prompt", "response"):
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise BadLine(f"{name!r} must be a non-empty string")
        item[name] = value
    try:
        normalise(item["prompt"])  # what the cache embeds and matches repeats on
    except SemcacheError as exc:
        raise BadLine(f"bad prompt: {exc}") from None
    if "scope" in raw:
        if not isinstance(raw["scope"], dict):
            raise BadLine("'scope' must be an object (namespace, model, params, system, context)")
        unknown = set(raw["scope"]) - SCOPE_FIELDS
        if unknown:  # a misspelt field would silently put the answer in another scope
            raise BadLine(
                f"unknown scope field(s) {sorted(unknown)}; allowed: {sorted(SCOPE_FIELDS)}"
            )
        try:
            item["scope"] = Scope.from_dict(raw["scope"])
        except SemcacheError as exc:
            raise BadLine(f"bad scope: {exc}") from None
    if "tags" in raw:
        tags = raw["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise BadLine("'tags' must be a list of non-empty strings")
        item["tags"] = tags
    if "ttl" in raw:
        ttl = raw["ttl"]
        if ttl is not None and (
            isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
            or not 0 <= ttl <= MAX_TTL  # also NaN, JSON's 1e999 (inf) and ints past floats
        ):
            raise BadLine(f"'ttl' must be seconds (a number from 0 to {MAX_TTL:.0e}) or null")
        item["ttl"] = ttl
    if "metadata" in raw:
        if not isinstance(raw["metadata"], dict):
            raise BadLine("'metadata' must be an object")
        item["metadata"] = raw["metadata"]
    return item


def _batches(
    path: Path, size: int, errors: list[tuple[int, str]]
) -> Iterator[tuple[int, list[tuple[int, dict[str, Any]]]]]:
    """Yield (lines read, [(line number, item)]) per ``size`` lines; bad lines go to
    ``errors`` (with their 1-based number) and blank lines are skipped."""
    batch: list[tuple[int, dict[str, Any]]] = []
    read = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            read += 1
            try:
                text = raw.decode("utf-8")
                if text.strip():
                    batch.append((number, parse_line(text)))
            except UnicodeDecodeError:
                errors.append((number, "not UTF-8 text"))
            except BadLine as exc:
                errors.append((number, str(exc)))
            if read >= size:
                yield read, batch
                batch, read = [], 0
    if read:
        yield read, batch


def _count_lines(path: Path) -> int:
    """Lines in the file, the last one counted also without its newline (as ``_batches``)."""
    count, last = 0, b"\n"
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _store_batch(
    cache: SemanticCache,
    batch: list[tuple[int, dict[str, Any]]],
    vectors: np.ndarray,
    errors: list[tuple[int, str]],
) -> int:
    """Store a batch with its vectors (one row per item) in one ``store_many``; when the cache
    refuses an item of it (one bad item makes ``store_many`` store nothing), store its items
    one by one and report the refused lines. Any other error (the store failing) is not a
    line's fault and propagates."""
    from .errors import InvalidInputError

    if not batch:
        return 0
    try:
        return len(cache.store_many([item for _, item in batch], vectors=vectors))
    except InvalidInputError:
        pass
    stored = 0
    for row, (number, item) in enumerate(batch):
        try:
            cache.store_many([item], vectors=vectors[row : row + 1])
            stored += 1
        except InvalidInputError as exc:
            errors.append((number, str(exc)))
    return stored


class _Embedding:
    """Embeds import batches with the cache's model in chunks of ``CHUNK`` texts, choosing
    torch's thread count per chunk by measurement (:class:`~semcache.threads.ThreadTuner`)
    unless ``threads`` fixes it; chunks keep the tuner's trials of the slower count short."""

    CHUNK = 256

    def __init__(self, cache: SemanticCache, threads: int | None) -> None:
        import torch

        from .threads import ThreadTuner

        self.cache = cache
        self._set = torch.set_num_threads
        most = torch.get_num_threads()
        self.tuner = ThreadTuner([threads] if threads else [1, most])
        self.used: dict[int, int] = {}  # threads -> lines embedded with them

    def __call__(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        if not texts:
            return self.cache.embed([])
        parts = []
        for start in range(0, len(texts), self.CHUNK):
            chunk = texts[start : start + self.CHUNK]
            threads = self.tuner.next()
            self._set(threads)
            began = time.perf_counter()
            parts.append(self.cache.embed(chunk))
            self.tuner.record(threads, len(chunk), time.perf_counter() - began)
            self.used[threads] = self.used.get(threads, 0) + len(chunk)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def describe(self) -> str:
        """Which thread counts embedded how many lines, e.g. "1 thread: 9,216 lines"."""
        return ", ".join(
            f"{t} thread{'s' if t > 1 else ''}: {n:,} lines" for t, n in sorted(self.used.items())
        )


def import_command(
    file: Annotated[Path, typer.Argument(help="JSONL: one {prompt, response, ...} per line")],
    data: DataOption = DEFAULT_DATA,
    batch_size: Annotated[
        int, typer.Option(min=1, max=100_000, help="lines embedded and written together")
    ] = 1024,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="show a progress bar with an ETA")
    ] = True,
    precision: Annotated[
        str,
        typer.Option(
            help="embedding precision: auto (bf16 where the CPU has it, as the sidecar "
            "embeds; similarities move by about 0.002), fp32 or bf16"
        ),
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch threads for embedding; default: measured, batch by batch, between 1 "
            "and torch's default (one is often faster on a busy host)",
        ),
    ] = None,
) -> None:
    """Load known answers from JSONL, embedding them in batches behind a progress bar.

    Each line is an object with "prompt", "response" and optional "scope", "tags", "ttl"
    (seconds; null: never expires) and "metadata". A bad line is reported with its number and
    nothing from it is stored; every other line is. Exits 1 when any line was bad.
    """
    if not file.is_file():
        raise _fail("import", f"{file} is not a file", 2)
    from .errors import SemcacheError
    from .keys import normalise
    from .progress import Progress

    total = _count_lines(file)
    errors: list[tuple[int, str]] = []
    stored = done = 0
    failure: str | None = None
    spent = {"reading": 0.0, "embedding": 0.0, "storing": 0.0}
    opened = time.perf_counter()
    with _bars(progress):
        cache = _open(data, "import", embed=True, precision=precision, progress=progress)
        started = time.perf_counter()  # the rate below is the import's, not the model load's
        try:
            embed = _Embedding(cache, threads)
            with Progress("importing", total=total or None, unit="lines") as bar:
                batches = _batches(file, batch_size, errors)
                try:
                    while True:
                        t0 = time.perf_counter()
                        step = next(batches, None)
                        t1 = time.perf_counter()
                        spent["reading"] += t1 - t0
                        if step is None:
                            break
                        read, batch = step
                        if batch:
                            vectors = embed([normalise(item["prompt"]) for _, item in batch])
                            t2 = time.perf_counter()
                            spent["embedding"] += t2 - t1
                            stored += _store_batch(cache, batch, vectors, errors)
                            spent["storing"] += time.perf_counter() - t2
                        done += read
                        bar.advance(read)
                except SemcacheError as exc:  # the store failed: stop, saying how far it got
                    failure = f"stopped after line {done}: {type(exc).__name__}: {exc}"
        finally:
            cache.close()
    seconds = time.perf_counter() - started
    errors.sort()
    for number, reason in errors:
        typer.echo(f"{file}:{number}: {reason}; nothing stored from this line", err=True)
    rate = stored / seconds if seconds > 0 else 0.0
    split = ", ".join(f"{name} {value:.1f}s" for name, value in spent.items() if name != "reading")
    typer.echo(
        f"stored {stored} entries from {file} in {seconds:.1f}s ({rate:.0f}/s; {split}, "
        f"reading {spent['reading']:.1f}s; the model loaded in {started - opened:.1f}s "
        f"before); {len(errors)} bad line(s)"
    )
    if embed.used:
        typer.echo(f"embedded with {embed.describe()}")
    if failure is not None:
        raise _fail("import", f"{failure} (lines up to {done} were imported as reported)")
    if errors:
        raise typer.Exit(1)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def export(
    data: DataOption = DEFAULT_DATA,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="write here instead of stdout")
    ] = None,
    namespace: Annotated[str | None, typer.Option(help="only this namespace's entries")] = None,
) -> None:
    """Write every live entry as JSONL that `semcache import` reads back.

    "ttl" is the time an entry has left (null: never expires; at most 1e12 seconds, what
    import takes). Expired entries and entries of an older namespace version (invalidated by
    a bump) are not live: they are left out, so an import never brings them back.
    """
    cache = _open(data, "export", embed=False)
    count = 0
    try:
        sink = out.open("w", encoding="utf-8") if out is not None else sys.stdout
        try:
            now = time.time()
            versions: dict[str, int] = {}
            for entry in cache.iter_entries(namespace=namespace):
                name = entry.scope.namespace
                if name not in versions:
                    versions[name] = cache.version(name)
                if entry.version != versions[name]:
                    continue  # dead since a bump
                if entry.expires_at is not None and entry.expires_at <= now:
                    continue  # expired, not yet removed
                ttl = None if entry.expires_at is None else min(entry.expires_at - now, MAX_TTL)
                row: dict[str, Any] = {
                    "prompt": entry.prompt,
                    "response": entry.response,
                    "scope": entry.scope.canonical(),
                    "tags": list(entry.tags),
                    "ttl": ttl,
                }
                if entry.metadata:
                    row["metadata"] = dict(entry.metadata)
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        finally:
            if out is not None:
                sink.close()
    finally:
        cache.close()
    typer.echo(f"exported {count} entries", err=True)


# --------------------------------------------------------------------------------------------
# invalidate
# --------------------------------------------------------------------------------------------


def invalidate(
    data: DataOption = DEFAULT_DATA,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="delete entries carrying this tag (repeat)")
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            help="with --tag: only this namespace's tagged entries; alone: make the whole "
            "namespace unreachable at once (a version bump)"
        ),
    ] = None,
    similar: Annotated[
        str | None, typer.Option(help="delete entries whose prompt means this (needs --radius)")
    ] = None,
    radius: Annotated[
        float | None, typer.Option(help="cosine similarity at or above which --similar deletes")
    ] = None,
) -> None:
    """Invalidate by tag, by namespace, or by meaning; prints how many entries it removed."""
    from .errors import SemcacheError

    if similar is None and radius is not None:
        raise _fail("invalidate", "--radius goes with --similar", 2)
    if similar is not None and (tag or namespace is not None):
        raise _fail("invalidate", "--similar cannot be combined with --tag or --namespace", 2)
    if similar is not None and radius is None:
        raise _fail("invalidate", "--similar needs --radius (e.g. --radius 0.9)", 2)
    if not tag and namespace is None and similar is None:
        raise _fail("invalidate", "give --tag, --namespace or --similar", 2)
    cache = _open(data, "invalidate", embed=similar is not None)
    try:
        if similar is not None:
            removed = cache.invalidate_similar(similar, radius)  # type: ignore[arg-type]
            typer.echo(f"removed {len(removed)} entries similar to {similar!r} (>= {radius})")
        elif tag:
            if namespace is None:
                n = cache.invalidate_tags(*tag)
            else:
                n = cache.invalidate_tags(*tag, namespace=namespace)
            where = f" in namespace {namespace!r}" if namespace is not None else ""
            typer.echo(f"removed {n} entries tagged {', '.join(tag)}{where}")
        else:
            version = cache.bump(namespace)  # type: ignore[arg-type]
            typer.echo(f"namespace {namespace!r} is now version {version}: its entries are gone")
    except SemcacheError as exc:
        raise _fail("invalidate", str(exc)) from None
    finally:
        cache.close()
