"""Tenant walls, error bodies and size limits of the sidecar, in process (httpx ASGITransport)
on the real model, with tokens for two tenants and an admin.

A cache on a fake clock makes expiry exact; the upstream is the fake app in process. The same
walls over real HTTP (a sidecar process) are in test_server_http.py and test_server_ops.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from semcache import FakeClock, SemanticCache
from semcache.server.app import create_app
from semcache.server.settings import MAX_TAG_CHARS, MAX_TAGS, Settings

from . import fake_upstream

ADMIN = "admin-token-0001"
ACME = "acme-token-0001"
ACME_EU = "acme-eu-token-01"  # the tenant "acme:eu": its name starts like acme's tags
USER = "user-token-00001"  # the tenant "user": its name is a CDC tag prefix
GLOBEX = "globex-token-001"
TOKENS = {ADMIN: None, ACME: "acme", ACME_EU: "acme:eu", USER: "user", GLOBEX: "globex"}


class Sidecar:
    """The app in process, a client per token, and the cache and clock behind it."""

    def __init__(self, app: Any, cache: SemanticCache, clock: FakeClock) -> None:
        self.app, self.cache, self.clock = app, cache, clock
        self.clients: dict[str, httpx.AsyncClient] = {}

    def as_(self, token: str | None) -> httpx.AsyncClient:
        key = token or ""
        if key not in self.clients:
            headers = {"authorization": f"Bearer {token}"} if token else {}
            self.clients[key] = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=self.app),
                base_url="http://sidecar",
                headers=headers,
            )
        return self.clients[key]

    async def store(self, token: str, prompt: str, **body: Any) -> str:
        r = await self.as_(token).post("/v1/cache/store", json={"prompt": prompt, "response": "r",
                                                                 **body})
        assert r.status_code == 201, r.text
        return str(r.json()["entry_id"])

    async def hit(self, token: str, prompt: str, namespace: str | None = None) -> bool:
        body: dict[str, Any] = {"prompt": prompt}
        if namespace is not None:
            body["scope"] = {"namespace": namespace}
        r = await self.as_(token).post("/v1/cache/lookup", json=body)
        assert r.status_code == 200, r.text
        return bool(r.json()["hit"])


@pytest.fixture
async def sidecar(tmp_path: Path, embedder: Any) -> AsyncIterator[Sidecar]:
    clock = FakeClock()
    cache = SemanticCache(tmp_path / "c", embedder=embedder, threshold=0.85, clock=clock)
    settings = Settings(
        upstream="http://fake/v1",
        tokens=TOKENS,
        max_prompt_chars=2000,
        max_body_bytes=64 * 1024,
        max_metadata_bytes=1024,
        max_scope_bytes=1024,
        max_response_chars=5000,
    )
    app = create_app(settings, cache, upstream_transport=httpx.ASGITransport(app=fake_upstream.app))
    side = Sidecar(app, cache, clock)
    async with app.router.lifespan_context(app):
        yield side
    for client in side.clients.values():
        await client.aclose()
    assert side.cache.verify() == []
    side.cache.close()


# -- tenant walls ----------------------------------------------------------------------------


async def test_expire_is_admin_only_and_removes_exactly_the_expired(sidecar: Sidecar) -> None:
    await sidecar.store(ACME, "Which port does the VPN use?", ttl=10)
    await sidecar.store(GLOBEX, "What is the office wifi password?", ttl=10)
    await sidecar.store(GLOBEX, "Who approves travel requests?", ttl=None)
    sidecar.clock.advance(60)
    for token in (ACME, GLOBEX):
        r = await sidecar.as_(token).post("/v1/cache/expire")
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "forbidden"
    assert sidecar.cache.stats()["entries"] == 3  # nothing was removed by the refused calls
    r = await sidecar.as_(ADMIN).post("/v1/cache/expire")
    assert r.status_code == 200 and r.json() == {"removed": 2}
    assert await sidecar.hit(GLOBEX, "Who approves travel requests?")


async def test_tags_are_confined_to_the_tenant_not_to_a_prefix(sidecar: Sidecar) -> None:
    """acme's tag "eu:x" and acme:eu's tag "x" were the same stored string under prefixes."""
    q = "What is the VAT rate for digital goods?"
    acme_id = await sidecar.store(ACME, q, tags=["eu:x"])
    eu_id = await sidecar.store(ACME_EU, q, tags=["x"])
    got = (await sidecar.as_(ACME).get(f"/v1/cache/entries/{acme_id}")).json()
    assert got["tags"] == ["eu:x"] and got["scope"]["namespace"] == "acme"

    r = await sidecar.as_(ACME_EU).post("/v1/cache/invalidate/tags", json={"tags": ["x"]})
    assert r.json() == {"removed": 1}
    assert not await sidecar.hit(ACME_EU, q)
    assert await sidecar.hit(ACME, q)  # acme's "eu:x" entry is untouched

    r = await sidecar.as_(ACME_EU).post("/v1/cache/invalidate/tags", json={"tags": ["eu:x"]})
    assert r.json() == {"removed": 0}
    r = await sidecar.as_(ACME).post("/v1/cache/invalidate/tags", json={"tags": ["x"]})
    assert r.json() == {"removed": 0}
    assert await sidecar.hit(ACME, q)
    r = await sidecar.as_(ACME).post("/v1/cache/invalidate/tags", json={"tags": ["eu:x"]})
    assert r.json() == {"removed": 1}
    assert not await sidecar.hit(ACME, q)
    assert (await sidecar.as_(ADMIN).get(f"/v1/cache/entries/{eu_id}")).status_code == 404


async def test_a_tenant_named_user_cannot_reach_the_user_tags_of_other_namespaces(
    sidecar: Sidecar,
) -> None:
    q = "Show me the order history of customer 42"
    for namespace in ("default", "acme", "globex"):
        await sidecar.store(ADMIN, q, tags=["user:42"], scope={"namespace": namespace})
    own = await sidecar.store(USER, q, tags=["user:42"])
    r = await sidecar.as_(USER).post(
        "/v1/cache/invalidate/tags", json={"tags": ["user:42", "42", "user"]}
    )
    assert r.json() == {"removed": 1}  # its own entry, nothing else
    assert (await sidecar.as_(USER).get(f"/v1/cache/entries/{own}")).status_code == 404
    for namespace in ("default", "acme", "globex"):
        assert await sidecar.hit(ADMIN, q, namespace)
    # an admin's (or CDC's) invalidation reaches every namespace
    r = await sidecar.as_(ADMIN).post("/v1/cache/invalidate/tags", json={"tags": ["user:42"]})
    assert r.json() == {"removed": 3}
    for namespace in ("default", "acme", "globex"):
        assert not await sidecar.hit(ADMIN, q, namespace)


async def test_entries_tagged_under_the_old_prefix_stay_invalidatable_by_their_tenant(
    sidecar: Sidecar,
) -> None:
    """Earlier sidecars stored a tenant's tag ``t`` as ``<tenant>:t``: the tenant's ``t`` still
    reaches those entries of its own namespace, and nothing in another namespace."""
    from semcache import Scope

    q = "Where do I download the quarterly report?"
    for namespace in ("acme", "globex"):  # as the old sidecar stored acme's tag "reports"
        sidecar.cache.store(q, "r", scope=Scope(namespace=namespace), tags=["acme:reports"])
    r = await sidecar.as_(ACME).post("/v1/cache/invalidate/tags", json={"tags": ["reports"]})
    assert r.json() == {"removed": 1}
    assert not await sidecar.hit(ACME, q)
    assert await sidecar.hit(ADMIN, q, "globex")


async def test_chat_tags_are_confined_too(sidecar: Sidecar) -> None:
    q = "What does the premium plan include?"
    body = {"model": "m", "messages": [{"role": "user", "content": q}],
            "semcache": {"tags": ["pricing"]}}
    for token in (ACME, GLOBEX):
        r = await sidecar.as_(token).post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["semcache"]["stored"] is True
    r = await sidecar.as_(GLOBEX).post("/v1/cache/invalidate/tags", json={"tags": ["pricing"]})
    assert r.json() == {"removed": 1}
    acme = await sidecar.as_(ACME).post("/v1/chat/completions", json=body)
    globex = await sidecar.as_(GLOBEX).post("/v1/chat/completions", json=body)
    assert acme.headers["x-semcache"] == "hit" and globex.headers["x-semcache"] == "miss"


async def _error(client: httpx.AsyncClient, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    r = await client.request(method, path, **kw)
    return r.status_code, r.json()


async def test_a_tenant_cannot_learn_that_another_tenant_exists(sidecar: Sidecar) -> None:
    """Every answer about a namespace or entry of another tenant is the same whether it exists
    or not."""
    acme_id = await sidecar.store(ACME, "Where is the Berlin office?", tags=["office"])
    await sidecar.as_(ACME).post("/v1/cache/bump", json={})
    g = sidecar.as_(GLOBEX)
    missing_id = acme_id[:-4] + ("0000" if not acme_id.endswith("0000") else "1111")
    assert await _error(g, "GET", f"/v1/cache/entries/{acme_id}") == (
        404,
        {"error": {"type": "not_found_error", "message": f"no entry {acme_id!r}",
                   "code": "not_found"}},
    )
    status, body = await _error(g, "GET", f"/v1/cache/entries/{missing_id}")
    assert status == 404 and body["error"]["message"] == f"no entry {missing_id!r}"
    for method, path, kw in [
        ("PATCH", "/v1/cache/entries/{}", {"json": {"response": "x"}}),
        ("DELETE", "/v1/cache/entries/{}", {}),
    ]:
        a = await _error(g, method, path.format(acme_id), **kw)
        b = await _error(g, method, path.format(missing_id), **kw)
        assert a[0] == b[0] and json.dumps(a[1]).replace(acme_id, "ID") == json.dumps(
            b[1]
        ).replace(missing_id, "ID")
    for probe in (
        lambda ns: g.get(f"/v1/cache/namespaces/{ns}/version"),
        lambda ns: g.post("/v1/cache/bump", json={"namespace": ns}),
        lambda ns: g.post("/v1/cache/lookup", json={"prompt": "p", "scope": {"namespace": ns}}),
        lambda ns: g.post("/v1/cache/store",
                          json={"prompt": "p", "response": "r", "scope": {"namespace": ns}}),
        lambda ns: g.post("/v1/chat/completions",
                          json={"model": "m", "messages": [{"role": "user", "content": "p"}],
                                "semcache": {"namespace": ns}}),
    ):
        a, b = await probe("acme"), await probe("acmf")
        assert a.status_code == b.status_code == 403
        assert a.json()["error"]["message"].replace("acme", "X") == b.json()["error"][
            "message"
        ].replace("acmf", "X")
    assert await sidecar.hit(ACME, "Where is the Berlin office?") is False  # bumped by acme
    # acme's entry is still stored (only unreachable): no globex call touched it
    assert (await sidecar.as_(ADMIN).get(f"/v1/cache/entries/{acme_id}")).status_code == 200


async def test_global_endpoints_are_admin_only(sidecar: Sidecar) -> None:
    for token in (ACME, USER):
        c = sidecar.as_(token)
        for method, path, kw in (
            ("GET", "/v1/cache/stats", {}),
            ("GET", "/metrics", {}),
            ("POST", "/v1/cache/expire", {}),
            ("POST", "/v1/cache/invalidate/similar", {"json": {"text": "x", "radius": 0.5}}),
        ):
            r = await c.request(method, path, **kw)
            assert r.status_code == 403, (token, path)
            assert set(r.json()["error"]) == {"type", "message", "code"}
    for path in ("/v1/cache/stats", "/metrics", "/openapi.json"):
        assert (await sidecar.as_(None).get(path)).status_code == 401
    assert (await sidecar.as_(ADMIN).get("/v1/cache/stats")).status_code == 200


# -- errors ----------------------------------------------------------------------------------


async def test_every_response_carries_a_request_id(sidecar: Sidecar) -> None:
    ids = set()
    for token, path in ((None, "/healthz"), (None, "/metrics"), (ADMIN, "/v1/cache/stats"),
                        (ACME, "/v1/cache/stats"), (ADMIN, "/nowhere")):
        r = await sidecar.as_(token).get(path)
        ids.add(r.headers["x-request-id"])
    assert len(ids) == 5
    r = await sidecar.as_(ADMIN).get("/healthz", headers={"x-request-id": "trace-abc.1"})
    assert r.headers["x-request-id"] == "trace-abc.1"  # a caller's own id is kept
    r = await sidecar.as_(ADMIN).get("/healthz", headers={"x-request-id": "bad id\twith junk"})
    assert r.headers["x-request-id"] != "bad id\twith junk"


async def test_a_5xx_carries_no_internals(
    sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing store (here: closed under the app) answers a fixed text with the request id;
    the exception's own text, with the data folder's path, goes only to the log."""
    await sidecar.store(ADMIN, "Anything stored before the failure")
    sidecar.cache.close()
    try:
        with caplog.at_level(logging.ERROR, logger="semcache.server"):
            r = await sidecar.as_(ADMIN).post("/v1/cache/store", json={"prompt": "p",
                                                                       "response": "r"})
            s = await sidecar.as_(ADMIN).get("/v1/cache/stats")
        for resp in (r, s):
            assert resp.status_code == 503
            err = resp.json()["error"]
            assert set(err) == {"type", "message", "code"} and err["code"] == "unavailable"
            rid = resp.headers["x-request-id"]
            assert rid in err["message"]
            assert str(sidecar.cache.path) not in resp.text and "closed" not in resp.text
            assert any(rid in rec.getMessage() for rec in caplog.records)
    finally:
        sidecar.cache = SemanticCache(sidecar.cache.path, embedder=sidecar.cache.embedder,
                                      clock=sidecar.clock)


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"role": "user"}], "user message needs content"),
        ([{"role": "user", "content": None}], "user message needs content"),
        ([{"role": "system", "content": "be brief"}, {"role": "user"}], "needs content"),
        ([{"role": "user", "content": 42}], "content"),
        ([{"role": "user", "content": [{"text": "hi"}]}], "string type"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "string text"),
        ([{"role": "assistant"}, {"role": "user", "content": "x"}], "tool_calls"),
        ([{"role": "tool", "content": "42"}], "tool_call_id"),
        ([{"role": "user", "content": "x", "name": 7}], "name"),
        ([], "messages"),
    ],
)
async def test_malformed_messages_are_refused_not_forwarded(
    sidecar: Sidecar, messages: list[dict[str, Any]], needle: str
) -> None:
    before = fake_upstream.STATE["total"]
    r = await sidecar.as_(ADMIN).post("/v1/chat/completions",
                                      json={"model": "m", "messages": messages})
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"]
    assert fake_upstream.STATE["total"] == before  # the upstream never saw it


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ('{"model":"m","messages":[{"role":"user","content":"hi\\ud800"}]}', "Unicode"),
        ('{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"x":'
         + "[" * 300 + "]" * 300 + "}}", "nested"),
        ('{"model":"m","messages":[{"role":"user","content":"a","x":' + "[" * 300 + "]" * 300
         + '},{"role":"user","content":"b"}]}', "nested"),
    ],
)  # fmt: skip
async def test_chat_input_that_cannot_be_forwarded_as_json_is_a_422(
    sidecar: Sidecar, raw: str, needle: str
) -> None:
    """A lone surrogate, or nesting deeper than the serialiser goes, was a 500."""
    before = fake_upstream.STATE["total"]
    r = await sidecar.as_(ADMIN).post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]["message"]
    assert fake_upstream.STATE["total"] == before


