"""OpenAI chat requests and answers as cache keys and cache entries.

Written once, used by the client wrapper (:mod:`semcache.clients.openai`) and by the sidecar
(:mod:`semcache.server`), so both cache exactly the same requests in exactly the same way.

Key of a chat request
    Only the **last user message** is compared by meaning: it becomes the prompt. Everything
    else must match exactly and goes into the :class:`~semcache.types.Scope`:

    - ``namespace``: the tenant (per-call option, wrapper default or the sidecar token's tenant);
    - ``model``: the requested model;
    - ``system``: the leading ``system``/``developer`` messages, joined;
    - ``context``: a SHA-256 digest of the earlier turns (everything between the leading system
      messages and the last user message, roles, names and tool calls included), so a follow-up
      question only matches within the same conversation so far;
    - ``params``: every other request field that can change the answer (``temperature``,
      ``top_p``, ``max_tokens``, ``stop``, penalties, ``seed``, ``tools``, ``tool_choice``,
      ``response_format``, ``reasoning_effort``, unknown fields too, and a digest of non-text
      parts of the last message). Transport and bookkeeping fields (``stream``,
      ``stream_options``, ``user``, ``metadata``, ``store``, ``service_tier``,
      ``safety_identifier``, ``prompt_cache_*``) are left out: they do not change the answer, so
      a streamed and a non-streamed request share one entry. ``None`` values and ``n=1`` are
      dropped (the same as absent).

Caching policy (:class:`ChatPolicy`)
    Requests that bypass the cache entirely (neither read nor written) and why:

    - ``n > 1``: one cached answer cannot be n independent samples;
    - ``temperature > max_temperature`` (default 1.0): the caller asked for variety;
    - ``logprobs``, audio output: a cached answer has neither;
    - the last message is not a user message (assistant prefill, tool results), or has no text;
    - ``seed`` and ``tools`` are cached by default, as part of the scope
      (``cache_seeded=False`` / ``cache_tools=False`` bypass them instead).

    Answers that are never stored: errors, more than one choice, ``finish_reason`` other than
    ``"stop"`` (``"length"`` truncation, ``"tool_calls"``, ``"content_filter"``), answers with
    tool or function calls or without text content, and streams that did not run to their
    final chunk (aborted by the caller or the upstream).

How a cached answer is marked
    A hit is a regular ``chat.completion`` (or a stream of ``chat.completion.chunk``) whose
    ``id`` starts with ``semcache-`` followed by the entry id, whose ``system_fingerprint`` is
    ``"semcache"``, whose ``usage`` is zero (nothing was billed; the tokens the original call
    used are in ``semcache.saved_usage``) and which carries an extra ``semcache`` object:
    ``{"hit": true, "similarity": 0.93, "entry_id": "...", "tier": "semantic", ...}``. With the
    openai SDK it is ``completion.semcache`` (pydantic keeps extra fields). The sidecar also
    sets ``x-semcache-*`` response headers.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from .errors import InvalidInputError, SemcacheError
from .types import Hit, Scope

#: Request fields that do not change the answer: left out of the scope.
TRANSPORT_FIELDS = frozenset(
    {
        "messages",
        "model",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "semcache",
    }
)

#: Roles whose leading messages form the system prompt.
SYSTEM_ROLES = frozenset({"system", "developer"})

#: ``id`` prefix of every completion served from the cache.
CACHED_ID_PREFIX = "semcache-"
CACHED_FINGERPRINT = "semcache"

#: Metadata keys semcache keeps with an entry stored from a chat completion.
META_SOURCE = "openai.chat"


@dataclass(frozen=True)
class ChatPolicy:
    """Which chat requests are cached (see the module docstring for the full policy)."""

    max_temperature: float = 1.0
    cache_seeded: bool = True
    cache_tools: bool = True


DEFAULT_POLICY = ChatPolicy()


class CallOptions(BaseModel):
    """Per-call cache options: ``extra_body={"semcache": {...}}`` or ``semcache_<name>=`` kwargs.

    ``skip``: neither read nor write the cache. ``refresh``: do not read, but store the fresh
    answer. ``ttl``: seconds the stored answer lives (``null``: never expires; absent: the
    cache's default). ``tags``: tags of the stored entry. ``namespace``: the tenant.
    ``threshold``: the similarity threshold for this lookup.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    skip: StrictBool = False
    refresh: StrictBool = False
    ttl: Annotated[float, Field(strict=True, ge=0)] | None = None
    tags: tuple[Annotated[StrictStr, Field(min_length=1)], ...] = ()
    namespace: StrictStr | None = Field(default=None, min_length=1, max_length=256)
    threshold: Annotated[float, Field(strict=True, ge=-1.0, le=1.0)] | None = None

    @property
    def ttl_given(self) -> bool:
        """Whether ``ttl`` was set (``None`` then means "never expires")."""
        return "ttl" in self.model_fields_set

    def merged_over(self, defaults: CallOptions) -> CallOptions:
        """These options, falling back to ``defaults`` for fields this call did not set."""
        data = defaults.model_dump(include=defaults.model_fields_set)
        data.update(self.model_dump(include=self.model_fields_set))
        data["tags"] = tuple(dict.fromkeys((*defaults.tags, *self.tags)))
        return CallOptions.model_validate(data)


def parse_options(raw: Any) -> CallOptions:
    """Validate a ``semcache`` options object (a dict); raise InvalidInputError with the reason."""
    if raw is None:
        return CallOptions()
    if isinstance(raw, CallOptions):
        return raw
    if not isinstance(raw, Mapping):
        raise InvalidInputError("semcache options must be an object")
    data = dict(raw)
    if isinstance(data.get("tags"), str):
        raise InvalidInputError("invalid semcache options: tags must be a list, not one string")
    try:
        return CallOptions.model_validate(data)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid semcache options: {_brief(exc)}") from None


def _brief(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


# -- request → key ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatKey:
    """What a chat request is cached under: the prompt compared by meaning, and the scope."""

    prompt: str
    scope: Scope


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`derive`: a key, or the reason the request bypasses the cache."""

    key: ChatKey | None
    reason: str | None = None

    @property
    def cacheable(self) -> bool:
        return self.key is not None


def _digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def plain(value: Any) -> Any:
    """JSON-ish plain data from SDK objects: pydantic models dumped, iterables listed."""
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return plain(value.model_dump(exclude_none=True, mode="json"))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    if isinstance(value, Iterable):
        return [plain(v) for v in value]
    return value


def text_of(content: Any) -> str:
    """The text of a message's content: the string, or its text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        ]
        return "\n".join(t for t in texts if isinstance(t, str))
    return ""


def _non_text_parts(content: Any) -> list[Any]:
    if isinstance(content, list):
        return [p for p in content if not (isinstance(p, Mapping) and p.get("type") == "text")]
    return []


def derive(
    request: Mapping[str, Any],
    *,
    namespace: str = "default",
    policy: ChatPolicy = DEFAULT_POLICY,
) -> Decision:
    """The cache key of an OpenAI chat request (a plain dict), or why it is not cached."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return Decision(None, "no messages")
    if not all(isinstance(m, Mapping) for m in messages):
        return Decision(None, "messages must be objects")
    model = request.get("model")
    if not isinstance(model, str):
        return Decision(None, "no model")

    n = request.get("n")
    if n is not None and n != 1:
        return Decision(None, "n > 1")
    temperature = request.get("temperature")
    if isinstance(temperature, int | float) and temperature > policy.max_temperature:
        return Decision(None, f"temperature above {policy.max_temperature}")
    if request.get("logprobs") or request.get("top_logprobs"):
        return Decision(None, "logprobs requested")
    modalities = request.get("modalities")
    if request.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        return Decision(None, "audio output requested")
    if request.get("seed") is not None and not policy.cache_seeded:
        return Decision(None, "seeded requests are not cached")
    if (request.get("tools") or request.get("functions")) and not policy.cache_tools:
        return Decision(None, "requests with tools are not cached")

    last = messages[-1]
    if last.get("role") != "user":
        return Decision(None, "the last message is not a user message")
    prompt = text_of(last.get("content"))
    if not prompt.strip():
        return Decision(None, "the last user message has no text")

    # Leading system/developer messages are the system prompt; the rest is the conversation.
    i = 0
    system_parts: list[str] = []
    while i < len(messages) - 1 and messages[i].get("role") in SYSTEM_ROLES:
        system_parts.append(text_of(messages[i].get("content")))
        i += 1
    earlier = [dict(m) for m in messages[i:-1]]
    context: tuple[str, ...] = (f"sha256:{_digest(earlier)}",) if earlier else ()

    params: dict[str, Any] = {}
    for name, value in request.items():
        if name in TRANSPORT_FIELDS or value is None or name == "n":
            continue
        params[name] = value
    attachments = _non_text_parts(last.get("content"))
    if attachments:
        params["last_message_attachments"] = f"sha256:{_digest(attachments)}"
    if last.get("name") is not None:
        params["last_message_name"] = last.get("name")
    try:
        scope = Scope(
            namespace=namespace,
            model=model,
            params=params,
            system="\n\n".join(system_parts),
            context=context,
        )
    except SemcacheError as exc:
        return Decision(None, f"request cannot be scoped: {exc}")
    return Decision(ChatKey(prompt=prompt, scope=scope))


# -- answer → entry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A cacheable answer taken from an upstream completion or stream."""

    content: str
    model: str
    usage: Mapping[str, Any] | None = None

    def metadata(self) -> dict[str, Any]:
        """What is stored beside the answer text, to rebuild a completion on a hit."""
        meta: dict[str, Any] = {"source": META_SOURCE, "model": self.model}
        if self.usage:
            meta["usage"] = {
                k: int(v)
                for k, v in self.usage.items()
                if k in ("prompt_tokens", "completion_tokens", "total_tokens")
                and isinstance(v, int | float)
            }
        return meta


def answer_from_completion(data: Mapping[str, Any]) -> tuple[Answer | None, str | None]:
    """The answer of a ``chat.completion`` dict if it may be cached, else (None, reason)."""
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return None, "not exactly one choice"
    choice = choices[0]
    if not isinstance(choice, Mapping):
        return None, "malformed choice"
    finish = choice.get("finish_reason")
    if finish != "stop":
        return None, f"finish_reason {finish!r}"
    message = choice.get("message")
    if not isinstance(message, Mapping):
        return None, "no message"
    if message.get("tool_calls") or message.get("function_call"):
        return None, "tool calls in the answer"
    content = message.get("content")
    if not isinstance(content, str) or not content:
        return None, "no text content"
    model = data.get("model")
    usage = data.get("usage")
    return (
        Answer(
            content=content,
            model=model if isinstance(model, str) else "",
            usage=usage if isinstance(usage, Mapping) else None,
        ),
        None,
    )


@dataclass
class StreamRecorder:
    """Accumulates ``chat.completion.chunk`` dicts of a streamed miss into an :class:`Answer`.

    Call :meth:`feed` for each chunk and :meth:`answer` only once the stream has ended normally;
    a stream that ends without a ``"stop"`` finish reason yields no answer.
    """

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    model: str = ""
    usage: Mapping[str, Any] | None = None
    problem: str | None = None

    def feed(self, chunk: Mapping[str, Any]) -> None:
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self.model = chunk["model"]
        if isinstance(chunk.get("usage"), Mapping):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, Mapping):
                self.problem = "malformed chunk"
                continue
            if choice.get("index", 0) != 0:
                self.problem = "more than one choice"
                continue
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.problem = "tool calls in the answer"
                piece = delta.get("content")
                if isinstance(piece, str):
                    self.parts.append(piece)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]

    def answer(self) -> tuple[Answer | None, str | None]:
        if self.problem:
            return None, self.problem
        if self.finish_reason != "stop":
            return None, f"finish_reason {self.finish_reason!r}"
        content = "".join(self.parts)
        if not content:
            return None, "no text content"
        return Answer(content=content, model=self.model, usage=self.usage), None


