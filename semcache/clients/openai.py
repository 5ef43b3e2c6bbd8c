"""``semcache.wrap(OpenAI(...), cache)``: the OpenAI client with a semantic cache in front.

``client.chat.completions.create(...)`` on the wrapped client answers from the cache on a hit and
otherwise calls the real API and stores the answer; sync (:class:`openai.OpenAI`) and async
(:class:`openai.AsyncOpenAI`) clients alike, streaming included::

    client = semcache.wrap(OpenAI(), cache, namespace="acme", ttl=3600)
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[...])
    r.id.startswith("semcache-")          # True on a hit; r.semcache has the details

What is cached, under which key, and how a hit is marked is defined once in
:mod:`semcache.chat` (shared with the sidecar). On a hit the wrapper returns a real
``ChatCompletion``, or with ``stream=True`` a real ``openai.Stream`` of ``ChatCompletionChunk``
replaying the answer; on a streamed miss the caller gets the upstream stream as it arrives while
it is recorded, and the answer is stored only when the stream ends normally with
``finish_reason == "stop"``. One entry serves streaming and non-streaming requests.

Per-call options, stripped before the request goes upstream: ``extra_body={"semcache": {...}}``
or keyword arguments ``semcache_skip``, ``semcache_refresh``, ``semcache_ttl``,
``semcache_tags``, ``semcache_namespace``, ``semcache_threshold``. Defaults for every call are
the keyword arguments of :func:`wrap` (the same names without the prefix, plus the
:class:`~semcache.chat.ChatPolicy` fields ``max_temperature``, ``cache_seeded``,
``cache_tools``).

Only ``chat.completions.create`` goes through the cache; everything else (``with_raw_response``,
``parse``, other resources) is the wrapped client's own, uncached. The cache fails open: if a
lookup or store raises, the call goes upstream as if there were no cache, and a warning is logged.
Requests with invalid ``semcache`` options raise :class:`~semcache.errors.InvalidInputError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from openai import AsyncOpenAI, AsyncStream, OpenAI, Stream
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ..chat import (
    CallOptions,
    ChatKey,
    ChatPolicy,
    StreamRecorder,
    answer_from_completion,
    chunks_from_hit,
    completion_from_hit,
    derive,
    parse_options,
    plain,
    wants_usage,
)
from ..errors import InvalidInputError, SemcacheError

if TYPE_CHECKING:
    from ..cache import SemanticCache
    from ..types import Hit

log = logging.getLogger(__name__)

OPTION_PREFIX = "semcache_"
_SDK_TRANSPORT = ("extra_headers", "extra_query", "extra_body", "timeout")
_POLICY_FIELDS = {f.name for f in fields(ChatPolicy)}


def _given(value: Any) -> bool:
    """False for the SDK's ``NOT_GIVEN``/``omit`` sentinels."""
    return type(value).__name__ not in ("NotGiven", "Omit")


@dataclass
class _Prepared:
    kwargs: dict[str, Any]  # what goes upstream
    options: CallOptions
    key: ChatKey | None
    reason: str | None
    stream: bool
    model: str
    include_usage: bool


