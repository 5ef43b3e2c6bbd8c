"""The sidecar's two ASGI middlewares (pure ASGI, so streaming responses pass through untouched).

- :class:`RequestContext` (outermost): gives every request an id, returned in ``x-request-id``
  and written into every log line about it; refuses a body over ``SEMCACHE_MAX_BODY_BYTES``
  with a 413 (by its ``content-length`` at once, or by counting the bytes as they are read, so a
  chunked body cannot slip past); and answers any error nothing else handled with a 500 that
  names the request id and nothing else (the traceback goes to the log).
- :class:`AuthMiddleware`: checks ``Authorization: Bearer`` on every path but the probes and
  records the caller for the handlers.
"""

from __future__ import annotations

import logging
import re
import uuid

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import ANONYMOUS_ADMIN, PUBLIC_PATHS, authenticate
from .errors import ApiError, error_response, internal_response
from .settings import Settings

log = logging.getLogger("semcache.server")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _too_large(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes (SEMCACHE_MAX_BODY_BYTES)"


class RequestContext:
    """Request id, body limit and the last-resort 500 for every HTTP request."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.limit = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _CLIENT_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        raw_id = request_id.encode()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw_id)]
            await send(message)

        limit = self.limit
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            status = 413 if length.isdigit() else 400
            message = _too_large(limit) if status == 413 else "invalid content-length"
            await error_response(status, message, "invalid_request_error")(
                scope, receive, send_with_id
            )
            return
        received = 0

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, _too_large(limit))
            return message

        try:
            await self.app(scope, receive_counted, send_with_id)
        except Exception:
            log.exception("unhandled error on %s [request %s]", scope.get("path"), request_id)
            if not started:
                await internal_response(request_id)(scope, receive, send_with_id)


class AuthMiddleware:
    """Checks ``Authorization: Bearer`` on every path but the probes and records the caller
    (a :class:`~semcache.server.auth.Principal`) in the request's state for the handlers."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        principal = ANONYMOUS_ADMIN
        if scope["path"] not in PUBLIC_PATHS:
            try:
                principal = authenticate(self.settings, Headers(scope=scope).get("authorization"))
            except ApiError as exc:
                await error_response(exc.status, exc.message, exc.kind, exc.code)(
                    scope, receive, send
                )
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)
