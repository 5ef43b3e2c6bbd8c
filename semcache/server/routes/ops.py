"""``GET /healthz`` (open to all, for probes) and ``GET /metrics`` (Prometheus, admin tokens)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from ..app import principal_of, state_of

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    """Liveness and readiness: ``ready`` once the cache is open. Needs no token."""
    state = state_of(request)
    return {"status": "ok", "ready": state.cache is not None}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    principal_of(request).require_admin("/metrics")
    state = state_of(request)
    if state.cache is not None:
        stats = await run_in_threadpool(state.cache.stats)
        state.metrics.refresh(stats, state.batcher)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
