"""Probes and shutdown: ``/readyz`` next to ``/healthz``, and SIGTERM draining the requests in
flight of a real sidecar process before it closes (and checkpoints) its cache."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from semcache import SemanticCache
from semcache.server.app import create_app
from semcache.server.settings import Settings

from .fake_upstream import start_sidecar, start_upstream, stop


async def test_readyz_checks_model_store_and_index(tmp_path: Path, embedder: Any) -> None:
    cache = SemanticCache(tmp_path / "c", embedder=embedder)
    cache.store("What is the capital of Norway?", "Oslo.")
    app = create_app(Settings(upstream=None, tokens={"admin-token-0001": None}), cache)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://s") as client,
    ):
        r = await client.get("/readyz")  # no token needed
        assert r.status_code == 200
        assert r.json() == {
            "status": "ready",
            "checks": {"model": True, "store": True, "index": True},
        }
        assert (await client.get("/healthz")).json() == {"status": "ok", "ready": True}
        cache.close()  # the store can no longer be read
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["store"] is False
        assert (await client.get("/healthz")).status_code == 200  # still alive
        assert "x-request-id" in r.headers


def test_sigterm_drains_requests_in_flight_and_checkpoints(tmp_path: Path, embedder: Any) -> None:
    up_proc, upstream = start_upstream()
    data = tmp_path / "data"
    try:
        proc, base = start_sidecar(
            data,
            upstream,
            {"SEMCACHE_LOG_LEVEL": "warning", "SEMCACHE_SHUTDOWN_GRACE": "15"},
        )
        root = base.removesuffix("/v1")
        try:
            assert httpx.get(f"{root}/readyz", timeout=10).status_code == 200
            out: dict[str, Any] = {}
            prompt = "Drain me: what is the tallest mountain in Africa? #delay=2"

            def slow() -> None:
                out["r"] = httpx.post(
                    f"{base}/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": prompt}]},
                    timeout=30,
                )

            thread = threading.Thread(target=slow)
            thread.start()
            stats_url = upstream.removesuffix("/v1") + "/_stats"
            deadline = time.monotonic() + 20
            while httpx.get(stats_url).json()["calls"].get(prompt, 0) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            t0, wall0 = time.monotonic(), time.time()
            os.kill(proc.pid, signal.SIGTERM)
            thread.join(30)
            code = proc.wait(timeout=30)
            took = time.monotonic() - t0
        finally:
            stop(proc)
    finally:
        stop(up_proc)
    r = out["r"]
    assert r.status_code == 200, r.text  # the request in flight was answered, not cut
    info = r.json()["semcache"]
    assert info["stored"] is True
    # uvicorn re-raises the signal once its graceful shutdown is over, so a clean exit after
    # SIGTERM reads -15; the answered request and the fresh checkpoint show it was graceful
    assert code in (0, -signal.SIGTERM) and took < 15
    manifests = list(data.rglob("manifest.json"))  # the index checkpoint, written at shutdown
    assert manifests and all(m.stat().st_mtime >= wall0 for m in manifests)
    with SemanticCache(data, embedder=embedder) as cache:
        assert cache.verify() == []
        entry = cache.get(info["entry_id"])
        assert entry.response == r.json()["choices"][0]["message"]["content"]
        assert cache.stats()["entries"] == 1
