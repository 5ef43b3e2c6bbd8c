"""Size bounds: ``max_entries`` and ``max_bytes``, enforced on every write by evicting.

The policy is data (:data:`~semcache.store.EVICTION_POLICIES`: the ORDER BY that picks the first
entries to go, each backed by an index). The entry whose write caused the eviction is never its
victim, so a write always leaves the entry it returned in the store, and an update that makes an
entry larger evicts others, never the entry it updated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import EntryTooLargeError, InvalidInputError
from .store import EVICTION_POLICIES, Store


class Evictor:
    """Keeps a store within ``max_entries`` and ``max_bytes`` (None: unbounded)."""

    def __init__(
        self, store: Store, policy: str, max_entries: int | None, max_bytes: int | None
    ) -> None:
        self.check(policy, max_entries, max_bytes)
        self.store = store
        self.policy = policy
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    @staticmethod
    def check(policy: object, max_entries: object, max_bytes: object) -> None:
        """InvalidInputError unless these are settings an Evictor takes (checked by the cache
        before it opens anything)."""
        if not isinstance(policy, str) or policy not in EVICTION_POLICIES:
            raise InvalidInputError(
                f"unknown eviction policy {policy!r}; choose from {sorted(EVICTION_POLICIES)}"
            )
        for name, value in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise InvalidInputError(f"{name} must be a positive int or None")

    @property
    def bounded(self) -> bool:
        return self.max_entries is not None or self.max_bytes is not None

    def check_size(self, size: int) -> None:
        """Refuse, before anything is written, an entry that alone exceeds ``max_bytes``."""
        if self.max_bytes is not None and size > self.max_bytes:
            raise EntryTooLargeError(
                f"the entry takes {size} bytes, more than max_bytes={self.max_bytes}"
            )

    def check_batch(self, entries: int, size: int) -> None:
        """Refuse, before anything is written, a bulk write that alone exceeds the bounds: it
        never evicts its own entries, so it could not end within them."""
        if self.max_entries is not None and entries > self.max_entries:
            raise InvalidInputError(
                f"the write holds {entries} distinct entries, more than "
                f"max_entries={self.max_entries}; store them in smaller calls"
            )
        if self.max_bytes is not None and size > self.max_bytes:
            raise InvalidInputError(
                f"the write's entries take {size} bytes, more than max_bytes={self.max_bytes}"
            )

    def enforce(
        self,
        keep_from: int | None,
        flush: Callable[[], None],
        *,
        spare: Sequence[tuple[int, int]] = (),
    ) -> int:
        """Evict until within bounds, never a row with id ``keep_from`` or later (the write or
        batch that caused it), nor one in the id ranges ``spare`` (an update that grew its
        entry, the earlier batches of a bulk write); returns how many went.

        ``flush`` writes buffered hits first, so LRU and LFU order include them.
        """
        if not self.bounded:
            return 0
        evicted = 0
        entries, size = self.store.counters()
        for _ in range(1000):  # bounded: each round removes at least one entry
            over = 0
            if self.max_entries is not None and entries > self.max_entries:
                over = entries - self.max_entries
            if self.max_bytes is not None and size > self.max_bytes:
                over = max(over, 1)
            if not over:
                break
            flush()
            n = self.store.evict(self.policy, min(over, 1000), keep_from, spare)
            evicted += n
            if n == 0:
                break
            entries, size = self.store.counters()
        return evicted
