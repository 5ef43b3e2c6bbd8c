"""The probes, ``GET /healthz`` (live) and ``GET /readyz`` (ready), open to all, and
``GET /metrics`` (Prometheus, admin tokens).

Neither probe says anything about tenants or entries: a caller without a token learns only
whether the sidecar is up and ready.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..app import ServerState, principal_of, state_of
from ..schemas import ErrorResponse, ReadyResponse

log = logging.getLogger("semcache.server")

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    """Liveness: the process answers (``ready`` says whether the cache is open). Needs no
    token."""
    state = state_of(request)
    return {"status": "ok", "ready": state.cache is not None}


def _readiness(state: ServerState) -> dict[str, bool]:
    """The three checks of ``/readyz`` (runs in a worker thread: it touches the store)."""
    cache = state.cache
    checks = {"model": False, "store": False, "index": False}
    if cache is None:
        return checks
    embedder = cache.embedder
    inner = getattr(embedder, "inner", embedder)
    # a model in a child process is loaded once that process runs; one in this process is
    # loaded when the cache opened
    checks["model"] = getattr(inner, "pid", True) is not None
    try:
        stats = cache.stats()  # reads the store and replays its change log into the index
    except Exception as exc:  # any failure means not ready; the reason goes to the log
        log.warning("readiness: the store cannot be read: %s", exc)
        return checks
    checks["store"] = True
    checks["index"] = stats.get("indexed") == stats.get("entries")
    return checks


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready: see the checks"}},
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded, the store answers and the index holds every
    stored entry; 503 (with the checks) before that and from the start of shutdown. Needs no
    token."""
    state = state_of(request)
    if state.draining or state.cache is None:
        checks = {"model": False, "store": False, "index": False}
    else:
        checks = await state.run(_readiness, state)
    ready = all(checks.values()) and not state.draining
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **{code: {"model": ErrorResponse} for code in (401, 403)},
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format); admin tokens only (they cover every
    tenant)."""
    principal_of(request).require_admin("/metrics")
    state = state_of(request)
    if state.cache is not None:
        stats = await state.run(state.cache.stats)
        state.metrics.refresh(stats, state.batcher)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
