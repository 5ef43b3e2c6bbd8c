"""The hard-negative verifier: near misses rejected, paraphrases accepted, retrainable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from semcache.errors import InvalidInputError
from semcache.threshold import HitPolicy, default_policy, load_policy, save_policy
from semcache.verifier import (
    FEATURES,
    VerifierModel,
    VerifierPolicy,
    calibrate_verifier,
    pair_features,
    shipped_model,
    shipped_policy,
    train_verifier,
)

# (cached prompt, new prompt): the near misses, and paraphrases of the same prompts.
NEAR_MISSES = [
    ("Convert 5 miles to km", "Convert 5 km to miles"),
    ("How do I sort a Python list ascending?", "How do I sort a Python list descending?"),
    (
        "Write an apology email to a customer for a late delivery",
        "Write an apology email to a customer for a damaged item",
    ),
    ("What is the capital of France?", "What is the capital of Germany?"),
]
PARAPHRASES = [
    ("Convert 5 miles to km", "Convert 5 miles into km"),
    ("How do I sort a Python list ascending?", "How do I sort a Python list in ascending order?"),
    (
        "Write an apology email to a customer for a late delivery",
        "Write an apology email to a customer for a delayed delivery",
    ),
    ("What is the capital of France?", "What's France's capital city?"),
]


def features(a: str, b: str, sim: float = 0.9) -> dict[str, float]:
    return dict(zip(FEATURES, pair_features(a, b, sim), strict=True))


@pytest.mark.parametrize("policy_factory", [shipped_policy, default_policy])
def test_rejects_near_misses_and_accepts_paraphrases(embedder, policy_factory) -> None:  # type: ignore[no-untyped-def]
    policy = policy_factory()
    assert isinstance(policy, HitPolicy)
    for pairs, expected in ((NEAR_MISSES, False), (PARAPHRASES, True)):
        for cached, new in pairs:
            v = embedder.embed([cached, new])
            sim = float(v[0] @ v[1])
            verdict = sim >= policy.min_similarity and policy.accept(new, cached, sim)
            assert verdict is expected, (cached, new, round(sim, 3))


def test_features_see_the_differences() -> None:
    f = features("Convert 5 miles to km", "Convert 5 km to miles")
    assert f["binding_mismatch"] == 1 and f["same_bag_diff_order"] == 1
    f = features("How do I sort a list ascending?", "How do I sort a list descending?")
    assert f["antonyms"] == 1 and f["substitution"] == 1
    f = features("What is the capital of France?", "What is the capital of Germany?")
    assert f["entities_differ"] == 1
    f = features("Is it safe to fly?", "Is it not safe to fly?")
    assert f["negation_mismatch"] == 1
    f = features("Why can't I log in?", "Why can I log in?")
    assert f["negation_mismatch"] == 1
    f = features("What is 15% of 200?", "What is 20% of 200?")
    assert f["numbers_differ"] == 1
    f = features("How do I recieve money?", "How do I receive money?")
    assert f["typo_pairs"] == 1 and f["only_max"] == 0
    f = features("Convert five miles to km", "Convert 5 miles to km")
    assert f["numbers_differ"] == 0 and f["content_jaccard"] == 1.0
    # Symmetric: the same features whichever text is cached.
    a, b = "How long is the flight from Paris to Rome?", "Flight time from Rome to Paris"
    assert pair_features(a, b, 0.8) == pair_features(b, a, 0.8)


def test_shipped_model_is_small_and_scores_are_probabilities() -> None:
    model = shipped_model()
    assert 0 < len(model.trees) <= 300
    s = model.score("What is the capital of France?", "What's France's capital city?", 0.944)
    assert 0.0 <= s <= 1.0
    # Monotone in similarity, all else equal.
    lo = model.score("How do I reset my password?", "How can I reset my password?", 0.7)
    hi = model.score("How do I reset my password?", "How can I reset my password?", 0.97)
    assert hi >= lo
    assert not shipped_policy().accept("a", "b", shipped_policy().min_similarity - 0.01)


def synthetic_pairs(n: int = 300, seed: int = 0) -> tuple[list[dict[str, object]], list[float]]:
    """Positives add a filler word; negatives change the number (with a high cosine)."""
    rng = np.random.default_rng(seed)
    pairs, sims = [], []
    for i in range(n):
        x, y = int(rng.integers(2, 99)), int(rng.integers(100, 999))
        a = f"Convert {x} miles to km for trip {i}"
        if i % 2:
            pairs.append({"a": a, "b": f"Please convert {x} miles to km for trip {i}", "label": 1})
        else:
            pairs.append({"a": a, "b": f"Convert {y} miles to km for trip {i}", "label": 0})
        sims.append(float(rng.uniform(0.85, 0.99)))
    return pairs, sims


def test_train_save_load_and_policy_round_trip(tmp_path: Path) -> None:
    pairs, sims = synthetic_pairs()
    model = train_verifier(pairs, sims, max_iter=30)
    assert model.score("Convert 3 miles to km", "Convert 300 miles to km", 0.95) < 0.5
    assert model.score("Convert 3 miles to km", "Please convert 3 miles to km", 0.95) > 0.5
    model.save(tmp_path / "m.json")
    back = VerifierModel.load(tmp_path / "m.json")
    x = pair_features("Convert 3 miles to km", "Convert 4 miles to km", 0.9)
    assert back.raw(x) == pytest.approx(model.raw(x))
    policy = VerifierPolicy(0.8, 0.5, model_path=tmp_path / "m.json")
    save_policy(policy, tmp_path / "policy.json")
    loaded = load_policy(tmp_path / "policy.json")
    assert isinstance(loaded, VerifierPolicy)
    assert (loaded.min_similarity, loaded.min_score) == (0.8, 0.5)
    assert loaded.accept("Convert 3 miles to km", "Please convert 3 miles to km", 0.95)


def test_bad_models_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        train_verifier([{"a": "x", "b": "y", "label": 1}] * 5, [0.9] * 5)
    with pytest.raises(InvalidInputError):
        train_verifier([{"a": "x", "b": "y", "label": 1}] * 30, [0.9] * 30)
    with pytest.raises(InvalidInputError):
        VerifierPolicy(0.8, 1.5)
    with pytest.raises(InvalidInputError):
        VerifierModel.load(tmp_path / "missing.json")
    doc = shipped_model().to_dict()
    doc["features"] = ["similarity"]
    (tmp_path / "other.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match="other features"):
        VerifierModel.load(tmp_path / "other.json")


def test_calibrate_verifier_bounds_its_operating_point() -> None:
    pairs, sims = synthetic_pairs(n=800, seed=1)
    model = train_verifier(pairs[:400], sims[:400], max_iter=30)
    held, held_sims = pairs[400:], sims[400:]
    for veto in (0.5, None):
        policy = calibrate_verifier(model, held, held_sims, veto_below=veto)
        assert policy.info["calibration_fhr_upper"] <= 0.02
        accepted = [
            policy.accept(str(p["b"]), str(p["a"]), s) for p, s in zip(held, held_sims, strict=True)
        ]
        negatives = [a for a, p in zip(accepted, held, strict=True) if p["label"] == 0]
        assert sum(negatives) / len(negatives) <= 0.02
        assert any(accepted)


def test_word_vector_features_see_the_word_with_no_counterpart() -> None:
    """The model's own word vectors: a swapped-in word with no match scores low alignment."""
    from semcache import wordvectors

    assert wordvectors.available()
    assert (
        wordvectors.rarity("the") < wordvectors.rarity("kenya") < wordvectors.rarity("rheumatology")
    )
    same = features("How can I buy a car?", "How can I purchase a car?")
    other = features("How do I learn Python?", "How do I learn Java?")
    assert same["align_min"] > other["align_min"]
    assert other["span_min"] == other["span_max"] == 1
    assert other["unaligned_rarity"] > 0 and same["unaligned_rarity"] == 0
    none = features("Is it safe to fly?", "is it safe to fly")
    assert none["align_min"] == 1 and none["span_max"] == 0 and none["span_sim"] == 1
    long_a = " ".join(f"word{i}" for i in range(5000))
    long_b = " ".join(f"term{i}" for i in range(5000))
    assert len(pair_features(long_a, long_b, 0.9)) == len(FEATURES)  # capped, not quadratic


