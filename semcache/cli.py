"""The ``semcache`` command line; each command imports its machinery lazily (fast --help)."""

from __future__ import annotations

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


# Commands register below, one function each (serve, cdc, eval, demo, ...).


# cdc: change data capture from PostgreSQL (semcache/cdc/cli.py; psycopg2 loads when it runs).
from .cdc.cli import cdc as _cdc  # noqa: E402

app.command("cdc")(_cdc)

# serve: the sidecar (semcache/server/cli.py; FastAPI, uvicorn and the model load when it runs).
from .server.cli import serve as _serve  # noqa: E402

app.command("serve")(_serve)

# eval: measure hit policies on labelled pairs (semcache/eval/cli.py; numpy, the model and
# matplotlib load when it runs).
from .eval.cli import eval_command as _eval  # noqa: E402

app.command("eval")(_eval)
