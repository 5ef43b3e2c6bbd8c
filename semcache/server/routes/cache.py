"""The cache itself over JSON: ``/v1/cache/...`` (lookup, store, entries, invalidation, stats).

Every body forbids unknown fields. A scope's ``namespace`` defaults to the token's tenant (or
``default``); a tenant-bound token naming another namespace gets a 403, and entries of other
namespaces are a 404 to it. Tags are stored as given; a tenant's tag invalidation is confined to
its namespace by the cache itself (``invalidate_tags(..., namespace=tenant)``). Expiry sweeps and
stats cover every tenant: admin tokens only. Sizes are bounded: prompts and texts
(``SEMCACHE_MAX_PROMPT_CHARS``), responses (``SEMCACHE_MAX_RESPONSE_CHARS``), metadata
(``SEMCACHE_MAX_METADATA_BYTES``) and scope params and context (``SEMCACHE_MAX_SCOPE_BYTES``) are
a 413 beyond their limits; tags a 422. Library errors map to statuses in
:mod:`semcache.server.errors`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request

from ...errors import EntryNotFoundError
from ...types import Entry, Scope
from ..app import ServerState, principal_of, state_of
from ..auth import Principal
from ..errors import ApiError
from ..schemas import (
    BumpRequest,
    BumpResponse,
    CountResponse,
    DeletedResponse,
    DeletePromptRequest,
    EntryModel,
    ErrorResponse,
    IdsResponse,
    LookupRequest,
    LookupResponse,
    ScopeModel,
    SimilarRequest,
    StoreRequest,
    StoreResponse,
    TagsRequest,
    UpdateRequest,
)

router = APIRouter(
    prefix="/v1/cache",
    tags=["cache"],
    responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 503)},
)


def _scope(state: ServerState, principal: Principal, model: ScopeModel | None) -> Scope:
    requested = model.namespace if model is not None else None
    namespace = principal.namespace(requested, state.settings.default_namespace)
    model = model or ScopeModel()
    _check_prompt(state, model.system)
    _check_json(
        state.settings.max_scope_bytes,
        "scope params and context",
        "SEMCACHE_MAX_SCOPE_BYTES",
        [model.params, model.context],
    )
    return model.to_scope(namespace)


def _check_json(limit: int, what: str, setting: str, value: Any) -> None:
    """413 when ``value`` takes more than ``limit`` bytes as JSON."""
    if value is None:
        return
    try:
        size = len(json.dumps(value, ensure_ascii=False).encode())
    except (TypeError, ValueError):
        raise ApiError(422, f"{what} must be plain JSON") from None
    if size > limit:
        raise ApiError(413, f"{what} take {size} bytes as JSON; the limit is {limit} ({setting})")


def _check_response(state: ServerState, response: str | None) -> None:
    limit = state.settings.max_response_chars
    if response is not None and len(response) > limit:
        raise ApiError(
            413,
            f"a response of {len(response)} characters is over the limit of {limit} "
            "(SEMCACHE_MAX_RESPONSE_CHARS)",
        )


def _check_metadata(state: ServerState, metadata: dict[str, Any] | None) -> None:
    _check_json(
        state.settings.max_metadata_bytes, "metadata", "SEMCACHE_MAX_METADATA_BYTES", metadata
    )


def _check_prompt(state: ServerState, *texts: str | None) -> None:
    limit = state.settings.max_prompt_chars
    for text in texts:
        if text is not None and len(text) > limit:
            raise ApiError(
                413,
                f"a text of {len(text)} characters is over the limit of {limit} "
                "(SEMCACHE_MAX_PROMPT_CHARS)",
            )


async def _entry(state: ServerState, principal: Principal, entry_id: str) -> Entry:
    """The entry, if this caller may see it (404 otherwise, as if it did not exist)."""
    cache = state.require_cache()
    entry: Entry = await state.run(cache.get, entry_id)
    if not principal.owns(entry.scope.namespace):
        raise EntryNotFoundError(f"no entry {entry_id!r}")
    return entry


@router.post("/lookup")
async def lookup(request: Request, body: LookupRequest) -> LookupResponse:
    """The cached answer for a prompt in a scope, or ``{"hit": false}``."""
    state, principal = state_of(request), principal_of(request)
    _check_prompt(state, body.prompt)
    scope = _scope(state, principal, body.scope)
    cache, metrics = state.require_cache(), state.metrics
    metrics.lookups.labels("api").inc()
    t0 = time.perf_counter()
    hit, nearest = await state.run(cache.probe, body.prompt, scope=scope, threshold=body.threshold)
    metrics.looked_up(hit, nearest, time.perf_counter() - t0)
    return LookupResponse.of(hit)


@router.post("/store", status_code=201)
async def store(request: Request, body: StoreRequest) -> StoreResponse:
    """Store an answer; ``ttl`` absent: the cache's default, ``null``: never expires."""
    state, principal = state_of(request), principal_of(request)
    _check_prompt(state, body.prompt)
    _check_response(state, body.response)
    _check_metadata(state, body.metadata)
    scope = _scope(state, principal, body.scope)
    kwargs: dict[str, Any] = {"scope": scope, "tags": body.tags, "metadata": body.metadata}
    if "ttl" in body.model_fields_set:
        kwargs["ttl"] = body.ttl
    cache = state.require_cache()
    entry_id = await state.run(cache.store, body.prompt, body.response, **kwargs)
    state.metrics.stores.inc()
    return StoreResponse(entry_id=entry_id)


