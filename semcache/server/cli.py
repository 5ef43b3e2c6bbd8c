"""``semcache serve``: run the sidecar under uvicorn.

Every flag is also an environment variable (``SEMCACHE_DATA``, ``SEMCACHE_HOST``,
``SEMCACHE_PORT``, ``SEMCACHE_UPSTREAM``, ...; see :mod:`semcache.server.settings`); a flag given
on the command line wins. FastAPI, uvicorn and the model load only when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def serve(
    data: Annotated[
        str | None,
        typer.Option(
            help="data folder of the cache, or a postgresql:// URL of a shared store "
            "(env SEMCACHE_DATA)"
        ),
    ] = None,
    index_dir: Annotated[
        Path | None,
        typer.Option(
            help="with a postgresql:// --data: folder of this replica's index files "
            "(env SEMCACHE_INDEX_DIR)"
        ),
    ] = None,
    schema: Annotated[
        str | None,
        typer.Option(help="with a postgresql:// --data: the store's schema (env SEMCACHE_SCHEMA)"),
    ] = None,
    host: Annotated[str | None, typer.Option(help="interface (env SEMCACHE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (env SEMCACHE_PORT)")] = None,
    upstream: Annotated[
        str | None,
        typer.Option(help="OpenAI-compatible base URL for misses (env SEMCACHE_UPSTREAM)"),
    ] = None,
    batching: Annotated[
        bool | None,
        typer.Option(
            "--batching/--no-batching",
            help="batch concurrent embeddings (env SEMCACHE_BATCHING)",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="uvicorn log level (env SEMCACHE_LOG_LEVEL)")
    ] = None,
    access_log: Annotated[bool, typer.Option(help="log every request")] = False,
) -> None:
    """Run the sidecar: an OpenAI-compatible /v1/chat/completions with the cache in front."""
    from pydantic import ValidationError

    from .settings import Settings

    overrides: dict[str, Any] = {
        name: value
        for name, value in {
            "data": data,
            "index_dir": index_dir,
            "schema": schema,
            "host": host,
            "port": port,
            "upstream": upstream,
            "batching": batching,
            "log_level": log_level,
        }.items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        # without the values given: a postgresql:// URL may carry a password
        problems = "\n".join(
            f"  {'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        typer.echo(f"invalid settings:\n{problems}", err=True)
        raise typer.Exit(2) from None

    import uvicorn

    from .app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=access_log,
        # SIGTERM: stop accepting, let the requests in flight finish for at most this long,
        # then close the cache (its index is checkpointed)
        timeout_graceful_shutdown=settings.shutdown_grace,
    )
