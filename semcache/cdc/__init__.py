"""Change data capture: invalidate cache entries when PostgreSQL rows change.

``ChangeConsumer`` reads a logical replication slot (pgoutput plugin, through psycopg2's
replication protocol support) and applies declared :class:`Rule` s: tags, entry ids or
namespace bumps computed from the changed rows. See ``docs/cdc.md``.

    from semcache.cdc import ChangeConsumer, Rule

    rules = [Rule("users", tags=lambda row: [f"user:{row['id']}"])]
    consumer = ChangeConsumer("postgresql://app@db/app", cache, rules)
    consumer.setup()   # publication + slot, idempotent
    consumer.run()     # until stop() or SIGTERM
"""

from __future__ import annotations

from .consumer import ChangeConsumer, ConsumerStats, default_state_folder
from .pgoutput import UNCHANGED, DecodeError
from .position import Position, PositionStore
from .rules import ALL_OPS, Invalidation, Row, Rule

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
    "default_state_folder",
]