@router.get("/entries/{entry_id}")
async def get_entry(request: Request, entry_id: str) -> EntryModel:
    """One entry, as stored."""
    entry = await _entry(state_of(request), principal_of(request), entry_id)
    return EntryModel.of(entry, list(entry.tags))


@router.patch("/entries/{entry_id}")
async def update_entry(request: Request, entry_id: str, body: UpdateRequest) -> EntryModel:
    """Change an entry in place (write-through); a new prompt is re-embedded."""
    state, principal = state_of(request), principal_of(request)
    _check_prompt(state, body.prompt)
    _check_response(state, body.response)
    _check_metadata(state, body.metadata)
    await _entry(state, principal, entry_id)
    changes: dict[str, Any] = {}
    for name in body.model_fields_set:
        value = getattr(body, name)
        changes[name] = (value or []) if name == "tags" else value
    cache = state.require_cache()
    await state.run(lambda: cache.update(entry_id, **changes))
    state.metrics.invalidation("update", 1)
    entry = await _entry(state, principal, entry_id)
    return EntryModel.of(entry, list(entry.tags))


@router.delete("/entries/{entry_id}")
async def delete_entry(request: Request, entry_id: str) -> DeletedResponse:
    """Delete one entry (write-through); idempotent: ``deleted`` says whether it existed."""
    state, principal = state_of(request), principal_of(request)
    try:
        await _entry(state, principal, entry_id)
    except EntryNotFoundError:
        return DeletedResponse(deleted=False)
    deleted = await state.run(state.require_cache().delete, entry_id)
    state.metrics.invalidation("delete", int(deleted))
    return DeletedResponse(deleted=deleted)


@router.post("/delete_prompt")
async def delete_prompt(request: Request, body: DeletePromptRequest) -> CountResponse:
    """Delete the entry stored for exactly this prompt in the scope."""
    state, principal = state_of(request), principal_of(request)
    _check_prompt(state, body.prompt)
    scope = _scope(state, principal, body.scope)
    cache = state.require_cache()
    removed = await state.run(lambda: cache.delete_prompt(body.prompt, scope=scope))
    state.metrics.invalidation("delete", removed)
    return CountResponse(removed=removed)