class _Core:
    """What the sync and async wrappers share: option handling, keys, hits and stores."""

    def __init__(self, cache: SemanticCache, defaults: CallOptions, policy: ChatPolicy) -> None:
        self.cache = cache
        self.defaults = defaults
        self.policy = policy

    def position(self) -> int | None:
        """The cache's fence position, taken before a lookup; None when the cache failed (the
        answer is then not stored: nothing could prove it is not stale)."""
        try:
            return self.cache.position()
        except SemcacheError as exc:
            log.warning("semcache position failed: %s", exc)
            return None

    def prepare(self, kwargs: dict[str, Any]) -> _Prepared:
        kwargs = dict(kwargs)
        raw: dict[str, Any] = {}
        for name in [k for k in kwargs if k.startswith(OPTION_PREFIX)]:
            raw[name[len(OPTION_PREFIX) :]] = kwargs.pop(name)
        extra_body = kwargs.get("extra_body")
        if isinstance(extra_body, Mapping) and "semcache" in extra_body:
            body = dict(extra_body)
            from_body = body.pop("semcache")
            if from_body is not None and not isinstance(from_body, Mapping):
                raise InvalidInputError("extra_body['semcache'] must be a dict")
            raw = {**dict(from_body or {}), **raw}
            if body:
                kwargs["extra_body"] = body
            else:
                kwargs.pop("extra_body")
        options = parse_options(raw).merged_over(self.defaults)

        messages = kwargs.get("messages")
        if messages is not None and not isinstance(messages, list) and _given(messages):
            kwargs["messages"] = list(messages)  # an iterator would be consumed by the key
        stream = bool(kwargs.get("stream")) and _given(kwargs.get("stream"))
        model = kwargs.get("model")
        model_name = model if isinstance(model, str) else ""

        view: dict[str, Any] = {
            k: plain(v) for k, v in kwargs.items() if k not in _SDK_TRANSPORT and _given(v)
        }
        extra = kwargs.get("extra_body")
        if isinstance(extra, Mapping):
            view.update({str(k): plain(v) for k, v in extra.items()})
        if options.skip:
            key, reason = None, "skip requested"
        else:
            decision = derive(view, namespace=options.namespace or "default", policy=self.policy)
            key, reason = decision.key, decision.reason
        return _Prepared(kwargs, options, key, reason, stream, model_name, wants_usage(view))

    def lookup_kwargs(self, prep: _Prepared) -> dict[str, Any]:
        assert prep.key is not None
        out: dict[str, Any] = {"scope": prep.key.scope}
        if prep.options.threshold is not None:
            out["threshold"] = prep.options.threshold
        return out

    def store_kwargs(self, prep: _Prepared, metadata: dict[str, Any]) -> dict[str, Any]:
        assert prep.key is not None
        out: dict[str, Any] = {
            "scope": prep.key.scope,
            "tags": list(prep.options.tags),
            "metadata": metadata,
        }
        if prep.options.ttl_given:
            out["ttl"] = prep.options.ttl
        return out

    # -- building answers --------------------------------------------------------------------

    def completion(self, hit: Hit, prep: _Prepared) -> ChatCompletion:
        return ChatCompletion.model_validate(completion_from_hit(hit, requested_model=prep.model))

    def chunks(self, hit: Hit, prep: _Prepared) -> list[ChatCompletionChunk]:
        return [
            ChatCompletionChunk.model_validate(c)
            for c in chunks_from_hit(
                hit, requested_model=prep.model, include_usage=prep.include_usage
            )
        ]


def _mark(response: Any, info: dict[str, Any]) -> None:
    """Attach ``semcache`` to an upstream completion (pydantic keeps extra attributes)."""
    with contextlib.suppress(Exception):  # an SDK object that refuses extra attributes
        response.semcache = info


def _synthetic_response(client: Any, hit: Hit) -> Any:
    """An ``httpx2.Response`` standing in for the HTTP exchange a hit did not make."""
    try:
        import httpx2
    except ImportError:  # pragma: no cover - older SDKs on httpx
        import httpx as httpx2  # type: ignore[no-redef]
    url = f"{str(getattr(client, 'base_url', 'semcache://cache/')).rstrip('/')}/chat/completions"
    return httpx2.Response(
        200,
        headers={
            "content-type": "text/event-stream",
            "x-semcache": "hit",
            "x-semcache-entry-id": hit.entry_id,
            "x-semcache-similarity": f"{hit.similarity:.6f}",
            "x-semcache-tier": hit.tier,
        },
        request=httpx2.Request("POST", url),
    )


# -- streams ---------------------------------------------------------------------------------


class CachedStream(Stream[ChatCompletionChunk]):
    """A real ``openai.Stream`` that replays a cached answer as chunks."""

    def __init__(self, chunks: list[ChatCompletionChunk], response: Any) -> None:
        self.response = response
        self._iterator = iter(chunks)

    def close(self) -> None:
        self._iterator = iter(())


class RecordingStream(Stream[ChatCompletionChunk]):
    """The upstream stream, passed through chunk by chunk while its answer is recorded.

    ``on_complete`` runs once the upstream stream is exhausted normally; a stream the caller
    stops reading, closes early, or that raises is never stored.
    """

    def __init__(
        self, inner: Stream[ChatCompletionChunk], on_complete: Callable[[StreamRecorder], None]
    ) -> None:
        self._inner = inner
        self.response = inner.response
        self._on_complete = on_complete
        self.recorder = StreamRecorder()
        self._iterator = self._record()

    def _record(self) -> Iterator[ChatCompletionChunk]:
        for chunk in self._inner:
            self.recorder.feed(chunk.model_dump(mode="json", exclude_none=True))
            yield chunk
        self._on_complete(self.recorder)

    def close(self) -> None:
        self._inner.close()


