"""semcache.chat: how a chat request becomes (prompt, scope), and which answers are stored."""

from __future__ import annotations

from typing import Any

import pytest

from semcache.chat import (
    CACHED_ID_PREFIX,
    CallOptions,
    ChatPolicy,
    StreamRecorder,
    answer_from_completion,
    chunks_from_hit,
    completion_from_hit,
    derive,
    parse_options,
    split_for_stream,
)
from semcache.errors import InvalidInputError
from semcache.types import Hit


def req(content: str = "How do I reset my password?", **kw: Any) -> dict[str, Any]:
    messages = kw.pop("messages", None) or [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": content},
    ]
    return {"model": "gpt-4o-mini", "messages": messages, **kw}


def key(request: dict[str, Any], **kw: Any):
    decision = derive(request, **kw)
    assert decision.key is not None, decision.reason
    return decision.key


def test_only_the_last_user_message_is_the_prompt() -> None:
    k = key(req())
    assert k.prompt == "How do I reset my password?"
    assert k.scope.model == "gpt-4o-mini"
    assert k.scope.system == "You are terse."
    assert k.scope.context == ()
    assert k.scope.namespace == "default"


def test_transport_fields_do_not_change_the_scope() -> None:
    base = key(req(temperature=0)).scope
    same = [
        req(temperature=0.0, stream=True, stream_options={"include_usage": True}),
        req(temperature=0, user="u1", metadata={"a": "b"}, store=False, n=1),
        req(temperature=0, top_p=None, service_tier="auto"),
    ]
    for r in same:
        assert key(r).scope == base, r


def test_whatever_changes_the_answer_changes_the_scope() -> None:
    base = key(req(temperature=0)).scope
    different = [
        req(temperature=0.7),
        req(temperature=0, model="gpt-4o"),
        req(temperature=0, max_tokens=10),
        req(temperature=0, seed=7),
        req(temperature=0, tools=[{"type": "function", "function": {"name": "f"}}]),
        req(temperature=0, response_format={"type": "json_object"}),
        req(temperature=0, some_new_param="x"),
        req(temperature=0, messages=[{"role": "user", "content": "How do I reset my password?"}]),
    ]
    for r in different:
        assert key(r).scope != base, r
    assert key(req(temperature=0), namespace="acme").scope != base


def test_earlier_turns_are_a_digest_in_the_context() -> None:
    turns = [
        {"role": "user", "content": "I use the mobile app."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "How do I reset my password?"},
    ]
    other = [
        {"role": "user", "content": "I use the website."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "How do I reset my password?"},
    ]
    a, b = key(req(messages=turns)), key(req(messages=other))
    assert a.prompt == b.prompt
    assert a.scope != b.scope
    assert len(a.scope.context) == 1 and a.scope.context[0].startswith("sha256:")
    assert a.scope == key(req(messages=[dict(m) for m in turns])).scope


def test_text_parts_are_joined_and_attachments_scope() -> None:
    parts = [{"type": "text", "text": "Describe"}, {"type": "text", "text": "this picture"}]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    plain = key(req(messages=[{"role": "user", "content": parts}]))
    with_image = key(req(messages=[{"role": "user", "content": [*parts, image]}]))
    assert plain.prompt == with_image.prompt == "Describe\nthis picture"
    assert plain.scope != with_image.scope


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (req(n=2), "n > 1"),
        (req(temperature=1.5), "temperature"),
        (req(logprobs=True), "logprobs"),
        (req(modalities=["text", "audio"]), "audio"),
        (
            req(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
            "not a user message",
        ),
        (req(content="   "), "no text"),
        ({"model": "m", "messages": []}, "no messages"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no model"),
    ],
)
def test_requests_that_bypass_the_cache(request_: dict[str, Any], reason: str) -> None:
    decision = derive(request_)
    assert decision.key is None and reason in (decision.reason or "")


def test_policy_knobs() -> None:
    assert derive(req(temperature=1.5), policy=ChatPolicy(max_temperature=2.0)).key is not None
    assert derive(req(seed=1), policy=ChatPolicy(cache_seeded=False)).key is None
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert derive(req(tools=tools), policy=ChatPolicy(cache_tools=False)).key is None


def completion(content: Any = "Use the reset link.", finish: str = "stop", **msg: Any) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini-2024",
        "choices": [
            {
                "index": 0,
                "finish_reason": finish,
                "message": {"role": "assistant", "content": content, **msg},
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
    }


def test_which_answers_are_stored() -> None:
    answer, reason = answer_from_completion(completion())
    assert answer is not None and reason is None
    assert answer.metadata()["usage"]["total_tokens"] == 9
    assert answer.metadata()["model"] == "gpt-4o-mini-2024"
    for bad in (
        completion(finish="length"),
        completion(finish="content_filter"),
        completion(content=None, tool_calls=[{"id": "c"}]),
        completion(content=""),
        {**completion(), "choices": completion()["choices"] * 2},
    ):
        answer, reason = answer_from_completion(bad)
        assert answer is None and reason


def test_stream_recorder() -> None:
    rec = StreamRecorder()
    for piece in ("Use", " the", " link."):
        rec.feed({"model": "m", "choices": [{"index": 0, "delta": {"content": piece}}]})
    assert rec.answer()[0] is None  # no finish reason yet: an aborted stream
    rec.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    rec.feed({"choices": [], "usage": {"total_tokens": 3}})
    answer, _ = rec.answer()
    assert answer is not None and answer.content == "Use the link." and answer.usage
    tool = StreamRecorder()
    tool.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]})
    tool.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    assert tool.answer()[0] is None


def test_hits_become_marked_completions_and_chunks() -> None:
    hit = Hit(
        "Use the reset link on the sign-in page.",
        0.93,
        "abc",
        "semantic",
        "p",
        {"model": "gpt-4o-mini-2024", "usage": {"total_tokens": 9}},
    )
    c = completion_from_hit(hit, requested_model="gpt-4o-mini")
    assert c["id"] == f"{CACHED_ID_PREFIX}abc"
    assert c["model"] == "gpt-4o-mini-2024"
    assert c["choices"][0]["message"]["content"] == hit.response
    assert c["usage"]["total_tokens"] == 0
    assert c["semcache"] == {
        "hit": True,
        "similarity": 0.93,
        "entry_id": "abc",
        "tier": "semantic",
        "saved_usage": {"total_tokens": 9},
    }
    chunks = chunks_from_hit(hit, requested_model="m", include_usage=True)
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert text == hit.response
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 0
    long = "word " * 1000
    assert "".join(split_for_stream(long)) == long and len(split_for_stream(long)) <= 64


def test_options() -> None:
    opts = parse_options({"ttl": 60, "tags": ["a"], "namespace": "acme"})
    assert opts.ttl == 60 and opts.ttl_given and opts.tags == ("a",)
    assert not parse_options({}).ttl_given
    merged = parse_options({"tags": ["b"]}).merged_over(CallOptions(tags=("a",), ttl=None))
    assert merged.tags == ("a", "b") and merged.ttl_given and merged.ttl is None
    for bad in ({"skip": "yes"}, {"tags": "a"}, {"unknown": 1}, {"ttl": -1}, {"threshold": 2}):
        with pytest.raises(InvalidInputError):
            parse_options(bad)
