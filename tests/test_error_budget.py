"""ErrorBudget: a policy that holds a wrong-answer rate from labels, and its hooks."""

from __future__ import annotations

import json
import random

import pytest

from semcache.errorbudget import (
    Decision,
    EmbeddingJudge,
    ErrorBudget,
    JsonJudge,
    TextJudge,
    upper_bound,
)
from semcache.errors import InvalidInputError
from semcache.nearmiss import GuardedPolicy
from semcache.threshold import HitPolicy
from semcache.verifier import shipped_policy

PAIRS = [
    ("What is the capital of France?", "What's France's capital city?"),
    ("Convert 5 miles to km", "Convert 5 km to miles"),
    ("What is the price of item 366?", "What is the price of item 367?"),
    ("How do I sort a Python list ascending?", "How do I sort a Python list descending?"),
    ("Write an apology email to a customer for a late delivery",
     "Write an apology email to a customer for a delayed delivery"),
]  # fmt: skip


def test_from_the_first_lookup_it_is_the_default_point(embedder) -> None:  # type: ignore[no-untyped-def]
    """Before any label: the guards, then the default policy's operating point."""
    budget = ErrorBudget(0.02)
    assert isinstance(budget, HitPolicy)
    default = GuardedPolicy(shipped_policy("default"))
    assert budget.min_similarity == default.min_similarity
    assert budget.prior == shipped_policy("default").min_score
    for cached, new in PAIRS:
        v = embedder.embed([cached, new])
        sim = float(v[0] @ v[1])
        assert budget.accept(new, cached, sim) is default.accept(new, cached, sim), (new, sim)
    item_366, item_367 = "What is the price of item 366?", "What is the price of item 367?"
    refused = budget.decide(item_367, item_366, 0.99)
    assert refused == Decision(False, None, budget.prior, False)  # a guard: no score to label
    assert budget.stats()["source"] == "prior" and budget.stats()["labels"] == 0


def test_long_prompts_are_decided_by_their_words_not_scored() -> None:
    """Above the model's window the verifier is not run on the whole text (its cost)."""
    doc = " ".join(f"Row {i}: supplier {i * 7} shipped {i * 3} crates." for i in range(80))
    budget = ErrorBudget(0.02)
    same = budget.decide(doc + " Who shipped most?", doc + " who shipped most", 0.999)
    assert same.serve and same.score == 1.0
    other = budget.decide(doc + " Who shipped most?", doc + " Who shipped least?", 0.999)
    assert not other.serve and other.score is None


def scorer(q: str, c: str, s: float) -> float:
    return s  # unit tests: the score is the similarity


def test_labels_lower_the_point_only_with_enough_evidence() -> None:
    budget = ErrorBudget(0.02, prior=0.9, min_similarity=0.0, scorer=scorer, bins=20)
    for _ in range(100):
        budget.observe(True, 0.62)
    assert budget.threshold() == 0.9  # 100 right answers cannot bound a rate by 2%
    for _ in range(60):
        budget.observe(True, 0.62)
    assert budget.threshold() == pytest.approx(0.6)  # 160 right, none wrong: bound < 2%
    st = budget.stats()
    assert st["source"] == "labels" and st["served_labels"] == 160
    assert st["bound"] <= 0.02 and st["labels_by_source"]["free"] == 160
    budget.observe(False, 0.63)
    budget.observe(False, 0.64)
    assert budget.threshold() == 0.9  # 2 wrong of 162: the bound is above 2% again


def test_wrong_answers_above_the_prior_raise_the_point() -> None:
    budget = ErrorBudget(0.02, prior=0.5, min_similarity=0.0, scorer=scorer, bins=10)
    for i in range(40):
        budget.observe(i % 4 != 0, 0.55, source="feedback")  # a quarter wrong at 0.55
    for _ in range(40):
        budget.observe(True, 0.85, source="explore")
    assert budget.threshold() == pytest.approx(0.6)
    assert not budget.accept("q", "c", 0.55) and budget.accept("q", "c", 0.9)


def test_namespaces_learn_apart_and_state_survives_a_restart() -> None:
    budget = ErrorBudget(0.02, prior=0.9, min_similarity=0.0, scorer=scorer, bins=20)
    for _ in range(200):
        budget.observe(True, 0.71, namespace="faq")
    assert budget.threshold("faq") == pytest.approx(0.7)
    assert budget.threshold("default") == 0.9
    state = json.loads(json.dumps(budget.state_dict()))
    again = ErrorBudget(0.02, prior=0.9, min_similarity=0.0, scorer=scorer, bins=20)
    again.load_state(state)
    assert again.threshold("faq") == pytest.approx(0.7)
    assert again.stats("faq") == budget.stats("faq")
    assert again.decide("q", "c", 0.75, namespace="faq").serve
    assert not again.decide("q", "c", 0.75).serve
    with pytest.raises(InvalidInputError):
        ErrorBudget(0.02, scorer=scorer, prior=0.9, min_similarity=0.0, bins=10).load_state(state)
    with pytest.raises(InvalidInputError):
        again.load_state({"format": 1, "bins": 20, "namespaces": {"x": {"right": [1]}}})
    with pytest.raises(InvalidInputError):
        again.load_state({"format": 99})


