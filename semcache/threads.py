"""Choosing torch's thread count for bulk embedding by measuring it, batch by batch.

A small model embedding short prompts gains little from several intra-op threads, and on a busy
host it loses much: each operator waits at a barrier for every thread, and one descheduled thread
stalls them all. Measured on this project's shared 2-core machine with the packaged MiniLM in
bf16 (other processes busy): one thread embedded 121-205 prompts/s, two threads 29-118/s; on an
idle machine two threads are the faster. Neither setting is right everywhere, so a bulk job
(``semcache import``) tries each candidate on a few of its own batches, keeps the faster, and
tries again now and then because the load on a host changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .errors import InvalidInputError


class ThreadTuner:
    """Picks, for each batch, how many threads to embed it with, from measured rates.

    Each period of ``recheck_every`` batches starts by trying every candidate ``trials`` times
    in turn; the rest of the period uses the candidate with the highest rate (units per second)
    over its last ``trials`` batches. The very first batch is not measured (it pays one-off
    costs: thread pools, allocator warm-up). One candidate: always that one.
    """

    def __init__(
        self, candidates: Sequence[int], *, trials: int = 2, recheck_every: int = 40
    ) -> None:
        unique = sorted({int(c) for c in candidates})
        if not unique or unique[0] < 1:
            raise InvalidInputError(f"thread candidates must be positive ints, not {candidates}")
        if trials < 1 or recheck_every < trials * len(unique) + 1:
            raise InvalidInputError("recheck_every must leave room for the trials")
        self.candidates = unique
        self.trials = trials
        self.recheck_every = recheck_every
        self.batches = 0
        self._rates: dict[int, deque[float]] = {c: deque(maxlen=trials) for c in unique}

    def next(self) -> int:
        """The thread count for the next batch."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        step = self.batches % self.recheck_every
        if step < self.trials * len(self.candidates):
            return self.candidates[step % len(self.candidates)]
        return self.best()

    def record(self, threads: int, units: int, seconds: float) -> None:
        """Report a batch of ``units`` embedded with ``threads`` in ``seconds``."""
        if self.batches > 0 and seconds > 0 and units > 0:
            self._rates[threads].append(units / seconds)
        self.batches += 1

    def rate(self, threads: int) -> float | None:
        """Mean measured rate of ``threads`` over its recent batches; None before any."""
        rates = self._rates[threads]
        return sum(rates) / len(rates) if rates else None

    def best(self) -> int:
        """The candidate with the highest measured rate (the most threads while unmeasured)."""
        measured = [(r, c) for c in self.candidates if (r := self.rate(c)) is not None]
        if not measured:
            return self.candidates[-1]
        return max(measured)[1]
