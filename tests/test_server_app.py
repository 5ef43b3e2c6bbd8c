"""The sidecar in process (httpx ASGITransport): settings, the serve command, routing to the
fake upstream, and embedding batched across concurrent requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from semcache import SemanticCache
from semcache.batching import BatchingEmbedder
from semcache.server.app import create_app
from semcache.server.settings import Settings, parse_tokens

from . import fake_upstream
from .fakes import HashEmbedder


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMCACHE_DATA", "/tmp/x")
    monkeypatch.setenv("SEMCACHE_PORT", "9999")
    monkeypatch.setenv("SEMCACHE_UPSTREAM", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("SEMCACHE_UPSTREAM_API_KEY", "sk-secret")
    monkeypatch.setenv("SEMCACHE_TOKENS", '{"token-aaaa": "acme", "token-bbbb": null}')
    s = Settings()
    assert s.data == Path("/tmp/x") and s.port == 9999 and not s.data_is_url
    assert s.cache_kwargs() == {}  # a folder holds its own index and has no schema
    assert s.upstream == "http://127.0.0.1:1/v1"
    assert s.upstream_api_key is not None and "sk-secret" not in repr(s)
    assert s.tokens == {"token-aaaa": "acme", "token-bbbb": None} and s.auth_enabled
    assert parse_tokens("token-aaaa=acme, token-bbbb") == {"token-aaaa": "acme", "token-bbbb": None}
    with pytest.raises(ValueError):
        parse_tokens("short=acme")


def test_serve_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from semcache.cli import app as cli

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("SEMCACHE_PORT", "9001")
    monkeypatch.setenv("SEMCACHE_HOST", "127.0.0.1")
    result = CliRunner().invoke(cli, ["serve", "--port", "9002", "--upstream", "http://u/v1"])
    assert result.exit_code == 0, result.output
    assert seen["port"] == 9002 and seen["host"] == "127.0.0.1"
    assert seen["app"].state.semcache.settings.upstream == "http://u/v1"
    bad = CliRunner().invoke(cli, ["serve", "--port", "70000"])
    assert bad.exit_code == 2


PG_URL = "postgresql://root@127.0.0.1:5432/test"


def test_data_is_a_folder_or_a_postgres_url_kept_as_a_string(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = "postgresql://app:s3cret-pw@db.internal:5432/llm?sslmode=require"
    monkeypatch.setenv("SEMCACHE_DATA", url)
    monkeypatch.setenv("SEMCACHE_INDEX_DIR", str(tmp_path / "idx"))
    monkeypatch.setenv("SEMCACHE_SCHEMA", "cache_b")
    s = Settings()
    assert s.data == url and isinstance(s.data, str) and s.data_is_url  # not Path()-folded
    assert s.index_dir == tmp_path / "idx" and s.schema == "cache_b"
    assert s.cache_kwargs() == {
        "index_dir": tmp_path / "idx",
        "schema": "cache_b",
        "consistency": "bounded",
    }
    assert "s3cret-pw" not in repr(s) and "s3cret-pw" not in s.data_shown
    assert s.data_shown == "postgresql://app@db.internal:5432/llm?sslmode=require"
    monkeypatch.delenv("SEMCACHE_INDEX_DIR")
    monkeypatch.delenv("SEMCACHE_SCHEMA")
    s = Settings(data="postgres://h/db")
    assert s.data == "postgres://h/db"
    assert s.cache_kwargs() == {"schema": "semcache", "consistency": "bounded"}
    monkeypatch.setenv("SEMCACHE_CONSISTENCY", "strong")
    assert Settings(data="postgres://h/db").cache_kwargs()["consistency"] == "strong"
    monkeypatch.setenv("SEMCACHE_CONSISTENCY", "eventual")
    with pytest.raises(ValueError, match="consistency"):
        Settings(data="postgres://h/db")
    monkeypatch.delenv("SEMCACHE_CONSISTENCY")
    assert Settings(data=Path("postgresql://h/db")).data_is_url is False  # a Path is a folder
    for bad in ("mysql://h/db", "s3://bucket/cache"):
        with pytest.raises(ValueError, match="folder or a postgresql:// URL"):
            Settings(data=bad)
    with pytest.raises(ValueError):
        Settings(schema="")


async def test_the_startup_log_shows_a_data_url_without_its_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = SemanticCache(tmp_path / "c", embedder=HashEmbedder(), threshold=0.9)
    settings = Settings(data="postgresql://app:pw-in-log@db:5432/llm", upstream=None)
    app = create_app(settings, cache)
    with caplog.at_level("INFO", logger="semcache.server"):
        async with app.router.lifespan_context(app):
            pass
    cache.close()
    assert "data=postgresql://app@db:5432/llm" in caplog.text
    assert "pw-in-log" not in caplog.text


def test_serve_data_flag_takes_a_url_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from semcache.cli import app as cli

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    url = "postgresql://app:pw-in-url@127.0.0.1:5432/test"
    args = ["serve", "--data", url, "--index-dir", "/tmp/idx", "--schema", "tenant_a"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    settings = seen["app"].state.semcache.settings
    assert settings.data == url and settings.schema == "tenant_a"
    assert settings.index_dir == Path("/tmp/idx")
    bad = CliRunner().invoke(cli, ["serve", "--data", "mysql://u:pw-in-url@h/db"])
    assert bad.exit_code == 2 and "postgresql://" in bad.output
    assert "pw-in-url" not in bad.output  # the error names the problem, not the value


@pytest.mark.postgres
def test_a_sidecar_on_a_postgres_url_opens_the_shared_store(tmp_path: Path) -> None:
    import uuid

    import psycopg

    from semcache.server import ui
    from semcache.server.app import _close_all, _open_cache
    from semcache.server.metrics import Metrics

    schema = f"semcache_test_{uuid.uuid4().hex[:16]}"
    settings = Settings(
        data=PG_URL.replace("root@", "root:pw-not-shown@"),
        index_dir=tmp_path / "idx",
        schema=schema,
        consistency="strong",
        threshold=0.85,
        embed_process=False,
        batching=False,
    )
    try:
        cache, _, closers = _open_cache(settings)
        try:
            assert cache.shared and cache.path == tmp_path / "idx"
            assert cache.consistency == "strong"  # SEMCACHE_CONSISTENCY reaches the cache
            assert schema in cache.location and "pw-not-shown" not in cache.location
            cache.store("what is the capital of France?", "Paris")
            hit = cache.lookup("what is the capital of France?")
            assert hit is not None and hit.response == "Paris"
            with psycopg.connect(PG_URL) as conn:
                rows = conn.execute(f"SELECT count(*) FROM {schema}.entries").fetchone()  # type: ignore[arg-type]
            assert rows is not None and rows[0] == 1  # in the URL's store, in that schema
            shown = SimpleNamespace(cache=cache, metrics=Metrics())
            page = ui.render(shown, cache.stats(), cache.position(), [])
            assert schema in page and "pw-not-shown" not in page
        finally:
            cache.close()
            _close_all(closers)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")  # type: ignore[arg-type]


@pytest.fixture
async def asgi(tmp_path: Path, embedder: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app on a cache with a batching real embedder, upstream = the fake app in process."""
    batcher = BatchingEmbedder(embedder)
    cache = SemanticCache(tmp_path / "c", embedder=batcher, threshold=0.85)
    settings = Settings(upstream="http://fake/v1", tokens={})
    app = create_app(settings, cache, upstream_transport=httpx.ASGITransport(app=fake_upstream.app))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            yield client, app
    cache.close()
    batcher.close()


