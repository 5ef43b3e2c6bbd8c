"""Write-through invalidation for the user's own write functions.

``@cache.invalidates(tags=lambda user_id, **_: [f"user:{user_id}"])`` runs the decorated write and,
only after it returns, invalidates what it names: tags, entry ids, or namespaces to bump. If the
write raises, nothing is invalidated and the error propagates: the data did not change, so the
cached answers are still right.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .cache import SemanticCache

F = TypeVar("F", bound=Callable[..., Any])
Names = Iterable[str] | Callable[..., Iterable[str]] | None


def _resolve(spec: Names, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    if spec is None:
        return []
    values = spec(*args, **kwargs) if callable(spec) else spec
    if isinstance(values, str):
        return [values]
    return list(values)


def invalidates(
    cache: SemanticCache, *, tags: Names = None, entries: Names = None, namespaces: Names = None
) -> Callable[[F], F]:
    """Decorate a write function (sync or async) to invalidate after it succeeds.

    Each of ``tags``, ``entries`` (entry ids) and ``namespaces`` (bumped) is a list or a function
    called with the write's own arguments.
    """

    def apply(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tag_list = _resolve(tags, args, kwargs)
        if tag_list:
            cache.invalidate_tags(*tag_list)
        for entry_id in _resolve(entries, args, kwargs):
            cache.delete(entry_id)
        for namespace in _resolve(namespaces, args, kwargs):
            cache.bump(namespace)

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                result = await fn(*args, **kwargs)
                apply(args, kwargs)
                return result

            return awrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            apply(args, kwargs)
            return result

        return wrapper  # type: ignore[return-value]

    return decorate
