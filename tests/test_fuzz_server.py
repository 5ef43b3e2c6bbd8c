"""A short fuzz of the sidecar over its own OpenAPI document (the long one: evals/fuzz.py).

A real sidecar process and the fake upstream; schemathesis draws about 150 valid and invalid
requests over every operation with each of three tokens (two tenants, an admin). No 5xx, no
undeclared status, no body that breaks the document.
"""

from __future__ import annotations

from pathlib import Path

from evals.fuzz import SIDECAR_ENV, fuzz
from tests.fake_upstream import start_sidecar, start_upstream, stop


def test_a_short_fuzz_finds_no_5xx_and_no_schema_violation(tmp_path: Path) -> None:
    up_proc, upstream = start_upstream()
    try:
        side_proc, sidecar = start_sidecar(tmp_path / "data", upstream, SIDECAR_ENV)
        try:
            report = fuzz(
                sidecar.removesuffix("/v1"), requests=150, seed=7, log=lambda _: None
            )
        finally:
            stop(side_proc)
    finally:
        stop(up_proc)
    assert report.requests >= 150
    assert report.server_errors == 0, report.lines()
    assert report.failures == [], "\n".join(report.lines())
    assert len(report.by_operation) >= 16  # every operation was reached
    assert any(400 <= status < 500 for status in report.statuses)  # invalid input was sent
