"""The sidecar: a FastAPI app that puts a :class:`~semcache.SemanticCache` in front of an
OpenAI-compatible API, and exposes the cache itself over JSON.

``create_app(settings, cache=None)`` builds the app. The cache, the embedder and the upstream
HTTP client are opened in the app's lifespan (so the model loads before the first request, not
during it) and closed at shutdown; a ``cache`` passed in is used as is and left open.

The cache API is blocking (SQLite, FAISS, the embedding model), so every call runs in the
threadpool; the embedder is wrapped in a :class:`~semcache.batching.BatchingEmbedder`, so the
prompts of concurrent requests are embedded together instead of one at a time, and by default
the model itself runs in a child process (:class:`~semcache.embed_process.ProcessEmbedder`),
where the server's own Python work cannot slow its forward passes down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import httpx
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ..chat import ChatPolicy
from ..errors import SemcacheError
from ..keys import normalise
from . import errors
from .auth import ANONYMOUS_ADMIN, Principal
from .errors import ApiError
from .metrics import Metrics
from .middleware import AuthMiddleware, RequestContext
from .schemas import known_chat_params
from .settings import Settings
from .upstream import UpstreamClients

if TYPE_CHECKING:
    from ..batching import BatchingEmbedder
    from ..cache import SemanticCache

log = logging.getLogger("semcache.server")

T = TypeVar("T")


@dataclass
class ServerState:
    """Everything a request handler needs, kept on ``app.state.semcache``."""

    settings: Settings
    metrics: Metrics
    policy: ChatPolicy
    known_params: frozenset[str]
    cache: SemanticCache | None = None
    upstream: UpstreamClients | None = None
    batcher: BatchingEmbedder | None = None
    #: the worker threads that run blocking cache calls (``cache_threads`` of them)
    executor: ThreadPoolExecutor | None = None
    #: exact misses being answered by the upstream right now, keyed by what the answer depends
    #: on: (scope digest, namespace version, normalised prompt) -> done
    inflight: dict[tuple[str, int, str], asyncio.Event] = dataclasses.field(default_factory=dict)
    #: set when shutdown begins (SIGTERM): /readyz answers 503 from then on
    draining: bool = False

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking cache call in a worker thread, at most ``cache_threads`` at a time
        (more threads only fight over the GIL).

        The pool is a plain executor, not anyio's worker threads: a trip through
        ``anyio.to_thread`` (cancel scope, capacity limiter, backend lookups) cost the event
        loop several times what ``run_in_executor`` does, on every cache call. A request
        cancelled meanwhile stops waiting; its call still finishes in its thread, and shutdown
        waits for every call before the cache closes."""
        call = functools.partial(fn, *args, **kwargs)
        if self.executor is None:  # outside the app's lifespan (tests that build a state)
            return await anyio.to_thread.run_sync(call)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def pre_embed(self, prompt: str) -> None:
        """Embed a prompt on the event loop through the batcher, so the cache call that follows
        finds its vector remembered and the wait for the batch holds no thread."""
        aembed = getattr(self.batcher, "aembed", None)
        if aembed is None:
            return
        with contextlib.suppress(SemcacheError):  # the cache call reports the problem
            await aembed([normalise(prompt)])

    def require_cache(self) -> SemanticCache:
        if self.cache is None:
            raise ApiError(
                503,
                "the cache is not open (the app is starting or stopping)",
                "service_unavailable",
            )
        return self.cache


def state_of(request: Request) -> ServerState:
    return request.app.state.semcache  # type: ignore[no-any-return]


def principal_of(request: Request) -> Principal:
    principal = request.scope.get("state", {}).get("principal")
    return principal if isinstance(principal, Principal) else ANONYMOUS_ADMIN


def _close_all(closers: list[Callable[[], None]]) -> None:
    """Run every closer, even when one fails (the first failure is re-raised at the end)."""
    failure: BaseException | None = None
    for close in closers:
        try:
            close()
        except BaseException as exc:  # keep closing: a leaked model process is worse
            failure = failure or exc
    if failure is not None:
        raise failure


def _accepts(cls: type, keyword: str) -> bool:
    """Whether ``cls(...)`` takes ``keyword``."""
    import inspect

    return keyword in inspect.signature(cls).parameters


