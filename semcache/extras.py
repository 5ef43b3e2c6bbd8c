"""Optional dependencies ("extras") and the error that names the ``pip install`` to run.

``pip install semcache`` installs what caching needs; the sidecar, the OpenAI wrapper, change
data capture, the evaluation tools and the LangChain cache each need an extra. Code that needs
one calls :func:`require` (or imports inside :func:`needs`) before importing it, so that a user
without it reads ``pip install "semcache[server]"`` instead of a bare ``No module named ...``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from .errors import InvalidInputError, SemcacheError

__all__ = ["EXTRAS", "MissingExtraError", "needs", "require"]

#: The top-level modules each extra provides (the import names, not the distribution names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "server": ("fastapi", "uvicorn", "httpx", "pydantic", "pydantic_settings", "prometheus_client"),
    "openai": ("openai", "pydantic"),
    "postgres": ("psycopg2",),
    "eval": ("matplotlib",),
    "langchain": ("langchain_core",),
}


class MissingExtraError(SemcacheError, ImportError):
    """A feature's optional dependency is not installed; the message says what to install.

    Also an ``ImportError``, so code that already guards an optional import keeps working.
    """

    def __init__(self, extra: str, module: str, feature: str) -> None:
        self.extra = extra
        self.module = module
        self.feature = feature
        super().__init__(
            f"{feature} needs the optional dependency {module!r}, which is not installed: "
            f'pip install "semcache[{extra}]"'
        )


def _check_extra(extra: str) -> tuple[str, ...]:
    if extra not in EXTRAS:
        raise InvalidInputError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    return EXTRAS[extra]


def require(extra: str, feature: str) -> dict[str, ModuleType]:
    """Import every module of ``extra`` and return them by name; raise
    :class:`MissingExtraError` naming ``pip install "semcache[extra]"`` when one is missing.

    Only the absence of the extra's own module is translated: an error inside an installed
    module (a broken install, a missing transitive dependency) propagates unchanged.
    """
    modules: dict[str, ModuleType] = {}
    for name in _check_extra(extra):
        try:
            modules[name] = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] != name:
                raise
            raise MissingExtraError(extra, name, feature) from exc
    return modules


@contextmanager
def needs(extra: str, feature: str) -> Iterator[None]:
    """Turn a ``ModuleNotFoundError`` for one of ``extra``'s modules, raised by the imports in
    the ``with`` block, into :class:`MissingExtraError`."""
    names = _check_extra(extra)
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in names:
            raise
        raise MissingExtraError(extra, top, feature) from exc
