"""``POST /v1/chat/completions``: OpenAI-compatible, answered from the cache when it can be.

The request's cache key comes from :func:`semcache.chat.derive` (the same as the client
wrapper's). A hit is answered at once, as JSON or as a replayed SSE stream; a miss is forwarded to
the upstream and its answer stored: a JSON answer when it is cacheable, a stream when it ends with
``finish_reason == "stop"`` and ``[DONE]`` (the entry is committed before ``[DONE]`` is relayed,
so a client that saw the end of its stream finds the entry on its next request). Upstream
failures become 502, timeouts 504, and the cache is left unchanged; an upstream 4xx (bad request,
rate limit, invalid key) is relayed with its status, because it is the caller's to handle.

No stale answer is cached: the store's change-log position is read before the lookup and the
upstream's answer is stored with ``fence=`` that position, so an answer an invalidation (a
namespace bump, a tag, a semantic invalidation, a delete) overtook while it was being computed is
returned to its caller but not cached. Identical concurrent misses share one upstream call
(single flight), keyed by the scope, the namespace version and the prompt: a request that comes
after a bump never waits for, nor is answered by, a call that began before it.

Time is bounded: the whole upstream answer, however slowly it trickles, must arrive within
``SEMCACHE_UPSTREAM_DEADLINE`` seconds (504 otherwise, or an error event in a stream already
started), and a single-flight follower waits at most that long for its leader before it fails
with a 504.

Response headers: ``x-semcache: hit|miss|bypass``, and ``x-semcache-similarity``,
``x-semcache-entry-id``, ``x-semcache-tier`` on hits, ``x-semcache-reason`` on bypasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
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
from ...keys import check_text, normalise
from ...leases import Lead, poll_lead
from ...types import Hit
from ..app import ServerState, principal_of, state_of
from ..errors import ApiError, error_response, request_id_of
from ..schemas import ChatCompletionRequest, ErrorResponse
from ..settings import MAX_TAG_CHARS, MAX_TAGS

log = logging.getLogger("semcache.server")

router = APIRouter(tags=["chat"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a chat completion (JSON), or with ``stream: true`` its chunks as "
        "server-sent events",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            # OpenAPI 3.1: the schema describes each event; its data is a chunk's JSON,
            # [DONE], or an error object's JSON
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                }
            },
        },
    },
    **{
        code: {"model": ErrorResponse}
        for code in (400, 401, 403, 404, 409, 413, 422, 429, 502, 503, 504)
    },
}


@dataclass(frozen=True)
class _Seen:
    """What one lookup saw: the hit, and the store position and namespace version before it."""

    hit: Hit | None
    position: int | None
    version: int | None
    #: the single-flight lead between processes, taken in the same trip when asked for and
    #: the lookup missed (None: not asked, or the store failed)
    lead: Lead[Hit] | None = None


@dataclass(frozen=True)
class _Call:
    """One upstream call's context: the key (None: do not store), the fence, the deadline."""

    key: ChatKey | None
    fence: int | None
    options: CallOptions
    deadline: float  # the event loop's clock
    #: a lead this call holds: released in the same worker-thread trip as the store
    lead: Lead[Hit] | None = None


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

    payload = _payload(body)
    options = body.semcache or CallOptions()
    if settings.strict_params:
        unknown = sorted(set(body.model_extra or {}) - state.known_params)
        if unknown:
            raise ApiError(
                422,
                f"unknown field(s) {', '.join(u[:64] for u in unknown[:10])}; "
                "start the sidecar with SEMCACHE_STRICT_PARAMS=false to forward them",
            )
    _check_size(state, body, options)
    namespace = principal.namespace(options.namespace, settings.default_namespace)
    stream = bool(body.stream)

    if options.skip:
        key, reason = None, "skip requested"
    else:
        decision = derive(payload, namespace=namespace, policy=state.policy)
        key, reason = decision.key, _uncacheable(state, decision.key) or decision.reason
        if reason is not None:
            key = None
    loop = asyncio.get_running_loop()
    outcome = "bypass"
    try:
        if key is None:
            metrics.bypassed(reason)
            headers = {"x-semcache": "bypass", "x-semcache-reason": _header(reason or "")}
            call = _Call(None, None, options, loop.time() + settings.upstream_deadline)
            return await _forward(state, request, payload, stream, call, headers)
        state.require_cache()
        # a plain JSON miss also takes the lead between processes in the lookup's own trip
        lead_on_miss = not options.refresh and not stream
        seen = await _lookup(state, key, options, probe=not options.refresh, lead=lead_on_miss)
        if seen.hit is not None:
            outcome = "hit"
            return _hit_response(seen.hit, body.model, stream, wants_usage(payload))
        deadline = loop.time() + settings.upstream_deadline
        leader = None
        if seen.version is not None:
            flight = (key.scope.digest, seen.version, normalise(key.prompt))
            leader = state.inflight.get(flight)
        if leader is not None and not options.refresh:
            # single flight: the same question, at the same namespace version, is with the
            # upstream already; wait for it (at most the deadline), then look again
            await _release(state, seen.lead)
            try:
                await asyncio.wait_for(leader.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                metrics.upstream_errors.labels("deadline").inc()
                raise ApiError(
                    504,
                    "an identical request already at the upstream did not finish within "
                    f"{settings.upstream_deadline:g}s (SEMCACHE_UPSTREAM_DEADLINE)",
                    "upstream_timeout",
                    code="upstream_deadline",
                ) from None
            seen = await _lookup(state, key, options, probe=True, lead=lead_on_miss)
            if seen.hit is not None:
                outcome = "hit"
                metrics.singleflight_waits.inc()
                return _hit_response(seen.hit, body.model, stream, wants_usage(payload))
        outcome = "miss"
        headers = {"x-semcache": "miss"}
        if seen.position is None:  # the store could not be read: answer, but cache nothing
            call = _Call(None, None, options, deadline)
        else:
            call = _Call(key, seen.position, options, deadline)
        flight = None
        if seen.version is not None:
            flight = (key.scope.digest, seen.version, normalise(key.prompt))
        if call.key is None or flight is None or stream or flight in state.inflight:
            await _release(state, seen.lead)  # without a flight of its own, no lead either
            return await _forward(state, request, payload, stream, call, headers)
        done = state.inflight[flight] = asyncio.Event()
        lead = seen.lead
        try:
            # single flight between processes sharing the store (other replicas, workers):
            # the lookup's trip took the lead or found another process holding it; then poll
            # (on the event loop) until its answer is stored or its lease is gone. A refresh
            # goes to the upstream whatever is stored.
            if lead is not None and not lead.led and lead.hit is None:
                lead = await _lead(state, key, deadline)
            if lead is not None and lead.hit is not None:
                outcome = "hit"
                metrics.singleflight_waits.inc()
                return _hit_response(lead.hit, body.model, stream, wants_usage(payload))
            call = dataclasses.replace(call, lead=lead)
            return await _forward(state, request, payload, stream, call, headers)
        finally:
            try:
                await _release(state, lead)  # unless the store's trip released it already
            finally:
                if state.inflight.get(flight) is done:
                    del state.inflight[flight]
                done.set()
    finally:
        metrics.request_seconds.labels("chat", outcome).observe(time.perf_counter() - started)


async def _lead(state: ServerState, key: ChatKey, deadline: float) -> Lead[Hit] | None:
    """Lead this prompt among the processes sharing the store, or wait (on the event loop,
    polling: no worker thread is held) while another one asks the upstream, up to the
    deadline. None: go to the upstream without a lead (the wait ran out, or the store failed:
    the cache fails open)."""
    cache = state.require_cache()

    async def look() -> Lead[Hit]:
        return await state.run(cache.lead, key.prompt, scope=key.scope, wait=False)

    try:
        return await poll_lead(look, deadline)
    except SemcacheError as exc:
        log.warning("single-flight lease failed, forwarding: %s", exc)
        return None


async def _release(state: ServerState, lead: Lead[Hit] | None) -> None:
    """End a lead this request still holds (a worker-thread trip only when it does)."""
    if lead is not None and lead.led:
        with contextlib.suppress(SemcacheError):
            await state.run(lead.release)


def _uncacheable(state: ServerState, key: ChatKey | None) -> str | None:
    """Why a request is relayed uncached though the cache could take it: a prompt no store
    keeps as text (a NUL), or a scope whose params and context (tools, earlier turns) take
    more than SEMCACHE_MAX_SCOPE_BYTES as JSON; None when it can be cached."""
    if key is None:
        return None
    try:
        check_text(key.prompt, "the prompt")
    except SemcacheError as exc:
        return str(exc)
    limit = state.settings.max_scope_bytes
    canonical = key.scope.canonical()  # plain JSON types, whatever mappings the scope holds
    size = len(json.dumps([canonical["params"], canonical["context"]], ensure_ascii=False).encode())
    if size <= limit:
        return None
    return f"scope params and context take {size} bytes, over SEMCACHE_MAX_SCOPE_BYTES ({limit})"


def _payload(body: ChatCompletionRequest) -> dict[str, Any]:
    """The request as plain JSON to forward upstream; 422 for what cannot be sent as JSON text
    (nesting deeper than the serialiser goes, a lone surrogate anywhere)."""
    try:
        payload: dict[str, Any] = body.model_dump(mode="json", exclude_unset=True)
        payload.pop("semcache", None)
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(422, "the request holds text that is not valid Unicode") from None
    except (ValueError, RecursionError):  # pydantic's serialisation depth, json's recursion
        raise ApiError(422, "the request is nested too deeply") from None
    return payload


def _check_size(state: ServerState, body: ChatCompletionRequest, options: CallOptions) -> None:
    """413 for messages over SEMCACHE_MAX_PROMPT_CHARS, 422 for too many or too long tags."""
    limit = state.settings.max_prompt_chars
    chars = sum(len(text_of(m.content)) for m in body.messages)
    if chars > limit:
        raise ApiError(
            413,
            f"the messages hold {chars} characters; this sidecar accepts at most "
            f"{limit} (SEMCACHE_MAX_PROMPT_CHARS)",
        )
    if len(options.tags) > MAX_TAGS or any(len(t) > MAX_TAG_CHARS for t in options.tags):
        raise ApiError(
            422,
            f"semcache.tags: at most {MAX_TAGS} tags of at most {MAX_TAG_CHARS} characters",
        )


def _header(text: str) -> str:
    return text.encode("ascii", "replace").decode()[:200]


def _probe(
    cache: Any, key: ChatKey, threshold: float | None, probe: bool, lead: bool
) -> tuple[Hit | None, float | None, float, int, int, Lead[Hit] | None]:
    """The store position and namespace version (read first, in that order: an invalidation
    after them fences the answer out), then the lookup, its nearest similarity and its time;
    on a miss, with ``lead``, the single-flight lead between processes too (one worker-thread
    trip instead of two)."""
    position: int = cache.position()
    version: int = cache.version(key.scope.namespace)
    hit, nearest, elapsed = None, None, 0.0
    if probe:
        t0 = time.perf_counter()
        hit, nearest = cache.probe(key.prompt, scope=key.scope, threshold=threshold)
        elapsed = time.perf_counter() - t0
    taken = None
    if lead and hit is None:
        try:
            taken = cache.lead(key.prompt, scope=key.scope, wait=False)
        except SemcacheError as exc:  # no lease: the request goes upstream without one
            log.warning("single-flight lease failed, forwarding: %s", exc)
    return hit, nearest, elapsed, position, version, taken


async def _lookup(
    state: ServerState, key: ChatKey, options: CallOptions, *, probe: bool, lead: bool = False
) -> _Seen:
    """One worker-thread trip: position, version, (unless ``probe`` is false) the lookup and
    (with ``lead``, on a miss) the lead between processes."""
    cache, metrics = state.require_cache(), state.metrics
    if probe:
        metrics.lookups.labels("chat").inc()
        await state.pre_embed(key.prompt)
    try:
        hit, near, elapsed, position, version, taken = await state.run(
            _probe, cache, key, options.threshold, probe, lead
        )
    except SemcacheError as exc:  # the cache fails open: the caller still gets an answer
        log.warning("cache lookup failed, forwarding: %s", exc)
        return _Seen(None, None, None)
    if probe:
        metrics.looked_up(hit, near, elapsed)
        if hit is not None:
            metrics.tokens_saved.inc(tokens_saved(hit))
    return _Seen(hit, position, version, taken)


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


def _deadline_error(state: ServerState) -> ApiError:
    state.metrics.upstream_errors.labels("deadline").inc()
    return ApiError(
        504,
        f"the upstream did not finish its answer within {state.settings.upstream_deadline:g}s "
        "(SEMCACHE_UPSTREAM_DEADLINE)",
        "upstream_timeout",
        code="upstream_deadline",
    )


def _relay_error(
    state: ServerState, request: Request, status: int, content: bytes, headers: httpx.Headers
) -> Response:
    """An upstream error answer in the stable shape: a 4xx with its status and the upstream's
    own message (the caller's to handle), a 5xx as a 502 that names only the status (the
    upstream's text goes to the log)."""
    state.metrics.upstream_errors.labels("status").inc()
    error: Any = None
    try:
        data = json.loads(content)
        error = data.get("error") if isinstance(data, dict) else None
    except ValueError:
        pass
    error = error if isinstance(error, dict) else {}
    message = error.get("message")
    if 400 <= status < 500:
        keep = {k: v for k, v in headers.items() if k.lower() == "retry-after"}
        kind, code = error.get("type"), error.get("code")
        return error_response(
            status,
            str(message)[:1000] if message else f"the upstream answered {status}",
            kind if isinstance(kind, str) and kind else "upstream_error",
            code if isinstance(code, str) and code else f"upstream_{status}",
            keep,
        )
    log.warning(
        "upstream answered %s [request %s]: %s", status, request_id_of(request), content[:500]
    )
    return error_response(
        502, f"the upstream failed with status {status}", "upstream_error", "upstream_failed"
    )


async def _read_capped(response: httpx.Response, cap: int) -> bytes | None:
    """The response body, or None when it is over ``cap`` bytes (then it is not read on)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _forward(
    state: ServerState,
    request: Request,
    payload: dict[str, Any],
    stream: bool,
    call: _Call,
    headers: dict[str, str],
) -> Response:
    if state.upstream is None:
        raise ApiError(502, "no upstream is configured (SEMCACHE_UPSTREAM)", "upstream_error")
    client = state.upstream.client()
    metrics = state.metrics
    metrics.upstream_requests.inc()
    request_headers = _upstream_headers(state, request)
    t0 = time.perf_counter()
    response: httpx.Response | None = None
    content = b""
    try:
        async with asyncio.timeout_at(call.deadline):
            upstream_request = client.build_request(
                "POST", "chat/completions", json=payload, headers=request_headers
            )
            response = await client.send(upstream_request, stream=True)
            if not stream or response.status_code >= 400:
                read = await _read_capped(response, state.settings.upstream_max_bytes)
                await response.aclose()
                if read is None:
                    metrics.upstream_errors.labels("invalid").inc()
                    raise ApiError(
                        502,
                        "the upstream answer is over SEMCACHE_UPSTREAM_MAX_BYTES",
                        "upstream_error",
                    )
                content = read
    except TimeoutError:
        if response is not None:
            await response.aclose()
        metrics.upstream_seconds.observe(time.perf_counter() - t0)
        raise _deadline_error(state) from None
    except httpx.TimeoutException:
        if response is not None:
            await response.aclose()
        metrics.upstream_errors.labels("timeout").inc()
        metrics.upstream_seconds.observe(time.perf_counter() - t0)
        raise ApiError(
            504,
            f"the upstream did not answer within {state.settings.upstream_timeout:g}s",
            "upstream_timeout",
        ) from None
    except httpx.HTTPError as exc:
        if response is not None:
            await response.aclose()
        metrics.upstream_errors.labels("connect").inc()
        raise ApiError(
            502, f"the upstream is unreachable ({type(exc).__name__})", "upstream_error"
        ) from None
    if response.status_code >= 400:
        metrics.upstream_seconds.observe(time.perf_counter() - t0)
        return _relay_error(state, request, response.status_code, content, response.headers)
    if not stream:
        metrics.upstream_seconds.observe(time.perf_counter() - t0)
        return await _finish_json(state, content, call, headers)
    if "text/event-stream" not in response.headers.get("content-type", ""):
        await response.aclose()
        metrics.upstream_errors.labels("invalid").inc()
        raise ApiError(502, "the upstream did not answer with an event stream", "upstream_error")
    return StreamingResponse(
        _relay_stream(state, response, call, t0),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
    )


async def _finish_json(
    state: ServerState, content: bytes, call: _Call, headers: dict[str, str]
) -> Response:
    try:
        data = json.loads(content)
    except ValueError:
        state.metrics.upstream_errors.labels("invalid").inc()
        raise ApiError(
            502, "the upstream answered with a body that is not JSON", "upstream_error"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        state.metrics.upstream_errors.labels("invalid").inc()
        raise ApiError(502, "the upstream answer is not a chat completion", "upstream_error")
    info: dict[str, Any] = {"hit": False, "stored": False}
    if call.key is not None:
        answer, reason = answer_from_completion(data)
        entry_id, reason = await _store(state, call, answer, reason)
        info.update(stored=entry_id is not None, entry_id=entry_id)
        if reason:
            info["reason"] = reason
    data["semcache"] = info
    return JSONResponse(data, headers=headers)


def _store_and_release(
    cache: Any, lead: Lead[Hit] | None, prompt: str, content: str, kwargs: dict[str, Any]
) -> str | None:
    """Store an answer, then end the lead its call held (one worker-thread trip for both: the
    lease must outlive the store, so that no other process asks the upstream in between)."""
    try:
        entry_id: str | None = cache.store(prompt, content, **kwargs)
    finally:
        if lead is not None:
            with contextlib.suppress(SemcacheError):
                lead.release()
    return entry_id


async def _store(
    state: ServerState, call: _Call, answer: Answer | None, reason: str | None
) -> tuple[str | None, str | None]:
    """Store the answer behind the call's fence; returns (entry id or None, why not)."""
    key, options = call.key, call.options
    if key is None or call.fence is None:
        return None, reason
    if answer is None:
        state.metrics.skipped(reason)
        return None, reason
    if len(answer.content) > state.settings.max_response_chars:
        reason = "answer over SEMCACHE_MAX_RESPONSE_CHARS"
        state.metrics.skipped(reason)
        return None, reason
    cache = state.require_cache()
    kwargs: dict[str, Any] = {
        "scope": key.scope,
        "tags": list(options.tags),
        "metadata": answer.metadata(),
        "fence": call.fence,
    }
    if options.ttl_given:
        kwargs["ttl"] = options.ttl
    try:
        entry_id: str | None = await state.run(
            _store_and_release, cache, call.lead, key.prompt, answer.content, kwargs
        )
    except SemcacheError as exc:
        log.warning("storing an answer failed: %s", exc)
        state.metrics.skipped("store failed")
        return None, "store failed"
    if entry_id is None:  # an invalidation overtook the call: the answer may be stale
        reason = "invalidated during the upstream call"
        state.metrics.skipped(reason)
        return None, reason
    state.metrics.stores.inc()
    return entry_id, None


async def _relay_stream(
    state: ServerState, response: httpx.Response, call: _Call, t0: float
) -> AsyncIterator[bytes]:
    """Pass the upstream's SSE lines through while recording the answer; store at ``[DONE]``.
    Each line must come before the call's deadline; past it the stream ends with an error
    event (its status was sent long ago)."""
    recorder = StreamRecorder()
    loop = asyncio.get_running_loop()
    lines = response.aiter_lines()
    try:
        while True:
            try:
                line = await asyncio.wait_for(anext(lines), call.deadline - loop.time())
            except StopAsyncIteration:
                break
            if line.startswith("data:"):
                data = line[5:].strip()
                if data == "[DONE]":
                    answer, reason = recorder.answer()
                    await _store(state, call, answer, reason)
                elif data:
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        recorder.problem = "malformed chunk"
                    else:
                        if isinstance(chunk, dict):
                            recorder.feed(chunk)
            yield f"{line}\n".encode()
    except TimeoutError:
        _deadline_error(state)  # counts it
        log.warning("the upstream stream passed its deadline")
        yield _error_event(
            "upstream_timeout",
            f"the upstream did not finish within {state.settings.upstream_deadline:g}s",
            "upstream_deadline",
        )
    except httpx.HTTPError as exc:
        state.metrics.upstream_errors.labels("stream").inc()
        log.warning("the upstream stream broke off: %s", type(exc).__name__)
        yield _error_event(
            "upstream_error",
            f"the upstream stream broke off ({type(exc).__name__})",
            "upstream_failed",
        )
    finally:
        await response.aclose()
        state.metrics.upstream_seconds.observe(time.perf_counter() - t0)


def _error_event(kind: str, message: str, code: str) -> bytes:
    error = {"error": {"type": kind, "message": message, "code": code}}
    return f"data: {json.dumps(error)}\n\n".encode()