class AsyncCachedStream(AsyncStream[ChatCompletionChunk]):
    """A real ``openai.AsyncStream`` that replays a cached answer as chunks."""

    def __init__(self, chunks: list[ChatCompletionChunk], response: Any) -> None:
        self.response = response
        self._chunks = chunks
        self._iterator = self._replay()

    async def _replay(self) -> AsyncIterator[ChatCompletionChunk]:
        for chunk in self._chunks:
            yield chunk

    async def close(self) -> None:
        self._chunks = []


class AsyncRecordingStream(AsyncStream[ChatCompletionChunk]):
    """Async twin of :class:`RecordingStream`."""

    def __init__(
        self,
        inner: AsyncStream[ChatCompletionChunk],
        on_complete: Callable[[StreamRecorder], Awaitable[None]],
    ) -> None:
        self._inner = inner
        self.response = inner.response
        self._on_complete = on_complete
        self.recorder = StreamRecorder()
        self._iterator = self._record()

    async def _record(self) -> AsyncIterator[ChatCompletionChunk]:
        async for chunk in self._inner:
            self.recorder.feed(chunk.model_dump(mode="json", exclude_none=True))
            yield chunk
        await self._on_complete(self.recorder)

    async def close(self) -> None:
        await self._inner.close()


# -- the sync wrapper ------------------------------------------------------------------------


class _Completions:
    def __init__(self, inner: Any, core: _Core, client: Any) -> None:
        self._inner = inner
        self._core = core
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create(self, **kwargs: Any) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """``chat.completions.create`` through the cache (same arguments, plus options)."""
        core = self._core
        prep = core.prepare(kwargs)
        if prep.key is None:
            log.debug("semcache bypass: %s", prep.reason)
            return self._inner.create(**prep.kwargs)  # type: ignore[no-any-return]
        fence = core.position()  # before the lookup: an invalidation during the call voids it
        if not prep.options.refresh:
            hit = self._lookup(prep)
            if hit is not None:
                if prep.stream:
                    return CachedStream(
                        core.chunks(hit, prep), _synthetic_response(self._client, hit)
                    )
                return core.completion(hit, prep)
        response = self._inner.create(**prep.kwargs)
        if prep.stream:
            return RecordingStream(
                response, lambda rec: self._store(prep, *rec.answer(), fence=fence)
            )
        answer, reason = answer_from_completion(response.model_dump(mode="json"))
        entry_id = self._store(prep, answer, reason, fence=fence)
        _mark(response, {"hit": False, "stored": entry_id is not None, "entry_id": entry_id})
        return response  # type: ignore[no-any-return]

    def _lookup(self, prep: _Prepared) -> Hit | None:
        assert prep.key is not None
        try:
            return self._core.cache.lookup(prep.key.prompt, **self._core.lookup_kwargs(prep))
        except InvalidInputError:
            raise
        except SemcacheError as exc:
            log.warning("semcache lookup failed, calling upstream: %s", exc)
            return None

    def _store(
        self, prep: _Prepared, answer: Any, reason: str | None, *, fence: int | None
    ) -> str | None:
        if answer is None or fence is None:
            log.debug("semcache not storing: %s", reason or "no fence position")
            return None
        assert prep.key is not None
        try:
            return self._core.cache.store(
                prep.key.prompt,
                answer.content,
                fence=fence,
                **self._core.store_kwargs(prep, answer.metadata()),
            )
        except SemcacheError as exc:
            log.warning("semcache store failed: %s", exc)
            return None


class _Chat:
    def __init__(self, inner: Any, core: _Core, client: Any) -> None:
        self._inner = inner
        self.completions = _Completions(inner.completions, core, client)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CachedOpenAI:
    """An :class:`openai.OpenAI` whose ``chat.completions.create`` goes through a cache."""

    def __init__(self, client: OpenAI, cache: SemanticCache, core: _Core) -> None:
        self.unwrapped = client
        self.cache = cache
        self._core = core
        self.chat = _Chat(client.chat, core, client)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unwrapped, name)

    def with_options(self, **kwargs: Any) -> CachedOpenAI:
        return CachedOpenAI(self.unwrapped.with_options(**kwargs), self.cache, self._core)

    copy = with_options


# -- the async wrapper -----------------------------------------------------------------------


