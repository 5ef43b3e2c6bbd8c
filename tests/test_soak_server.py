"""A short soak (about 20 s) of the sidecar: 32 clients of two tenants, a fake upstream of
200-800 ms that fails 2% of its calls, every invalidation kind; every answer checked against the
key (the long run, with figures per minute: evals/soak.py)."""

from __future__ import annotations

from evals.soak import run


def test_a_short_soak_serves_no_wrong_stale_or_cross_tenant_answer() -> None:
    report = run(20, clients=32, interval=5)
    text = "\n".join(report.lines())
    assert report.requests > 200, text
    assert report.checked > 100, text
    assert report.cross_tenant == 0, text
    assert report.wrong == 0, text  # near misses are counted apart (the hit policy's domain)
    assert report.stale == 0 and report.stale_ttl == 0, text
    assert report.unparseable == 0, text
    assert report.unexpected_5xx == 0 and report.transport_errors == 0, text
    assert report.outcomes["hit"] > 0 and report.outcomes["miss"] > 0, text
    assert set(report.invalidations) >= {"tag", "group", "similar", "delete", "expire"}, text
