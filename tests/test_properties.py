"""Hypothesis properties: scope keys and store round-trips."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semcache import Scope, SemanticCache
from semcache.keys import exact_key, normalise

from .fakes import HashEmbedder

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
params = st.dictionaries(st.text(min_size=1, max_size=8), json_scalars, max_size=4)
scopes = st.builds(
    Scope,
    namespace=st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        min_size=1,
        max_size=8,
    ),
    model=st.text(max_size=8),
    params=params,
    system=st.text(max_size=20),
    context=st.lists(st.text(max_size=10), max_size=3),
)


@given(scopes)
def test_scope_digest_is_stable_and_round_trips(scope: Scope) -> None:
    again = Scope.from_dict(scope.canonical())
    assert again == scope and again.digest == scope.digest
    reordered = Scope(
        namespace=scope.namespace,
        model=scope.model,
        params=dict(reversed(list(scope.params.items()))),
        system=scope.system,
        context=list(scope.context),
    )
    assert reordered.digest == scope.digest


@given(scopes, scopes)
def test_different_scopes_have_different_digests(a: Scope, b: Scope) -> None:
    assert (a.canonical() == b.canonical()) == (a.digest == b.digest)


#: what every store keeps as text: no lone surrogates, no NUL (both are refused)
storable = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")


@given(st.text(alphabet=storable, min_size=1).filter(lambda s: s.strip()))
def test_normalise_is_idempotent(text: str) -> None:
    once = normalise(text)
    assert normalise(once) == once
    assert exact_key("s", once) == exact_key("s", normalise(" " + text + "\n"))


prompt_text = st.text(alphabet=storable, min_size=1, max_size=60).filter(lambda s: s.strip())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            prompt_text,
            st.text(alphabet=storable, max_size=80),
            st.lists(st.text(alphabet=storable, min_size=1, max_size=5), max_size=3),
        ),
        min_size=1,
        max_size=8,
    ),
    scopes,
)
def test_store_round_trip(items: list[tuple[str, str, list[str]]], scope: Scope) -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        SemanticCache(Path(tmp), embedder=HashEmbedder(dim=16), threshold=0.99) as cache,
    ):
        latest: dict[str, tuple[str, str, list[str], str]] = {}
        for prompt, response, tags in items:
            eid = cache.store(prompt, response, scope=scope, tags=tags, metadata={"p": prompt})
            latest[normalise(prompt)] = (eid, response, tags, prompt)
        for norm, (eid, response, tags, prompt) in latest.items():
            entry = cache.get(eid)
            assert entry.response == response and entry.scope == scope
            assert set(entry.tags) == set(tags) and entry.metadata == {"p": prompt}
            hit = cache.lookup(norm, scope=scope)
            assert hit is not None and hit.entry_id == eid and hit.response == response
        assert cache.verify() == []
