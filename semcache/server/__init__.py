"""The semcache sidecar: a FastAPI app with an OpenAI-compatible endpoint and a JSON cache API.

``create_app(settings, cache=None)`` builds it (see :mod:`semcache.server.app`); ``semcache
serve`` runs it under uvicorn (see :mod:`semcache.server.cli`). Importing this package does not
import FastAPI; ``create_app`` and ``Settings`` are loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    from ..extras import require

    if name == "create_app":
        require("server", "semcache.server.create_app")  # names pip install "semcache[server]"
        from .app import create_app

        return create_app
    if name == "Settings":
        require("server", "semcache.server.Settings")
        from .settings import Settings

        return Settings
    raise AttributeError(name)
