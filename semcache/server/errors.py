"""HTTP errors of the sidecar, in OpenAI's shape: ``{"error": {"message", "type", ...}}``.

OpenAI clients in every language turn that shape into their own exception with the message, so
a 413 or a 502 from the sidecar reads like one from the API. Library errors map onto statuses
here, once: bad input 422, unknown entry 404, a closed cache 503.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    CacheClosedError,
    EmbedderError,
    EntryNotFoundError,
    InvalidInputError,
    SemcacheError,
    UpstreamError,
    UpstreamTimeoutError,
)

log = logging.getLogger("semcache.server")


class ApiError(Exception):
    """An error answered with ``status`` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers


def error_response(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}},
        status_code=status,
        headers=headers,
    )


def status_of(exc: SemcacheError) -> tuple[int, str]:
    """The HTTP status and error type of a library error."""
    if isinstance(exc, InvalidInputError):
        return 422, "invalid_request_error"
    if isinstance(exc, EntryNotFoundError):
        return 404, "not_found_error"
    if isinstance(exc, CacheClosedError | EmbedderError):  # the next call restarts the model
        return 503, "service_unavailable"
    if isinstance(exc, UpstreamTimeoutError):
        return 504, "upstream_timeout"
    if isinstance(exc, UpstreamError):
        return 502, "upstream_error"
    return 500, "server_error"


def _describe(errors: list[Any]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else str(msg))
    return "; ".join(parts[:10]) or "invalid request"


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the OpenAI shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(
                400, f"malformed JSON: {_describe(errors)}", "invalid_request_error"
            )
        return error_response(422, _describe(errors), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            exc.status_code, str(exc.detail), "invalid_request_error", dict(exc.headers or {})
        )

    @app.exception_handler(SemcacheError)
    async def _semcache(request: Request, exc: SemcacheError) -> JSONResponse:
        status, kind = status_of(exc)
        if status >= 500:
            log.error("%s on %s: %s", type(exc).__name__, request.url.path, exc)
        return error_response(status, str(exc), kind)
