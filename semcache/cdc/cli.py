"""``semcache cdc``: run the change-data-capture consumer against a cache's data folder.

Only typer is imported here; psycopg2, the cache and the rules module load when the command
runs, so ``semcache --help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import typer


def load_object(spec: str, what: str) -> Any:
    """Import ``module:ATTR`` (the current directory is importable, as with ``python -m``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise typer.BadParameter(f"{what} must look like module:NAME, got {spec!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise typer.BadParameter(f"cannot import {module_name!r} for {what}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise typer.BadParameter(f"{module_name!r} has no {attr!r} ({what})") from None
    return obj


class InvalidationOnlyEmbedder:
    """Stands in for the cache's model in a process that only invalidates: it carries the
    model id and dimension the data folder records (so the cache opens) and refuses to embed.
    Invalidation by tags, ids and namespace versions never embeds, so the consumer need not
    load the model."""

    def __init__(self, model_id: str, dim: int) -> None:
        self.model_id = model_id
        self.dim = dim

    def embed(self, texts: Any) -> Any:
        from ..errors import SemcacheError

        raise SemcacheError("the CDC consumer's cache does not embed (invalidation only)")


def recorded_model(data: str | Path, schema: str = "semcache") -> tuple[str, int] | None:
    """The (model_id, dim) a store records (a data folder, or a ``postgresql://`` store in
    ``schema``), or None for a new one."""
    from ..cache import DB_FILE
    from ..stores import is_store_url, open_store

    if is_store_url(data):
        store = open_store(data, schema=schema)
        try:
            model_id, dim = store.get_meta("model_id"), store.get_meta("dim")
        finally:
            store.close()
        return None if model_id is None or dim is None else (model_id, int(dim))
    db = Path(data) / DB_FILE
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30.0)
        try:
            rows = dict(
                conn.execute("SELECT key, value FROM meta WHERE key IN ('model_id', 'dim')")
            )
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    if "model_id" not in rows or "dim" not in rows:
        return None
    return str(rows["model_id"]), int(rows["dim"])


def open_cache(
    data: str | Path,
    embedder_spec: str | None,
    *,
    schema: str = "semcache",
    index_dir: Path | None = None,
) -> Any:
    """Open the cache for invalidation: ``synchronous=FULL`` so each invalidation is on disk
    before the consumer records its position (a power cut cannot lose one it confirmed). A
    ``postgresql://`` store is opened as a replica (``schema``, ``index_dir``), and every other
    replica of it sees the invalidations."""
    from ..cache import SemanticCache
    from ..stores import is_store_url

    if embedder_spec:
        embedder = load_object(embedder_spec, "--embedder")
        if callable(embedder) and not hasattr(embedder, "embed"):
            embedder = embedder()
    else:
        recorded = recorded_model(data, schema)
        embedder = InvalidationOnlyEmbedder(*recorded) if recorded else None
    if is_store_url(data):
        return SemanticCache(
            str(data), embedder=embedder, synchronous="FULL", schema=schema, index_dir=index_dir
        )
    if index_dir is not None:
        raise typer.BadParameter("--index-dir goes with a postgresql:// --data")
    return SemanticCache(data, embedder=embedder, synchronous="FULL")


def cdc(
    dsn: str = typer.Option(
        ..., "--dsn", envvar="SEMCACHE_CDC_DSN", help="PostgreSQL connection string or URL."
    ),
    rules: str = typer.Option(
        ..., "--rules", help="The rules, as module:NAME (a list of semcache.cdc.Rule)."
    ),
    data: str = typer.Option(
        "indexes/default",
        "--data",
        envvar="SEMCACHE_DATA",
        help="The cache's data folder, or the postgresql:// URL of a shared store.",
    ),
    schema: str = typer.Option(
        "semcache", "--schema", envvar="SEMCACHE_SCHEMA", help="A shared store's schema."
    ),
    index_dir: Path | None = typer.Option(  # noqa: B008 (typer declares options in defaults)
        None,
        "--index-dir",
        envvar="SEMCACHE_INDEX_DIR",
        help="With a shared store: this replica's index folder (its CDC positions go in "
        "INDEX_DIR/cdc).",
    ),
    slot: str = typer.Option("semcache", "--slot", help="Logical replication slot name."),
    publication: str = typer.Option("semcache", "--publication", help="Publication name."),
    setup: bool = typer.Option(
        True, "--setup/--no-setup", help="Create the publication and slot if missing."
    ),
    on_slot_lost: str = typer.Option(
        "raise",
        "--on-slot-lost",
        help="When the slot is gone: 'raise' (stop; flush the cache yourself) or 'flush' "
        "(recreate it and invalidate what the rules cover).",
    ),
    embedder: str | None = typer.Option(
        None,
        "--embedder",
        help="module:NAME of the cache's embedder (default: none is loaded when the data "
        "folder already records its model).",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="Logging level."),
) -> None:
    """Invalidate cache entries from PostgreSQL changes (logical replication, pgoutput).

    Runs until SIGTERM or Ctrl-C. The position goes to DATA/cdc/SLOT.json once the
    invalidations are committed, and only then is it confirmed to PostgreSQL.
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if on_slot_lost not in ("raise", "flush"):
        raise typer.BadParameter("--on-slot-lost must be 'raise' or 'flush'")
    log = logging.getLogger("semcache.cdc")
    # SIGTERM/SIGINT stop the command cleanly from here on, not only once the consumer runs:
    # one that arrives while the rules load or the cache opens is remembered and honoured.
    stop = _StopOnSignal(log)
    try:
        _cdc(
            stop,
            dsn=dsn,
            rules=rules,
            data=data,
            schema=schema,
            index_dir=index_dir,
            slot=slot,
            publication=publication,
            setup=setup,
            on_slot_lost=on_slot_lost,
            embedder=embedder,
        )
    finally:
        stop.restore()


def _cdc(
    stop: _StopOnSignal,
    *,
    dsn: str,
    rules: str,
    data: str,
    schema: str,
    index_dir: Path | None,
    slot: str,
    publication: str,
    setup: bool,
    on_slot_lost: str,
    embedder: str | None,
) -> None:
    from ..errors import SemcacheError
    from .consumer import ChangeConsumer
    from .rules import Rule

    rule_list = load_object(rules, "--rules")
    if isinstance(rule_list, Rule):
        rule_list = [rule_list]
    try:
        rule_list = list(rule_list)
    except TypeError:
        raise typer.BadParameter(f"{rules} is not a list of Rule") from None
    log = logging.getLogger("semcache.cdc")
    if stop.requested:
        log.info("stopped before the cache was opened")
        return
    try:
        cache = open_cache(data, embedder, schema=schema, index_dir=index_dir)
        try:
            consumer = ChangeConsumer(
                dsn,
                cache,
                rule_list,
                slot=slot,
                publication=publication,
                on_slot_lost=on_slot_lost,  # type: ignore[arg-type]
            )
            stop.forward_to(consumer)
            try:
                if setup and not stop.requested:
                    consumer.setup()
                log.info(
                    "consuming slot %s (publication %s) into %s; position file %s",
                    slot,
                    publication,
                    cache.location,
                    consumer.state_file,
                )
                consumer.run(handle_signals=False)
                log.info("stopped; %s", consumer.stats)
            finally:
                consumer.close()
        finally:
            cache.close()
    except SemcacheError as exc:
        typer.echo(f"semcache cdc: {exc}", err=True)
        raise typer.Exit(code=1) from None


class _StopOnSignal:
    """SIGTERM and SIGINT handlers for the command's whole life (main thread only): a signal
    is recorded, and passed on to the consumer once there is one."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._requested = threading.Event()
        self._consumer: Any = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def forward_to(self, consumer: Any) -> None:
        """From now on a signal stops ``consumer``; one that came before stops it at once."""
        self._consumer = consumer
        if self._requested.is_set():
            consumer.stop()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._log.info("signal %d: stopping the CDC consumer", signum)
        self._requested.set()
        if self._consumer is not None:
            self._consumer.stop()