def _open_cache(
    settings: Settings,
) -> tuple[SemanticCache, BatchingEmbedder | None, list[Callable[[], None]]]:
    """The cache the settings describe, its batcher, and what must be closed after it."""
    from ..batching import BatchingEmbedder
    from ..cache import SemanticCache
    from ..embed import SentenceTransformerEmbedder

    inner: Any
    closers: list[Callable[[], None]] = []
    if settings.embed_process:
        from ..embed_process import ProcessEmbedder

        inner = ProcessEmbedder(
            functools.partial(SentenceTransformerEmbedder, precision=settings.embed_precision),
            torch_threads=settings.torch_threads,
        )
        closers.append(inner.close)
    else:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        inner = SentenceTransformerEmbedder(precision=settings.embed_precision)
    batcher = None
    embedder: Any = inner
    try:
        if settings.batching:
            batcher = BatchingEmbedder(
                inner,
                max_batch=settings.batch_max_size,
                max_wait=settings.batch_max_wait_ms / 1000.0,
            )
            embedder = batcher
            closers.insert(0, batcher.close)
        kwargs: dict[str, Any] = {"embedder": embedder, "threshold": settings.threshold}
        if settings.target_error is not None:
            kwargs["target_error"] = settings.target_error
        if settings.default_ttl is not None:
            kwargs["default_ttl"] = settings.default_ttl
        if settings.max_entries is not None:
            kwargs["max_entries"] = settings.max_entries
        where = settings.cache_kwargs()  # index_dir and schema, only for a postgresql:// URL
        if where and not _accepts(SemanticCache, "index_dir"):
            raise SemcacheError(
                "this semcache's SemanticCache cannot open a postgresql:// store (no index_dir "
                "or schema argument); give SEMCACHE_DATA a folder"
            )
        cache = SemanticCache(settings.data, **kwargs, **where)
    except BaseException:
        _close_all(closers)
        raise
    return cache, batcher, closers


def create_app(
    settings: Settings | None = None,
    cache: SemanticCache | None = None,
    *,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the sidecar app.

    ``settings`` default to the environment (``SEMCACHE_*``). ``cache``: use this cache instead
    of opening ``settings.data`` (it is not closed at shutdown). ``upstream_transport``: an httpx
    transport for the upstream client (tests route it to an in-process fake).
    """
    settings = settings or Settings()
    metrics = Metrics()
    state = ServerState(
        settings=settings,
        metrics=metrics,
        policy=ChatPolicy(
            max_temperature=settings.max_temperature,
            cache_seeded=settings.cache_seeded,
            cache_tools=settings.cache_tools,
        ),
        known_params=known_chat_params(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = cache is None
        closers: list[Callable[[], None]] = []
        state.executor = ThreadPoolExecutor(
            settings.cache_threads, thread_name_prefix="semcache-call"
        )
        if owned:
            state.cache, state.batcher, closers = await run_in_threadpool(_open_cache, settings)
        else:
            state.cache = cache
            embedder = getattr(cache, "embedder", None)
            state.batcher = embedder if hasattr(embedder, "stats") else None  # type: ignore[assignment]
        state.draining = False
        try:
            if settings.upstream:
                timeout = httpx.Timeout(
                    settings.upstream_timeout, connect=min(10.0, settings.upstream_timeout)
                )
                state.upstream = UpstreamClients(
                    settings.upstream.rstrip("/") + "/", timeout, transport=upstream_transport
                )
            log.info(
                "semcache sidecar ready: data=%s upstream=%s auth=%s",
                settings.data_shown,
                settings.upstream,
                "on" if settings.auth_enabled else "off",
            )
            yield
        finally:
            state.draining = True
            try:
                if state.upstream is not None:
                    await state.upstream.aclose()
                    state.upstream = None
                executor, state.executor = state.executor, None
                if executor is not None:  # the calls in flight finish before the cache closes
                    await run_in_threadpool(executor.shutdown, True)
                if owned and state.cache is not None:
                    opened, state.cache = state.cache, None
                    await run_in_threadpool(opened.close)
            finally:
                await run_in_threadpool(_close_all, closers)

    from .. import __version__

    app = FastAPI(
        title="semcache",
        version=__version__,
        description=(
            "A semantic cache for LLM calls. `POST /v1/chat/completions` is OpenAI-compatible "
            "(point any OpenAI client's base_url here); `/v1/cache/...` is the cache itself."
        ),
        lifespan=lifespan,
    )
    app.state.semcache = state
    errors.install(app)
    app.add_middleware(AuthMiddleware, settings=settings)
    app.add_middleware(RequestContext, settings=settings)  # outermost: ids, body limit, 500s

    from .routes import cache as cache_routes
    from .routes import chat as chat_routes
    from .routes import ops as ops_routes

    app.include_router(ops_routes.router)
    app.include_router(chat_routes.router)
    app.include_router(cache_routes.router)
    app.include_router(__import__(f"{__package__}.ui", fromlist=["router"]).router)  # /ui
    return app
