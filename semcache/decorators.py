"""``@cache.cached(...)``: cache any function of a prompt, sync or async, with single-flight.

::

    @cache.cached(scope=Scope(model="gpt-4o-mini"), ttl=3600, tags=["faq"])
    def answer(prompt: str) -> str:
        return call_llm(prompt)

    @cache.cached()
    async def summarise(prompt: str, *, style: str = "short") -> str: ...

The first positional argument (or ``prompt=``) is the prompt, compared by meaning; the function's
return value (a ``str``) is the cached answer. Concurrent calls with the same or a near-identical
prompt run the function once (:meth:`SemanticCache.get_or_compute` /
:meth:`SemanticCache.aget_or_compute`).

Because two different functions must never answer for each other, the function's qualified name
and any further arguments are part of the scope (``params["fn"]``, ``params["args"]``,
``params["kwargs"]``); those arguments must therefore be JSON values (str, numbers, bools, None,
lists, dicts), or the call raises :class:`~semcache.errors.InvalidScopeError`. Pass
``per_function=False`` to share entries between functions with the same scope.

The wrapped function keeps its name and docstring and exposes ``.uncached`` (the original) and
``.cache``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from .checks import check_tags
from .errors import InvalidInputError
from .types import Scope

if TYPE_CHECKING:
    from .cache import SemanticCache
    from .threshold import HitPolicy

F = TypeVar("F", bound=Callable[..., Any])

_UNSET: Any = object()  # "ttl not given": the cache's default_ttl applies (None means forever)


def _call_scope(
    base: Scope | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    per_function: bool,
) -> Scope:
    base = base if base is not None else Scope()
    extra: dict[str, Any] = {}
    if per_function:
        extra["fn"] = f"{fn.__module__}.{fn.__qualname__}"
    if args:
        extra["args"] = list(args)
    if kwargs:
        extra["kwargs"] = dict(kwargs)
    if not extra:
        return base
    return Scope(
        namespace=base.namespace,
        model=base.model,
        params={**dict(base.params), **extra},
        system=base.system,
        context=base.context,
    )


def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict]:
    if args:
        return args[0], args[1:], kwargs
    if "prompt" in kwargs:
        rest = dict(kwargs)
        return rest.pop("prompt"), (), rest
    raise InvalidInputError("a @cached function takes the prompt as its first argument")


def cached(
    cache: SemanticCache,
    *,
    scope: Scope | None = None,
    ttl: Any = _UNSET,
    tags: Iterable[str] = (),
    threshold: float | HitPolicy | None = None,
    per_function: bool = True,
    **store_options: Any,
) -> Callable[[F], F]:
    """Decorate a function of a prompt so its answers come from ``cache`` when they can.

    ``scope``, ``ttl``, ``tags`` and ``threshold`` are those of
    :meth:`SemanticCache.get_or_compute` (``ttl`` left out means the cache's default).
    """
    if scope is not None and not isinstance(scope, Scope):
        raise InvalidInputError(f"scope must be a semcache.Scope, not {type(scope).__name__}")
    options: dict[str, Any] = {
        "tags": check_tags(tags),  # checked now: a str would be stored letter by letter
        "threshold": threshold,
        **store_options,
    }
    if ttl is not _UNSET and type(ttl).__name__ != "_Missing":  # cache.MISSING means unset too
        options["ttl"] = ttl

    def decorate(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                prompt, rest, kw = _split(args, kwargs)
                call_scope = _call_scope(scope, fn, rest, kw, per_function)

                async def compute(p: str) -> Any:
                    return await fn(p, *rest, **kw)

                return await cache.aget_or_compute(prompt, compute, scope=call_scope, **options)

            async_wrapper.uncached = fn  # type: ignore[attr-defined]
            async_wrapper.cache = cache  # type: ignore[attr-defined]
            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            prompt, rest, kw = _split(args, kwargs)
            call_scope = _call_scope(scope, fn, rest, kw, per_function)

            def compute(p: str) -> Any:
                return fn(p, *rest, **kw)

            return cache.get_or_compute(prompt, compute, scope=call_scope, **options)

        wrapper.uncached = fn  # type: ignore[attr-defined]
        wrapper.cache = cache  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