@router.post("/invalidate/tags")
async def invalidate_tags(request: Request, body: TagsRequest) -> CountResponse:
    """Delete every entry carrying any of the tags: a tenant token's entries only (the cache
    matches the tags within its namespace); an admin token's across every namespace.

    A tenant's tag also matches its ``<tenant>:<tag>`` spelling, which earlier sidecars stored
    for tenants (a string prefix, not a wall): entries cached then stay invalidatable by the
    tags their tenant gave, still only within the tenant's namespace."""
    state, principal = state_of(request), principal_of(request)
    cache = state.require_cache()
    tenant = principal.confined_to
    tags = list(body.tags)
    if tenant is not None:
        tags += [f"{tenant}:{tag}" for tag in body.tags]
    removed = await state.run(lambda: cache.invalidate_tags(*tags, namespace=tenant))
    state.metrics.invalidation("tags", removed)
    return CountResponse(removed=removed)


@router.post("/bump")
async def bump(request: Request, body: BumpRequest) -> BumpResponse:
    """Make every entry of a namespace unreachable at once; returns the new version."""
    state, principal = state_of(request), principal_of(request)
    namespace = principal.namespace(body.namespace, state.settings.default_namespace)
    version = await state.run(state.require_cache().bump, namespace)
    state.metrics.invalidation("version", 0)
    return BumpResponse(namespace=namespace, version=version)


@router.get("/namespaces/{namespace}/version")
async def version(request: Request, namespace: str) -> BumpResponse:
    """A namespace's current version (0 until first bumped)."""
    state, principal = state_of(request), principal_of(request)
    namespace = principal.namespace(namespace, state.settings.default_namespace)
    current = await state.run(state.require_cache().version, namespace)
    return BumpResponse(namespace=namespace, version=current)


@router.post("/invalidate/similar")
async def invalidate_similar(request: Request, body: SimilarRequest) -> IdsResponse:
    """Delete every entry at least ``radius`` similar to ``text`` or ``vector``.

    With a ``scope`` only that scope's entries; without one, every scope (admin tokens only: a
    tenant must name a scope, which is then in its namespace).
    """
    state, principal = state_of(request), principal_of(request)
    _check_prompt(state, body.text)
    scope: Scope | None = None
    if body.scope is not None:
        scope = _scope(state, principal, body.scope)
    elif not principal.admin:
        raise ApiError(
            403,
            "a token bound to a tenant must give a scope to invalidate similar entries",
            "permission_denied",
        )
    query: Any = body.text if body.text is not None else body.vector
    cache = state.require_cache()
    removed = await state.run(lambda: cache.invalidate_similar(query, body.radius, scope=scope))
    state.metrics.invalidation("semantic", len(removed))
    return IdsResponse(removed=removed)


@router.post("/expire")
async def expire(request: Request) -> CountResponse:
    """Delete every expired (and version-dead) entry now, in every namespace; returns how many
    (admin tokens only: it reaches every tenant's entries)."""
    principal_of(request).require_admin("/v1/cache/expire")
    state = state_of(request)
    removed = await state.run(state.require_cache().expire)
    state.metrics.invalidation("ttl", removed)
    return CountResponse(removed=removed)


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """The cache's counters (admin tokens only: they cover every tenant)."""
    principal_of(request).require_admin("/v1/cache/stats")
    state = state_of(request)
    result: dict[str, Any] = await state.run(state.require_cache().stats)
    embedder = state.require_cache().embedder
    inner = getattr(embedder, "inner", embedder)
    result["embedder"] = {
        "model_id": embedder.model_id,
        "precision": getattr(inner, "precision", None),
        "pid": getattr(inner, "pid", None),  # the model's own process, when it has one
        "restarts": getattr(inner, "restarts", None),
    }
    batcher = state.batcher
    if batcher is not None:
        s = batcher.stats
        result["embedding_batches"] = {
            "calls": s.calls,
            "texts": s.texts,
            "batches": s.batches,
            "mean_batch": round(s.mean_batch, 3),
            "largest_batch": s.largest_batch,
            "memo_hits": s.memo_hits,
        }
    return result
