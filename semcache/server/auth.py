"""Bearer tokens and tenants: who is calling, and which namespace they may touch.

With tokens configured every endpoint but ``/healthz`` needs ``Authorization: Bearer <token>``
(401 otherwise). A token bound to a tenant acts only in the namespace of that name: naming another
namespace is a 403, entries of other namespaces are invisible (404), its tags live in a space of
its own (stored as ``<tenant>:<tag>``, shown without the prefix) so it can neither invalidate nor
see another tenant's tags, and the global endpoints (stats, metrics) are for admin tokens
(tokens without a tenant). Without tokens the caller is an admin.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ApiError
from .settings import Settings

PUBLIC_PATHS = frozenset({"/healthz"})


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: an admin (tenant None) or a tenant-bound token."""

    tenant: str | None
    authenticated: bool

    @property
    def admin(self) -> bool:
        return self.tenant is None

    def namespace(self, requested: str | None, default: str) -> str:
        """The namespace a request acts in; 403 when a tenant names another one."""
        if self.tenant is None:
            return requested or default
        if requested is not None and requested != self.tenant:
            raise ApiError(
                403,
                f"this token is bound to namespace {self.tenant!r}; it cannot use {requested!r}",
                "permission_denied",
            )
        return self.tenant

    def require_admin(self, what: str) -> None:
        if self.tenant is not None:
            raise ApiError(
                403, f"{what} needs a token that is not bound to a tenant", "permission_denied"
            )

    def owns(self, namespace: str) -> bool:
        return self.tenant is None or namespace == self.tenant

    def tags_in(self, tags: Iterable[str]) -> list[str]:
        """Tags as stored: a tenant's tags carry its prefix."""
        if self.tenant is None:
            return list(tags)
        return [f"{self.tenant}:{tag}" for tag in tags]

    def tags_out(self, tags: Iterable[str]) -> list[str]:
        """Tags as shown to this caller."""
        if self.tenant is None:
            return list(tags)
        prefix = f"{self.tenant}:"
        return [t[len(prefix) :] for t in tags if t.startswith(prefix)]


ANONYMOUS_ADMIN = Principal(tenant=None, authenticated=False)


def authenticate(settings: Settings, authorization: str | None) -> Principal:
    """The caller behind an ``Authorization`` header (401 when auth is on and it is not valid)."""
    if not settings.auth_enabled:
        return ANONYMOUS_ADMIN
    if not authorization:
        raise ApiError(401, "missing Authorization: Bearer <token>", "authentication_error")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401, "the Authorization header must be 'Bearer <token>'", "authentication_error"
        )
    match: str | None = None
    found = False
    for known, tenant in settings.tokens.items():  # compare with every token: constant time
        if hmac.compare_digest(known.encode(), token.encode()):
            match, found = tenant, True
    if not found:
        raise ApiError(401, "invalid token", "authentication_error")
    return Principal(tenant=match, authenticated=True)
