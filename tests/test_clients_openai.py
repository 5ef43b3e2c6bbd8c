"""semcache.wrap around the official openai client, against the fake upstream over real HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from semcache import Scope, SemanticCache
from semcache.clients import wrap
from semcache.clients.openai import CachedAsyncOpenAI, CachedOpenAI
from semcache.decorators import cached
from semcache.errors import InvalidInputError

from .fake_upstream import start_upstream, stop

MODEL = "gpt-4o-mini"
# The wrapper's mechanics are tested here, not the hit policy: pin a plain cosine threshold.
THRESHOLD = 0.85


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    proc, url = start_upstream()
    try:
        yield url
    finally:
        stop(proc)


def stats(upstream: str) -> dict[str, Any]:
    return httpx.get(upstream.removesuffix("/v1") + "/_stats", timeout=5).json()


def calls(upstream: str, prompt: str) -> int:
    return int(stats(upstream)["calls"].get(prompt, 0))


def msgs(text: str, system: str = "You are terse.") -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


@pytest.fixture
def client(upstream: str, cache: SemanticCache) -> CachedOpenAI:
    inner = openai.OpenAI(base_url=upstream, api_key="sk-test", max_retries=0)
    wrapped = wrap(inner, cache, threshold=THRESHOLD)
    assert isinstance(wrapped, CachedOpenAI)
    return wrapped


@pytest.fixture
def aclient(upstream: str, cache: SemanticCache) -> CachedAsyncOpenAI:
    inner = openai.AsyncOpenAI(base_url=upstream, api_key="sk-test", max_retries=0)
    wrapped = wrap(inner, cache, threshold=THRESHOLD)
    assert isinstance(wrapped, CachedAsyncOpenAI)
    return wrapped


def text_of(stream: Any) -> tuple[str, list[ChatCompletionChunk]]:
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return content, chunks


def test_miss_then_hit_on_a_paraphrase(client: CachedOpenAI, upstream: str) -> None:
    first_q = "How do I reset my account password?"
    first = client.chat.completions.create(model=MODEL, messages=msgs(first_q), temperature=0)
    assert isinstance(first, ChatCompletion)
    assert not first.id.startswith("semcache-")
    assert first.semcache["hit"] is False and first.semcache["stored"] is True

    second = client.chat.completions.create(
        model=MODEL, messages=msgs("how can I reset the password of my account"), temperature=0
    )
    assert isinstance(second, ChatCompletion)
    assert second.id.startswith("semcache-")
    assert second.system_fingerprint == "semcache"
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.choices[0].finish_reason == "stop"
    assert second.semcache["hit"] is True and second.semcache["tier"] == "semantic"
    assert second.semcache["similarity"] >= 0.85
    assert second.semcache["saved_usage"]["total_tokens"] == first.usage.total_tokens
    assert second.usage.total_tokens == 0
    assert calls(upstream, first_q) == 1
    assert calls(upstream, "how can I reset the password of my account") == 0


def test_scope_differences_miss(client: CachedOpenAI, upstream: str) -> None:
    q = "What is the boiling point of water at sea level?"
    client.chat.completions.create(model=MODEL, messages=msgs(q), temperature=0)
    other_model = client.chat.completions.create(model="gpt-4o", messages=msgs(q), temperature=0)
    other_temp = client.chat.completions.create(model=MODEL, messages=msgs(q), temperature=0.7)
    other_system = client.chat.completions.create(
        model=MODEL, messages=msgs(q, system="Answer in French."), temperature=0
    )
    for response in (other_model, other_temp, other_system):
        assert not response.id.startswith("semcache-")
    assert calls(upstream, q) == 4
    again = client.chat.completions.create(model=MODEL, messages=msgs(q), temperature=0.0)
    assert again.id.startswith("semcache-") and again.semcache["tier"] == "l1"
    assert calls(upstream, q) == 4


def test_streaming_miss_is_recorded_and_served_both_ways(
    client: CachedOpenAI, upstream: str
) -> None:
    q = "Explain what a semantic cache does for LLM apps"
    stream = client.chat.completions.create(model=MODEL, messages=msgs(q), stream=True)
    assert isinstance(stream, openai.Stream)
    content, chunks = text_of(stream)
    assert content.startswith("Answer #") and not chunks[0].id.startswith("semcache-")
    assert calls(upstream, q) == 1

    plain = client.chat.completions.create(model=MODEL, messages=msgs(q))
    assert plain.id.startswith("semcache-") and plain.choices[0].message.content == content

    replay = client.chat.completions.create(
        model=MODEL, messages=msgs(q), stream=True, stream_options={"include_usage": True}
    )
    assert isinstance(replay, openai.Stream)
    replayed, chunks = text_of(replay)
    assert replayed == content
    assert all(c.id.startswith("semcache-") for c in chunks)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0
    assert replay.response.headers["x-semcache"] == "hit"
    assert calls(upstream, q) == 1


def test_a_stream_read_halfway_is_not_stored(client: CachedOpenAI, upstream: str) -> None:
    q = "Tell me a long story about a lighthouse keeper"
    stream = client.chat.completions.create(model=MODEL, messages=msgs(q), stream=True)
    next(iter(stream))
    stream.close()
    client.chat.completions.create(model=MODEL, messages=msgs(q))
    assert calls(upstream, q) == 2


def test_never_cached(client: CachedOpenAI, upstream: str, cache: SemanticCache) -> None:
    truncated = "Summarise the history of Rome #truncate"
    tool = "Look up the weather in Paris #tool"
    aborted = "Describe the water cycle in detail #abort"
    failing = "What is two plus two #fail500"
    for _ in range(2):
        r = client.chat.completions.create(model=MODEL, messages=msgs(truncated))
        assert r.choices[0].finish_reason == "length"
        r = client.chat.completions.create(model=MODEL, messages=msgs(tool))
        assert r.choices[0].finish_reason == "tool_calls"
        with pytest.raises(openai.APIError):
            text_of(
                client.chat.completions.create(model=MODEL, messages=msgs(aborted), stream=True)
            )
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=msgs(failing))
    for q in (truncated, tool, aborted, failing):
        assert calls(upstream, q) == 2, q
    n2 = "List three prime numbers for the n test"
    for _ in range(2):
        r = client.chat.completions.create(model=MODEL, messages=msgs(n2), n=2)
        assert not r.id.startswith("semcache-")
    hot = "Write a haiku about autumn leaves"
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=msgs(hot), temperature=1.5)
    assert calls(upstream, n2) == 2 and calls(upstream, hot) == 2
    assert cache.stats()["entries"] == 0


def test_per_call_options_are_stripped(
    client: CachedOpenAI, upstream: str, cache: SemanticCache
) -> None:
    q = "Which planet is known as the red planet?"
    r = client.chat.completions.create(
        model=MODEL,
        messages=msgs(q),
        extra_body={
            "semcache": {"ttl": 60, "tags": ["astro"], "namespace": "acme"},
            "custom_flag": True,
        },
    )
    body = stats(upstream)["last_body"]
    assert "semcache" not in body and body["custom_flag"] is True
    entry = cache.get(r.semcache["entry_id"])
    assert entry.scope.namespace == "acme" and entry.tags == ("astro",)
    assert entry.expires_at is not None
    # another namespace does not see it; the same namespace does
    miss = client.chat.completions.create(
        model=MODEL, messages=msgs(q), extra_body={"custom_flag": True}
    )
    assert not miss.id.startswith("semcache-")
    hit = client.chat.completions.create(
        model=MODEL, messages=msgs(q), semcache_namespace="acme", extra_body={"custom_flag": True}
    )
    assert hit.id.startswith("semcache-")
    assert "semcache_namespace" not in stats(upstream)["last_body"]
    # skip goes upstream even though an entry exists
    skipped = client.chat.completions.create(
        model=MODEL,
        messages=msgs(q),
        semcache_skip=True,
        semcache_namespace="acme",
        extra_body={"custom_flag": True},
    )
    assert not skipped.id.startswith("semcache-")
    assert calls(upstream, q) == 3
    assert cache.invalidate_tags("astro") == 1
    with pytest.raises(InvalidInputError):
        client.chat.completions.create(model=MODEL, messages=msgs(q), semcache_bogus=1)
    with pytest.raises(InvalidInputError):
        client.chat.completions.create(
            model=MODEL, messages=msgs(q), extra_body={"semcache": {"ttl": "soon"}}
        )


def test_wrap_defaults_and_passthrough(upstream: str, cache: SemanticCache) -> None:
    inner = openai.OpenAI(base_url=upstream, api_key="sk-test", max_retries=0)
    client = wrap(inner, cache, namespace="team", tags=["t1"], max_temperature=2.0)
    q = "Name a famous painting by Vermeer"
    r = client.chat.completions.create(model=MODEL, messages=msgs(q), temperature=1.5)
    entry = cache.get(r.semcache["entry_id"])
    assert entry.scope.namespace == "team" and entry.tags == ("t1",)
    assert client.models is inner.models  # everything else is the client's own
    assert client.with_options(timeout=5).cache is cache
    with pytest.raises(InvalidInputError):
        wrap(object(), cache)  # type: ignore[arg-type]


async def test_async_miss_hit_and_stream(aclient: CachedAsyncOpenAI, upstream: str) -> None:
    q = "What does HTTP status code 404 mean?"
    first = await aclient.chat.completions.create(model=MODEL, messages=msgs(q))
    assert not first.id.startswith("semcache-")
    second = await aclient.chat.completions.create(
        model=MODEL, messages=msgs("what is the meaning of HTTP status 404")
    )
    assert second.id.startswith("semcache-")
    assert second.choices[0].message.content == first.choices[0].message.content

    sq = "How do vaccines train the immune system?"
    stream = await aclient.chat.completions.create(model=MODEL, messages=msgs(sq), stream=True)
    assert isinstance(stream, openai.AsyncStream)
    live = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    replay = await aclient.chat.completions.create(model=MODEL, messages=msgs(sq), stream=True)
    assert isinstance(replay, openai.AsyncStream)
    chunks = [c async for c in replay]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == live
    assert chunks[0].id.startswith("semcache-")
    assert calls(upstream, q) == 1 and calls(upstream, sq) == 1

    with pytest.raises(openai.InternalServerError):
        await aclient.chat.completions.create(model=MODEL, messages=msgs("oops #fail500"))


def test_decorator_sync_single_flight(cache: SemanticCache) -> None:
    seen: list[str] = []
    gate = threading.Event()

    @cached(cache, scope=Scope(model="m"), tags=["deco"], threshold=THRESHOLD)
    def answer(prompt: str) -> str:
        seen.append(prompt)
        gate.wait(timeout=10)
        return f"answer to {prompt}"

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(answer("How tall is Mount Everest?")))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    while not seen:
        gate.wait(0.01)
    gate.set()
    for t in threads:
        t.join(timeout=30)
    assert seen == ["How tall is Mount Everest?"]
    assert results == ["answer to How tall is Mount Everest?"] * 6
    assert answer("how tall is mount everest") == "answer to How tall is Mount Everest?"
    assert len(seen) == 1
    assert answer.uncached("x") == "answer to x" and answer.__name__ == "answer"
    assert cache.invalidate_tags("deco") == 1


async def test_decorator_async_and_arguments_scope(cache: SemanticCache) -> None:
    calls_made: list[tuple[str, str]] = []

    @cached(cache)
    async def translate(prompt: str, language: str = "fr") -> str:
        calls_made.append((prompt, language))
        await asyncio.sleep(0.05)
        return f"{language}: {prompt}"

    out = await asyncio.gather(*[translate("Good morning, friend", "de") for _ in range(4)])
    assert out == ["de: Good morning, friend"] * 4
    assert await translate("Good morning, friend", "es") == "es: Good morning, friend"
    assert await translate(prompt="Good morning, friend", language="de") != ""
    assert calls_made[:2] == [("Good morning, friend", "de"), ("Good morning, friend", "es")]

    @cached(cache)
    async def other(prompt: str) -> str:
        return "other function"

    assert await other("Good morning, friend") == "other function"  # functions never share


@pytest.mark.parametrize("invalidation", ["tag", "bump"])
def test_an_invalidation_during_the_upstream_call_voids_the_store(
    client: CachedOpenAI, cache: SemanticCache, invalidation: str
) -> None:
    """The answer of a call that overlapped an invalidation covering it is returned but not
    cached: the lookup's fence position travels with the call to the store."""
    q = f"What is our refund window? ({invalidation}) #delay=0.8"
    fired = threading.Event()

    def invalidate() -> None:
        fired.wait(5)
        time.sleep(0.4)  # inside the upstream's 0.8 s: after the lookup, before the store
        if invalidation == "tag":
            cache.invalidate_tags("policy")
        else:
            cache.bump("default")

    worker = threading.Thread(target=invalidate)
    worker.start()
    fired.set()
    first = client.chat.completions.create(
        model=MODEL, messages=msgs(q), temperature=0, extra_body={"semcache": {"tags": ["policy"]}}
    )
    worker.join()
    assert first.semcache["hit"] is False and first.semcache["stored"] is False
    assert first.choices[0].message.content  # the caller still gets its answer
    assert cache.stats()["fenced"] == 1
    again = client.chat.completions.create(model=MODEL, messages=msgs(q), temperature=0)
    assert not again.id.startswith("semcache-")  # a miss: the pre-invalidation answer is gone
