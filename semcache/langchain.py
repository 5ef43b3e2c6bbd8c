"""A LangChain cache backed by :class:`~semcache.SemanticCache` (``pip install
"semcache[langchain]"``).

    from langchain_core.globals import set_llm_cache
    from semcache.langchain import SemanticLangChainCache

    set_llm_cache(SemanticLangChainCache("indexes/langchain"))   # a data folder, or
    set_llm_cache(SemanticLangChainCache(SemanticCache("indexes/langchain", threshold=0.9)))

LangChain calls ``lookup(prompt, llm_string)`` before a model runs and ``update(...)`` after.
The key is split the way semcache splits every chat request:

* the **scope** (matched exactly) is LangChain's ``llm_string`` (the model and every invocation
  parameter) plus every message except the last human one: system prompts, earlier turns, and
  anything after the last human message (tool results) with its position;
* the **prompt** (matched by meaning) is the text of the last human message.

So a paraphrase of the last question, after the same conversation, to the same model with the
same parameters is served from the cache; another model, other parameters or another history
never are. For plain LLMs (not chat models) the prompt string itself is compared by meaning.
``clear()`` bumps the cache's namespace: every entry this adapter stored becomes unreachable at
once (other namespaces of the same cache are untouched).

Streaming follows LangChain's own rules, which this class does not change: ``stream()`` of a
model that implements streaming neither reads nor writes the cache; ``invoke()`` does, also when
the model streams internally (``streaming=True``), and ``stream()`` of a model without streaming
falls back to ``invoke()`` and so is cached too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .extras import needs

with needs("langchain", "semcache.langchain.SemanticLangChainCache"):
    from langchain_core.caches import BaseCache
    from langchain_core.load import dumps, loads
    from langchain_core.outputs import Generation

from .cache import MISSING
from .errors import InvalidInputError, InvalidScopeError
from .types import Scope

if TYPE_CHECKING:
    from .cache import SemanticCache

__all__ = ["SemanticLangChainCache", "split_prompt"]

GENERATIONS_KEY = "langchain_generations"
_MODEL_RE = re.compile(r"\('(?:model_name|model|model_id|_type)', '([^']*)'\)")


def _text(content: Any) -> tuple[str, list[Any]]:
    """The text of a message's content and its non-text blocks (images, files...)."""
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    other: list[Any] = []
    if isinstance(content, list):
        for block in content:
            if isinstance(block, str):
                texts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                texts.append(str(block.get("text", "")))
            else:
                other.append(block)
    else:
        other.append(content)
    return "\n".join(texts), other


def _messages(prompt: str) -> list[dict[str, Any]] | None:
    """LangChain's serialized message list (``dumps(messages)``), or None for a plain prompt."""
    if not prompt.startswith("["):
        return None
    try:
        data = json.loads(prompt)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, list) or not data:
        return None
    out = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("kwargs"), dict):
            return None
        out.append(item["kwargs"])
    return out


def split_prompt(prompt: str) -> tuple[str, list[Any]]:
    """Split LangChain's prompt into (the text compared by meaning, the exact-match context).

    Chat models: the last human message's text, and every other message (role, content, tool
    calls, names) in order with a marker where the compared message stood. Plain LLMs: the
    prompt itself and no context.
    """
    messages = _messages(prompt)
    if messages is None:
        return prompt, []
    last = max((i for i, m in enumerate(messages) if m.get("type") == "human"), default=None)
    if last is None:
        return "", []
    context: list[Any] = []
    for i, message in enumerate(messages):
        if i == last:
            text, blocks = _text(message.get("content", ""))
            context.append({"compared": True, "blocks": blocks, "name": message.get("name")})
            continue
        kept = {k: v for k, v in message.items() if k not in ("id", "response_metadata")}
        context.append(kept)
    return text, context


def _revive(blob: str) -> Any:
    """Generations serialized by ``dumps``; None when this LangChain cannot read them (an
    entry written by another version: the stored text is served instead)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LangChainBetaWarning: loads is "beta"
            try:
                return loads(blob, allowed_objects="core")
            except TypeError:  # langchain-core before allowed_objects
                return loads(blob)
    except Exception:
        return None


def _model(llm_string: str) -> str:
    found = _MODEL_RE.search(llm_string)
    return found.group(1) if found else ""


class SemanticLangChainCache(BaseCache):
    """``langchain_core.caches.BaseCache`` on a :class:`~semcache.SemanticCache`.

    Args:
        cache: the semantic cache (its hit policy decides what "the same meaning" is), or the
            path of a data folder to open one on with the defaults.
        namespace: the scope namespace of every entry; ``clear()`` bumps it.
        ttl: seconds an answer lives (omitted: the cache's ``default_ttl``; None: forever).
        tags: tags put on every stored answer (for ``cache.invalidate_tags``).
    """

    def __init__(
        self,
        cache: SemanticCache | str | os.PathLike[str],
        *,
        namespace: str = "langchain",
        ttl: float | None = MISSING,
        tags: Sequence[str] = (),
    ) -> None:
        if isinstance(cache, str | os.PathLike):
            from .cache import SemanticCache

            cache = SemanticCache(cache)
        self.cache = cache
        self.namespace = Scope(namespace=namespace).namespace  # validates it
        self.ttl = ttl
        self.tags = tuple(tags)

    def _key(self, prompt: str, llm_string: str) -> tuple[str, Scope] | None:
        """(text compared by meaning, exact scope), or None when the call is not cacheable:
        no human text, or messages that cannot be put in a scope (not JSON data)."""
        text, context = split_prompt(prompt)
        if not text.strip():
            return None  # nothing to compare by meaning: not cached
        try:
            scope = Scope(
                namespace=self.namespace,
                model=_model(llm_string),
                params={"llm_string": llm_string},
                context=context,
            )
        except InvalidScopeError:
            return None
        return text, scope

    def lookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        """The cached generations for a prompt meaning the same in the same scope, or None."""
        key = self._key(prompt, llm_string)
        if key is None:
            return None
        try:
            hit = self.cache.lookup(key[0], scope=key[1])
        except InvalidInputError:  # a prompt the cache refuses (too long...): the model runs
            return None
        if hit is None:
            return None
        blob = hit.metadata.get(GENERATIONS_KEY) if hit.metadata else None
        if isinstance(blob, str):
            revived = _revive(blob)
            if isinstance(revived, list) and all(isinstance(g, Generation) for g in revived):
                return revived
        return [Generation(text=hit.response)]

    def update(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        """Store the generations LangChain just produced (nothing when there is no text)."""
        key = self._key(prompt, llm_string)
        if key is None or not return_val:
            return
        text = return_val[0].text
        if not isinstance(text, str) or not text:
            return
        with contextlib.suppress(InvalidInputError):  # refused input: the answer is not cached
            self.cache.store(
                key[0],
                text,
                scope=key[1],
                ttl=self.ttl,
                tags=self.tags,
                metadata={GENERATIONS_KEY: dumps(list(return_val))},
            )

    def clear(self, **kwargs: Any) -> None:
        """Make every answer this adapter stored unreachable (a namespace bump, O(1))."""
        self.cache.bump(self.namespace)

    async def alookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        return await asyncio.to_thread(self.lookup, prompt, llm_string)

    async def aupdate(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        await asyncio.to_thread(self.update, prompt, llm_string, return_val)

    async def aclear(self, **kwargs: Any) -> None:
        await asyncio.to_thread(self.clear, **kwargs)