# -- hit → completion -------------------------------------------------------------------------


def hit_info(hit: Hit) -> dict[str, Any]:
    """The ``semcache`` object attached to a cached completion."""
    saved = hit.metadata.get("usage") if isinstance(hit.metadata, Mapping) else None
    return {
        "hit": True,
        "similarity": round(float(hit.similarity), 6),
        "entry_id": hit.entry_id,
        "tier": hit.tier,
        "saved_usage": dict(saved) if isinstance(saved, Mapping) else None,
    }


def tokens_saved(hit: Hit) -> int:
    """Tokens the original call used (0 when unknown): what this hit did not spend."""
    usage = hit.metadata.get("usage") if isinstance(hit.metadata, Mapping) else None
    if isinstance(usage, Mapping):
        total = usage.get("total_tokens")
        if isinstance(total, int):
            return total
    return 0


def _answer_model(hit: Hit, requested_model: str) -> str:
    model = hit.metadata.get("model") if isinstance(hit.metadata, Mapping) else None
    return model if isinstance(model, str) and model else requested_model


_ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def completion_from_hit(
    hit: Hit, *, requested_model: str, created: int | None = None
) -> dict[str, Any]:
    """A ``chat.completion`` dict that serves ``hit`` (see the module docstring for the marks)."""
    return {
        "id": f"{CACHED_ID_PREFIX}{hit.entry_id}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": _answer_model(hit, requested_model),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": hit.response, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": dict(_ZERO_USAGE),
        "system_fingerprint": CACHED_FINGERPRINT,
        "semcache": hit_info(hit),
    }


