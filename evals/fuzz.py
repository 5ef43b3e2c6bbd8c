"""Fuzz the sidecar over its own OpenAPI document (schemathesis), with three tokens.

Starts the fake OpenAI upstream (tests/fake_upstream.py) and one ``semcache serve`` process on
127.0.0.1 with tokens for two tenants (``acme``, ``globex``) and an admin, loads the sidecar's
``/openapi.json``, and for every operation and every token draws requests from the schema:
valid ones (positive) and ones that break it (negative: wrong types, missing fields, values out
of range). Each response is checked with schemathesis's checks:

- ``not_a_server_error``: no 5xx, ever (the fake upstream does not fail here, so there is no
  upstream failure to relay);
- ``status_code_conformance``: the status is one the document declares for the operation;
- ``content_type_conformance`` and ``response_schema_conformance``: the body is what the
  document says, error bodies included (``{"error": {"type", "message", "code"}}``).

Prints the requests sent, the statuses seen, and every failure (operation, token, check, a curl
line to replay it). Exits 1 when anything failed.

Usage: python evals/fuzz.py [--requests 2000] [--seed 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fake_upstream import start_sidecar, start_upstream, stop  # noqa: E402

ADMIN = "fuzz-admin-token-1"
TENANTS = {"acme": "fuzz-acme-token-01", "globex": "fuzz-globex-token"}
TOKENS = {"admin": ADMIN, **{name: tok for name, tok in TENANTS.items()}}

SIDECAR_ENV = {
    "SEMCACHE_TOKENS": f"{ADMIN},{TENANTS['acme']}=acme,{TENANTS['globex']}=globex",
    "SEMCACHE_LOG_LEVEL": "error",
    "SEMCACHE_MAX_PROMPT_CHARS": "4000",
    "SEMCACHE_UPSTREAM_TIMEOUT": "10",
    "SEMCACHE_UPSTREAM_DEADLINE": "20",
}


@dataclass
class Report:
    """What a fuzz run sent and found."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def lines(self) -> list[str]:
        out = [
            f"requests: {self.requests} in {self.seconds:.0f} s "
            f"({len(self.by_operation)} operations x {len(TOKENS)} tokens, positive + negative)",
            "statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items())),
            f"5xx: {self.server_errors}",
            f"failures (5xx, undeclared status, schema violations): {len(self.failures)}",
        ]
        out += [f"  - {f}" for f in self.failures[:50]]
        return out


def fuzz(
    base_url: str,
    *,
    requests: int,
    seed: int = 1,
    skip: frozenset[str] = frozenset(),
    log: Callable[[str], None] = print,
) -> Report:
    """Send about ``requests`` generated requests to the sidecar at ``base_url`` (no ``/v1``),
    spread evenly over its operations, the three tokens, and positive and negative cases."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(
        f"{base_url}/openapi.json", headers={"authorization": f"Bearer {ADMIN}"}
    )
    operations = [
        op for op in (result.ok() for result in schema.get_all_operations())
        if op.path not in skip
    ]
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    per_run = max(1, requests // (len(operations) * len(TOKENS) * len(modes)))
    report = Report()
    t0 = time.perf_counter()
    seen_failures: set[str] = set()

    rounds = 0
    while report.requests < requests and rounds < 20:  # small operations run out of new cases
        for operation in operations:
            label = f"{operation.method.upper()} {operation.path}"
            for who, token in TOKENS.items():
                headers = {"authorization": f"Bearer {token}"}
                for mode in modes:
                    _run_one(
                        operation.as_strategy(generation_mode=mode),
                        per_run,
                        seed + rounds,
                        base_url,
                        headers,
                        checks,
                        report,
                        f"{label} [{who}, {mode.value}]",
                        label,
                        seen_failures,
                    )
        rounds += 1
        log(
            f"  round {rounds}: {report.requests} requests, {report.server_errors} 5xx, "
            f"{len(report.failures)} failures"
        )
    report.seconds = time.perf_counter() - t0
    return report


def _describe(exc: BaseException) -> str:
    """One line per check that failed (a FailureGroup holds one exception per check)."""
    inner = getattr(exc, "exceptions", None) or [exc]
    parts = []
    for e in inner:
        title = getattr(e, "title", "") or type(e).__name__
        message = " ".join(str(getattr(e, "message", "") or e).split())
        parts.append(f"{title}: {message[:300]}")
    return "; ".join(parts)


def _run_one(
    strategy: Any,
    examples: int,
    seed: int,
    base_url: str,
    headers: dict[str, str],
    checks: list[Any],
    report: Report,
    where: str,
    label: str,
    seen_failures: set[str],
) -> None:
    """Draw ``examples`` cases from ``strategy``, send each, and record what the checks find
    (every distinct failure once; fuzzing goes on after one)."""
    import hypothesis
    from hypothesis import HealthCheck, given

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.generate],
    )
    @hypothesis.seed(seed)
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        report.requests += 1
        report.statuses[response.status_code] += 1
        report.by_operation[label] += 1
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:  # a finding: record it, keep fuzzing
            key = f"{where}: {_describe(exc)}"
            if key not in seen_failures:
                seen_failures.add(key)
                report.failures.append(
                    f"{key} (status {response.status_code}); replay: "
                    f"{case.as_curl_command(headers=headers)[:300]}"
                )

    try:
        run()
    except hypothesis.errors.Unsatisfiable:  # nothing to negate (an operation without input)
        pass
    except (Exception, BaseExceptionGroup) as exc:  # one hypothesis re-raised at the end
        key = f"{where}: {_describe(exc)}"
        if key not in seen_failures:
            seen_failures.add(key)
            report.failures.append(key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated paths to leave out (e.g. /ui, the HTML status page)",
    )
    args = parser.parse_args()
    skip = frozenset(p for p in args.skip.split(",") if p)

    up_proc, upstream = start_upstream()
    try:
        with tempfile.TemporaryDirectory(prefix="semcache-fuzz-") as tmp:
            side_proc, sidecar = start_sidecar(Path(tmp) / "data", upstream, SIDECAR_ENV)
            try:
                report = fuzz(
                    sidecar.removesuffix("/v1"), requests=args.requests, seed=args.seed, skip=skip
                )
            finally:
                stop(side_proc)
    finally:
        stop(up_proc)
    if skip:
        print(f"left out: {', '.join(sorted(skip))}")
    for line in report.lines():
        print(line)
    return 0 if not report.failures and report.requests >= args.requests * 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
