"""Wrappers that put a semantic cache in front of LLM client libraries.

``wrap(client, cache, **defaults)`` picks the wrapper for the client's library; today the
OpenAI SDK (``openai.OpenAI`` and ``openai.AsyncOpenAI``, see :mod:`semcache.clients.openai`).
The SDK is imported only when ``wrap`` is called, so ``import semcache`` stays light; without it
(and pydantic) ``wrap`` raises :class:`~semcache.extras.MissingExtraError`, which names
``pip install "semcache[openai]"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..cache import SemanticCache

__all__ = ["wrap"]


def wrap(client: Any, cache: SemanticCache, **defaults: Any) -> Any:
    """Return ``client`` with ``chat.completions.create`` answered from ``cache`` when it can.

    See :func:`semcache.clients.openai.wrap` for the options and the caching policy.
    """
    from ..extras import needs

    with needs("openai", "semcache.wrap (the OpenAI SDK wrapper)"):
        from .openai import wrap as wrap_openai

    return wrap_openai(client, cache, **defaults)
