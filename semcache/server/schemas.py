"""Request and response bodies of the sidecar (pydantic; they also make the OpenAPI docs).

The JSON cache API (``/v1/cache/...``) forbids unknown fields: a typo is a 422 with the field
named, not a silently ignored option. The chat endpoint is OpenAI-compatible: it validates the
fields semcache reads and accepts the others the installed ``openai`` SDK knows (they are
forwarded upstream and become part of the scope); unknown ones are rejected unless
``SEMCACHE_STRICT_PARAMS=false``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

from ..chat import CallOptions
from ..types import Entry, Hit, Scope
from .settings import MAX_NAMESPACE_CHARS, MAX_TAG_CHARS, MAX_TAGS

#: one tag: a non-empty string of at most MAX_TAG_CHARS characters
Tag = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TAG_CHARS)]
#: a namespace name
Namespace = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAMESPACE_CHARS)]
#: the most messages one chat request may hold
MAX_MESSAGES = 2048


def known_chat_params() -> frozenset[str]:
    """Top-level chat request fields the installed openai SDK knows, plus ``stream``."""
    try:
        from openai.types.chat import completion_create_params as params

        names = set(params.CompletionCreateParamsBase.__annotations__)
    except (ImportError, AttributeError):  # pragma: no cover - an SDK without the TypedDict
        names = set()
    return frozenset(names | {"model", "messages", "stream", "stream_options", "semcache"})


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- chat -------------------------------------------------------------------------------------


#: roles whose messages must have content (an assistant message may carry tool calls instead)
_CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool", "function"})


class ChatMessage(BaseModel):
    """One message of a chat request (fields beyond these are kept and forwarded).

    Refused here with a 422, never forwarded upstream: a ``system``, ``developer``, ``user``,
    ``tool`` or ``function`` message without ``content``; an ``assistant`` message with neither
    ``content`` nor ``tool_calls``/``function_call``; a content part that is not an object with a
    string ``type`` (a ``text`` part with a string ``text``); a ``tool`` message without a string
    ``tool_call_id``.
    """

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _well_formed(self) -> ChatMessage:
        extra = self.model_extra or {}
        if self.content is None:
            if self.role in _CONTENT_REQUIRED:
                raise ValueError(f"a {self.role} message needs content")
            if not (extra.get("tool_calls") or extra.get("function_call")):
                raise ValueError("an assistant message needs content or tool_calls")
        if isinstance(self.content, list):
            for part in self.content:
                kind = part.get("type")
                if not isinstance(kind, str):
                    raise ValueError("every content part needs a string type")
                if kind == "text" and not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string text")
        if self.role == "tool" and not isinstance(extra.get("tool_call_id"), str):
            raise ValueError("a tool message needs a string tool_call_id")
        tool_calls = extra.get("tool_calls")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise ValueError("tool_calls must be a list")
        return self


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: the OpenAI request, plus an optional ``semcache`` object."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: StrictBool | None = None
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    semcache: CallOptions | None = Field(
        None, description="semcache options: skip, refresh, ttl, tags, namespace, threshold"
    )


# -- the cache API ----------------------------------------------------------------------------


class ScopeModel(_Forbid):
    """A :class:`~semcache.types.Scope`; ``namespace`` defaults to the token's tenant."""

    namespace: Namespace | None = None
    model: StrictStr = Field("", max_length=256)
    params: dict[str, Any] = Field(default_factory=dict)
    system: StrictStr = ""
    context: list[Any] = Field(default_factory=list)

    def to_scope(self, namespace: str) -> Scope:
        return Scope(
            namespace=namespace,
            model=self.model,
            params=self.params,
            system=self.system,
            context=tuple(self.context),
        )

    @classmethod
    def of(cls, scope: Scope) -> ScopeModel:
        return cls(
            namespace=scope.namespace,
            model=scope.model,
            params=dict(scope.params),
            system=scope.system,
            context=list(scope.context),
        )


class LookupRequest(_Forbid):
    prompt: StrictStr = Field(min_length=1)
    scope: ScopeModel | None = None
    threshold: float | None = Field(None, ge=-1.0, le=1.0)


