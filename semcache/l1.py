"""The L1 tier: an in-process LRU of exact repeats (normalised prompt + shard).

It holds answers, so a repeat costs a dict lookup instead of an embedding. It is derived state:
the cache evicts an entry here whenever the change log says the entry was deleted or updated,
whichever process changed it, before any lookup can be served.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class L1Item:
    rowid: int
    uid: str
    prompt: str
    response: str
    expires_at: float | None
    metadata: dict[str, Any]


class L1Cache:
    """A bounded LRU keyed by exact key, with a reverse map so deletes by row id are O(1)."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[str, L1Item] = OrderedDict()
        self._key_of: dict[int, str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str, now: float) -> L1Item | None:
        """The live item under ``key``; an expired one is dropped and never returned."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item.expires_at is not None and item.expires_at <= now:
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return item

    def put(self, key: str, item: L1Item) -> None:
        if self.maxsize <= 0:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._key_of.pop(old.rowid, None)
            stale_key = self._key_of.pop(item.rowid, None)
            if stale_key is not None:
                self._items.pop(stale_key, None)
            self._items[key] = item
            self._key_of[item.rowid] = key
            while len(self._items) > self.maxsize:
                _, evicted = self._items.popitem(last=False)
                self._key_of.pop(evicted.rowid, None)

    def discard(self, rowid: int) -> None:
        """Forget the entry with this row id, if held."""
        with self._lock:
            key = self._key_of.pop(rowid, None)
            if key is not None:
                self._items.pop(key, None)

    def discard_many(self, rowids: Iterable[int]) -> None:
        """Forget the entries with these row ids, if held (one lock for all of them)."""
        with self._lock:
            if not self._key_of:
                return
            for rowid in rowids:
                key = self._key_of.pop(rowid, None)
                if key is not None:
                    self._items.pop(key, None)

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._key_of.pop(item.rowid, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._key_of.clear()
