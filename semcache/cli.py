"""The ``semcache`` command line. Each command imports its machinery lazily, so ``--help`` is fast."""

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
