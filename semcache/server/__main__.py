"""``python -m semcache.server [--data DIR] [--host H] [--port P] [--upstream URL]``."""

from __future__ import annotations

import typer

from .cli import serve

if __name__ == "__main__":
    typer.run(serve)
