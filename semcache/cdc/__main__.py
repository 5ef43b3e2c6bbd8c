"""``python -m semcache.cdc ...``: the ``semcache cdc`` command, runnable without the console
script (tests and containers use it)."""

from __future__ import annotations

import typer

from .cli import cdc

if __name__ == "__main__":
    typer.run(cdc)
