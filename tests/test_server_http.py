"""The sidecar as a process over real HTTP: the official openai client with base_url pointed at it,
a fake upstream process behind it, auth and tenants, bad input, upstream failures.

One sidecar and one upstream serve the whole module (the model loads once per process).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .fake_upstream import start_sidecar, start_upstream, stop

ADMIN = "admin-token-0001"
ACME = "acme-token-0001"
GLOBEX = "globex-token-0001"
MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    up_proc, upstream = start_upstream()
    data: Path = tmp_path_factory.mktemp("sidecar") / "data"
    env = {
        "SEMCACHE_TOKENS": f"{ADMIN},{ACME}=acme,{GLOBEX}=globex",
        "SEMCACHE_UPSTREAM_TIMEOUT": "2",
        "SEMCACHE_UPSTREAM_DEADLINE": "3",
        "SEMCACHE_MAX_PROMPT_CHARS": "2000",
        "SEMCACHE_UPSTREAM_API_KEY": "sk-upstream-key",
        "SEMCACHE_LOG_LEVEL": "warning",
        "SEMCACHE_THRESHOLD": "0.85",  # the sidecar's mechanics are tested, not the policy
    }
    try:
        side_proc, sidecar = start_sidecar(data, upstream, env)
    except BaseException:
        stop(up_proc)
        raise
    try:
        yield sidecar, upstream
    finally:
        stop(side_proc)
        stop(up_proc)


@pytest.fixture(scope="module")
def sidecar(servers: tuple[str, str]) -> str:
    return servers[0]


@pytest.fixture(scope="module")
def upstream(servers: tuple[str, str]) -> str:
    return servers[1]


def client(sidecar: str, token: str = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=sidecar, api_key=token, max_retries=0, timeout=30)


def http(sidecar: str, token: str | None = ADMIN) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=sidecar.removesuffix("/v1"), headers=headers, timeout=30)


def calls(upstream: str, prompt: str) -> int:
    got = httpx.get(upstream.removesuffix("/v1") + "/_stats", timeout=5).json()
    return int(got["calls"].get(prompt, 0))


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


def test_miss_then_hit_on_a_paraphrase(sidecar: str, upstream: str) -> None:
    c = client(sidecar)
    q = "How do I cancel my subscription?"
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs(q))
    assert raw.headers["x-semcache"] == "miss"
    first = raw.parse()
    assert not first.id.startswith("semcache-")
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=msgs("how can I cancel my subscription")
    )
    assert raw.headers["x-semcache"] == "hit"
    assert raw.headers["x-semcache-tier"] == "semantic"
    assert float(raw.headers["x-semcache-similarity"]) >= 0.85
    second = raw.parse()
    assert second.id.startswith("semcache-")
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.semcache["hit"] is True  # type: ignore[attr-defined]
    assert calls(upstream, q) == 1
    assert calls(upstream, "how can I cancel my subscription") == 0
    # the upstream got the configured key, not the caller's token
    stats = httpx.get(upstream.removesuffix("/v1") + "/_stats").json()
    assert stats["auth"][-1] == "Bearer sk-upstream-key"


def test_streaming_miss_and_hit(sidecar: str, upstream: str) -> None:
    c = client(sidecar)
    q = "Why is the sky blue during the day?"
    live = c.chat.completions.create(model=MODEL, messages=msgs(q), stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in live if ch.choices)
    assert text.startswith("Answer #")
    replay = c.chat.completions.create(model=MODEL, messages=msgs(q), stream=True)
    chunks = list(replay)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[0].id.startswith("semcache-")
    plain = c.chat.completions.create(
        model=MODEL, messages=msgs("why is the sky blue during the daytime")
    )
    assert plain.id.startswith("semcache-") and plain.choices[0].message.content == text
    assert calls(upstream, q) == 1


def test_different_model_or_temperature_misses(sidecar: str, upstream: str) -> None:
    c = client(sidecar)
    q = "What is the largest ocean on Earth?"
    c.chat.completions.create(model=MODEL, messages=msgs(q), temperature=0)
    assert not c.chat.completions.create(
        model="gpt-4o", messages=msgs(q), temperature=0
    ).id.startswith("semcache-")
    assert not c.chat.completions.create(
        model=MODEL, messages=msgs(q), temperature=0.5
    ).id.startswith("semcache-")
    assert c.chat.completions.create(model=MODEL, messages=msgs(q), temperature=0).id.startswith(
        "semcache-"
    )
    assert calls(upstream, q) == 3


def test_auth(sidecar: str) -> None:
    with http(sidecar, None) as h:
        assert h.get("/healthz").status_code == 200
        for path in ("/metrics", "/docs", "/v1/cache/stats"):
            r = h.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        client(sidecar, "wrong-token-123").chat.completions.create(model=MODEL, messages=msgs("hi"))
    with http(sidecar, ACME) as h:
        assert h.get("/v1/cache/stats").status_code == 403  # global: admin only
        assert h.get("/metrics").status_code == 403
    with http(sidecar) as h:
        assert h.get("/docs").status_code == 200
        assert "/v1/chat/completions" in h.get("/openapi.json").json()["paths"]


def test_tenant_isolation(sidecar: str, upstream: str) -> None:
    q = "What is our refund policy for annual plans?"
    acme, globex = client(sidecar, ACME), client(sidecar, GLOBEX)
    a = acme.chat.completions.create(
        model=MODEL, messages=msgs(q), extra_body={"semcache": {"tags": ["policy"]}}
    )
    entry_id = a.semcache["entry_id"]  # type: ignore[attr-defined]
    assert acme.chat.completions.create(model=MODEL, messages=msgs(q)).id.startswith("semcache-")
    g = globex.chat.completions.create(model=MODEL, messages=msgs(q))
    assert not g.id.startswith("semcache-")  # globex never sees acme's answer
    assert calls(upstream, q) == 2
    with pytest.raises(openai.PermissionDeniedError):
        globex.chat.completions.create(
            model=MODEL, messages=msgs(q), extra_body={"semcache": {"namespace": "acme"}}
        )
    with http(sidecar, GLOBEX) as h:
        assert h.get(f"/v1/cache/entries/{entry_id}").status_code == 404
        assert h.delete(f"/v1/cache/entries/{entry_id}").json() == {"deleted": False}
        assert h.post("/v1/cache/invalidate/tags", json={"tags": ["policy"]}).json() == {
            "removed": 0
        }
        r = h.post("/v1/cache/lookup", json={"prompt": q, "scope": {"namespace": "acme"}})
        assert r.status_code == 403
        assert h.post("/v1/cache/bump", json={"namespace": "acme"}).status_code == 403
        assert (
            h.post("/v1/cache/invalidate/similar", json={"text": q, "radius": 0.5}).status_code
            == 403
        )
    with http(sidecar, ACME) as h:
        entry = h.get(f"/v1/cache/entries/{entry_id}").json()
        assert entry["tags"] == ["policy"] and entry["scope"]["namespace"] == "acme"
        assert h.post("/v1/cache/invalidate/tags", json={"tags": ["policy"]}).json() == {
            "removed": 1
        }
    assert (
        acme.chat.completions.create(model=MODEL, messages=msgs(q)).id.startswith("semcache-")
        is False
    )


@pytest.mark.parametrize(
    ("content", "kwargs", "status", "needle"),
    [
        (b"{not json", {"headers": {"content-type": "application/json"}}, 400, "JSON"),
        (None, {"json": {"model": MODEL, "messages": "hello"}}, 422, "messages"),
        (
            None,
            {"json": {"model": 5, "messages": [{"role": "user", "content": "x"}]}},
            422,
            "model",
        ),
        (
            None,
            {"json": {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}},
            422,
            "role",
        ),
        (
            None,
            {
                "json": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "x"}],
                    "temperature": "hot",
                }
            },
            422,
            "temperature",
        ),
        (
            None,
            {
                "json": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "x"}],
                    "frobnicate": 1,
                }
            },
            422,
            "frobnicate",
        ),
        (
            None,
            {
                "json": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "x"}],
                    "semcache": {"ttl": "soon"},
                }
            },
            422,
            "ttl",
        ),
        (
            None,
            {"json": {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}},
            413,
            "2000",
        ),
        (None, {"json": []}, 422, ""),
    ],
)
def test_bad_input_is_a_4xx_with_a_reason(
    sidecar: str, content: bytes | None, kwargs: dict[str, Any], status: int, needle: str
) -> None:
    with http(sidecar) as h:
        r = h.post("/v1/chat/completions", content=content, **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_bad_input_on_the_cache_api(sidecar: str) -> None:
    with http(sidecar) as h:
        assert (
            h.post("/v1/cache/store", json={"prompt": "p", "response": "r", "x": 1}).status_code
            == 422
        )
        assert h.post("/v1/cache/store", json={"prompt": "", "response": "r"}).status_code == 422
        assert h.post("/v1/cache/lookup", json={"prompt": "p", "threshold": 3}).status_code == 422
        assert h.post("/v1/cache/lookup", json={"prompt": "p" * 3000}).status_code == 413
        assert h.post("/v1/cache/invalidate/similar", json={"radius": 0.9}).status_code == 422
        assert h.patch("/v1/cache/entries/nope", json={"response": "x"}).status_code == 404
        assert h.patch("/v1/cache/entries/nope", json={}).status_code == 422
        assert h.get("/v1/cache/entries/nope").status_code == 404
        big = b'{"prompt": "' + b"x" * (5 * 1024 * 1024) + b'", "response": "r"}'
        r = h.post("/v1/cache/store", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_upstream_failures_become_502_504_and_are_not_cached(sidecar: str, upstream: str) -> None:
    c = client(sidecar)
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model=MODEL, messages=msgs("Compute the answer #fail500"))
        assert err.value.status_code == 502
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model=MODEL, messages=msgs("Compute the answer #garbage"))
        assert err.value.status_code == 502
        with pytest.raises(openai.BadRequestError):  # an upstream 4xx is the caller's: relayed
            c.chat.completions.create(model=MODEL, messages=msgs("Compute the answer #fail400"))
    assert calls(upstream, "Compute the answer #fail500") == 2
    assert calls(upstream, "Compute the answer #garbage") == 2
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model=MODEL, messages=msgs("Slow answer please #delay=4"))
    assert err.value.status_code == 504
    with pytest.raises(openai.APIStatusError) as err:
        list(
            c.chat.completions.create(
                model=MODEL, messages=msgs("Slow stream please #delay=4"), stream=True
            )
        )
    assert err.value.status_code == 504


def test_truncated_and_aborted_answers_are_not_cached(sidecar: str, upstream: str) -> None:
    c = client(sidecar)
    truncated, aborted = "Write an essay on bridges #truncate", "Write a poem on rivers #abort"
    for _ in range(2):
        r = c.chat.completions.create(model=MODEL, messages=msgs(truncated))
        assert r.choices[0].finish_reason == "length"
        with pytest.raises(openai.APIError):
            list(c.chat.completions.create(model=MODEL, messages=msgs(aborted), stream=True))
    assert calls(upstream, truncated) == 2 and calls(upstream, aborted) == 2


def test_cache_api_round_trip(sidecar: str) -> None:
    scope = {"namespace": "api-test", "model": "m"}
    with http(sidecar) as h:
        r = h.post(
            "/v1/cache/store",
            json={
                "prompt": "What is the speed of light?",
                "response": "About 300,000 km/s.",
                "scope": scope,
                "tags": ["physics"],
                "ttl": 3600,
                "metadata": {"source": "test"},
            },
        )
        assert r.status_code == 201
        entry_id = r.json()["entry_id"]
        hit = h.post(
            "/v1/cache/lookup",
            json={"prompt": "how fast is light", "scope": scope, "threshold": 0.6},
        ).json()
        assert hit["hit"] and hit["entry_id"] == entry_id and hit["response"].startswith("About")
        miss = h.post("/v1/cache/lookup", json={"prompt": "What is the speed of light?"}).json()
        assert miss == {
            "hit": False,
            "response": None,
            "similarity": None,
            "entry_id": None,
            "tier": None,
            "prompt": None,
            "metadata": None,
        }
        got = h.patch(f"/v1/cache/entries/{entry_id}", json={"response": "299,792 km/s."}).json()
        assert got["response"] == "299,792 km/s." and got["tags"] == ["physics"]
        assert h.post("/v1/cache/invalidate/tags", json={"tags": ["physics"]}).json() == {
            "removed": 1
        }
        ids = [
            h.post("/v1/cache/store", json={"prompt": p, "response": "r", "scope": scope}).json()[
                "entry_id"
            ]
            for p in ("How do magnets work?", "Explain how magnets work")
        ]
        removed = h.post(
            "/v1/cache/invalidate/similar",
            json={"text": "how do magnets work", "radius": 0.8, "scope": scope},
        ).json()
        assert sorted(removed["removed"]) == sorted(ids)
        h.post(
            "/v1/cache/store", json={"prompt": "Define entropy", "response": "r", "scope": scope}
        )
        assert h.post("/v1/cache/bump", json={"namespace": "api-test"}).json() == {
            "namespace": "api-test",
            "version": 1,
        }
        assert h.get("/v1/cache/namespaces/api-test/version").json()["version"] == 1
        assert not h.post(
            "/v1/cache/lookup", json={"prompt": "Define entropy", "scope": scope}
        ).json()["hit"]
        eid = h.post(
            "/v1/cache/store", json={"prompt": "Gone soon", "response": "r", "ttl": 0.5}
        ).json()["entry_id"]
        assert h.get(f"/v1/cache/entries/{eid}").status_code == 200
        time.sleep(0.6)  # no write in between: only expire() can remove it (exact counts under
        # a fake clock: test_server_security.py)
        before = h.get("/v1/cache/stats").json()["invalidations"]["ttl"]
        removed = h.post("/v1/cache/expire").json()["removed"]
        assert removed >= 1
        assert h.get("/v1/cache/stats").json()["invalidations"]["ttl"] == before + removed
        assert not h.post("/v1/cache/lookup", json={"prompt": "Gone soon"}).json()["hit"]
        assert h.delete(f"/v1/cache/entries/{eid}").json() == {"deleted": False}
        stats = h.get("/v1/cache/stats").json()
        assert stats["entries"] >= 1 and "embedding_batches" in stats


def _samples(sidecar: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with http(sidecar) as h:
        text = h.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_what_happened(sidecar: str) -> None:
    """A miss then an exact repeat move each counter by exactly what they did."""
    c = client(sidecar)
    q = "Metrics: how many moons does Mars have?"
    before = _samples(sidecar)
    first = c.chat.completions.create(model=MODEL, messages=msgs(q))
    c.chat.completions.create(model=MODEL, messages=msgs(q))
    after = _samples(sidecar)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("semcache_lookups_total", endpoint="chat") == 2
    assert delta("semcache_misses_total") == 1
    assert delta("semcache_hits_total", tier="l1") == 1
    assert delta("semcache_hits_total", tier="semantic") == 0
    assert delta("semcache_upstream_requests_total") == 1
    assert delta("semcache_stores_total") == 1
    assert delta("semcache_lookup_seconds_count") == 2
    assert delta("semcache_upstream_seconds_count") == 1
    assert delta("semcache_best_similarity_count", outcome="accepted") == 1
    assert delta("semcache_request_seconds_count", endpoint="chat", outcome="miss") == 1
    assert delta("semcache_request_seconds_count", endpoint="chat", outcome="hit") == 1
    assert first.usage is not None
    assert delta("semcache_tokens_saved_total") == first.usage.total_tokens
    assert after[("semcache_entries", ())] >= 1
    with http(sidecar) as h:
        assert after[("semcache_entries", ())] == h.get("/v1/cache/stats").json()["entries"]


def _gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(OSError):  # a zombie still answers kill(0); it has exited
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        time.sleep(0.05)
    return False


def test_the_model_runs_in_a_child_process(sidecar: str) -> None:
    with http(sidecar) as h:
        info = h.get("/v1/cache/stats").json()["embedder"]
    assert info["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["precision"] in ("fp32", "bf16")
    pid = info["pid"]
    assert isinstance(pid, int) and info["restarts"] == 0
    os.kill(pid, 0)  # alive


def test_the_model_process_dies_with_a_killed_sidecar(tmp_path: Path, upstream: str) -> None:
    proc, base = start_sidecar(tmp_path / "data", upstream, {"SEMCACHE_LOG_LEVEL": "warning"})
    try:
        child = httpx.get(base.removesuffix("/v1") + "/v1/cache/stats").json()["embedder"]["pid"]
        status = Path(f"/proc/{child}/status").read_text()
        assert f"PPid:\t{proc.pid}\n" in status  # a child of the sidecar, not a thread of it
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert _gone(child), "the embedding process outlived its sidecar"


# -- the stale-answer race, over real HTTP ----------------------------------------------------


def _in_background(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _wait_for_call(upstream: str, prompt: str, n: int = 1, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while calls(upstream, prompt) < n:
        assert time.monotonic() < deadline, f"the upstream never got {prompt!r}"
        time.sleep(0.02)


def _chat(sidecar: str, token: str, prompt: str, **semcache: Any) -> httpx.Response:
    with http(sidecar, token) as h:
        return h.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": msgs(prompt), "semcache": semcache},
        )


@pytest.mark.parametrize("kind", ["bump", "tenant_tag", "admin_tag", "similar"])
def test_an_invalidation_during_the_upstream_call_is_not_cached(
    sidecar: str, upstream: str, kind: str
) -> None:
    """The answer computed across an invalidation goes back to its caller but is not cached:
    the next identical request is a miss that asks the upstream again."""
    prompt = f"Race {kind}: what is the current list price of plan B? #delay=1"
    namespace = f"race-{kind}"
    token, options = ADMIN, {"namespace": namespace, "tags": [f"price-{kind}"]}
    if kind == "tenant_tag":
        token, options = ACME, {"tags": ["price-tenant"]}
    thread, out = _in_background(lambda: _chat(sidecar, token, prompt, **options))
    _wait_for_call(upstream, prompt)
    with http(sidecar, token) as h:
        if kind == "bump":
            r = h.post("/v1/cache/bump", json={"namespace": namespace})
        elif kind in ("tenant_tag", "admin_tag"):
            r = h.post("/v1/cache/invalidate/tags", json={"tags": options["tags"]})
        elif kind == "similar":
            r = h.post("/v1/cache/invalidate/similar", json={"text": prompt, "radius": 0.9})
        assert r.status_code == 200, r.text
    thread.join(30)
    first = out["value"]
    assert first.status_code == 200 and first.headers["x-semcache"] == "miss"
    assert first.json()["semcache"] == {
        "hit": False,
        "stored": False,
        "entry_id": None,
        "reason": "invalidated during the upstream call",
    }
    again = _chat(sidecar, token, prompt, **options)
    assert again.headers["x-semcache"] == "miss", kind
    assert again.json()["choices"][0]["message"]["content"] != first.json()["choices"][0][
        "message"
    ]["content"]
    assert calls(upstream, prompt) == 2
    assert _chat(sidecar, token, prompt, **options).headers["x-semcache"] == "hit"


def test_a_request_after_a_bump_never_gets_the_answer_begun_before_it(
    sidecar: str, upstream: str
) -> None:
    """Single flight is keyed by the namespace version: a request that arrives after a bump
    does not wait for, nor take, the answer the upstream began before the bump."""
    prompt = "Single flight: what is the shipping fee to Norway? #delay=1.5"
    options = {"namespace": "race-flight"}
    lead, lead_out = _in_background(lambda: _chat(sidecar, ADMIN, prompt, **options))
    _wait_for_call(upstream, prompt)
    with http(sidecar) as h:
        assert h.post("/v1/cache/bump", json={"namespace": "race-flight"}).status_code == 200
    follow, follow_out = _in_background(lambda: _chat(sidecar, ADMIN, prompt, **options))
    _wait_for_call(upstream, prompt, 2)  # it went upstream itself instead of waiting
    lead.join(30)
    follow.join(30)
    before, after = lead_out["value"], follow_out["value"]
    assert before.json()["semcache"]["stored"] is False
    assert after.headers["x-semcache"] == "miss" and after.json()["semcache"]["stored"] is True
    text = after.json()["choices"][0]["message"]["content"]
    assert text != before.json()["choices"][0]["message"]["content"]
    hit = _chat(sidecar, ADMIN, prompt, **options)
    assert hit.headers["x-semcache"] == "hit"
    assert hit.json()["choices"][0]["message"]["content"] == text


# -- the total upstream deadline ---------------------------------------------------------------


def test_a_trickling_upstream_is_cut_at_the_total_deadline(sidecar: str, upstream: str) -> None:
    """The upstream sends a byte every 0.25 s (under the 2 s read timeout) for 8 s: only the
    3 s total deadline (SEMCACHE_UPSTREAM_DEADLINE) ends it, with a 504."""
    c = client(sidecar)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model=MODEL, messages=msgs("Trickle me an answer #trickle=8"))
    elapsed = time.monotonic() - t0
    assert err.value.status_code == 504
    assert err.value.body["code"] == "upstream_deadline"  # type: ignore[index]
    assert 2.9 <= elapsed < 8.0  # cut at the deadline, before the trickle would have ended
    t0 = time.monotonic()
    with pytest.raises(openai.APIError) as stream_err:
        list(
            c.chat.completions.create(
                model=MODEL, messages=msgs("Trickle me a stream #trickle=8"), stream=True
            )
        )
    assert "did not finish within 3s" in str(stream_err.value)
    assert 2.9 <= time.monotonic() - t0 < 8.0


def test_single_flight_followers_wait_at_most_the_deadline(sidecar: str, upstream: str) -> None:
    prompt = "Followers: trickle the tax table please #trickle=8"
    lead, lead_out = _in_background(lambda: _chat(sidecar, ADMIN, prompt))
    _wait_for_call(upstream, prompt)
    t0 = time.monotonic()
    followers = [_in_background(lambda: _chat(sidecar, ADMIN, prompt)) for _ in range(3)]
    for thread, _ in followers:
        thread.join(30)
    waited = time.monotonic() - t0
    lead.join(30)
    assert lead_out["value"].status_code == 504
    for _, out in followers:
        r = out["value"]
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "upstream_deadline"
    # unbounded, they would wait for the leader's 504 (3 s) and then make their own 3 s call
    assert waited < 6.0
    assert calls(upstream, prompt) <= 4