def test_exploration_samples_only_uncertain_would_be_hits() -> None:
    budget = ErrorBudget(0.02, prior=0.8, min_similarity=0.0, scorer=scorer, explore=1.0, band=0.1)
    sure, unsure, miss = (budget.decide("q", "c", s) for s in (0.95, 0.85, 0.7))
    assert unsure.serve and unsure.uncertain and sure.serve and not sure.uncertain
    assert budget.should_explore(unsure, can_compute=True)
    assert not budget.should_explore(unsure, can_compute=False)  # plain lookup: nothing to call
    assert not budget.should_explore(sure, can_compute=True)
    assert not budget.should_explore(miss, can_compute=True)
    never = ErrorBudget(0.02, prior=0.8, min_similarity=0.0, scorer=scorer, explore=0.0)
    assert not never.should_explore(never.decide("q", "c", 0.85), can_compute=True)
    some = ErrorBudget(
        0.02, prior=0.8, min_similarity=0.0, scorer=scorer, explore=0.2, band=0.1, seed=1
    )
    share = sum(some.should_explore(some.decide("q", "c", 0.85), can_compute=True)
                for _ in range(2000)) / 2000  # fmt: skip
    assert 0.17 < share < 0.23


def test_it_holds_the_target_on_a_simulated_stream() -> None:
    """Scores where P(wrong | score) = (1 - score) / 10: serving score >= t is wrong
    (1 - t) / 20 of the time, so the target 2% needs t >= 0.6; labels at random scores."""
    broken = moved = 0
    for seed in range(20):
        rng = random.Random(seed)
        budget = ErrorBudget(0.02, prior=0.99, min_similarity=0.0, scorer=scorer, bins=50)
        for _ in range(4000):
            s = rng.random()
            budget.observe(rng.random() >= (1 - s) / 10, s)
        t = budget.threshold()
        broken += (1 - t) / 20 > 0.02
        moved += t < 0.99
    assert broken <= 2  # at 95% confidence, about one seed in twenty may break it
    assert moved >= 10  # and the labels are mostly enough to serve more than the prior did


def test_judges() -> None:
    assert TextJudge().agree("Paris.", "  paris ")
    assert not TextJudge().agree("Paris", "Berlin")
    assert JsonJudge().agree('{"a": 1, "b": [2]}', '{"b": [2], "a": 1}')
    assert not JsonJudge().agree('{"a": 1}', '{"a": 2}')
    assert JsonJudge().agree("Paris", "paris.")  # not JSON: compared as text
    assert upper_bound(0, 148, 0.95) > 0.02 > upper_bound(0, 149, 0.95)


def test_embedding_judge_with_the_real_model(embedder) -> None:  # type: ignore[no-untyped-def]
    judge = EmbeddingJudge(embedder.embed, cut=0.8)
    assert judge.agree("The capital of France is Paris.", "Paris is the capital of France.")
    assert not judge.agree("The capital of France is Paris.", "Use a heap to sort the list.")
    budget = ErrorBudget(0.02, judge=judge, scorer=scorer, prior=0.9, min_similarity=0.0)
    assert budget.agree("Paris is France's capital.", "The capital of France is Paris.")
    with pytest.raises(InvalidInputError):
        EmbeddingJudge(embedder.embed, cut=2.0)


def test_bad_arguments() -> None:
    for kwargs in ({"target_error": 0.0}, {"confidence": 1.0}, {"explore": 2.0}, {"bins": 1}):
        with pytest.raises(InvalidInputError):
            ErrorBudget(**{"scorer": scorer, "prior": 0.9, "min_similarity": 0.0, **kwargs})
    budget = ErrorBudget(0.02, scorer=scorer, prior=0.9, min_similarity=0.0)
    with pytest.raises(InvalidInputError):
        budget.observe(True, 0.5, source="guess")
    with pytest.raises(InvalidInputError):
        budget.observe(True, float("nan"))


def test_labels_are_saved_in_batches_as_they_arrive() -> None:
    """persist_to: the state goes to the saver every N labels (a kill loses one batch)."""
    budget = ErrorBudget(0.02, scorer=lambda q, c, s: 0.9, prior=0.9, min_similarity=0.5)
    saved: list[dict] = []
    budget.persist_to(saved.append, every=3, seconds=3600)
    for _ in range(2):
        budget.observe(True, 0.95)
    assert saved == []
    budget.observe(False, 0.95)
    assert len(saved) == 1
    restored = ErrorBudget(0.02, scorer=lambda q, c, s: 0.9, prior=0.9, min_similarity=0.5)
    restored.load_state(saved[-1])
    assert restored.state_dict() == budget.state_dict()
    budget.observe(True, 0.95)
    assert len(saved) == 1 and budget.flush() and len(saved) == 2
    assert saved[-1]["namespaces"]["default"]["by_source"]["free"] == 4

    def broken(state: dict) -> None:
        raise OSError("disk full")

    budget.persist_to(broken, every=1)
    budget.observe(True, 0.95)  # logged, kept pending: not raised into the lookup
    assert budget.flush() is False
    budget.persist_to(saved.append, every=1)
    assert budget.flush() and saved[-1]["namespaces"]["default"]["by_source"]["free"] == 5
    with pytest.raises(InvalidInputError):
        budget.persist_to(saved.append, every=0)
    with pytest.raises(InvalidInputError):
        budget.persist_to("not callable")  # type: ignore[arg-type]