_PIECES = re.compile(r"\s*\S+\s*|\s+")


def split_for_stream(text: str, max_chunks: int = 64) -> list[str]:
    """Cut an answer into word-sized pieces (at most ``max_chunks``) that join back to it."""
    pieces = _PIECES.findall(text) or [text]
    if len(pieces) > max_chunks:
        per = -(-len(pieces) // max_chunks)
        pieces = ["".join(pieces[i : i + per]) for i in range(0, len(pieces), per)]
    return pieces


def chunks_from_hit(
    hit: Hit,
    *,
    requested_model: str,
    include_usage: bool = False,
    created: int | None = None,
) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` dicts that replay ``hit`` as a stream."""
    base = {
        "id": f"{CACHED_ID_PREFIX}{hit.entry_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()) if created is None else created,
        "model": _answer_model(hit, requested_model),
        "system_fingerprint": CACHED_FINGERPRINT,
        "semcache": hit_info(hit),
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            **base,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    out = [chunk({"role": "assistant", "content": ""})]
    out.extend(chunk({"content": piece}) for piece in split_for_stream(hit.response))
    out.append(chunk({}, "stop"))
    if include_usage:
        out.append({**base, "choices": [], "usage": dict(_ZERO_USAGE)})
    return out


def wants_usage(request: Mapping[str, Any]) -> bool:
    """Whether a streaming request asked for the final usage chunk."""
    opts = request.get("stream_options")
    return isinstance(opts, Mapping) and bool(opts.get("include_usage"))
