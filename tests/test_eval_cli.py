"""`semcache eval` end to end on a small shippable sample (real model)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from semcache.cli import app
from semcache.eval.data import save_pairs
from semcache.eval.sources import load_named


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    pairs = random.Random(0).sample(load_named("banking77_pairs"), 240)
    save_pairs(pairs, tmp_path / "sample.jsonl")
    return tmp_path / "sample.jsonl"


def test_eval_prints_table_writes_plots_and_json(
    sample: Path,
    tmp_path: Path,
    embedder,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("SEMCACHE_EVAL_CACHE", str(tmp_path / "emb"))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["eval", "--data", str(sample), "--target-fhr", "0.1", "--out", str(out), "--replay",
         "--save-calibration", str(tmp_path / "cal.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "GPTCache rule" in result.output and "RedisVL default" in result.output
    assert "calibrated" in result.output and "verifier" in result.output
    assert "workload replay" in result.output
    # each stage leaves its bar: the replay's with its count of lookups and an ETA
    replay_row = next(line for line in result.output.splitlines() if line.startswith("replay"))
    assert re.search(r"(\d+)/\1\s+lookups", replay_row), replay_row
    assert re.search(r"ETA \d+:\d\d:\d\d", replay_row), replay_row
    assert re.search(r"^policies .* (\d+)/\1\s+policies", result.output, re.M), result.output
    for name in ("similarity_hist.png", "fhr_vs_threshold.png", "precision_recall.png"):
        assert (out / name).stat().st_size > 1000
    doc = json.loads((out / "results.json").read_text())
    assert doc["calibrated"]["target_false_hit_rate"] == 0.1
    assert doc["n_eval_pairs"] + doc["n_calibration_pairs"] <= 240
    assert len(doc["replay"]) == len(doc["policies"])
    assert json.loads((tmp_path / "cal.json").read_text())["kind"] == "calibrated"


def test_eval_with_chosen_policies_and_errors(sample: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["eval", "--data", str(sample), "--policy", "gptcache", "--policy", "0.93",
              "--out", str(tmp_path / "o"), "--limit", "60"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "cos>=0.93" in result.output
    bad = runner.invoke(app, ["eval", "--data", str(tmp_path / "missing.jsonl")])
    assert bad.exit_code == 2 and "error" in bad.output
    bad = runner.invoke(app, ["eval", "--data", str(sample), "--policy", "nonsense"])
    assert bad.exit_code != 0
    for limit in ("0", "-1"):  # no pairs, or a count that is not one: a clear error
        bad = runner.invoke(app, ["eval", "--data", str(sample), "--limit", limit])
        assert bad.exit_code == 2 and "error" in bad.output, bad.output
