"""Calibration (exact binomial bound, checked over seeded trials), persistence, the default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from semcache import SemanticCache
from semcache.errors import InvalidInputError
from semcache.threshold import (
    CalibratedThreshold,
    HitPolicy,
    StaticThreshold,
    calibrate,
    default_policy,
    load_policy,
    save_policy,
)

from .fakes import HashEmbedder

# Synthetic scores: negatives ~ N(0.5, 0.1), positives ~ N(0.8, 0.1).
NEG_MU, POS_MU, SD = 0.5, 0.8, 0.1


def true_fhr(t: float) -> float:
    return float(stats.norm.sf(t, NEG_MU, SD))


def synthetic(rng: np.random.Generator, n_neg: int, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    sims = np.concatenate([rng.normal(NEG_MU, SD, n_neg), rng.normal(POS_MU, SD, n_pos)])
    labels = np.concatenate([np.zeros(n_neg, int), np.ones(n_pos, int)])
    return np.clip(sims, -1, 1), labels


def test_bound_holds_across_seeded_trials() -> None:
    """The true FHR at the calibrated threshold exceeds the target in <= ~5% of trials."""
    target, confidence, trials = 0.01, 0.95, 300
    exceed, fhrs = 0, []
    for seed in range(trials):
        sims, labels = synthetic(np.random.default_rng(seed), 2000, 500)
        cal = calibrate(sims, labels, target_false_hit_rate=target, confidence=confidence)
        fhr = true_fhr(cal.threshold)
        fhrs.append(fhr)
        exceed += fhr > target
        assert cal.false_hit_rate_upper <= target
    # Binomial slack above 1 - confidence for 300 trials (about 3 standard errors).
    assert exceed / trials <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / trials)
    # Not trivially conservative: the threshold lands near the oracle's (FHR 1% at t = 0.733).
    oracle = stats.norm.isf(target, NEG_MU, SD)
    assert 0.3 * target < np.mean(fhrs) <= target
    cal = calibrate(*synthetic(np.random.default_rng(1), 2000, 500))
    assert abs(cal.threshold - oracle) < 0.05
    # Expected hit rate is the recall of positives at that threshold.
    assert cal.expected_hit_rate == pytest.approx(
        stats.norm.sf(cal.threshold, POS_MU, SD), abs=0.05
    )


def test_known_answer_small_case() -> None:
    """300 negatives at 95%: zero accepted negatives are allowed (bound 0.994%), one is not."""
    neg = np.linspace(0.0, 0.6, 300)
    pos = np.array([0.55, 0.61, 0.7, 0.9])
    sims = np.concatenate([neg, pos])
    labels = np.array([0] * 300 + [1] * 4)
    cal = calibrate(sims, labels, target_false_hit_rate=0.01, confidence=0.95)
    assert 0.6 < cal.threshold < 0.6 + 1e-9  # just above the highest negative
    assert cal.false_hit_rate == 0.0
    assert cal.false_hit_rate_upper == pytest.approx(1 - 0.05 ** (1 / 300), rel=1e-6)
    assert cal.expected_hit_rate == 0.75
    assert (cal.n_negative, cal.n_positive) == (300, 4)
    # With 1000 negatives the bound allows k = 4 (upper 0.0094), not 5 (0.0105).
    neg = np.arange(1000) / 1000.0
    cal = calibrate(np.concatenate([neg, [1.0]]), np.array([0] * 1000 + [1]))
    assert cal.false_hit_rate == pytest.approx(4 / 1000)
    assert 0.995 < cal.threshold <= 0.996


def test_too_few_negatives_and_bad_input() -> None:
    with pytest.raises(InvalidInputError, match="too few"):
        calibrate(np.linspace(0, 1, 100), np.zeros(100, int))
    with pytest.raises(InvalidInputError):
        calibrate([0.1, 0.2], [0])
    with pytest.raises(InvalidInputError):
        calibrate([0.1, float("nan")] * 200, [0, 1] * 200)
    with pytest.raises(InvalidInputError):
        calibrate([0.1] * 400, [0] * 400, target_false_hit_rate=1.5)


def test_calibrate_from_pairs_with_an_embedder() -> None:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)]
    pairs = []
    for _i in range(400):
        a = " ".join(rng.choice(words, 6))
        pairs.append({"a": a, "b": a + " please", "label": 1})
        pairs.append({"a": a, "b": " ".join(rng.choice(words, 6)), "label": 0})
    emb = HashEmbedder()
    cal = calibrate(pairs, target_false_hit_rate=0.02, embedder=emb)
    assert cal.model_id == emb.model_id
    assert cal.expected_hit_rate > 0.9
    assert cal.false_hit_rate <= 0.02


def test_policies_round_trip_as_json(tmp_path: Path) -> None:
    cal = calibrate(*synthetic(np.random.default_rng(3), 1000, 100), fit_on="synthetic")
    assert isinstance(cal, HitPolicy)
    cal.save(tmp_path / "cal.json")
    back = CalibratedThreshold.load(tmp_path / "cal.json")
    assert back.threshold == cal.threshold and back.fit_on == "synthetic"
    assert back.to_dict() == cal.to_dict()
    save_policy(StaticThreshold(0.9), tmp_path / "static.json")
    static = load_policy(tmp_path / "static.json")
    assert isinstance(static, StaticThreshold) and static.min_similarity == 0.9
    with pytest.raises(InvalidInputError):
        CalibratedThreshold.load(tmp_path / "static.json")
    with pytest.raises(InvalidInputError):
        load_policy(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"kind": "nope"}')
    with pytest.raises(InvalidInputError):
        load_policy(tmp_path / "bad.json")


def test_calibrated_policy_drives_the_cache(tmp_path: Path) -> None:
    """A loaded calibration is a policy the cache accepts as threshold=."""
    cal = CalibratedThreshold(
        0.99, target_false_hit_rate=0.01, confidence=0.95, false_hit_rate=0.0,
        false_hit_rate_upper=0.01, expected_hit_rate=0.5, n_positive=10, n_negative=300,
    )  # fmt: skip
    cal.save(tmp_path / "cal.json")
    with SemanticCache(
        tmp_path / "c", embedder=HashEmbedder(), threshold=load_policy(tmp_path / "cal.json")
    ) as c:
        c.store("alpha beta gamma delta", "A")
        assert c.lookup("alpha beta gamma delta epsilon") is None
        assert c.lookup("alpha beta gamma delta epsilon", threshold=0.5) is not None


def test_default_policy_on_the_lead_examples(embedder) -> None:  # type: ignore[no-untyped-def]
    """France's paraphrase (cosine 0.944) is served; Germany (0.663) is not."""
    policy = default_policy()
    v = embedder.embed(
        ["What is the capital of France?", "What's France's capital city?",
         "What is the capital of Germany?"]
    )  # fmt: skip
    para, germany = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert para >= policy.min_similarity
    assert policy.accept("What's France's capital city?", "What is the capital of France?", para)
    assert not policy.accept(
        "What is the capital of Germany?", "What is the capital of France?", germany
    )
