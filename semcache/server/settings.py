"""The sidecar's settings, each an environment variable ``SEMCACHE_<NAME>`` (pydantic-settings).

``semcache serve`` flags override them. The ones that matter most:

==========================  ===================================  ==============================
variable                    meaning                              default
==========================  ===================================  ==============================
``SEMCACHE_DATA``           the cache's data folder              ``indexes/default``
``SEMCACHE_HOST``           interface to listen on               ``127.0.0.1``
``SEMCACHE_PORT``           port                                 ``8080``
``SEMCACHE_UPSTREAM``       OpenAI-compatible base URL of misses ``https://api.openai.com/v1``
``SEMCACHE_UPSTREAM_API_KEY`` key sent upstream (see below)      unset
``SEMCACHE_TOKENS``         bearer tokens, each bound to a       unset: no auth
                            tenant or not (see below)
``SEMCACHE_MAX_PROMPT_CHARS`` largest prompt accepted (413)      ``32000``
``SEMCACHE_MAX_BODY_BYTES`` largest request body accepted (413)  ``4194304``
``SEMCACHE_UPSTREAM_TIMEOUT`` seconds one upstream read may take  ``60``
``SEMCACHE_UPSTREAM_DEADLINE`` seconds a whole upstream answer     ``120``
                            may take, however it trickles (504)
``SEMCACHE_MAX_RESPONSE_CHARS`` largest answer stored (413 on the  ``200000``
                            cache API; a larger upstream answer
                            is relayed, not cached)
``SEMCACHE_MAX_METADATA_BYTES`` largest ``metadata`` (JSON) (413)  ``16384``
``SEMCACHE_MAX_SCOPE_BYTES`` largest scope params/context (JSON)   ``16384``
                            (413)
``SEMCACHE_SHUTDOWN_GRACE`` seconds SIGTERM waits for requests   ``10``
                            in flight before closing the cache
``SEMCACHE_THRESHOLD``      similarity threshold (None: default) unset
``SEMCACHE_TARGET_ERROR``   hold wrong answers under this rate   unset
                            (the ErrorBudget policy; not with
                            ``SEMCACHE_THRESHOLD``)
``SEMCACHE_DEFAULT_TTL``    seconds an answer lives (None: ever) unset
``SEMCACHE_MAX_TEMPERATURE`` above it requests are not cached    ``1.0``
``SEMCACHE_BATCHING``       dynamic batching of embeddings       ``true``
``SEMCACHE_TORCH_THREADS``  model threads (0: torch's default)   ``1``
``SEMCACHE_EMBED_PROCESS``  run the model in a child process     ``true``
``SEMCACHE_EMBED_PRECISION`` ``auto``, ``fp32`` or ``bf16``      ``auto`` (bf16 where native)
==========================  ===================================  ==============================

Tokens: ``SEMCACHE_TOKENS`` is a JSON object ``{"token": "tenant", "admin-token": null}`` or a
comma list ``token=tenant,admin-token``. A token bound to a tenant works only in that namespace;
a token without one (an admin) may name any namespace and reach the global endpoints (stats,
metrics, expire). With no tokens every endpoint is open: bind to 127.0.0.1 then. Tags and tag
counts are fixed limits of the API (:data:`MAX_TAGS` tags of at most :data:`MAX_TAG_CHARS`
characters, 422 beyond).

Upstream key: when ``SEMCACHE_UPSTREAM_API_KEY`` is set it is sent upstream on every miss. When it
is not and auth is off, the caller's own ``Authorization`` header is passed through (the sidecar
is then a transparent proxy for callers that hold their own keys).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: most tags one entry or one invalidation may carry (422 beyond)
MAX_TAGS = 64
#: longest tag accepted (422 beyond)
MAX_TAG_CHARS = 256
#: longest namespace name accepted (422 beyond)
MAX_NAMESPACE_CHARS = 256


def parse_tokens(value: Any) -> dict[str, str | None]:
    """Tokens from a dict, a JSON object, or ``token=tenant,token2`` (no tenant: admin)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        else:
            out: dict[str, str | None] = {}
            for item in text.split(","):
                item = item.strip()
                if not item:
                    continue
                token, _, tenant = item.partition("=")
                out[token.strip()] = tenant.strip() or None
            value = out
    if not isinstance(value, dict):
        raise ValueError("tokens must be a mapping of token to tenant (or null)")
    tokens: dict[str, str | None] = {}
    for token, tenant in value.items():
        if not isinstance(token, str) or len(token) < 8:
            raise ValueError("each token must be a string of at least 8 characters")
        if tenant in ("", "*"):
            tenant = None
        if tenant is not None and not isinstance(tenant, str):
            raise ValueError(f"the tenant of a token must be a string or null, not {tenant!r}")
        tokens[token] = tenant
    return tokens


