"""Single-flight: concurrent misses for the same (or a near-identical) prompt make one call.

A leader registers its prompt and vector in the prompt's shard; a caller that misses while a
leader for the same normalised prompt, or for a prompt the hit policy would accept, is in flight
waits for that leader's answer instead of calling the LLM itself. Threads and asyncio tasks share
one registry (``concurrent.futures.Future`` works for both). A leader's failure is shared with its
followers, as Go's singleflight does: they asked the same question at the same moment. A
leader that is cancelled or interrupted (``asyncio.CancelledError``, ``KeyboardInterrupt``: a
``BaseException`` that is not an ``Exception``) did not fail: it hands over, and its followers
look again and elect a new leader among themselves.

A flight belongs to a shard, which includes the namespace's version: a caller that misses after
a bump never joins a flight that started before it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .threshold import HitPolicy


class _Handover:
    def __repr__(self) -> str:
        return "HANDOVER"


#: The result a follower receives when its leader went away without an answer: look again.
HANDOVER: object = _Handover()


@dataclass
class Flight:
    shard: str
    prompt: str
    vector: np.ndarray
    future: Future[str] = field(default_factory=Future)
    followers: int = 0


class SingleFlight:
    """The registry of in-flight computations, per shard."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, list[Flight]] = {}

    def join_or_lead(
        self, shard: str, prompt: str, vector: np.ndarray, policy: HitPolicy
    ) -> tuple[Flight, bool]:
        """Return (flight, is_leader): an existing flight this prompt may share, or a new one."""
        with self._lock:
            flights = self._flights.setdefault(shard, [])
            best: Flight | None = None
            best_sim = -2.0
            for flight in flights:
                if flight.prompt == prompt:
                    best, best_sim = flight, 1.0
                    break
                sim = float(flight.vector @ vector)
                if (
                    sim > best_sim
                    and sim >= policy.min_similarity
                    and policy.accept(prompt, flight.prompt, sim)
                ):
                    best, best_sim = flight, sim
            if best is not None:
                best.followers += 1
                return best, False
            flight = Flight(shard, prompt, vector)
            flights.append(flight)
            return flight, True

    @staticmethod
    def finish(flight: Flight, result: str | None, error: BaseException | None) -> None:
        """Resolve a flight: an answer, an error shared with the followers, or (a cancelled or
        interrupted leader) a handover."""
        if error is None:
            flight.future.set_result(result)  # type: ignore[arg-type]
        elif isinstance(error, Exception):
            flight.future.set_exception(error)
        else:
            flight.future.set_result(HANDOVER)  # type: ignore[arg-type]

    def land(self, flight: Flight) -> None:
        """Unregister a finished flight (after its future is resolved)."""
        with self._lock:
            flights = self._flights.get(flight.shard)
            if flights and flight in flights:
                flights.remove(flight)
                if not flights:
                    del self._flights[flight.shard]

    def __len__(self) -> int:
        with self._lock:
            return sum(len(f) for f in self._flights.values())
