"""The ``semcache`` command line; each command imports its machinery lazily (fast --help).

Commands that need an optional dependency check for it first and, when it is missing, say which
``pip install "semcache[...]"`` to run (:mod:`semcache.extras`): ``serve`` needs ``[server]``,
``cdc`` ``[postgres]``, ``eval`` ``[eval]``. The operator commands (stats, verify, import,
export, invalidate; :mod:`semcache.cli_ops`) need only the core.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

app = typer.Typer(
    name="semcache",
    help="A semantic cache for LLM calls.",
    no_args_is_help=True,
    add_completion=False,
)


def main() -> None:
    """Entry point of the ``semcache`` console script."""
    app()


def needs_extra(extra: str, command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a command so that a missing ``extra`` ends it with the ``pip install`` to run
    (exit code 1) instead of a traceback. typer reads the wrapped function's signature."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            from .extras import MissingExtraError, require

            try:
                require(extra, f"semcache {command}")
            except MissingExtraError as exc:
                typer.echo(f"semcache {command}: {exc}", err=True)
                raise typer.Exit(1) from None
            return func(*args, **kwargs)

        return run

    return decorate


# Commands register below, one function each (serve, cdc, eval, the operator commands).


# cdc: change data capture from PostgreSQL (semcache/cdc/cli.py; psycopg2 loads when it runs).
from .cdc.cli import cdc as _cdc  # noqa: E402

app.command("cdc")(needs_extra("postgres", "cdc")(_cdc))

# serve: the sidecar (semcache/server/cli.py; FastAPI, uvicorn and the model load when it runs).
from .server.cli import serve as _serve  # noqa: E402

app.command("serve")(needs_extra("server", "serve")(_serve))

# eval: measure hit policies on labelled pairs (semcache/eval/cli.py; numpy, the model and
# matplotlib load when it runs).
from .eval.cli import eval_command as _eval  # noqa: E402

app.command("eval")(needs_extra("eval", "eval")(_eval))

# Operator commands on a data folder (semcache/cli_ops.py; the core only).
from . import cli_ops as _ops  # noqa: E402

app.command("stats")(_ops.stats)
app.command("verify")(_ops.verify)
app.command("import")(_ops.import_command)
app.command("export")(_ops.export)
app.command("invalidate")(_ops.invalidate)
