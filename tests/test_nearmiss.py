"""Near-miss guards: different numbers, units or dates are never a hit by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from semcache import SemanticCache
from semcache.errors import InvalidInputError
from semcache.nearmiss import GuardedPolicy, quantities, quantity_difference
from semcache.threshold import (
    StaticThreshold,
    as_policy,
    default_policy,
    load_policy,
    save_policy,
)

# (a, b): the same quantities however they are written.
SAME = [
    ("Is $1,000 a lot?", "Is $1000 a lot?"),
    ("Is $1,000 a lot?", "Is 1000 dollars a lot?"),
    ("Convert 5 miles to km", "How many kilometers is 5 miles?"),
    ("I have five apples", "I have 5 apples"),
    ("the first item", "the 1st item"),
    ("item 007", "item 7"),
    ("price of item366", "price of item 366"),
    ("What happened in 1990 in Paris", "What happened in Paris in 1990"),
    ("mp3 or mp4?", "mp3 or mp4 ?"),
    ("Can I go?", "May I go?"),  # "may" is a date only beside a number
    ("What is 20 degrees Celsius in Fahrenheit?", "What is 20°C in Fahrenheit?"),
    ("Turn it 90 degrees", "Turn it 90°"),
]
# (a, b, reason): different quantities.
DIFFERENT = [
    ("What is the price of item 366?", "What is the price of item 367?", "numbers differ"),
    ("Convert 5 miles to km", "Convert 5 km to miles", "units bound to the numbers differ"),
    ("Is $1,000 a lot?", "Is 1000 euros a lot?", "units bound to the numbers differ"),
    ("What is 20°C in F?", "What is 20°F in C?", "units bound to the numbers differ"),
    ("python 3.10 features", "python 3.1 features", "numbers differ"),
    ("meeting on 2023-01-05", "meeting on 2023-01-06", "numbers differ"),
    ("-5 degrees outside", "5 degrees outside", "numbers differ"),
    (
        "How many degrees Celsius are in 173 degrees Fahrenheit?",
        "What is 173 degrees Celsius in degrees Fahrenheit?",
        "units bound to the numbers differ",
    ),
    ("Convert 5 miles to km", "Convert miles to km", "numbers differ"),
    ("What's the weather today?", "What's the weather tomorrow?", "dates differ"),
    ("Flights on March 3", "Flights on April 3", "dates differ"),
    ("Convert 5 miles to km", "Convert 5 miles to meters", "units differ"),
    ("Convert miles to km", "Convert miles to feet", "units differ"),
]


@pytest.mark.parametrize(("a", "b"), SAME)
def test_same_quantities_however_written(a: str, b: str) -> None:
    assert quantity_difference(a, b) is None
    assert quantity_difference(b, a) is None


@pytest.mark.parametrize(("a", "b", "why"), DIFFERENT)
def test_different_quantities_are_seen(a: str, b: str, why: str) -> None:
    assert quantity_difference(a, b) == why
    assert quantity_difference(b, a) == why


def test_quantities_bind_numbers_to_units() -> None:
    q = quantities("Is $1,000 enough for 20°C and 5 km to miles?")
    assert q.bindings == {("1000", "usd"): 1, ("20", "celsius"): 1, ("5", "km"): 1}
    assert q.units == frozenset({"mile"})


def test_default_policy_has_the_guards_and_round_trips(tmp_path: Path) -> None:
    policy = default_policy()
    assert isinstance(policy, GuardedPolicy)
    assert as_policy(None).to_dict() == policy.to_dict()  # type: ignore[attr-defined]
    # Far above any floor, the guard still refuses different numbers.
    item_366, item_367 = "What is the price of item 366?", "What is the price of item 367?"
    assert not policy.accept(item_367, item_366, 0.999)
    save_policy(policy, tmp_path / "p.json")
    back = load_policy(tmp_path / "p.json")
    assert isinstance(back, GuardedPolicy) and back.to_dict() == policy.to_dict()
    assert not back.accept("Convert 5 km to miles", "Convert 5 miles to km", 0.999)
    with pytest.raises(InvalidInputError):
        GuardedPolicy("not a policy")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        GuardedPolicy(StaticThreshold(0.9), window=2)


def test_a_plain_float_threshold_has_no_guard() -> None:
    """threshold=0.9 is the plain cosine rule, as documented: no guard behind the user's back."""
    assert as_policy(0.9).accept("item 367", "item 366", 0.95)


def test_real_cache_refuses_a_different_number_and_serves_a_paraphrase(
    tmp_path: Path, embedder
) -> None:  # type: ignore[no-untyped-def]
    """The issue's case on the real model and the real default policy (threshold=None)."""
    with SemanticCache(tmp_path / "c", embedder=embedder) as cache:
        cache.store("What is the price of item 366?", "$12")
        cache.store("Convert 5 miles to km", "8.05 km")
        cache.store("Is $1,000 enough for a week in Paris?", "Barely.")
        v = embedder.embed(["What is the price of item 366?", "What is the price of item 367?"])
        assert float(v[0] @ v[1]) > 0.95  # the cosine cannot tell them apart
        assert cache.lookup("What is the price of item 367?") is None
        assert cache.lookup("Convert 5 km to miles") is None
        assert cache.lookup("Is 1000 euros enough for a week in Paris?") is None
        hit = cache.lookup("What's the price of item 366?")
        assert hit is not None and hit.response == "$12"
        hit = cache.lookup("Convert 5 miles into km")
        assert hit is not None and hit.response == "8.05 km"
        hit = cache.lookup("Is $1000 enough for a week in Paris?")
        assert hit is not None and hit.response == "Barely."