class _AsyncCompletions:
    def __init__(self, inner: Any, core: _Core, client: Any) -> None:
        self._inner = inner
        self._core = core
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def create(self, **kwargs: Any) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """``chat.completions.create`` through the cache (same arguments, plus options)."""
        core = self._core
        prep = core.prepare(kwargs)
        if prep.key is None:
            log.debug("semcache bypass: %s", prep.reason)
            return await self._inner.create(**prep.kwargs)  # type: ignore[no-any-return]
        fence = await asyncio.to_thread(core.position)
        if not prep.options.refresh:
            hit = await self._lookup(prep)
            if hit is not None:
                if prep.stream:
                    return AsyncCachedStream(
                        core.chunks(hit, prep), _synthetic_response(self._client, hit)
                    )
                return core.completion(hit, prep)
        response = await self._inner.create(**prep.kwargs)
        if prep.stream:

            async def on_complete(rec: StreamRecorder) -> None:
                await self._store(prep, *rec.answer(), fence=fence)

            return AsyncRecordingStream(response, on_complete)
        answer, reason = answer_from_completion(response.model_dump(mode="json"))
        entry_id = await self._store(prep, answer, reason, fence=fence)
        _mark(response, {"hit": False, "stored": entry_id is not None, "entry_id": entry_id})
        return response  # type: ignore[no-any-return]

    async def _lookup(self, prep: _Prepared) -> Hit | None:
        assert prep.key is not None
        try:
            return await self._core.cache.alookup(prep.key.prompt, **self._core.lookup_kwargs(prep))
        except InvalidInputError:
            raise
        except SemcacheError as exc:
            log.warning("semcache lookup failed, calling upstream: %s", exc)
            return None

    async def _store(
        self, prep: _Prepared, answer: Any, reason: str | None, *, fence: int | None
    ) -> str | None:
        if answer is None or fence is None:
            log.debug("semcache not storing: %s", reason or "no fence position")
            return None
        assert prep.key is not None
        try:
            entry_id: str | None = await self._core.cache.astore(
                prep.key.prompt,
                answer.content,
                fence=fence,
                **self._core.store_kwargs(prep, answer.metadata()),
            )
            return entry_id
        except SemcacheError as exc:
            log.warning("semcache store failed: %s", exc)
            return None


class _AsyncChat:
    def __init__(self, inner: Any, core: _Core, client: Any) -> None:
        self._inner = inner
        self.completions = _AsyncCompletions(inner.completions, core, client)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CachedAsyncOpenAI:
    """An :class:`openai.AsyncOpenAI` whose ``chat.completions.create`` goes through a cache."""

    def __init__(self, client: AsyncOpenAI, cache: SemanticCache, core: _Core) -> None:
        self.unwrapped = client
        self.cache = cache
        self._core = core
        self.chat = _AsyncChat(client.chat, core, client)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unwrapped, name)

    def with_options(self, **kwargs: Any) -> CachedAsyncOpenAI:
        return CachedAsyncOpenAI(self.unwrapped.with_options(**kwargs), self.cache, self._core)

    copy = with_options


def wrap(
    client: OpenAI | AsyncOpenAI, cache: SemanticCache, **defaults: Any
) -> CachedOpenAI | CachedAsyncOpenAI:
    """Put ``cache`` in front of ``client.chat.completions.create``.

    ``defaults`` are per-call options applied to every call (``namespace``, ``ttl``, ``tags``,
    ``threshold``, ``skip``, ``refresh``) and policy fields (``max_temperature``,
    ``cache_seeded``, ``cache_tools``, or a whole ``policy=ChatPolicy(...)``); a call's own
    options override them (tags are added).
    """
    policy = defaults.pop("policy", None) or ChatPolicy()
    if not isinstance(policy, ChatPolicy):
        raise InvalidInputError("policy must be a semcache.chat.ChatPolicy")
    policy_kw = {k: defaults.pop(k) for k in list(defaults) if k in _POLICY_FIELDS}
    if policy_kw:
        policy = ChatPolicy(**{**policy.__dict__, **policy_kw})
    options = parse_options(defaults)
    core = _Core(cache, options, policy)
    if isinstance(client, AsyncOpenAI):
        return CachedAsyncOpenAI(client, cache, core)
    if isinstance(client, OpenAI):
        return CachedOpenAI(client, cache, core)
    raise InvalidInputError(
        f"semcache.wrap() takes an openai.OpenAI or openai.AsyncOpenAI, not {type(client).__name__}"
    )