class LookupResponse(BaseModel):
    hit: bool
    response: str | None = None
    similarity: float | None = None
    entry_id: str | None = None
    tier: str | None = None
    prompt: str | None = None
    metadata: dict[str, Any] | None = None

    @classmethod
    def of(cls, hit: Hit | None) -> LookupResponse:
        if hit is None:
            return cls(hit=False)
        return cls(
            hit=True,
            response=hit.response,
            similarity=hit.similarity,
            entry_id=hit.entry_id,
            tier=hit.tier,
            prompt=hit.prompt,
            metadata=dict(hit.metadata) if isinstance(hit.metadata, Mapping) else None,
        )


class StoreRequest(_Forbid):
    prompt: StrictStr = Field(min_length=1)
    response: StrictStr
    scope: ScopeModel | None = None
    ttl: float | None = Field(
        None, ge=0, description="seconds to live; null: never expires; absent: the default"
    )
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    metadata: dict[str, Any] | None = None


class StoreResponse(BaseModel):
    entry_id: str


class UpdateRequest(_Forbid):
    """Fields to change; the ones left out stay as they are."""

    response: StrictStr | None = None
    prompt: StrictStr | None = Field(None, min_length=1)
    ttl: float | None = Field(None, ge=0)
    tags: list[Tag] | None = Field(None, max_length=MAX_TAGS)
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _something(self) -> UpdateRequest:
        if not self.model_fields_set:
            raise ValueError("nothing to update: give response, prompt, ttl, tags or metadata")
        for name in ("response", "prompt"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class EntryModel(BaseModel):
    entry_id: str
    prompt: str
    response: str
    scope: ScopeModel
    version: int
    created_at: float
    updated_at: float
    accessed_at: float
    expires_at: float | None
    hits: int
    tags: list[str]
    metadata: dict[str, Any]

    @classmethod
    def of(cls, entry: Entry, tags: list[str]) -> EntryModel:
        return cls(
            entry_id=entry.entry_id,
            prompt=entry.prompt,
            response=entry.response,
            scope=ScopeModel.of(entry.scope),
            version=entry.version,
            created_at=entry.created_at,
            updated_at=entry.updated_at,
            accessed_at=entry.accessed_at,
            expires_at=entry.expires_at,
            hits=entry.hits,
            tags=tags,
            metadata=dict(entry.metadata),
        )


class DeletePromptRequest(_Forbid):
    prompt: StrictStr = Field(min_length=1)
    scope: ScopeModel | None = None


class TagsRequest(_Forbid):
    tags: list[Tag] = Field(min_length=1, max_length=MAX_TAGS)


class BumpRequest(_Forbid):
    namespace: Namespace | None = None


class BumpResponse(BaseModel):
    namespace: str
    version: int


class SimilarRequest(_Forbid):
    """Give ``text`` (embedded by the cache) or ``vector``, not both."""

    text: StrictStr | None = Field(None, min_length=1)
    vector: list[float] | None = Field(None, min_length=1)
    radius: float = Field(ge=-1.0, le=1.0)
    scope: ScopeModel | None = None

    @model_validator(mode="after")
    def _one_query(self) -> SimilarRequest:
        if (self.text is None) == (self.vector is None):
            raise ValueError("give exactly one of text or vector")
        return self


class CountResponse(BaseModel):
    removed: int


class IdsResponse(BaseModel):
    removed: list[str]


class DeletedResponse(BaseModel):
    deleted: bool


class ReadyChecks(BaseModel):
    model: bool
    store: bool
    index: bool


class ReadyResponse(BaseModel):
    """``GET /readyz``: ``ready`` (200) or ``not ready`` (503), and each check."""

    status: Literal["ready", "not ready"]
    checks: ReadyChecks


class ErrorBody(BaseModel):
    """The stable error body: the OpenAI category, a message for people, a code for programs."""

    type: str
    message: str
    code: str


class ErrorResponse(BaseModel):
    error: ErrorBody
