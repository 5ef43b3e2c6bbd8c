"""HTTP errors of the sidecar: one stable body, ``{"error": {"type", "message", "code"}}``.

``type`` is the OpenAI error category (``invalid_request_error``, ``permission_denied``, ...), so
OpenAI clients in every language turn it into their own exception with the message, and a 413 or
a 502 from the sidecar reads like one from the API; ``code`` is a stable machine-readable reason
(``too_large``, ``not_found``, ``upstream_deadline``, ...). Library errors map onto statuses here,
once: bad input 422, unknown entry 404, a closed cache or a failed model 503.

A 5xx never carries internals (SQLite texts, file paths, exception texts): its message is fixed
per kind and names the request id, which every response carries in ``x-request-id``; the details
go to the server log under that id.
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
    EntryTooLargeError,
    InvalidInputError,
    SemcacheError,
    UpstreamError,
    UpstreamTimeoutError,
)

log = logging.getLogger("semcache.server")

#: the stable ``code`` of a status when a handler gives none
DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_field",
    500: "internal",
    502: "upstream_failed",
    503: "unavailable",
    504: "upstream_timeout",
}


class ApiError(Exception):
    """An error answered with ``status`` and the stable body. ``message`` goes to the caller
    as is: it must never hold internals (it is written here, by the sidecar, for callers)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code or DEFAULT_CODES.get(status, "error")
        self.headers = headers


def request_id_of(scope_or_request: Any) -> str:
    """The id :class:`~semcache.server.middleware.RequestContext` gave this request."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    state = scope.get("state") or {}
    return str(state.get("request_id", "-"))


def error_response(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The stable error body with ``status``."""
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    body = {"type": kind, "message": message, "code": code or DEFAULT_CODES.get(status, "error")}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def internal_response(request_id: str, status: int = 500) -> JSONResponse:
    """A 5xx without internals: the caller gets the request id to quote, the log the rest."""
    messages = {
        500: "internal error",
        503: "the cache is not available right now; retry shortly",
    }
    kind = "service_unavailable" if status == 503 else "server_error"
    return error_response(
        status,
        f"{messages.get(status, 'internal error')} (request id {request_id})",
        kind,
        DEFAULT_CODES.get(status, "internal"),
    )


def status_of(exc: SemcacheError) -> tuple[int, str]:
    """The HTTP status and error type of a library error."""
    if isinstance(exc, EntryTooLargeError):  # too large for the cache's max_bytes
        return 413, "too_large"
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
    """Pydantic's errors as one line of ``field: reason`` (never the input values)."""
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = str(err.get("msg", "invalid"))[:200]
        parts.append(f"{loc[:200]}: {msg}" if loc else msg)
    return "; ".join(parts[:10]) or "invalid request"


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the stable body."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(
                400, f"malformed JSON: {_describe(errors)}", "invalid_request_error", "invalid_json"
            )
        return error_response(422, _describe(errors), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code >= 500:
            log.error(
                "HTTP %s on %s [%s]: %s",
                exc.status_code,
                request.url.path,
                request_id_of(request),
                exc.detail,
            )
            return internal_response(request_id_of(request), exc.status_code)
        return error_response(
            exc.status_code,
            str(exc.detail),
            "invalid_request_error",
            None,
            dict(exc.headers or {}),
        )

    @app.exception_handler(SemcacheError)
    async def _semcache(request: Request, exc: SemcacheError) -> JSONResponse:
        status, kind = status_of(exc)
        if status >= 500:
            log.error(
                "%s on %s [request %s]: %s",
                type(exc).__name__,
                request.url.path,
                request_id_of(request),
                exc,
            )
            if status in (500, 503):
                return internal_response(request_id_of(request), status)
            return error_response(status, f"the upstream failed ({type(exc).__name__})", kind)
        return error_response(status, _client_text(exc), kind)


def _client_text(exc: SemcacheError) -> str:
    """A 4xx library error's text for the caller: its own words, cut short."""
    return str(exc)[:500]
