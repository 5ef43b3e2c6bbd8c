"""Imports point one way: the consistency core and its backends never import the facade or an
edge (server, clients, CDC, CLI, evals), directly or through another module, so each can be
used and tested without them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "semcache"

#: The core: the store of record, the replica and its backends, the write path.
CORE = (
    "errors",
    "types",
    "keys",
    "clock",
    "checks",
    "vectorcodec",
    "embed",
    "embed_process",
    "batching",
    "store",
    "pgstore",
    "stores",
    "index",
    "radius",
    "shards",
    "l1",
    "folder",
    "progress",
    "fence",
    "groupcommit",
    "replica",
    "eviction",
    "writer",
)
#: What the core must not reach: the package root (it imports the facade), the facade and
#: every edge.
ABOVE = {
    "__init__",
    "__main__",
    "cache",
    "server",
    "clients",
    "cdc",
    "cli",
    "cli_ops",
    "langchain",
    "decorators",
    "demo",
    "eval",
}


def imported(module: str) -> set[str]:
    """The semcache modules ``module`` (a top-level module's name) imports, by the first
    component below the package; ``__init__`` for the package root itself."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y, from .x.y import z
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x: a module, or a name of the package root
                for alias in node.names:
                    is_module = (PACKAGE / f"{alias.name}.py").exists()
                    found.add(alias.name if is_module else "__init__")
            elif node.module == "semcache":  # from semcache import X
                found.add("__init__")
            elif node.module and node.module.startswith("semcache."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "semcache":
                    found.add("__init__")
                elif alias.name.startswith("semcache."):
                    found.add(alias.name.split(".")[1])
    return found


def reached(module: str) -> set[str]:
    """Every semcache module ``module`` imports, directly or through other top-level modules
    (a subpackage counts as one module and is not entered)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in imported(todo.pop()):
            if name not in seen:
                seen.add(name)
                if name not in ABOVE and (PACKAGE / f"{name}.py").exists():
                    todo.append(name)
    return seen


def test_the_parser_sees_every_kind_of_import() -> None:
    assert "__init__" in imported("demo")  # from . import SemanticCache
    assert "writer" in imported("cache") and "store" in imported("writer")


@pytest.mark.parametrize("module", CORE)
def test_the_core_never_reaches_the_facade_or_an_edge(module: str) -> None:
    above = reached(module) & ABOVE
    assert not above, f"semcache/{module}.py reaches {sorted(above)}"


def test_the_facade_leaves_writing_new_entries_to_the_writer() -> None:
    """SemanticCache holds no SQL and no group commit: rows for new entries are made and
    committed in semcache/writer.py (``update`` and ``expire`` call the store's own methods)."""
    source = (PACKAGE / "cache.py").read_text(encoding="utf-8")
    for marker in ("INSERT INTO", "GroupCommit(", "insert_many(", "_commit_group"):
        assert marker not in source, marker
