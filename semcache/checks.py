"""The checks on what the public API is given: a typed error (:class:`InvalidInputError`) for
bad input before anything is read or written, so nothing stored is touched by it."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InvalidInputError
from .keys import check_text
from .types import DEFAULT_SCOPE, Scope


def check_ttl(ttl: Any) -> float | None:
    if ttl is None:
        return None
    try:
        finite = not isinstance(ttl, bool) and isinstance(ttl, int | float) and math.isfinite(ttl)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise InvalidInputError(f"ttl must be None or a finite number of seconds, not {ttl!r}")
    if ttl < 0:
        raise InvalidInputError(f"ttl must not be negative, got {ttl}")
    return float(ttl)


def check_count(value: Any, name: str) -> int:
    """``value`` if it is a non-negative int (not a bool), else InvalidInputError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{name} must be a non-negative int")
    return value


def check_tags(tags: Iterable[str] | None) -> tuple[str, ...]:
    if tags is None:
        return ()
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise InvalidInputError(f"tags must be a list of strings, not {type(tags).__name__}")
    out = tuple(tags)
    for tag in out:
        if not isinstance(tag, str) or not tag:
            raise InvalidInputError(f"a tag must be a non-empty string, not {tag!r}")
        check_text(tag, "a tag")
    return tuple(dict.fromkeys(out))


#: Deepest nesting of lists and dicts that metadata may have: every reader can serialise it
#: (pydantic, and so the sidecar, stops at a few hundred levels).
MAX_METADATA_DEPTH = 64


def _depth(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, Mapping):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if level <= MAX_METADATA_DEPTH:
            stack.extend((child, level + 1) for child in children)
    return deepest


def check_metadata(metadata: Mapping[str, Any] | None) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidInputError("metadata must be a mapping")
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise InvalidInputError(
            f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep"
        )
    try:
        # not escaped to ASCII, so a lone surrogate anywhere in it is seen (and refused) here,
        # as in every other text, instead of coming back out of the store unencodable
        text = json.dumps(
            dict(metadata), separators=(",", ":"), allow_nan=False, ensure_ascii=False
        )
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata must be JSON-serialisable: {exc}") from None
    except RecursionError:
        raise InvalidInputError("metadata is nested too deeply") from None
    return check_text(text, "the metadata")


def check_response(response: Any) -> str:
    if not isinstance(response, str):
        raise InvalidInputError(f"a response must be a str, not {type(response).__name__}")
    return check_text(response, "the response")


def check_namespace(namespace: Any) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise InvalidInputError(f"a namespace is a non-empty string, not {namespace!r}")
    check_text(namespace, "the namespace")


def may_be_id(value: Any) -> bool:
    """Whether ``value`` can be an entry id at all (ids are hex strings); anything else is
    simply not found, never sent to the store."""
    return isinstance(value, str) and value.isascii() and value.isalnum()


def check_fn(fn: Any) -> None:
    if not callable(fn):
        raise InvalidInputError(f"the compute function must be callable, not {type(fn).__name__}")


def as_scope(scope: Scope | None) -> Scope:
    if scope is None:
        return DEFAULT_SCOPE
    if not isinstance(scope, Scope):
        raise InvalidInputError(f"scope must be a semcache.Scope, not {type(scope).__name__}")
    return scope


def check_answer(result: Any) -> str:
    """A compute function's answer, which must be text (whether it can be stored is the
    write's business: an answer that cannot is still returned)."""
    if not isinstance(result, str):
        raise InvalidInputError(f"the function must return a str, not {type(result).__name__}")
    return result


def check_seconds(value: Any, name: str) -> float:
    """A positive, finite number of seconds a thread can wait, or InvalidInputError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"{name} must be a positive number of seconds")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not 0 < seconds <= threading.TIMEOUT_MAX:
        raise InvalidInputError(
            f"{name} must be a positive number of seconds, at most {threading.TIMEOUT_MAX:.0f}"
        )
    return seconds
