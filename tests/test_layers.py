"""Imports point one way: the consistency core and its backends never import the facade or an
edge (server, clients, CDC, CLI), so each can be used and tested without them."""

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
    "vectorcodec",
    "store",
    "pgstore",
    "index",
    "shards",
    "l1",
    "folder",
    "fence",
    "groupcommit",
    "replica",
    "eviction",
    "writer",
)
#: What the core must not import: the facade and every edge.
ABOVE = ("cache", "server", "clients", "cdc", "cli", "cli_ops", "langchain", "decorators")


def imported(module: str) -> set[str]:
    """The semcache modules ``module`` imports (first component below the package)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("semcache."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("semcache.")
            )
    return found


@pytest.mark.parametrize("module", CORE)
def test_the_core_never_imports_the_facade_or_an_edge(module: str) -> None:
    assert not imported(module) & set(ABOVE), f"semcache/{module}.py imports above itself"


def test_the_facade_writes_through_the_writer() -> None:
    """SemanticCache holds no SQL of its own and no commit logic: the write path is one module."""
    source = (PACKAGE / "cache.py").read_text(encoding="utf-8")
    assert "writer" in imported("cache")
    for marker in ("INSERT INTO", "GroupCommit(", "insert_many(", ".insert("):
        assert marker not in source
