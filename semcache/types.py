"""The value types of the public API: Scope, Hit and Entry."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidScopeError

Tier = Literal["l1", "semantic"]


def _canonical(value: Any, path: str) -> Any:
    """A JSON-stable form: dict keys sorted, integral floats as ints (0 == 0.0), tuples as lists."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidScopeError(f"scope field {path} is {value!r}; only finite numbers scope")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidScopeError(f"scope field {path} has a non-string key {k!r}")
            out[k] = _canonical(v, f"{path}.{k}")
        return dict(sorted(out.items()))
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [_canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise InvalidScopeError(
        f"scope field {path} holds a {type(value).__name__}; use JSON types "
        "(str, int, float, bool, None, lists and dicts)"
    )


@dataclass(frozen=True, eq=False)
class Scope:
    """Everything besides the prompt that must match exactly for a cached answer to apply.

    ``namespace`` is the tenant; ``model`` the LLM; ``params`` the decoding parameters
    (temperature, max_tokens, tools...); ``system`` the system prompt; ``context`` the earlier
    turns of the conversation (strings or ``{"role", "content"}`` dicts). Two scopes are equal when
    their digests are; ``temperature=0`` and ``temperature=0.0`` are the same scope.
    """

    namespace: str = "default"
    model: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    system: str = ""
    context: Sequence[Any] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not self.namespace:
            raise InvalidScopeError("Scope.namespace must be a non-empty string")
        if "\x00" in self.namespace:  # kept as a text column, which PostgreSQL's cannot hold
            raise InvalidScopeError("Scope.namespace must not hold a NUL character")
        if not isinstance(self.model, str):
            raise InvalidScopeError("Scope.model must be a string")
        if not isinstance(self.system, str):
            raise InvalidScopeError("Scope.system must be a string")
        if not isinstance(self.params, Mapping):
            raise InvalidScopeError("Scope.params must be a mapping")
        if isinstance(self.context, str | bytes) or not isinstance(self.context, Sequence):
            raise InvalidScopeError("Scope.context must be a list of earlier turns")
        try:
            canonical = self.canonical()  # validates every field once, up front
            text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False)
            blob = text.encode()
        except RecursionError:
            raise InvalidScopeError("the scope is nested too deeply to be a key") from None
        except UnicodeEncodeError as exc:
            raise InvalidScopeError(
                f"the scope holds text that is not valid Unicode (a lone surrogate: {exc.reason})"
            ) from None
        except ValueError as exc:  # an int past Python's digit limit for str()
            raise InvalidScopeError(f"the scope cannot be serialised: {exc}") from None
        object.__setattr__(self, "_digest", hashlib.sha256(blob).hexdigest())
        object.__setattr__(self, "_json", text)

    def canonical(self) -> dict[str, Any]:
        """The JSON-stable dict the digest is computed from."""
        return {
            "namespace": self.namespace,
            "model": self.model,
            "params": _canonical(self.params, "params"),
            "system": self.system,
            "context": _canonical(list(self.context), "context"),
        }

    @property
    def digest(self) -> str:
        """Hex SHA-256 of the canonical scope: the exact-match part of every cache key."""
        return self._digest  # type: ignore[attr-defined,no-any-return]

    def to_json(self) -> str:
        """The canonical scope as JSON (as the store keeps it), as of the scope's creation."""
        return self._json  # type: ignore[attr-defined,no-any-return]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scope:
        return cls(
            namespace=data.get("namespace", "default"),
            model=data.get("model", ""),
            params=data.get("params") or {},
            system=data.get("system", ""),
            context=data.get("context") or (),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scope) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)


DEFAULT_SCOPE = Scope()


@dataclass(frozen=True)
class Hit:
    """A cached answer served for a prompt.

    ``similarity`` is the cosine similarity (in [-1, 1]) between the prompt and the cached
    prompt; exact repeats served by the ``"l1"`` tier report 1.0.
    """

    response: str
    similarity: float
    entry_id: str
    tier: Tier
    prompt: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One stored entry, as the store holds it (``cache.get(entry_id)``)."""

    entry_id: str
    prompt: str
    response: str
    scope: Scope
    version: int
    created_at: float
    updated_at: float
    accessed_at: float
    expires_at: float | None
    hits: int
    tags: tuple[str, ...]
    metadata: Mapping[str, Any]
