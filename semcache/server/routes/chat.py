"""``POST /v1/chat/completions``: OpenAI-compatible, answered from the cache when it can be.

The request's cache key comes from :func:`semcache.chat.derive` (the same as the client
wrapper's). A hit is answered at once, as JSON or as a replayed SSE stream; a miss is forwarded to
the upstream and its answer stored: a JSON answer when it is cacheable, a stream when it ends with
``finish_reason == "stop"`` and ``[DONE]`` (the entry is committed before ``[DONE]`` is relayed,
so a client that saw the end of its stream finds the entry on its next request). Upstream
failures become 502, timeouts 504, and the cache is left unchanged; an upstream 4xx (bad request,
rate limit, invalid key) is relayed as it is, because it is the caller's to handle.

Response headers: ``x-semcache: hit|miss|bypass``, and ``x-semcache-similarity``,
``x-semcache-entry-id``, ``x-semcache-tier`` on hits, ``x-semcache-reason`` on bypasses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ...chat import (
    Answer,
    CallOptions,
    ChatKey,
    StreamRecorder,
    answer_from_completion,
    chunks_from_hit,
    completion_from_hit,
    derive,
    text_of,
    tokens_saved,
    wants_usage,
)
from ...errors import SemcacheError
from ...keys import normalise
from ...types import Hit
from ..app import ServerState, principal_of, state_of
from ..auth import Principal
from ..errors import ApiError, error_response
from ..schemas import ChatCompletionRequest, ErrorResponse

log = logging.getLogger("semcache.server")

router = APIRouter(tags=["chat"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 422, 502, 504)
}


@router.post("/v1/chat/completions", responses=_ERRORS)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    """Create a chat completion (OpenAI-compatible), from the cache when it has the answer.

    Per-request options go in a ``semcache`` object (``extra_body={"semcache": {...}}`` with the
    openai SDK): ``skip``, ``refresh``, ``ttl``, ``tags``, ``namespace``, ``threshold``.
    """
    state = state_of(request)
    settings, metrics = state.settings, state.metrics
    principal = principal_of(request)
    started = time.perf_counter()

    payload = body.model_dump(mode="json", exclude_unset=True)
    payload.pop("semcache", None)
    options = body.semcache or CallOptions()
    if settings.strict_params:
        unknown = sorted(set(body.model_extra or {}) - state.known_params)
        if unknown:
            raise ApiError(
                422,
                f"unknown field(s) {', '.join(unknown)}; "
                "start the sidecar with SEMCACHE_STRICT_PARAMS=false to forward them",
            )
    chars = sum(len(text_of(m.content)) for m in body.messages)
    if chars > settings.max_prompt_chars:
        raise ApiError(
            413,
            f"the messages hold {chars} characters; this sidecar accepts at most "
            f"{settings.max_prompt_chars} (SEMCACHE_MAX_PROMPT_CHARS)",
        )
    namespace = principal.namespace(options.namespace, settings.default_namespace)
    stream = bool(body.stream)

    if options.skip:
        key, reason = None, "skip requested"
    else:
        decision = derive(payload, namespace=namespace, policy=state.policy)
        key, reason = decision.key, decision.reason
    outcome = "bypass"
    try:
        if key is None:
            metrics.bypassed(reason)
            headers = {"x-semcache": "bypass", "x-semcache-reason": _header(reason or "")}
            return await _forward(
                state, request, payload, stream, None, options, principal, headers
            )
        state.require_cache()
        if not options.refresh:
            hit = await _lookup(state, key, options)
            if hit is not None:
                outcome = "hit"
                return _hit_response(hit, body.model, stream, wants_usage(payload))
        flight = (key.scope.digest, normalise(key.prompt))
        leader = state.inflight.get(flight)
        if leader is not None and not options.refresh:
            # single-flight: the same question is with the upstream already; wait for it
            await leader.wait()
            hit = await _lookup(state, key, options)
            if hit is not None:
                outcome = "hit"
                metrics.singleflight_waits.inc()
                return _hit_response(hit, body.model, stream, wants_usage(payload))
        outcome = "miss"
        if stream or flight in state.inflight:
            return await _forward(
                state, request, payload, stream, key, options, principal, {"x-semcache": "miss"}
            )
        done = state.inflight[flight] = asyncio.Event()
        try:
            return await _forward(
                state, request, payload, stream, key, options, principal, {"x-semcache": "miss"}
            )
        finally:
            state.inflight.pop(flight, None)
            done.set()
    finally:
        metrics.request_seconds.labels("chat", outcome).observe(time.perf_counter() - started)


def _header(text: str) -> str:
    return text.encode("ascii", "replace").decode()[:200]


def _probe(
    cache: Any, key: ChatKey, threshold: float | None
) -> tuple[Hit | None, float | None, float]:
    """The lookup, how close its nearest candidate came, and how long it took."""
    t0 = time.perf_counter()
    hit, nearest = cache.probe(key.prompt, scope=key.scope, threshold=threshold)
    return hit, nearest, time.perf_counter() - t0


async def _lookup(state: ServerState, key: ChatKey, options: CallOptions) -> Hit | None:
    cache, metrics = state.require_cache(), state.metrics
    metrics.lookups.labels("chat").inc()
    await state.pre_embed(key.prompt)
    try:
        hit, near, elapsed = await state.run(_probe, cache, key, options.threshold)
    except SemcacheError as exc:  # the cache fails open: the caller still gets an answer
        log.warning("cache lookup failed, forwarding: %s", exc)
        return None
    metrics.looked_up(hit, near, elapsed)
    if hit is not None:
        metrics.tokens_saved.inc(tokens_saved(hit))
    return hit


def _hit_response(hit: Hit, model: str, stream: bool, include_usage: bool) -> Response:
    headers = {
        "x-semcache": "hit",
        "x-semcache-similarity": f"{hit.similarity:.6f}",
        "x-semcache-entry-id": hit.entry_id,
        "x-semcache-tier": hit.tier,
    }
    if not stream:
        return JSONResponse(completion_from_hit(hit, requested_model=model), headers=headers)
    chunks = chunks_from_hit(hit, requested_model=model, include_usage=include_usage)

    async def replay() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        replay(), media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"}
    )


# -- the upstream ----------------------------------------------------------------------------


def _upstream_headers(state: ServerState, request: Request) -> dict[str, str]:
    settings = state.settings
    headers = {"content-type": "application/json"}
    if settings.upstream_api_key is not None:
        headers["authorization"] = f"Bearer {settings.upstream_api_key.get_secret_value()}"
    elif not settings.auth_enabled and request.headers.get("authorization"):
        headers["authorization"] = request.headers["authorization"]
    for name in ("openai-organization", "openai-project"):
        if request.headers.get(name):
            headers[name] = request.headers[name]
    return headers


def _relay_error(
    state: ServerState, status: int, content: bytes, headers: httpx.Headers
) -> Response:
    """An upstream error answer: 4xx relayed as is, 5xx as a 502."""
    state.metrics.upstream_errors.labels("status").inc()
    message = ""
    try:
        data = json.loads(content)
        error = data.get("error") if isinstance(data, dict) else None
        message = str(error.get("message", "")) if isinstance(error, dict) else ""
    except ValueError:
        data = None
    if 400 <= status < 500:
        if data is not None:
            keep = {k: v for k, v in headers.items() if k.lower() in ("retry-after",)}
            return JSONResponse(data, status_code=status, headers=keep)
        return error_response(
            status, f"upstream said {status}: {content[:200]!r}", "upstream_error"
        )
    return error_response(
        502,
        f"upstream failed with {status}" + (f": {message}" if message else ""),
        "upstream_error",
    )


async def _forward(
    state: ServerState,
    request: Request,
    payload: dict[str, Any],
    stream: bool,
    key: ChatKey | None,
    options: CallOptions,
    principal: Principal,
    headers: dict[str, str],
) -> Response:
    client = state.upstream
    if client is None:
        raise ApiError(502, "no upstream is configured (SEMCACHE_UPSTREAM)", "upstream_error")
    metrics = state.metrics
    metrics.upstream_requests.inc()
    request_headers = _upstream_headers(state, request)
    t0 = time.perf_counter()
    try:
        upstream_request = client.build_request(
            "POST", "chat/completions", json=payload, headers=request_headers
        )
        response = await client.send(upstream_request, stream=stream)
    except httpx.TimeoutException:
        metrics.upstream_errors.labels("timeout").inc()
        metrics.upstream_seconds.observe(time.perf_counter() - t0)
        raise ApiError(
            504,
            f"the upstream did not answer within {state.settings.upstream_timeout}s",
            "upstream_timeout",
        ) from None
    except httpx.HTTPError as exc:
        metrics.upstream_errors.labels("connect").inc()
        raise ApiError(
            502, f"the upstream is unreachable ({type(exc).__name__})", "upstream_error"
        ) from None
    if not stream:
        metrics.upstream_seconds.observe(time.perf_counter() - t0)
        return await _finish_json(state, response, key, options, principal, headers)

    if response.status_code >= 400:
        content = await response.aread()
        await response.aclose()
        return _relay_error(state, response.status_code, content, response.headers)
    if "text/event-stream" not in response.headers.get("content-type", ""):
        await response.aclose()
        metrics.upstream_errors.labels("invalid").inc()
        raise ApiError(502, "the upstream did not answer with an event stream", "upstream_error")
    return StreamingResponse(
        _relay_stream(state, response, key, options, principal, t0),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
    )


async def _finish_json(
    state: ServerState,
    response: httpx.Response,
    key: ChatKey | None,
    options: CallOptions,
    principal: Principal,
    headers: dict[str, str],
) -> Response:
    if response.status_code >= 400:
        return _relay_error(state, response.status_code, response.content, response.headers)
    try:
        data = response.json()
    except ValueError:
        state.metrics.upstream_errors.labels("invalid").inc()
        raise ApiError(
            502, "the upstream answered with a body that is not JSON", "upstream_error"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        state.metrics.upstream_errors.labels("invalid").inc()
        raise ApiError(502, "the upstream answer is not a chat completion", "upstream_error")
    info: dict[str, Any] = {"hit": False, "stored": False}
    if key is not None:
        answer, reason = answer_from_completion(data)
        entry_id = await _store(state, key, answer, reason, options, principal)
        info.update(stored=entry_id is not None, entry_id=entry_id)
        if reason:
            info["reason"] = reason
    data["semcache"] = info
    return JSONResponse(data, headers=headers)


async def _store(
    state: ServerState,
    key: ChatKey,
    answer: Answer | None,
    reason: str | None,
    options: CallOptions,
    principal: Principal,
) -> str | None:
    if answer is None:
        state.metrics.skipped(reason)
        return None
    cache = state.require_cache()
    kwargs: dict[str, Any] = {
        "scope": key.scope,
        "tags": principal.tags_in(options.tags),
        "metadata": answer.metadata(),
    }
    if options.ttl_given:
        kwargs["ttl"] = options.ttl
    try:
        entry_id: str = await state.run(cache.store, key.prompt, answer.content, **kwargs)
    except SemcacheError as exc:
        log.warning("storing an answer failed: %s", exc)
        state.metrics.skipped("store failed")
        return None
    state.metrics.stores.inc()
    return entry_id


async def _relay_stream(
    state: ServerState,
    response: httpx.Response,
    key: ChatKey | None,
    options: CallOptions,
    principal: Principal,
    t0: float,
) -> AsyncIterator[bytes]:
    """Pass the upstream's SSE lines through while recording the answer; store at ``[DONE]``."""
    recorder = StreamRecorder()
    try:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if data == "[DONE]":
                    if key is not None:
                        answer, reason = recorder.answer()
                        await _store(state, key, answer, reason, options, principal)
                elif data:
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        recorder.problem = "malformed chunk"
                    else:
                        if isinstance(chunk, dict):
                            recorder.feed(chunk)
            yield f"{line}\n".encode()
    except httpx.HTTPError as exc:
        state.metrics.upstream_errors.labels("stream").inc()
        log.warning("the upstream stream broke off: %s", type(exc).__name__)
        error = {
            "error": {
                "message": f"the upstream stream broke off ({type(exc).__name__})",
                "type": "upstream_error",
                "param": None,
                "code": None,
            }
        }
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        await response.aclose()
        state.metrics.upstream_seconds.observe(time.perf_counter() - t0)
