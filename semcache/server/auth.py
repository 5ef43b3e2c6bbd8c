"""Bearer tokens and tenants: who is calling, and which namespace they may touch.

With tokens configured every endpoint but the probes (``/healthz``, ``/readyz``) needs
``Authorization: Bearer <token>`` (401 otherwise). A token bound to a tenant acts only in the
namespace of that name, by construction:

- naming another namespace is a 403 whether or not that namespace exists (the answer is the same
  for every name, so it tells nothing about other tenants);
- entries of other namespaces are a 404, exactly as entries that do not exist;
- tags are stored as given and a tenant's tag invalidation runs with ``namespace=<tenant>``
  (:meth:`SemanticCache.invalidate_tags`), so it matches only its own namespace's entries: no
  tag spelling reaches another namespace's entries (the old ``<tenant>:<tag>`` prefixes could);
- the global endpoints (stats, metrics, expire, tag or similarity invalidation without a scope)
  are for admin tokens (tokens without a tenant).

Without tokens the caller is an admin.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .errors import ApiError
from .settings import Settings

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


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
                f"this token is bound to namespace {self.tenant!r}; "
                f"it cannot use {requested[:100]!r}",
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

    @property
    def confined_to(self) -> str | None:
        """The namespace this caller is confined to (None: an admin, confined to nothing)."""
        return self.tenant


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