def test_a_model_trained_on_the_first_features_still_loads(tmp_path: Path) -> None:
    """Features are appended, never reordered: an older model scores on the ones it knows."""
    pairs, sims = synthetic_pairs(n=200, seed=3)
    model = train_verifier(pairs, sims, max_iter=10)
    doc = model.to_dict()
    n = len(FEATURES) - 6
    for tree in doc["trees"]:
        for node in tree:
            if node[0] >= n:  # make the model use only the first n features
                node[:] = [-1, 0.0, 0, 0, 0.0]
    doc["features"] = list(FEATURES[:n])
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = VerifierModel.load(tmp_path / "old.json")
    assert 0.0 <= old.score("a b c", "a b d", 0.9) <= 1.0
    assert old.to_dict()["features"] == list(FEATURES[:n])


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("A woman is slicing a tomato.", "A woman is slicing tomato.", True),
        ("Is $1,000 enough for a week in Paris?", "Is $1000 enough for a week in Paris?", True),
        ("How do I reset my password", "How do you reset your password?", True),
        ("Move money from savings to checking", "Move money to savings from checking", False),
        ("What is a mortgage?", "Why is a mortgage?", False),
        ("Is it safe to fly?", "Is it not safe to fly?", False),
        ("Convert 5 miles to km", "Convert 5 km to miles", False),
    ],
)
def test_same_request_scores_one_and_nothing_else_does(a: str, b: str, same: bool) -> None:
    """One request written two ways scores 1.0 whatever the trees say; a real change does not."""
    from semcache.verifier import same_request

    assert same_request(a, b) is same and same_request(b, a) is same
    if same:
        assert shipped_model().score(a, b, 0.95) == 1.0


def test_order_features_see_a_swap_and_not_a_rewording() -> None:
    """Swapped names or roles keep the bag of words; the order and role features see them."""
    swap = features(
        "The show was chaired by Terry Wogan with a panel including Michael Flanders.",
        "The show was chaired by Michael Flanders with a panel including Terry Wogan.",
    )
    assert swap["content_jaccard"] == 1.0
    assert swap["role_changes"] >= 2 and swap["role_change_share"] > 0
    assert swap["entity_order_swap"] == 1.0 and swap["entity_role_changes"] >= 2
    assert swap["inversions"] > 0 and swap["broken_links"] > 0
    assert swap["shared_bigram_jaccard"] < 1.0
    same = features("How do I reset my password?", "How can I reset my password?")
    assert same["role_changes"] == same["inversions"] == same["broken_links"] == 0
    assert same["entity_order_swap"] == 0 and same["shared_bigram_jaccard"] == 1.0
    directions = features("Flights from Boston to Denver", "Flights from Denver to Boston")
    assert directions["role_changes"] == 2 and directions["entity_order_swap"] == 1.0
    # The shipped model refuses the swapped direction at the default's operating point.
    model = shipped_model()
    swapped = model.score("Flights from Boston to Denver", "Flights from Denver to Boston", 0.97)
    assert swapped < shipped_policy("default").min_score
