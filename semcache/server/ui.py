"""``GET /ui``: the sidecar's status page, one server-rendered HTML page (admin tokens only).

Everything is drawn on the server (inline CSS and SVG, no script, nothing fetched from the
internet); the page reloads itself every ``REFRESH_SECONDS``. It shows:

* the hit rate, overall and per interval between page loads, and wrong-answer feedback (when the
  cache's ``stats()`` reports it);
* the histogram of the best candidate's similarity for hits and near misses (the sidecar's
  ``semcache_best_similarity`` metric) with the hit policy's operating point
  (``policy.min_similarity``) marked;
* entries removed by invalidation pattern (all sources, from ``cache.stats()``), the sidecar's
  invalidation calls, and what changed since the previous load;
* change data capture: each slot's position file in ``<data>/cdc`` (LSN, transactions, how long
  ago the last one was applied), or "none";
* the index replica's propagation delay (store change-log position minus the replica's), or
  "none" where the cache does not report it; the largest namespaces where ``stats()`` reports
  them.

"Over time" is the history this process has sampled: one sample per page load (at most one a
second, the last ``HISTORY`` kept), so the chart grows while someone watches the page.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from .app import principal_of, state_of
from .schemas import ErrorResponse

router = APIRouter(tags=["ui"])

REFRESH_SECONDS = 5
HISTORY = 240
PATTERNS = ("ttl", "delete", "tag", "version", "semantic", "cdc")


@dataclass(frozen=True)
class Sample:
    """Cumulative counts at one page load."""

    at: float
    lookups: int
    hits: int
    feedback_wrong: int | None
    removed: dict[str, int]


def _history(request: Request) -> deque[Sample]:
    history: deque[Sample] | None = getattr(request.app.state, "semcache_ui_history", None)
    if history is None:
        history = deque(maxlen=HISTORY)
        request.app.state.semcache_ui_history = history
    return history


def _metric_samples(registry: Any) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for m in registry.collect() for s in m.samples]


def similarity_histogram(registry: Any) -> tuple[list[float], dict[str, list[int]]]:
    """Bucket upper bounds and per-bucket counts (not cumulative) for each outcome of the
    ``semcache_best_similarity`` histogram."""
    cumulative: dict[str, dict[float, float]] = {"accepted": {}, "near_miss": {}}
    for name, labels, value in _metric_samples(registry):
        if name != "semcache_best_similarity_bucket" or labels.get("outcome") not in cumulative:
            continue
        cumulative[labels["outcome"]][float(labels["le"])] = value
    bounds = sorted({b for counts in cumulative.values() for b in counts if math.isfinite(b)})
    per_bucket: dict[str, list[int]] = {}
    for outcome, counts in cumulative.items():
        previous, row = 0.0, []
        for bound in bounds:
            now = counts.get(bound, previous)
            row.append(int(now - previous))
            previous = now
        per_bucket[outcome] = row
    return bounds, per_bucket


def _api_invalidations(registry: Any) -> dict[str, int]:
    calls: dict[str, int] = {}
    for name, labels, value in _metric_samples(registry):
        if name == "semcache_invalidations_total":
            calls[labels.get("pattern", "?")] = int(value)
    return calls


def cdc_positions(folder: Path) -> list[dict[str, Any]]:
    """The CDC consumers' position files in ``<data>/cdc`` (written by ``semcache cdc``)."""
    rows = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            rows.append({"slot": path.stem, "error": "unreadable position file"})
    return rows


def _lsn(value: Any) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}" if isinstance(value, int) else "?"


def _e(value: Any) -> str:
    return html.escape(str(value))


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _hit_rate_chart(history: list[Sample]) -> str:
    """A line of the hit rate in each interval between samples (SVG, 600x160)."""
    points = []
    for before, after in itertools.pairwise(history):
        lookups = after.lookups - before.lookups
        if lookups > 0:
            points.append((after.at, (after.hits - before.hits) / lookups))
    if len(points) < 2:
        return (
            '<p class="muted" id="hit-rate-chart">The chart needs two intervals with lookups; '
            f"it grows as this page reloads (every {REFRESH_SECONDS} s).</p>"
        )
    t0, t1 = points[0][0], points[-1][0]
    span = max(t1 - t0, 1e-9)
    coords = " ".join(
        f"{40 + 550 * (t - t0) / span:.1f},{150 - 140 * rate:.1f}" for t, rate in points
    )
    return (
        '<svg id="hit-rate-chart" width="600" height="170" role="img" '
        'aria-label="hit rate per interval">'
        '<line x1="40" y1="10" x2="40" y2="150" class="axis"/>'
        '<line x1="40" y1="150" x2="590" y2="150" class="axis"/>'
        '<text x="4" y="14">100%</text><text x="10" y="150">0%</text>'
        f'<polyline points="{coords}" class="line"/>'
        f'<text x="40" y="166">{_e(time.strftime("%H:%M:%S", time.localtime(t0)))}</text>'
        f'<text x="530" y="166">{_e(time.strftime("%H:%M:%S", time.localtime(t1)))}</text>'
        "</svg>"
    )