def chat(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **kw}


async def test_in_process_miss_hit_stream_and_bypass(asgi: tuple[httpx.AsyncClient, Any]) -> None:
    client, _app = asgi
    r = await client.post("/v1/chat/completions", json=chat("How do I bake sourdough bread?"))
    assert r.status_code == 200 and r.headers["x-semcache"] == "miss"
    assert r.json()["semcache"]["stored"] is True
    r = await client.post(
        "/v1/chat/completions", json=chat("how to bake sourdough bread", stream=True)
    )
    assert r.headers["x-semcache"] == "hit" and r.headers["content-type"].startswith(
        "text/event-stream"
    )
    assert r.text.rstrip().endswith("data: [DONE]")
    r = await client.post("/v1/chat/completions", json=chat("How do I bake sourdough bread?", n=3))
    assert r.headers["x-semcache"] == "bypass" and "n > 1" in r.headers["x-semcache-reason"]
    r = await client.post(
        "/v1/chat/completions",
        json=chat("How do I bake sourdough bread?", semcache={"refresh": True, "ttl": 30}),
    )
    assert r.headers["x-semcache"] == "miss"
    assert "semcache" not in fake_upstream.STATE["last_body"]
    r = await client.get("/healthz")
    assert r.json() == {"status": "ok", "ready": True}


