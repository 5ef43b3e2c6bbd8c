"""Prometheus metrics of the sidecar, in a registry of its own per app (``GET /metrics``).

A registry per app (not the global default) keeps two apps in one process, as tests create them,
from colliding, and keeps foreign process metrics out unless asked for.

=============================================  ==============================================
metric                                         meaning
=============================================  ==============================================
``semcache_lookups_total{endpoint}``           cache lookups (chat, api)
``semcache_hits_total{tier}``                  hits by tier: ``l1`` (exact), ``semantic``
``semcache_misses_total``                      lookups without a hit
``semcache_bypass_total{reason}``              chat requests not cached (n>1, skip, ...)
``semcache_lookup_seconds``                    histogram: time of a cache lookup
``semcache_request_seconds{endpoint,outcome}`` histogram: time of a whole request
``semcache_best_similarity{outcome}``          histogram: best candidate's similarity,
                                               ``accepted`` (a hit) or ``near_miss``
``semcache_entries``                           live entries (read from the store on scrape)
``semcache_invalidations_total{pattern}``      invalidation calls: tags, version, semantic,
                                               ttl, delete, update
``semcache_invalidated_entries_total{pattern}`` entries those calls removed
``semcache_cache_invalidated_entries{pattern}`` entries the cache removed, all sources (CDC too)
``semcache_stores_total``                      answers stored
``semcache_store_skipped_total{reason}``       answers not stored (finish_reason, tools, ...)
``semcache_upstream_requests_total``           misses forwarded upstream
``semcache_upstream_errors_total{kind}``       status, timeout, connect, invalid, stream
``semcache_upstream_seconds``                  histogram: upstream latency
``semcache_tokens_saved_total``                tokens the served hits did not spend
``semcache_embed_batches_total`` / ``..._texts_total``  dynamic batching of embeddings
=============================================  ==============================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from ..types import Hit

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIMILARITY_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)


class Metrics:
    """Every metric the sidecar exports, registered in ``self.registry``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.lookups = Counter("semcache_lookups", "Cache lookups.", ["endpoint"], registry=r)
        self.hits = Counter("semcache_hits", "Cache hits by tier.", ["tier"], registry=r)
        self.misses = Counter("semcache_misses", "Lookups without a hit.", registry=r)
        self.singleflight_waits = Counter(
            "semcache_singleflight_waits",
            "Misses answered by waiting for an identical request already at the upstream.",
            registry=r,
        )
        self.bypass = Counter(
            "semcache_bypass", "Chat requests that bypass the cache.", ["reason"], registry=r
        )
        self.lookup_seconds = Histogram(
            "semcache_lookup_seconds",
            "Time of a cache lookup.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "semcache_request_seconds",
            "Time of a whole request.",
            ["endpoint", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.best_similarity = Histogram(
            "semcache_best_similarity",
            "Similarity of the best candidate: accepted (hit) or near_miss.",
            ["outcome"],
            buckets=SIMILARITY_BUCKETS,
            registry=r,
        )
        self.entries = Gauge("semcache_entries", "Live entries in the store.", registry=r)
        self.invalidations = Counter(
            "semcache_invalidations", "Invalidation calls by pattern.", ["pattern"], registry=r
        )
        self.invalidated = Counter(
            "semcache_invalidated_entries",
            "Entries removed by invalidations, by pattern.",
            ["pattern"],
            registry=r,
        )
        self.stores = Counter("semcache_stores", "Answers stored.", registry=r)
        self.store_skipped = Counter(
            "semcache_store_skipped", "Answers not stored, by reason.", ["reason"], registry=r
        )
        self.upstream_requests = Counter(
            "semcache_upstream_requests", "Misses forwarded upstream.", registry=r
        )
        self.upstream_errors = Counter(
            "semcache_upstream_errors", "Upstream failures by kind.", ["kind"], registry=r
        )
        self.upstream_seconds = Histogram(
            "semcache_upstream_seconds", "Upstream latency.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens_saved = Counter(
            "semcache_tokens_saved", "Tokens the served hits did not spend.", registry=r
        )
        self.cache_invalidated = Gauge(
            "semcache_cache_invalidated_entries",
            "Entries the cache has removed by pattern since it opened (all sources: API, "
            "change data capture, expiry sweeps), read from cache.stats() on scrape.",
            ["pattern"],
            registry=r,
        )
        self.embed_batches = Gauge(
            "semcache_embed_batches_total", "Embedding batches run by the batcher.", registry=r
        )
        self.embed_texts = Gauge(
            "semcache_embed_texts_total", "Texts embedded by the batcher.", registry=r
        )

    def looked_up(self, hit: Hit | None, nearest: float | None, seconds: float) -> None:
        """Count one lookup's outcome: its latency, hit tier or miss, and the similarity of
        the answer served or, on a miss, of the nearest candidate (how close it came)."""
        self.lookup_seconds.observe(seconds)
        if hit is None:
            self.misses.inc()
            if nearest is not None:
                self.best_similarity.labels("near_miss").observe(nearest)
            return
        self.hits.labels(hit.tier).inc()
        self.best_similarity.labels("accepted").observe(hit.similarity)

    def invalidation(self, pattern: str, removed: int) -> None:
        self.invalidations.labels(pattern).inc()
        if removed:
            self.invalidated.labels(pattern).inc(removed)

    def skipped(self, reason: str | None) -> None:
        self.store_skipped.labels(_label(reason)).inc()

    def bypassed(self, reason: str | None) -> None:
        self.bypass.labels(_label(reason)).inc()

    def refresh(self, stats: dict[str, Any], embedder: Any = None) -> None:
        """Set the gauges read from the cache at scrape time."""
        self.entries.set(float(stats.get("entries", 0)))
        by_pattern = stats.get("invalidations")
        if isinstance(by_pattern, dict):
            for pattern, count in by_pattern.items():
                self.cache_invalidated.labels(str(pattern)).set(float(count))
        batch_stats = getattr(embedder, "stats", None)
        if batch_stats is not None and hasattr(batch_stats, "batches"):
            self.embed_batches.set(batch_stats.batches)
            self.embed_texts.set(batch_stats.texts)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _label(reason: str | None) -> str:
    """A low-cardinality label from a reason text (numbers and quotes cut off)."""
    if not reason:
        return "unknown"
    text = reason.replace("'", "").split(":")[0].strip()
    return text[:48] or "unknown"
