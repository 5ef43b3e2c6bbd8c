"""The sidecar's HTTP clients to the upstream: several small connection pools, taken in turn.

httpx keeps one pool per client, and httpcore, each time it gives a request a connection (at
every request's start and at every response's end), checks every connection of the pool
against every request waiting for one (``has_expired``: a ``poll()`` of each socket). With one
pool of up to 256 connections that scan was the largest single cost of the sidecar's event loop
under 32 concurrent clients (more than a tenth of it, beside another quarter in the exchange
itself). ``shards`` pools of ``connections / shards`` each, given out round-robin, hold the
same number of connections with a scan ``shards`` times shorter.
"""

from __future__ import annotations

import itertools

import httpx


class UpstreamClients:
    """``shards`` :class:`httpx.AsyncClient` to one base URL, handed out in turn by
    :meth:`client`. With a ``transport`` (tests: an in-process app) there is one client, since
    a transport given to httpx brings its own pool."""

    def __init__(
        self,
        base_url: str,
        timeout: httpx.Timeout,
        *,
        connections: int = 256,
        keepalive: int = 64,
        shards: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        count = 1 if transport is not None else max(1, min(shards, connections))
        limits = httpx.Limits(
            max_connections=max(1, connections // count),
            max_keepalive_connections=max(1, keepalive // count),
        )
        self.clients = [
            httpx.AsyncClient(
                base_url=base_url, timeout=timeout, limits=limits, transport=transport
            )
            for _ in range(count)
        ]
        self._turn = itertools.cycle(self.clients)

    def client(self) -> httpx.AsyncClient:
        """The next client (round-robin: the event loop is one thread, so no lock)."""
        return next(self._turn)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