class Settings(BaseSettings):
    """Configuration of ``semcache serve`` (environment variables ``SEMCACHE_*``)."""

    model_config = SettingsConfigDict(env_prefix="SEMCACHE_", extra="ignore")

    data: Path = Field(Path("indexes/default"), description="the cache's data folder")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    upstream: str | None = Field(
        "https://api.openai.com/v1", description="OpenAI-compatible base URL that misses go to"
    )
    upstream_api_key: SecretStr | None = None
    upstream_timeout: float = Field(
        60.0, gt=0, description="seconds one upstream connect or read may take (504 beyond)"
    )
    upstream_deadline: float = Field(
        120.0,
        gt=0,
        description="seconds a whole upstream answer may take, reads included, however slowly "
        "it trickles (504 beyond); single-flight followers wait at most this long too",
    )
    upstream_max_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest upstream JSON answer read (502 beyond)"
    )
    tokens: Annotated[dict[str, str | None], NoDecode] = Field(default_factory=dict)
    default_namespace: str = Field("default", min_length=1)
    max_prompt_chars: int = Field(32_000, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_response_chars: int = Field(200_000, ge=1)
    max_metadata_bytes: int = Field(16 * 1024, ge=2)
    max_scope_bytes: int = Field(16 * 1024, ge=2)
    shutdown_grace: float = Field(
        10.0,
        ge=0,
        description="seconds SIGTERM waits for requests in flight before the cache is closed "
        "(and its index checkpointed)",
    )
    threshold: float | None = Field(None, ge=-1.0, le=1.0)
    target_error: float | None = Field(None, gt=0.0, lt=1.0)
    default_ttl: float | None = Field(None, ge=0)
    max_entries: int | None = Field(None, ge=1)
    max_temperature: float = 1.0
    cache_seeded: bool = True
    cache_tools: bool = True
    batching: bool = True
    batch_max_size: int = Field(64, ge=1)
    batch_max_wait_ms: float = Field(5.0, ge=0, le=1000)
    cache_threads: int = Field(
        8, ge=1, description="worker threads that run blocking cache calls at the same time"
    )
    torch_threads: int = Field(
        1,
        ge=0,
        description="intra-op threads of the embedding model (0: torch's default). One leaves "
        "the other cores to HTTP, SQLite and the index; more threads spinning beside the event "
        "loop made the sidecar many times slower on 2 cores",
    )
    embed_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="arithmetic of the embedding model: bf16 embeds batches about 1.8x as fast "
        "on CPUs with native bf16 (AVX512-BF16, AMX) and moves a similarity by at most ~0.002; "
        "auto picks it where the CPU has it",
    )
    embed_process: bool = Field(
        True,
        description="run the embedding model in a child process, where the server's own Python "
        "work cannot slow it down (in-process, a batch took 2-3x longer under load)",
    )
    strict_params: bool = Field(
        True,
        description="reject chat request fields the installed openai SDK does not know (422)",
    )
    log_level: str = "info"

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, value: Any) -> dict[str, str | None]:
        return parse_tokens(value)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)
