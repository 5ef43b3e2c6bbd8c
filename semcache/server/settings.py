"""The sidecar's settings, each an environment variable ``SEMCACHE_<NAME>`` (pydantic-settings).

``semcache serve`` flags override them. The ones that matter most:

==========================  ===================================  ==============================
variable                    meaning                              default
==========================  ===================================  ==============================
``SEMCACHE_DATA``           the cache's data folder, or a        ``indexes/default``
                            ``postgresql://`` URL of a shared
                            store (see below)
``SEMCACHE_INDEX_DIR``      with a URL: folder of this replica's unset: a per-store folder
                            local index files                    under the user cache dir
``SEMCACHE_SCHEMA``         with a URL: the store's schema       ``semcache``
``SEMCACHE_CONSISTENCY``    with a URL: ``bounded`` or ``strong``  ``bounded``
                            (see SemanticCache)
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

Data: ``SEMCACHE_DATA`` (``semcache serve --data``) is a folder, or a ``postgresql://`` URL
that several sidecars share (each keeps its own index files in ``SEMCACHE_INDEX_DIR``). A URL is
kept as the string it is and handed to :class:`~semcache.SemanticCache` unchanged; what the
sidecar shows or logs of it has the password taken out (:attr:`Settings.data_shown`). Any other
``scheme://`` is refused (422) rather than taken for a folder name.

Upstream key: when ``SEMCACHE_UPSTREAM_API_KEY`` is set it is sent upstream on every miss. When it
is not and auth is off, the caller's own ``Authorization`` header is passed through (the sidecar
is then a transparent proxy for callers that hold their own keys).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..stores import is_store_url

# ``schema`` (SEMCACHE_SCHEMA) is the name the rest of semcache gives a PostgreSQL schema; as a
# field it hides pydantic's deprecated ``BaseModel.schema()``, which nothing here calls
warnings.filterwarnings(
    "ignore", message='Field name "schema" in "Settings" shadows', category=UserWarning
)

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

    data: Path | str = Field(
        Path("indexes/default"),
        description="the cache's data folder, or a postgresql:// URL (kept as a string)",
        repr=False,  # a URL may carry a password: repr shows data_shown instead
    )
    index_dir: Path | None = Field(
        None,
        description="with a postgresql:// data URL: the folder of this replica's local index "
        "files (default: a folder per store under the user cache directory)",
    )
    schema: str = Field(  # shadows BaseModel.schema(), the deprecated v1 method (see above)
        "semcache",
        min_length=1,
        description="with a postgresql:// data URL: the schema that holds the cache's tables",
    )
    consistency: Literal["bounded", "strong"] = Field(
        "bounded",
        description="with a postgresql:// data URL: 'bounded' (L1 hits and other replicas' new "
        "entries lag by the propagation delay) or 'strong' (every lookup first catches up "
        "with the store: one more round trip)",
    )
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

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, value: Any) -> Path | str:
        """A ``postgresql://`` URL stays a string (``Path`` would fold its ``//``); anything
        else is a folder. Another ``scheme://`` is refused, not taken for a folder name."""
        if isinstance(value, str):
            if is_store_url(value):
                return value
            if "://" in value:
                scheme = value.split("://", 1)[0]
                raise ValueError(
                    f"data must be a folder or a postgresql:// URL, not a {scheme}:// URL"
                )
            return Path(value)
        if isinstance(value, Path):
            return value
        raise ValueError("data must be a folder or a postgresql:// URL")

    @property
    def data_is_url(self) -> bool:
        """Whether ``data`` names a shared PostgreSQL store (not a folder)."""
        return isinstance(self.data, str)

    @property
    def data_shown(self) -> str:
        """``data`` as logs and pages show it: a URL without its password."""
        if not isinstance(self.data, str):
            return str(self.data)
        from ..pgstore import redact  # needs the postgres extra, which a URL needs anyway

        return redact(self.data)

    def cache_kwargs(self) -> dict[str, Any]:
        """Where the data lives, as :class:`~semcache.SemanticCache` keywords: ``index_dir``,
        ``schema`` and ``consistency`` only for a URL (a data folder holds its own index, has
        no schema, and is always as consistent as the strong mode)."""
        if not self.data_is_url:
            return {}
        kwargs: dict[str, Any] = {"schema": self.schema, "consistency": self.consistency}
        if self.index_dir is not None:
            kwargs["index_dir"] = self.index_dir
        return kwargs

    def __repr_args__(self) -> Any:
        yield "data", self.data_shown
        yield from super().__repr_args__()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)
