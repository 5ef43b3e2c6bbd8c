"""Single-flight: concurrent misses for the same (or a near-identical) prompt make one call.

A leader registers its prompt and vector in the prompt's shard; a caller that misses while a
leader for the same normalised prompt, or for a prompt the hit policy would accept, is in flight
waits for that leader's answer instead of calling the LLM itself. Threads and asyncio tasks share
one registry (``concurrent.futures.Future`` works for both). A leader's failure is shared with its
followers, as Go's singleflight does: they asked the same question at the same moment.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .threshold import HitPolicy


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