async def test_no_upstream_and_disconnected_upstream(tmp_path: Path) -> None:
    cache = SemanticCache(tmp_path / "c", embedder=HashEmbedder())
    for upstream, status in (
        (None, 502),
        (f"http://127.0.0.1:{fake_upstream.free_port()}/v1", 502),
    ):
        app = create_app(Settings(upstream=upstream), cache)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c,
        ):
            r = await c.post("/v1/chat/completions", json=chat("anything at all"))
            assert r.status_code == status and r.json()["error"]["type"] == "upstream_error"
    assert cache.stats()["entries"] == 0
    cache.close()


async def test_concurrent_requests_share_embedding_batches(
    asgi: tuple[httpx.AsyncClient, Any],
) -> None:
    client, app = asgi
    batcher = app.state.semcache.batcher
    before = (batcher.stats.batches, batcher.stats.texts)
    prompts = [f"Question {i}: what is the capital of country number {i}?" for i in range(24)]
    responses = await asyncio.gather(
        *[client.post("/v1/cache/lookup", json={"prompt": p}) for p in prompts]
    )
    assert all(r.status_code == 200 and r.json()["hit"] is False for r in responses)
    batches = batcher.stats.batches - before[0]
    texts = batcher.stats.texts - before[1]
    assert texts == 24
    assert batches < 24  # several prompts per model call


async def test_identical_concurrent_misses_make_one_upstream_call(
    asgi: tuple[httpx.AsyncClient, Any],
) -> None:
    import asyncio

    client, _app = asgi
    fake_upstream.STATE.update(total=0)
    question = "What is the boiling point of water at sea level? #delay=0.5"
    responses = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=chat(question)) for _ in range(6))
    )
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.headers["x-semcache"] for r in responses) == ["hit"] * 5 + ["miss"]
    assert fake_upstream.STATE["total"] == 1
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1


def test_semcache_target_error_runs_the_error_budget_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semcache.errorbudget import ErrorBudget
    from semcache.server.app import _close_all, _open_cache

    monkeypatch.setenv("SEMCACHE_TARGET_ERROR", "0.02")
    settings = Settings(data=tmp_path / "data", embed_process=False, batching=False)
    assert settings.target_error == 0.02
    cache, _, closers = _open_cache(settings)
    try:
        assert isinstance(cache.policy, ErrorBudget) and cache.policy.target_error == 0.02
        assert cache.stats()["policy_state"]["default"]["target"] == 0.02
    finally:
        cache.close()
        _close_all(closers)
    with pytest.raises(ValueError):
        Settings(target_error=1.5)


def test_library_errors_map_to_http_statuses() -> None:
    """An entry too large for the cache's max_bytes is a 413 like an oversize request; other
    refused input is a 422."""
    from semcache import EntryNotFoundError, EntryTooLargeError, InvalidInputError
    from semcache.server.errors import status_of

    assert status_of(EntryTooLargeError("the entry takes 9 bytes")) == (413, "too_large")
    assert status_of(InvalidInputError("bad"))[0] == 422
    assert status_of(EntryNotFoundError("no entry"))[0] == 404