# -- bounded work ----------------------------------------------------------------------------


async def test_size_limits(sidecar: Sidecar) -> None:
    c = sidecar.as_(ADMIN)

    async def store(**body: Any) -> httpx.Response:
        return await c.post("/v1/cache/store", json={"prompt": "p", "response": "r", **body})

    # a body over SEMCACHE_MAX_BODY_BYTES made of metadata, not of a long prompt
    r = await store(metadata={"blob": "x" * (70 * 1024)})
    assert r.status_code == 413 and "SEMCACHE_MAX_BODY_BYTES" in r.json()["error"]["message"]
    # the same without a content-length (chunked): counted as it is read
    big = json.dumps({"prompt": "p", "response": "r", "metadata": {"b": "x" * (70 * 1024)}})

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192].encode()

    r = await c.post("/v1/cache/store", content=chunks(),
                     headers={"content-type": "application/json"})
    assert r.status_code == 413
    # under the body limit, over the metadata limit
    r = await store(metadata={"blob": "x" * 2000})
    assert r.status_code == 413 and "SEMCACHE_MAX_METADATA_BYTES" in r.text
    assert (await store(response="x" * 5001)).status_code == 413
    assert (await store(prompt="x" * 2001)).status_code == 413
    assert (await store(scope={"params": {"p": "x" * 2000}})).status_code == 413
    assert (await store(scope={"system": "x" * 2001})).status_code == 413
    assert (await store(tags=["t"] * (MAX_TAGS + 1))).status_code == 422
    assert (await store(tags=["x" * (MAX_TAG_CHARS + 1)])).status_code == 422
    assert (await store(tags=[""])).status_code == 422
    r = await c.post("/v1/cache/invalidate/tags", json={"tags": ["t"] * (MAX_TAGS + 1)})
    assert r.status_code == 422
    r = await c.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hello"}],
        "semcache": {"tags": ["x" * (MAX_TAG_CHARS + 1)]}})
    assert r.status_code == 422 and "semcache.tags" in r.text
    # chat params over SEMCACHE_MAX_SCOPE_BYTES (here tools): relayed, never cached
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "x" * 200}}
             for i in range(20)]  # fmt: skip
    for _ in range(2):
        r = await c.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hello"}], "tools": tools})
        assert r.status_code == 200 and r.headers["x-semcache"] == "bypass"
        assert "SEMCACHE_MAX_SCOPE_BYTES" in r.headers["x-semcache-reason"]
    # a prompt with a NUL (no store keeps it as text): relayed, never cached, not an error
    for _ in range(2):
        r = await c.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hi\u0000there"}]})
        assert r.status_code == 200 and r.headers["x-semcache"] == "bypass"
        assert "NUL" in r.headers["x-semcache-reason"]
    assert sidecar.cache.stats()["entries"] == 0  # nothing refused was stored
    ok = await store(metadata={"blob": "x" * 900}, tags=["t"] * MAX_TAGS)
    assert ok.status_code == 201


async def test_an_upstream_answer_over_the_response_limit_is_relayed_not_cached(
    tmp_path: Path, embedder: Any
) -> None:
    cache = SemanticCache(tmp_path / "c", embedder=embedder, threshold=0.85)
    settings = Settings(upstream="http://fake/v1", max_response_chars=40)
    app = create_app(settings, cache, upstream_transport=httpx.ASGITransport(app=fake_upstream.app))
    question = "Describe the moon in as much detail as you can"
    body = {"model": "m", "messages": [{"role": "user", "content": question}]}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c,
    ):
        for _ in range(2):
            r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.headers["x-semcache"] == "miss"
            assert len(r.json()["choices"][0]["message"]["content"]) > 40  # relayed whole
            assert r.json()["semcache"]["stored"] is False
            assert r.json()["semcache"]["reason"] == "answer over SEMCACHE_MAX_RESPONSE_CHARS"
    assert cache.stats()["entries"] == 0
    cache.close()