def _histogram_chart(bounds: list[float], counts: dict[str, list[int]], point: float) -> str:
    """Bars of hits and near misses per similarity bucket, the operating point as a line."""
    if not bounds:
        return '<p class="muted">no buckets</p>'
    top = max(1, *counts["accepted"], *counts["near_miss"])
    width = 560 / len(bounds)
    lo = bounds[0] - (bounds[1] - bounds[0] if len(bounds) > 1 else 0.1)
    parts = [
        '<svg id="similarity-histogram" width="620" height="200" role="img" '
        'aria-label="similarity of hits and near misses">',
        '<line x1="40" y1="170" x2="600" y2="170" class="axis"/>',
    ]
    for i, bound in enumerate(bounds):
        x = 40 + i * width
        for j, outcome in enumerate(("accepted", "near_miss")):
            n = counts[outcome][i]
            h = 150 * n / top
            parts.append(
                f'<rect x="{x + 2 + j * (width - 4) / 2:.1f}" y="{170 - h:.1f}" '
                f'width="{(width - 4) / 2:.1f}" height="{h:.1f}" class="{outcome}">'
                f"<title>{outcome} &le; {bound}: {n}</title></rect>"
            )
        parts.append(  # each bucket's upper bound, at its right edge
            f'<text x="{x + width:.1f}" y="186" class="tick" text-anchor="end">{bound:g}</text>'
        )
    # the operating point, placed within its bucket by linear interpolation
    edges = [lo, *bounds]
    x_point = 40.0
    for i in range(len(bounds)):
        if edges[i] <= point <= edges[i + 1] or i == len(bounds) - 1:
            frac = (point - edges[i]) / max(edges[i + 1] - edges[i], 1e-9)
            x_point = 40 + (i + min(max(frac, 0.0), 1.0)) * width
            break
    parts.append(
        f'<line x1="{x_point:.1f}" y1="10" x2="{x_point:.1f}" y2="170" class="point"/>'
        f'<text x="{x_point + 4:.1f}" y="20" class="point-label">operating point '
        f"{point:.3f}</text></svg>"
    )
    return "".join(parts)


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1000px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:right;border-bottom:1px solid #eee}
th:first-child,td:first-child{text-align:left}.muted{color:#777}
.big{font-size:28px;font-weight:600;margin-right:24px}
svg text{font-size:11px;fill:#555}.axis{stroke:#999}.line{fill:none;stroke:#2a6fdb;stroke-width:2}
.accepted{fill:#2a9d55}.near_miss{fill:#e0a030}.point{stroke:#c0392b;stroke-dasharray:4 3}
.point-label{fill:#c0392b}.legend span{display:inline-block;width:12px;height:12px;margin:0 4px}
.legend .accepted{background:#2a9d55}.legend .near_miss{background:#e0a030}
"""


def render(state: Any, stats: dict[str, Any], position: int | None, history: list[Sample]) -> str:
    """The whole page as HTML (pure: everything it shows is passed in)."""
    cache = state.cache
    metrics = state.metrics
    lookups, hits = int(stats.get("lookups", 0)), int(stats.get("hits", 0))
    wrong = stats.get("feedback_wrong")
    bounds, counts = similarity_histogram(metrics.registry)
    point = float(getattr(cache.policy, "min_similarity", float("nan")))
    calls = _api_invalidations(metrics.registry)
    removed = stats.get("invalidations") or {}
    previous = history[-2] if len(history) > 1 else None

    rows = []
    for sample, nxt in list(itertools.pairwise(history))[-8:][::-1]:
        d_lookups = nxt.lookups - sample.lookups
        d_wrong = (
            "n/a"
            if nxt.feedback_wrong is None or sample.feedback_wrong is None
            else nxt.feedback_wrong - sample.feedback_wrong
        )
        rows.append(
            f"<tr><td>{_e(time.strftime('%H:%M:%S', time.localtime(nxt.at)))}</td>"
            f"<td>{d_lookups}</td><td>{_pct(nxt.hits - sample.hits, d_lookups)}</td>"
            f"<td>{_e(d_wrong)}</td></tr>"
        )
    interval_table = (
        "<table id='intervals'><tr><th>until</th><th>lookups</th><th>hit rate</th>"
        "<th>wrong answers reported</th></tr>" + "".join(rows) + "</table>"
        if rows
        else "<p class='muted'>one sample so far</p>"
    )

    inv_rows = []
    for pattern in PATTERNS:
        total = int(removed.get(pattern, 0))
        recent = total - previous.removed.get(pattern, 0) if previous else 0
        api = calls.get({"tag": "tags"}.get(pattern, pattern), 0)
        inv_rows.append(
            f"<tr><td>{_e(pattern)}</td><td id='removed-{_e(pattern)}'>{total}</td>"
            f"<td>{recent}</td><td>{api}</td></tr>"
        )

    cdc_rows = []
    for pos in cdc_positions(Path(cache.path) / "cdc"):
        age = time.time() - float(pos.get("updated_at") or 0.0)
        cdc_rows.append(
            f"<tr><td>{_e(pos.get('slot', '?'))}</td><td>{_e(_lsn(pos.get('lsn')))}</td>"
            f"<td>{_e(pos.get('transactions', '?'))}</td>"
            f"<td>{_e(f'{age:.0f} s ago' if pos.get('updated_at') else '?')}</td></tr>"
        )
    cdc = (
        "<table id='cdc'><tr><th>slot</th><th>applied up to LSN</th><th>transactions</th>"
        "<th>last applied</th></tr>" + "".join(cdc_rows) + "</table>"
        if cdc_rows
        else "<p id='cdc'>none (no change-data-capture consumer has written a position "
        "in this data folder)</p>"
    )
    replica_seq = stats.get("log_position")
    if position is not None and isinstance(replica_seq, int):
        replica = (
            f"<p id='replica'>index replica: {max(0, position - replica_seq)} change(s) behind "
            f"the store (store at {position}, replica at {replica_seq})</p>"
        )
    else:
        replica = "<p id='replica'>none (this cache does not report a replica position)</p>"
    namespaces = stats.get("namespaces")
    if isinstance(namespaces, dict) and namespaces:
        largest = sorted(namespaces.items(), key=lambda kv: -int(kv[1]))[:10]
        ns_html = (
            "<table id='namespaces'><tr><th>namespace</th><th>entries</th></tr>"
            + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in largest)
            + "</table>"
        )
    else:
        ns_html = (
            "<p id='namespaces' class='muted'>not reported (this cache's stats() has no "
            "per-namespace counts)</p>"
        )
    wrong_html = (
        f"<span class='big' id='feedback-wrong'>{int(wrong)}</span> wrong answers reported"
        if wrong is not None
        else "<span id='feedback-wrong' class='muted'>wrong-answer feedback: not recorded "
        "(this cache's stats() has no feedback count)</span>"
    )
    # the store as people see it: a postgresql:// URL without its password (the folder else)
    shown = getattr(cache, "location", cache.path)
    near = sum(counts.get("near_miss", []))
    accepted = sum(counts.get("accepted", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<link rel="icon" href="data:,">
<title>semcache status</title><style>{STYLE}</style></head>
<body>
<h1>semcache status</h1>
<p class="muted">{_e(shown)} &middot; model {_e(stats.get("model_id", "?"))} &middot;
policy {_e(stats.get("policy", "?"))} &middot;
<span id="entries">{_e(stats.get("entries", 0))}</span> entries,
{_e(stats.get("bytes", 0))} bytes &middot; reloads every {REFRESH_SECONDS} s</p>

<h2>Hit rate</h2>
<p><span class="big" id="hit-rate">{_pct(hits, lookups)}</span>
<span id="hits">{hits}</span> hits of <span id="lookups">{lookups}</span> lookups
(exact {_e(stats.get("hits_l1", 0))}, semantic {_e(stats.get("hits_semantic", 0))})</p>
<p>{wrong_html}</p>
{_hit_rate_chart(history)}
{interval_table}

<h2>Similarity of hits and near misses</h2>
<p class="legend"><span class="accepted"></span>hits: <b id="accepted-count">{accepted}</b>
<span class="near_miss"></span>near misses (the best candidate of a miss):
<b id="near-miss-count">{near}</b>; each bar counts similarities up to the bound under its right
edge; the dashed line is the policy's operating point ({point:.3f}).</p>
{_histogram_chart(bounds, counts, point)}

<h2>Invalidations</h2>
<table id="invalidations"><tr><th>pattern</th><th>entries removed (all sources)</th>
<th>since last load</th><th>sidecar API calls</th></tr>{"".join(inv_rows)}</table>

<h2>Change data capture</h2>
{cdc}
<h2>Replica propagation</h2>
{replica}
<h2>Largest namespaces</h2>
{ns_html}
</body></html>"""


def _read(cache: Any) -> tuple[dict[str, Any], int | None]:
    stats = cache.stats()
    position = cache.position() if hasattr(cache, "position") else None
    return stats, position


@router.get(
    "/ui",
    response_class=Response,  # as /metrics: the errors stay documented as JSON
    responses={
        200: {"content": {"text/html": {"schema": {"type": "string"}}}},
        **{code: {"model": ErrorResponse} for code in (401, 403, 503)},
    },
)
async def ui(request: Request) -> Response:
    """The status page (HTML); admin tokens only, like ``/metrics``."""
    principal_of(request).require_admin("/ui")
    state = state_of(request)
    cache = state.require_cache()
    stats, position = await state.run(_read, cache)
    history = _history(request)
    removed = {p: int((stats.get("invalidations") or {}).get(p, 0)) for p in PATTERNS}
    wrong = stats.get("feedback_wrong")
    sample = Sample(
        time.time(),
        int(stats.get("lookups", 0)),
        int(stats.get("hits", 0)),
        int(wrong) if wrong is not None else None,
        removed,
    )
    if not history or sample.at - history[-1].at >= 1.0:
        history.append(sample)
    else:
        history[-1] = sample
    page = render(state, stats, position, list(history))
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})
