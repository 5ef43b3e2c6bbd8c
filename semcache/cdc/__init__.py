"""Change data capture: invalidate cache entries when PostgreSQL rows change.

``ChangeConsumer`` reads a logical replication slot (pgoutput plugin, through psycopg2's
replication protocol support) and applies declared :class:`Rule` s: tags, entry ids or
namespace bumps computed from the changed rows. See ``docs/cdc.md``.

    from semcache.cdc import ChangeConsumer, Rule

    rules = [Rule("users", tags=lambda row: [f"user:{row['id']}"])]
    consumer = ChangeConsumer("postgresql://app@db/app", cache, rules)
    consumer.setup()   # publication + slot, idempotent
    consumer.run()     # until stop() or SIGTERM

The names below load on first use, so importing ``semcache.cdc.cli`` (the ``semcache cdc``
command's declaration) does not pull psycopg2 into ``semcache --help``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .consumer import (
        ChangeConsumer,
        ConsumerStats,
        StreamInterruptedError,
        default_state_folder,
    )
    from .pgoutput import UNCHANGED, DecodeError
    from .position import Position, PositionStore
    from .rules import ALL_OPS, Invalidation, Row, Rule

_WHERE = {
    "ChangeConsumer": "consumer",
    "ConsumerStats": "consumer",
    "default_state_folder": "consumer",
    "StreamInterruptedError": "consumer",
    "UNCHANGED": "pgoutput",
    "DecodeError": "pgoutput",
    "Position": "position",
    "PositionStore": "position",
    "ALL_OPS": "rules",
    "Invalidation": "rules",
    "Row": "rules",
    "Rule": "rules",
}

__all__ = [
    "ALL_OPS",
    "UNCHANGED",
    "ChangeConsumer",
    "ConsumerStats",
    "DecodeError",
    "Invalidation",
    "Position",
    "PositionStore",
    "Row",
    "Rule",
    "StreamInterruptedError",
    "default_state_folder",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'semcache.cdc' has no attribute {name!r}")
    from ..extras import needs

    with needs("postgres", f"semcache.cdc.{name}"):
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
