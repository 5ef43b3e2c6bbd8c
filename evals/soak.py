"""Soak: many clients of two tenants against one sidecar for minutes, every answer checked.

Starts the fake OpenAI upstream (tests/fake_upstream.py) with realistic latency (200-800 ms a
call by default) that fails 2% of its calls with a 500, and one ``semcache serve`` process with
tokens for two tenants (``acme``, ``globex``) and an admin. Closed-loop clients (32 by default,
half per tenant, each on its own connection) send, for the same question list in both tenants:

- chat completions (80%), a fifth of them streamed, in paraphrases of the questions (semantic
  hits), each tagged with its question's tag and group tag; every seventh question lives 15 s;
- cache API stores and lookups (10%) in a scope of their own;
- invalidations (10%) of every kind: a question's tag, a group's tag, a namespace bump (rare), a
  semantic invalidation (admin, every namespace), deleting an entry that was just served, and an
  expiry sweep (admin).

The answer key: with an ``openai-project`` header the fake upstream's answer names the tenant,
the upstream call's number and time and the question it was asked, so every served answer is
checked for

- cross-tenant: an answer made for the other tenant;
- wrong: an answer to another question. Near misses (the same question about another item
  number, "item 366" vs "item 367", a quality question of the hit policy) are counted apart from
  other wrong answers;
- stale: an answer computed before an invalidation that covered its question (its upstream call
  came before the invalidation was sent) served to a request that began after it returned, or an
  answer served after its TTL.

Printed: requests, errors by kind (relayed upstream failures are the 502s with code
``upstream_failed``; anything else 5xx is unexpected), the counts above, and per minute the
requests, p50/p99 latency and the sidecar's resident memory (with its model process).

Usage: python evals/soak.py [--minutes 10] [--clients 32] [--latency 0.2-0.8] [--fail-rate 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fake_upstream import start_sidecar, start_upstream, stop  # noqa: E402

ADMIN = "soak-admin-token-1"
TENANT_TOKENS = {"acme": "soak-acme-token-01", "globex": "soak-globex-token"}
MODEL = "gpt-4o-mini"
TTL = 15.0

SUBJECTS = [
    "reset my password",
    "cancel my subscription",
    "change my billing address",
    "export my data to CSV",
    "enable two-factor authentication",
    "delete my account",
    "invite a colleague to my workspace",
    "upgrade to the annual plan",
    "get a refund",
    "connect the Slack integration",
    "change the language of the interface",
    "recover a deleted file",
    "set up single sign-on",
    "download my invoices",
    "change my email address",
    "create an API key",
    "archive an old project",
    "turn off email notifications",
    "add a payment card",
    "transfer ownership of a workspace",
]
PHRASINGS = ["How do I {s}?", "What are the steps to {s}?", "how can I {s}", "Tell me how to {s}."]
NEAR_NUMBERS = list(range(360, 372))
NEAR_PHRASINGS = ["What is the list price of item {n}?", "How much does item {n} cost?"]

_ANSWER = re.compile(r"^Answer #(\d+) \[project=([^\]]+)\] \(at ([0-9.]+)\): (.*)$", re.S)
_API = re.compile(r"^API answer item=(\S+) tenant=(\S+) at=([0-9.]+)$")


@dataclass(frozen=True)
class Question:
    """One question of the answer key: its id, its phrasings, its tags, its TTL."""

    qid: str
    phrasings: tuple[str, ...]
    group: str
    near: bool  # one of the near-miss family (same words, another item number)
    ttl: float | None

    @property
    def tags(self) -> list[str]:
        return [f"q-{self.qid}", f"group-{self.group}"]


def questions() -> list[Question]:
    out = []
    for i, subject in enumerate(SUBJECTS):
        out.append(
            Question(
                f"s{i}",
                tuple(p.format(s=subject) for p in PHRASINGS),
                str(i % 5),
                False,
                TTL if i % 7 == 3 else None,
            )
        )
    for n in NEAR_NUMBERS:
        out.append(Question(f"n{n}", tuple(p.format(n=n) for p in NEAR_PHRASINGS), "n", True, None))
    return out


@dataclass
class Report:
    """What a soak run did and found."""

    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    invalidations: Counter[str] = field(default_factory=Counter)
    checked: int = 0
    cross_tenant: int = 0
    wrong: int = 0
    near_miss_wrong: int = 0
    stale: int = 0
    stale_ttl: int = 0
    unparseable: int = 0
    relayed_upstream_failures: int = 0
    unexpected_5xx: int = 0
    transport_errors: int = 0
    examples: list[str] = field(default_factory=list)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    requests_per: Counter[int] = field(default_factory=Counter)
    rss: dict[int, float] = field(default_factory=dict)
    interval: float = 60.0
    seconds: float = 0.0

    def note(self, kind: str, text: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {text[:300]}")

    def lines(self) -> list[str]:
        unit = "minute" if self.interval == 60 else f"{self.interval:g}-s slot"
        out = [
            f"requests: {self.requests} in {self.seconds:.0f} s "
            f"({self.requests / max(self.seconds, 1e-9):.0f} req/s)",
            "statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())),
            "chat outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items())),
            "invalidations: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(self.invalidations.items())),
            f"answers checked against the key: {self.checked}",
            f"cross-tenant answers: {self.cross_tenant}",
            f"wrong answers: {self.wrong} (near misses, another item number: "
            f"{self.near_miss_wrong}, counted apart)",
            f"stale answers: {self.stale} after an invalidation, {self.stale_ttl} past their TTL",
            f"unparseable answers: {self.unparseable}",
            f"5xx: {self.relayed_upstream_failures} relayed upstream failures (502), "
            f"{self.unexpected_5xx} unexpected; transport errors: {self.transport_errors}",
            f"per {unit}: requests, p50, p99 latency, resident memory (sidecar + model process)",
        ]
        for slot in sorted(self.requests_per):
            lat = sorted(self.latencies.get(slot, []))
            p50 = statistics.median(lat) * 1000 if lat else 0.0
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0
            rss = self.rss.get(slot)
            out.append(
                f"  {unit} {slot + 1}: {self.requests_per[slot]} requests, p50 {p50:.0f} ms, "
                f"p99 {p99:.0f} ms, RSS {rss:.0f} MiB" if rss is not None else
                f"  {unit} {slot + 1}: {self.requests_per[slot]} requests, p50 {p50:.0f} ms, "
                f"p99 {p99:.0f} ms"
            )
        slots = sorted(self.rss)
        if len(slots) >= 2:
            half = slots[len(slots) // 2 :]
            first, last = self.rss[half[0]], self.rss[half[-1]]
            out.append(
                f"memory over the last {len(half)} of {len(slots)} {unit}s: "
                f"{first:.0f} -> {last:.0f} MiB "
                f"({(last - first) / first * 100:+.1f}%)"
            )
        out += [f"  e.g. {e}" for e in self.examples]
        return out


class Soak:
    """The driver: clients, the answer key, the floors that invalidations set."""

    def __init__(self, base: str, upstream: str, report: Report, seed: int) -> None:
        self.base = base  # no /v1
        self.upstream_stats = upstream.removesuffix("/v1") + "/_stats"
        self.report = report
        self.questions = questions()
        self.by_text = {p: q for q in self.questions for p in q.phrasings}
        self.by_id = {q.qid: q for q in self.questions}
        self.rng = random.Random(seed)
        #: (tenant, qid) -> the upstream call count before the last invalidation covering it was
        #: sent, and the time that invalidation returned
        self.floor: dict[tuple[str, str], tuple[int, float]] = {}
        #: (tenant, qid) -> entry id last served (for the delete invalidation)
        self.served: dict[tuple[str, str], str] = {}
        self.t0 = time.monotonic()

    # -- the answer key ------------------------------------------------------------------
    def check_chat(self, tenant: str, q: Question, content: str, hit: bool, started: float) -> None:
        report = self.report
        report.checked += 1
        m = _ANSWER.match(content)
        if m is None:
            report.unparseable += 1
            report.note("unparseable", content)
            return
        n, project, at, asked = int(m.group(1)), m.group(2), float(m.group(3)), m.group(4)
        if project != tenant:
            report.cross_tenant += 1
            report.note("cross-tenant", f"{tenant} asked {q.qid}, got {project}'s: {content}")
            return
        got = self.by_text.get(asked)
        if got is None:
            report.unparseable += 1
            report.note("unknown question", content)
            return
        if got.qid != q.qid:
            if got.near and q.near:
                report.near_miss_wrong += 1
                report.note("near miss", f"asked {q.qid}, served {got.qid}")
            else:
                report.wrong += 1
                report.note("wrong", f"asked {q.qid}, served {got.qid}: {content}")
            return
        floor = self.floor.get((tenant, q.qid))
        if floor is not None and started > floor[1] and n <= floor[0]:
            report.stale += 1
            report.note("stale", f"{tenant} {q.qid}: call #{n} <= #{floor[0]} (hit={hit})")
        if hit and q.ttl is not None and time.time() > at + q.ttl + 1.0:
            report.stale_ttl += 1
            report.note("past TTL", f"{tenant} {q.qid}: made {time.time() - at:.1f} s ago")

    def check_api(self, tenant: str, q: Question, body: dict[str, Any]) -> None:
        if not body.get("hit"):
            return
        report = self.report
        report.checked += 1
        m = _API.match(body.get("response") or "")
        if m is None:
            report.unparseable += 1
            report.note("unparseable api", str(body.get("response")))
            return
        qid, owner = m.group(1), m.group(2)
        if owner != tenant:
            report.cross_tenant += 1
            report.note("cross-tenant api", f"{tenant} asked {q.qid}, got {owner}'s")
        elif qid != q.qid:
            if self.by_id[qid].near and q.near:
                report.near_miss_wrong += 1
            else:
                report.wrong += 1
                report.note("wrong api", f"asked {q.qid}, served {qid}")

    # -- the requests --------------------------------------------------------------------
    def _status(self, response: httpx.Response) -> None:
        report = self.report
        report.statuses[str(response.status_code)] += 1
        if response.status_code >= 500:
            code = ""
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = response.json()["error"]["code"]
            if response.status_code == 502 and code == "upstream_failed":
                report.relayed_upstream_failures += 1
            else:
                report.unexpected_5xx += 1
                report.note("5xx", f"{response.status_code} {response.text[:200]}")

    async def chat(self, client: httpx.AsyncClient, tenant: str) -> None:
        q = self.rng.choice(self.questions)
        text = self.rng.choice(q.phrasings)
        stream = self.rng.random() < 0.2
        options: dict[str, Any] = {"tags": q.tags}
        if q.ttl is not None:
            options["ttl"] = q.ttl
        body = {
            "model": MODEL,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "You are the support assistant."},
                {"role": "user", "content": text},
            ],
            "stream": stream,
            "semcache": options,
        }
        started = time.monotonic()
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                raw = (await response.aread()).decode()
            self._status(response)
            if response.status_code != 200:
                return
            content, errored = _sse_content(raw)
            if errored:
                self.report.outcomes["stream error event"] += 1
                return
        else:
            response = await client.post("/v1/chat/completions", json=body)
            self._status(response)
            if response.status_code != 200:
                return
            content = response.json()["choices"][0]["message"]["content"]
        outcome = response.headers.get("x-semcache", "?")
        self.report.outcomes[outcome] += 1
        if outcome == "hit":
            self.served[(tenant, q.qid)] = response.headers["x-semcache-entry-id"]
        self.check_chat(tenant, q, content, outcome == "hit", started)

    async def api(self, client: httpx.AsyncClient, tenant: str) -> None:
        q = self.rng.choice(self.questions)
        scope = {"model": "soak-api"}
        if self.rng.random() < 0.3:
            response = await client.post(
                "/v1/cache/store",
                json={
                    "prompt": self.rng.choice(q.phrasings),
                    "response": f"API answer item={q.qid} tenant={tenant} at={time.time():.3f}",
                    "scope": scope,
                    "tags": q.tags,
                },
            )
            self._status(response)
        else:
            response = await client.post(
                "/v1/cache/lookup", json={"prompt": self.rng.choice(q.phrasings), "scope": scope}
            )
            self._status(response)
            if response.status_code == 200:
                self.check_api(tenant, q, response.json())

    async def _count(self, client: httpx.AsyncClient) -> int:
        return int((await client.get(self.upstream_stats)).json()["total"])

    async def invalidate(
        self, client: httpx.AsyncClient, admin: httpx.AsyncClient, tenant: str
    ) -> None:
        kind = self.rng.choices(
            ["tag", "group", "bump", "similar", "delete", "expire"], [35, 15, 3, 15, 20, 12]
        )[0]
        q = self.rng.choice(self.questions)
        covered: list[tuple[str, str]] = []
        before = await self._count(admin)
        if kind == "tag":
            response = await client.post("/v1/cache/invalidate/tags", json={"tags": q.tags[:1]})
            covered = [(tenant, q.qid)]
        elif kind == "group":
            response = await client.post("/v1/cache/invalidate/tags", json={"tags": q.tags[1:]})
            covered = [(tenant, x.qid) for x in self.questions if x.group == q.group]
        elif kind == "bump":
            response = await client.post("/v1/cache/bump", json={})
            covered = [(tenant, x.qid) for x in self.questions]
        elif kind == "similar":  # removes what it reaches; no floor (it may leave paraphrases)
            response = await admin.post(
                "/v1/cache/invalidate/similar",
                json={"text": self.rng.choice(q.phrasings), "radius": 0.97},
            )
        elif kind == "delete":
            entry = self.served.get((tenant, q.qid))
            if entry is None:
                return
            response = await client.delete(f"/v1/cache/entries/{entry}")
        else:
            response = await admin.post("/v1/cache/expire")
        self._status(response)
        if response.status_code == 200:
            self.report.invalidations[kind] += 1
            done = time.monotonic()
            for key in covered:
                self.floor[key] = (before, done)

    async def client(self, i: int, until: float) -> None:
        tenant = "acme" if i % 2 == 0 else "globex"
        headers = {
            "authorization": f"Bearer {TENANT_TOKENS[tenant]}",
            "openai-project": tenant,
        }
        limits = httpx.Limits(max_connections=1)
        async with (
            httpx.AsyncClient(base_url=self.base, headers=headers, timeout=60, limits=limits) as c,
            httpx.AsyncClient(
                base_url=self.base,
                headers={"authorization": f"Bearer {ADMIN}"},
                timeout=60,
                limits=limits,
            ) as admin,
        ):
            while time.monotonic() < until:
                r = self.rng.random()
                t = time.monotonic()
                try:
                    if r < 0.80:
                        await self.chat(c, tenant)
                    elif r < 0.90:
                        await self.api(c, tenant)
                    else:
                        await self.invalidate(c, admin, tenant)
                except httpx.HTTPError as exc:
                    self.report.transport_errors += 1
                    self.report.note("transport", f"{type(exc).__name__}: {exc}")
                end = time.monotonic()
                slot = int((t - self.t0) // self.report.interval)
                self.report.requests += 1
                self.report.requests_per[slot] += 1
                self.report.latencies.setdefault(slot, []).append(end - t)


def _sse_content(raw: str) -> tuple[str, bool]:
    """The text of a chat completion stream, and whether it carried an error event."""
    parts: list[str] = []
    for line in raw.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]" or not data:
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            return "", True
        for choice in chunk.get("choices") or []:
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts), False


def _rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total / 2**20


async def _drive(soak: Soak, clients: int, seconds: float, pid: int) -> None:
    until = time.monotonic() + seconds

    async def sample() -> None:
        while time.monotonic() < until:
            slot = int((time.monotonic() - soak.t0) // soak.report.interval)
            soak.report.rss[slot] = _rss_mib(pid)
            await asyncio.sleep(min(5.0, soak.report.interval / 4))

    soak.t0 = time.monotonic()
    await asyncio.gather(sample(), *(soak.client(i, until) for i in range(clients)))


def run(
    seconds: float,
    *,
    clients: int = 32,
    latency: str = "0.2-0.8",
    fail_rate: float = 0.02,
    interval: float = 60.0,
    seed: int = 1,
    data: Path | None = None,
) -> Report:
    """Start the fake upstream and a sidecar, soak them for ``seconds``, return the report."""
    report = Report(interval=interval)
    up_env = {
        "SEMCACHE_FAKE_LATENCY": latency,
        "SEMCACHE_FAKE_FAIL_RATE": str(fail_rate),
        "SEMCACHE_FAKE_SEED": str(seed),
    }
    side_env = {
        "SEMCACHE_TOKENS": f"{ADMIN},{TENANT_TOKENS['acme']}=acme,"
        f"{TENANT_TOKENS['globex']}=globex",
        "SEMCACHE_LOG_LEVEL": "warning",
        "SEMCACHE_UPSTREAM_TIMEOUT": "10",
        "SEMCACHE_UPSTREAM_DEADLINE": "30",
    }
    up_proc, upstream = start_upstream(up_env)
    try:
        with tempfile.TemporaryDirectory(prefix="semcache-soak-") as tmp:
            side_proc, sidecar = start_sidecar(data or Path(tmp) / "data", upstream, side_env)
            try:
                soak = Soak(sidecar.removesuffix("/v1"), upstream, report, seed)
                t0 = time.perf_counter()
                asyncio.run(_drive(soak, clients, seconds, side_proc.pid))
                report.seconds = time.perf_counter() - t0
            finally:
                stop(side_proc)
    finally:
        stop(up_proc)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--latency", default="0.2-0.8", help="upstream seconds, uniform range")
    parser.add_argument("--fail-rate", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(
        f"soak: {args.clients} clients, 2 tenants, {args.minutes:g} min, upstream "
        f"{args.latency} s failing {args.fail_rate:.0%}"
    )
    report = run(
        args.minutes * 60,
        clients=args.clients,
        latency=args.latency,
        fail_rate=args.fail_rate,
        seed=args.seed,
    )
    for line in report.lines():
        print(line)
    bad = report.cross_tenant + report.wrong + report.stale + report.stale_ttl
    bad += report.unexpected_5xx + report.unparseable
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
