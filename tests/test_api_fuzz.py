"""Hypothesis over the library's public API, with the rule of the sidecar's fuzz.

A stateful machine drives one :class:`~semcache.SemanticCache` with generated calls of its public
methods (lookup, probe, store, store_many, get_or_compute, delete, delete_prompt, update,
invalidate_tags, bump, version, invalidate_similar, nearest_similarity, expire, feedback, get,
iter_entries, stats, verify, and the ``Scope`` constructor), valid and invalid arguments mixed:
odd Unicode, whitespace-only and NUL prompts, huge, negative, NaN and infinite TTLs, bad scopes,
bad tags, non-JSON metadata, wrong types, unknown entry ids. The rule, after every call:

- the call returned, or raised a subclass of :class:`~semcache.errors.SemcacheError` (a compute
  function's own exception passes through ``get_or_compute`` unchanged: it is the caller's);
- ``cache.verify()`` returns ``[]``;
- nothing stored earlier was lost or altered: the entries before and after the call differ only
  by what the call is documented to do (a store adds its entry and replaces the exact repeat in
  its scope; ``invalidate_tags`` removes exactly the tagged entries; ``expire`` exactly the
  expired and version-dead ones; a failed call changes nothing), and any call may drop entries
  that are already expired or version-dead (the lazy clean-up). A hit served is a live entry of
  the asked scope, with that entry's answer.

The bulk runs on the deterministic hash embedder (``tests/fakes.py``); a short run beside it uses
the real model. Inputs the machine once found escaping as other exceptions (lone surrogates,
non-iterables, nesting past the recursion limit, a compute function that is not callable) are
among its strategies now, and pinned below one by one as well.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from semcache import FakeClock, Scope, SemanticCache
from semcache.errors import (
    CacheClosedError,
    EntryNotFoundError,
    InvalidInputError,
    SemcacheError,
)
from semcache.keys import normalise

from .fakes import HashEmbedder

#: similarity threshold of the machine's caches (hash embedder: shared words make neighbours)
THRESHOLD = 0.9
#: cosines this close to a radius may fall on either side (FAISS and numpy round differently)
SLACK = 1e-3

MISSING: Any = object()  # "leave the keyword out"


class ComputeFailed(Exception):
    """The caller's own failure inside a compute function: it must pass through unchanged."""


# ------------------------------------------------------------------------------- strategies
class _Deep(dict):  # type: ignore[type-arg]
    """A dict with a short repr (hypothesis prints the arguments of a failing step)."""

    def __repr__(self) -> str:
        return "<a dict nested 5,000 deep>"


def _deep(levels: int) -> dict[str, Any]:
    """A dict nested ``levels`` deep (past Python's recursion limit at a few thousand)."""
    root: dict[str, Any] = _Deep()
    node = root
    for _ in range(levels):
        node["a"] = {}
        node = node["a"]
    return root


DEEP = _deep(5000)
WORDS = ["price", "item", "capital", "France", "weather", "Paris", "refund", "order", "42"]
#: prompts that repeat, paraphrase and collide after normalisation
PHRASES = [
    "what is the price of item 42",
    "What is the price of item 42?",
    "  what is the   price of item 42 ",
    "what is the capital of France",
    "capital of France",
    "ｗｈａｔ ｉｓ ｔｈｅ capital of France",  # NFKC folds the full-width letters
    "refund my order",
    "émoji 🙂 prompt",
    "x" * 5000,
]
#: text a store keeps: no lone surrogates, no NUL (both are refused: see bad_prompts)
storable = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
odd_text = st.text(alphabet=storable, min_size=1, max_size=40).filter(lambda s: s.strip() != "")
prompts = st.one_of(
    st.sampled_from(PHRASES),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join),
    odd_text,
)
bad_prompts = st.sampled_from(
    ["", "   ", "\n\t", None, 5, 4.2, b"bytes", ["a"], {"p": 1}, "lone \ud800 surrogate", "a\x00b"]
)
any_prompt = st.one_of(*[prompts] * 4, bad_prompts)

responses = st.one_of(
    st.sampled_from(["Paris", "", "42 euros", "y" * 3000, "line\nbreak"]),
    st.text(alphabet=storable, max_size=30),
)
any_response = st.one_of(
    *[responses] * 4, st.sampled_from([None, 7, b"b", ["r"], "x\udfff", "line\nbreak\x00nul"])
)

NAMESPACES = ["default", "acme", "beta", "user:42", "acme:eu"]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=8),
)
valid_scopes = st.builds(
    Scope,
    namespace=st.sampled_from(NAMESPACES),
    model=st.sampled_from(["", "gpt-x"]),
    params=st.sampled_from([{}, {"temperature": 0}, {"temperature": 0.0, "max_tokens": 5}]),
    system=st.sampled_from(["", "be brief"]),
    context=st.sampled_from([(), ["hi"], [{"role": "user", "content": "hi"}]]),
)
scopes = st.one_of(st.none(), valid_scopes, valid_scopes)
bad_scopes = st.sampled_from([{"namespace": "acme"}, "acme", 5, ("acme",)])
any_scope = st.one_of(*[scopes] * 4, bad_scopes)
#: arguments for the Scope constructor itself, many of them wrong
scope_args = st.fixed_dictionaries(
    {},
    optional={
        "namespace": st.one_of(st.sampled_from(["", None, 5, "ns", "a" * 300, "\ud800"]), odd_text),
        "model": st.one_of(st.sampled_from([None, 1, "m"]), st.text(max_size=5)),
        "params": st.one_of(
            st.dictionaries(st.text(max_size=5), json_scalars, max_size=3),
            st.sampled_from(
                [
                    {"t": math.nan},
                    {"t": math.inf},
                    {"t": object()},
                    {"t": {1, 2}},
                    {1: "int key"},
                    [("a", 1)],
                    "params",
                    None,
                ]
            ),
        ),
        "system": st.one_of(st.sampled_from([None, 3, b"s"]), st.text(max_size=5)),
        "context": st.one_of(
            st.lists(st.one_of(st.text(max_size=5), st.just({"role": "user"})), max_size=3),
            st.sampled_from(["a string", b"bytes", 5, None, [object()], [math.nan], [DEEP]]),
        ),
    },
)

ttls = st.one_of(
    st.just(MISSING),
    st.none(),
    st.sampled_from([0, 0.0, 1, 30, 3600, 1e308, 10**12]),
    st.floats(min_value=0, max_value=1e6),
)
bad_ttls = st.sampled_from([-1, -1e-9, math.nan, math.inf, -math.inf, "10", True, 10**400, [1]])
any_ttl = st.one_of(*[ttls] * 4, bad_ttls)

TAGS = ["t1", "t2", "user:42", "eu:x", "table:users"]
tag_lists = st.one_of(
    st.just(MISSING),
    st.none(),
    st.lists(st.sampled_from(TAGS), max_size=4),
    st.lists(st.sampled_from(TAGS), max_size=3).map(tuple),
)
bad_tags = st.sampled_from(["t1", [""], [None], ["t1", 5], [b"t1"], [["t1"]], ["\ud800"], 5])
any_tags = st.one_of(*[tag_lists] * 4, bad_tags)

json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
metadatas = st.one_of(
    st.just(MISSING), st.none(), st.dictionaries(st.text(max_size=8), json_values, max_size=4)
)
bad_metadata = st.sampled_from(
    [{"x": math.nan}, {"x": object()}, {"x": {1, 2}}, {(1, 2): "tuple key"}, ["a"], "meta", 5, DEEP]
)
any_metadata = st.one_of(*[metadatas] * 4, bad_metadata)

good_thresholds = st.one_of(st.none(), st.floats(min_value=-1, max_value=1))
thresholds = st.one_of(
    *[good_thresholds] * 4, st.sampled_from([math.nan, math.inf, 2.0, -1.5, "0.9", True])
)
radii = st.one_of(
    *[st.floats(min_value=-1, max_value=1)] * 4, st.sampled_from([math.nan, 1.5, "0.5", None])
)
bad_ids = st.sampled_from(["", "no-such-id", "0" * 32, None, 5, ["id"], b"id", "\ud800"])


# ------------------------------------------------------------------------------ observation
@dataclass(frozen=True)
class View:
    """What must not change about an entry unless a call is documented to change it."""

    prompt: str
    response: str
    digest: str
    namespace: str
    version: int
    tags: tuple[str, ...]
    metadata: str
    expires_at: float | None
    created_at: float


def snapshot(cache: SemanticCache) -> dict[str, View]:
    """Every stored entry, by id (expired ones included until removed)."""
    return {
        e.entry_id: View(
            e.prompt,
            e.response,
            e.scope.digest,
            e.scope.namespace,
            e.version,
            tuple(sorted(e.tags)),
            json.dumps(e.metadata, sort_keys=True),
            e.expires_at,
            e.created_at,
        )
        for e in cache.iter_entries()
    }


def _text_ok(text: str) -> bool:
    """Whether ``text`` is a prompt the cache takes (valid Unicode, no NUL), so the test may
    embed it."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def json_form(metadata: Any) -> str:
    """Metadata as the store gives it back (JSON round trip: tuples become lists, ...)."""
    return json.dumps(json.loads(json.dumps(dict(metadata or {}))), sort_keys=True)


def kw(**values: Any) -> dict[str, Any]:
    """Keyword arguments without the ones left out (MISSING)."""
    return {k: v for k, v in values.items() if v is not MISSING}


class APIMachine(RuleBasedStateMachine):
    """One cache, called with generated arguments; the rule checked after every call."""

    make_embedder: Callable[[], Any] = HashEmbedder

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="semcache-apifuzz-"))
        self.clock = FakeClock()
        self.embedder = type(self).make_embedder()
        self.cache = SemanticCache(
            self.folder / "data", embedder=self.embedder, clock=self.clock, threshold=THRESHOLD
        )
        self.versions: dict[str, int] = {}
        self.before: dict[str, View] = {}
        self.vectors: dict[str, np.ndarray] = {}

    def teardown(self) -> None:
        try:
            self.cache.close()
            self.cache.close()  # idempotent
            for call in (
                lambda: self.cache.lookup("after close"),
                lambda: self.cache.store("after close", "x"),
                lambda: self.cache.stats(),
            ):
                with pytest.raises(CacheClosedError):
                    call()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------------------- machinery
    @initialize(
        items=st.lists(
            st.tuples(prompts, responses, scopes, ttls, tag_lists, metadatas), max_size=12
        )
    )
    def start(self, items: list[tuple[Any, ...]]) -> None:
        """Begin with some entries (each store checked), so later calls have something to
        find, change and lose."""
        self.before = snapshot(self.cache)
        for prompt, response, scope, ttl, tags, metadata in items:
            self.store(prompt, response, scope, ttl, tags, metadata, MISSING)
            self.before = snapshot(self.cache)

    def attempt(self, fn: Callable[[], Any]) -> tuple[Any, SemcacheError | None]:
        """Run one call: its value, or the SemcacheError it raised. Anything else fails the
        test (it propagates). The outcome is an event (``--hypothesis-show-statistics``)."""
        name = sys._getframe(1).f_code.co_name  # the rule making the call
        try:
            value = fn()
        except SemcacheError as exc:
            event(f"{name}: {type(exc).__name__}")
            return None, exc
        event(f"{name}: returned")
        return value, None

    def now(self) -> float:
        return self.clock.now()

    def lazily_removable(self, view: View) -> bool:
        """Entries any call may clean up: expired, or of an older namespace version."""
        expired = view.expires_at is not None and view.expires_at <= self.now()
        return expired or view.version < self.versions.get(view.namespace, 0)

    def live(self, view: View) -> bool:
        return not self.lazily_removable(view)

    def settle(
        self,
        *,
        may_remove: set[str] = frozenset(),  # type: ignore[assignment]
        must_remove: set[str] = frozenset(),  # type: ignore[assignment]
        changed: set[str] = frozenset(),  # type: ignore[assignment]
        added: int = 0,
    ) -> tuple[dict[str, View], set[str], set[str]]:
        """Check the step against the entries before it; returns (after, removed, new)."""
        after = snapshot(self.cache)
        removed = set(self.before) - set(after)
        new = set(after) - set(self.before)
        assert must_remove <= removed, f"entries not removed: {must_remove - removed}"
        for entry_id in removed - must_remove - may_remove:
            assert self.lazily_removable(self.before[entry_id]), (
                f"entry {entry_id} {self.before[entry_id]} was lost"
            )
        assert len(new) <= added, f"unexpected new entries {[after[i] for i in new]}"
        for entry_id in set(after) & set(self.before) - changed:
            assert after[entry_id] == self.before[entry_id], (
                f"entry {entry_id} altered: {self.before[entry_id]} -> {after[entry_id]}"
            )
        return after, removed, new

    def same_key(self, prompt: Any, scope: Any) -> set[str]:
        """Entries an exact repeat of ``prompt`` in ``scope`` would replace (or
        ``delete_prompt`` delete): same scope, same normalised prompt, the namespace's current
        version, expired or not."""
        try:
            norm = normalise(prompt)
        except SemcacheError:
            return set()
        digest = (scope or Scope()).digest if isinstance(scope, Scope | None) else None
        return {
            i
            for i, v in self.before.items()
            if v.prompt == norm
            and v.digest == digest
            and v.version == self.versions.get(v.namespace, 0)
        }

    def check_hit(self, hit: Any, scope: Any, threshold: Any) -> None:
        """A served hit is a live entry of the asked scope, with that entry's answer."""
        if hit is None:
            return
        view = self.before.get(hit.entry_id)
        assert view is not None, f"hit of an entry that is not stored: {hit}"
        assert self.live(view), f"served an expired or version-dead entry: {view}"
        assert view.digest == (scope or Scope()).digest, "served from another scope"
        assert hit.response == view.response and hit.prompt == view.prompt
        floor = THRESHOLD if threshold is None else threshold
        assert hit.tier == "l1" or hit.similarity >= floor - SLACK

    def ids(self) -> st.SearchStrategy[Any]:
        # in the order the entries were stored (iter_entries' order), never sorted: the ids are
        # random, and a choice must pick the same entry when hypothesis replays it
        known = list(self.before)
        return st.sampled_from(known) if known else bad_ids

    def cosine(self, a: str, b: np.ndarray) -> float:
        if a not in self.vectors:
            self.vectors[a] = self.cache.embed([a])[0]
        return float(self.vectors[a] @ b)

    @invariant()
    def verify_is_clean(self) -> None:
        assert self.cache.verify() == []
        self.before = snapshot(self.cache)

    # ----------------------------------------------------------------------------- reads
    @rule(prompt=any_prompt, scope=any_scope, threshold=thresholds, probe=st.booleans())
    def lookup(self, prompt: Any, scope: Any, threshold: Any, probe: bool) -> None:
        call = self.cache.probe if probe else self.cache.lookup
        value, error = self.attempt(lambda: call(prompt, scope=scope, threshold=threshold))
        self.settle()
        if error is None:
            hit = value[0] if probe else value
            if probe:
                nearest = value[1]
                assert nearest is None or -1 - SLACK <= nearest <= 1 + SLACK
            self.check_hit(hit, scope, threshold)

    @rule(prompt=any_prompt, scope=any_scope, as_vector=st.booleans())
    def nearest(self, prompt: Any, scope: Any, as_vector: bool) -> None:
        vector = None
        if as_vector and isinstance(prompt, str) and prompt.strip() and _text_ok(prompt):
            vector = self.embedder.embed([normalise(prompt)])[0]
        value, error = self.attempt(
            lambda: self.cache.nearest_similarity(prompt, scope=scope, vector=vector)
        )
        self.settle()
        assert error is not None or value is None or -1 - SLACK <= value <= 1 + SLACK

    @rule(data=st.data(), bad=st.booleans())
    def get(self, data: st.DataObject, bad: bool) -> None:
        entry_id = data.draw(bad_ids if bad else self.ids())
        value, error = self.attempt(lambda: self.cache.get(entry_id))
        self.settle()
        if isinstance(entry_id, str) and entry_id in self.before:
            assert error is None and value.response == self.before[entry_id].response
        else:
            assert isinstance(error, EntryNotFoundError), f"get({entry_id!r}) -> {value!r}"

    @rule(namespace=st.one_of(st.none(), st.sampled_from(NAMESPACES), st.sampled_from(["", 5])))
    def iter_entries(self, namespace: Any) -> None:
        value, error = self.attempt(lambda: list(self.cache.iter_entries(namespace=namespace)))
        self.settle()
        if error is None and isinstance(namespace, str) and namespace:
            expected = {i for i, v in self.before.items() if v.namespace == namespace}
            assert {e.entry_id for e in value} == expected

    @rule()
    def stats(self) -> None:
        value, error = self.attempt(self.cache.stats)
        self.settle()
        assert error is None and isinstance(value, dict)

    @rule(namespace=st.one_of(st.sampled_from(NAMESPACES), st.sampled_from(["", None, 5])))
    def version(self, namespace: Any) -> None:
        value, error = self.attempt(lambda: self.cache.version(namespace))
        self.settle()
        if error is None and isinstance(namespace, str):
            assert value == self.versions.get(namespace, 0)

    @rule(args=scope_args)
    def make_scope(self, args: dict[str, Any]) -> None:
        value, error = self.attempt(lambda: Scope(**args))
        self.settle()
        if error is None:
            assert Scope.from_dict(value.canonical()).digest == value.digest

    # ---------------------------------------------------------------------------- writes
    @rule(
        prompt=any_prompt,
        response=any_response,
        scope=any_scope,
        ttl=any_ttl,
        tags=any_tags,
        metadata=any_metadata,
        fence=st.sampled_from([MISSING, MISSING, MISSING, "1", 1.5, True, -1, 2**63, 10**30]),
    )
    def store(
        self, prompt: Any, response: Any, scope: Any, ttl: Any, tags: Any, metadata: Any, fence: Any
    ) -> None:
        replaced = self.same_key(prompt, scope)
        args = kw(scope=scope, ttl=ttl, tags=tags, metadata=metadata, fence=fence)
        value, error = self.attempt(lambda: self.cache.store(prompt, response, **args))
        if error is not None:
            self.settle()
            return
        after, _, new = self.settle(must_remove=replaced, added=1)
        assert new <= {value}, f"store returned {value!r}, new entries {new}"
        if value not in after:  # cleaned up at once: only an entry that expires at once may be
            expires_now = isinstance(ttl, int | float) and self.now() + ttl <= self.now()
            assert expires_now, f"store returned {value!r}, which is not stored"
            return
        view = after[value]
        assert view.prompt == normalise(prompt) and view.response == response
        assert view.digest == (scope or Scope()).digest
        assert view.tags == (() if tags is MISSING else tuple(sorted(set(tags or ()))))
        assert view.metadata == json_form(None if metadata is MISSING else metadata)
        expected_ttl = None if ttl is MISSING else ttl
        if expected_ttl is None:
            assert view.expires_at is None
        else:
            assert view.expires_at == pytest.approx(self.now() + float(expected_ttl))

    @rule(
        prompt=prompts,
        response=responses,
        scope=scopes,
        ttl=ttls,
        tags=tag_lists,
        metadata=metadatas,
    )
    def store_valid(
        self, prompt: Any, response: Any, scope: Any, ttl: Any, tags: Any, metadata: Any
    ) -> None:
        self.store(prompt, response, scope, ttl, tags, metadata, MISSING)

    @rule(
        items=st.one_of(
            st.lists(
                st.one_of(
                    st.tuples(any_prompt, any_response),
                    st.fixed_dictionaries(
                        {"prompt": any_prompt, "response": any_response},
                        optional={"scope": any_scope, "ttl": any_ttl, "tags": any_tags},
                    ),
                    st.sampled_from([None, ("only one",), "ab", 5]),
                ),
                max_size=5,
            ),
            st.sampled_from([5, None]),  # not an iterable of items at all
        ),
        scope=any_scope,
        ttl=any_ttl,
        tags=any_tags,
    )
    def store_many(self, items: Any, scope: Any, ttl: Any, tags: Any) -> None:
        if not isinstance(items, list):
            _, error = self.attempt(lambda: self.cache.store_many(items))
            self.settle()
            assert error is not None
            return
        items = [
            {k: v for k, v in item.items() if v is not MISSING} if isinstance(item, dict) else item
            for item in items
        ]
        may = set()
        for item in items:
            if isinstance(item, dict):
                may |= self.same_key(item["prompt"], item.get("scope", scope))
            elif isinstance(item, tuple) and len(item) == 2:
                may |= self.same_key(item[0], scope)
        args = kw(scope=scope, ttl=ttl, tags=tags)
        value, error = self.attempt(lambda: self.cache.store_many(items, **args))
        if error is not None:
            self.settle()
            return
        _, _, new = self.settle(may_remove=may, added=len(items))
        assert len(value) == len(items) and new <= set(value)

    @rule(
        prompt=any_prompt,
        scope=any_scope,
        ttl=any_ttl,
        tags=any_tags,
        metadata=any_metadata,
        threshold=thresholds,
        outcome=st.sampled_from(["answer", "answer", "raise", "not a str", "not callable"]),
    )
    def get_or_compute(
        self,
        prompt: Any,
        scope: Any,
        ttl: Any,
        tags: Any,
        metadata: Any,
        threshold: Any,
        outcome: str,
    ) -> None:
        calls: list[str] = []

        def compute(p: str) -> Any:
            calls.append(p)
            if outcome == "raise":
                raise ComputeFailed(p)
            return 12345 if outcome == "not a str" else f"computed for {p}"

        replaced = self.same_key(prompt, scope)
        args = kw(scope=scope, ttl=ttl, tags=tags, metadata=metadata, threshold=threshold)
        fn: Any = 5 if outcome == "not callable" else compute
        try:
            value, error = self.attempt(lambda: self.cache.get_or_compute(prompt, fn, **args))
        except ComputeFailed:  # the caller's own exception, passed through: nothing cached
            assert calls and outcome == "raise"
            self.settle()
            return
        if outcome == "not callable":
            assert error is not None, "a compute function that is not callable was accepted"
        if error is not None or not calls:
            self.settle()  # a refusal, or a hit: nothing changes
            if error is None:
                assert any(
                    v.response == value and v.digest == (scope or Scope()).digest and self.live(v)
                    for v in self.before.values()
                ), f"get_or_compute answered {value!r}, which no live entry of its scope holds"
            return
        assert value == f"computed for {prompt}"
        after, _, new = self.settle(may_remove=replaced, added=1)
        assert all(after[i].response == value for i in new)

    @rule(data=st.data(), bad=st.booleans())
    def delete(self, data: st.DataObject, bad: bool) -> None:
        entry_id = data.draw(bad_ids if bad else self.ids())
        value, error = self.attempt(lambda: self.cache.delete(entry_id))
        known = isinstance(entry_id, str) and entry_id in self.before
        self.settle(must_remove={entry_id} if known else set())  # type: ignore[arg-type]
        assert error is None and value is known

    @rule(prompt=any_prompt, scope=any_scope)
    def delete_prompt(self, prompt: Any, scope: Any) -> None:
        target = self.same_key(prompt, scope)
        value, error = self.attempt(lambda: self.cache.delete_prompt(prompt, scope=scope))
        if error is not None:
            self.settle()
            return
        self.settle(must_remove=target)
        assert value == len(target)

    @rule(
        data=st.data(),
        bad=st.booleans(),
        response=st.one_of(st.just(MISSING), any_response),
        prompt=st.one_of(st.just(MISSING), any_prompt),
        ttl=any_ttl,
        tags=any_tags,
        metadata=any_metadata,
    )
    def update(
        self,
        data: st.DataObject,
        bad: bool,
        response: Any,
        prompt: Any,
        ttl: Any,
        tags: Any,
        metadata: Any,
    ) -> None:
        entry_id = data.draw(bad_ids if bad else self.ids())
        args = kw(response=response, prompt=prompt, ttl=ttl, tags=tags, metadata=metadata)
        old = self.before.get(entry_id) if isinstance(entry_id, str) else None
        collide = set()
        if old is not None and prompt is not MISSING:
            try:
                norm = normalise(prompt)
                collide = {
                    i
                    for i, v in self.before.items()
                    if v.prompt == norm and v.digest == old.digest and i != entry_id
                }
            except SemcacheError:
                pass
        _value, error = self.attempt(lambda: self.cache.update(entry_id, **args))
        if error is not None:
            self.settle()
            if old is None:
                assert isinstance(error, EntryNotFoundError | InvalidInputError)
            return
        assert old is not None, f"update of an unknown id {entry_id!r} succeeded"
        after, _, _ = self.settle(changed={entry_id}, may_remove=collide)
        now = after[entry_id]
        assert now.response == (old.response if response is MISSING else response)
        assert now.prompt == (old.prompt if prompt is MISSING else normalise(prompt))
        assert now.digest == old.digest and now.created_at == old.created_at
        if tags is not MISSING:
            assert now.tags == tuple(sorted(set(tags or ())))
        else:
            assert now.tags == old.tags
        if metadata is not MISSING:
            assert now.metadata == json_form(metadata)
        else:
            assert now.metadata == old.metadata
        if ttl is MISSING:
            assert now.expires_at == old.expires_at
        elif ttl is None:
            assert now.expires_at is None
        else:
            assert now.expires_at == pytest.approx(self.now() + float(ttl))

    @rule(
        data=st.data(),
        response=st.one_of(st.just(MISSING), responses),
        prompt=st.one_of(st.just(MISSING), prompts),
        ttl=ttls,
        tags=tag_lists,
        metadata=metadatas,
    )
    def update_valid(
        self, data: st.DataObject, response: Any, prompt: Any, ttl: Any, tags: Any, metadata: Any
    ) -> None:
        self.update(data, False, response, prompt, ttl, tags, metadata)

    @rule(
        data=st.data(),
        bad=st.booleans(),
        correct=st.sampled_from([True, False, False, 1, "no", None]),
        similarity=st.one_of(
            st.just(MISSING),
            st.none(),
            st.floats(min_value=-1, max_value=1),
            st.sampled_from([math.nan, 2.0, "0.9"]),
        ),
    )
    def feedback(self, data: st.DataObject, bad: bool, correct: Any, similarity: Any) -> None:
        entry_id = data.draw(bad_ids if bad else self.ids())
        args = kw(similarity=similarity)
        _value, error = self.attempt(lambda: self.cache.feedback(entry_id, correct, **args))
        may = {entry_id} if correct is False and isinstance(entry_id, str) else set()
        self.settle(may_remove=may)
        if not isinstance(entry_id, str) or entry_id not in self.before:
            assert error is not None
        if not isinstance(correct, bool):
            assert error is not None

    # ---------------------------------------------------------------------- invalidation
    @rule(
        tags=st.one_of(
            *[st.lists(st.sampled_from(TAGS), max_size=3)] * 4,
            st.sampled_from([[""], [None], [5], ["t1", b"x"]]),
        ),
        namespace=st.one_of(
            st.none(), st.none(), st.sampled_from(NAMESPACES), st.sampled_from(["", 5])
        ),
    )
    def invalidate_tags(self, tags: list[Any], namespace: Any) -> None:
        value, error = self.attempt(lambda: self.cache.invalidate_tags(*tags, namespace=namespace))
        if error is not None:
            self.settle()
            return
        target = {
            i
            for i, v in self.before.items()
            if set(v.tags) & set(tags) and (namespace is None or v.namespace == namespace)
        }
        _, _removed, _ = self.settle(must_remove=target)
        assert value == len(target)

    @rule(namespace=st.one_of(st.sampled_from(NAMESPACES), st.sampled_from(["", None, 5])))
    def bump(self, namespace: Any) -> None:
        value, error = self.attempt(lambda: self.cache.bump(namespace))
        if error is None:
            self.versions[namespace] = self.versions.get(namespace, 0) + 1
            assert value == self.versions[namespace]
        self.settle()

    @rule(
        text=st.one_of(prompts, st.sampled_from(["", None, 5, [0.0, 1.0], "   "])),
        as_vector=st.booleans(),
        radius=radii,
        scope=st.one_of(st.none(), valid_scopes, bad_scopes),
    )
    def invalidate_similar(self, text: Any, as_vector: bool, radius: Any, scope: Any) -> None:
        query: Any = text
        if as_vector and isinstance(text, str) and text.strip():
            query = self.embedder.embed([normalise(text)])[0]
        value, error = self.attempt(
            lambda: self.cache.invalidate_similar(query, radius, scope=scope)
        )
        if error is not None:
            self.settle()
            return
        vector = (
            self.cache.embed([normalise(text)])[0]
            if isinstance(query, str)
            else np.asarray(query, dtype=np.float32)
        )
        vector = vector / np.linalg.norm(vector)
        in_scope = {
            i
            for i, v in self.before.items()
            if scope is None or (v.digest == scope.digest and self.live(v))
        }
        sims = {i: self.cosine(self.before[i].prompt, vector) for i in in_scope}
        must = {i for i, s in sims.items() if s >= radius + SLACK and self.live(self.before[i])}
        may = {i for i, s in sims.items() if s >= radius - SLACK}
        _, removed, _ = self.settle(must_remove=must, may_remove=may)
        assert set(value) <= removed | must and len(value) == len(set(value))

    @rule()
    def expire(self) -> None:
        target = {i for i, v in self.before.items() if self.lazily_removable(v)}
        value, error = self.attempt(self.cache.expire)
        self.settle(must_remove=target)
        assert error is None and value == len(target)

    @rule(seconds=st.sampled_from([0.5, 1, 30, 3600, 10**7]))
    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: len(self.before) > 0)
    @rule()
    def lookup_stored(self) -> None:
        """An exact repeat of a live stored prompt in its scope is served (that entry, or one
        equal to it)."""
        entry_id = next(iter(self.before))
        view = self.before[entry_id]
        entry = self.cache.get(entry_id)
        hit = self.cache.lookup(view.prompt, scope=entry.scope)
        self.settle()
        if self.live(view):
            assert hit is not None and hit.response == view.response
            self.check_hit(hit, entry.scope, None)


class RealModelMachine(APIMachine):
    """The same machine on the real model (all-MiniLM-L6-v2), loaded once."""

    model: Any = None

    @classmethod
    def make_embedder(cls) -> Any:  # type: ignore[override]
        if cls.model is None:
            from semcache.embed import SentenceTransformerEmbedder

            cls.model = SentenceTransformerEmbedder()
        return cls.model


#: no "explain" phase: it traces every line of a failing case again, for minutes
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)

TestAPIFuzz = pytest.mark.timeout(900)(APIMachine.TestCase)
TestAPIFuzz.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestAPIFuzzRealModel = pytest.mark.timeout(900)(RealModelMachine.TestCase)
TestAPIFuzzRealModel.settings = settings(
    max_examples=6,
    stateful_step_count=15,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ---------------------------------------------------------------- known holes, pinned
@pytest.fixture
def fast(tmp_path: Path) -> Iterator[SemanticCache]:
    cache = SemanticCache(tmp_path / "c", embedder=HashEmbedder(), clock=FakeClock())
    yield cache
    assert cache.verify() == []
    cache.close()


def _stored(cache: SemanticCache) -> str:
    entry_id = cache.store("a prompt to aim at", "an answer")
    assert entry_id is not None
    return entry_id


#: calls the library once answered with an exception that was not a SemcacheError (found by the
#: machine above), and the exception they raised then; each is now refused with a typed error.
KNOWN_HOLES: list[tuple[str, Callable[[SemanticCache], Any], type[BaseException]]] = [
    ("lone surrogate in a prompt", lambda c: c.store("hi \ud800", "x"), UnicodeEncodeError),
    ("lone surrogate in a lookup", lambda c: c.lookup("hi \ud800"), UnicodeEncodeError),
    ("lone surrogate in a response", lambda c: c.store("hi", "x\udfff"), UnicodeEncodeError),
    ("lone surrogate in a tag", lambda c: c.store("hi", "x", tags=["\ud800"]), UnicodeEncodeError),
    (
        "lone surrogate in a tag to invalidate",
        lambda c: c.invalidate_tags("\ud800"),
        UnicodeEncodeError,
    ),
    ("lone surrogate in a namespace", lambda c: Scope(namespace="\ud800"), UnicodeEncodeError),
    ("lone surrogate in bump's namespace", lambda c: c.bump("\ud800"), UnicodeEncodeError),
    ("lone surrogate as an entry id (get)", lambda c: c.get("\ud800"), UnicodeEncodeError),
    (
        "lone surrogate as an entry id (update)",
        lambda c: c.update("\ud800", response="x"),
        UnicodeEncodeError,
    ),
    (
        "lone surrogate in an update's response",
        lambda c: c.update(_stored(c), response="\ud800"),
        UnicodeEncodeError,
    ),
    ("tags that are not iterable", lambda c: c.store("hi", "x", tags=5), TypeError),
    ("store_many of a non-iterable", lambda c: c.store_many(5), TypeError),  # type: ignore[arg-type]
    (
        "metadata nested past the recursion limit",
        lambda c: c.store("hi", "x", metadata=_deep(5000)),
        RecursionError,
    ),
    (
        "scope context nested past the recursion limit",
        lambda c: Scope(context=[_deep(5000)]),
        RecursionError,
    ),
    (
        "get_or_compute with a compute function that is not callable",
        lambda c: c.get_or_compute("hi", 5),  # type: ignore[arg-type]
        TypeError,
    ),
]


@pytest.mark.parametrize(
    ("call", "raised"),
    [pytest.param(call, raised, id=name) for name, call, raised in KNOWN_HOLES],
)
def test_known_holes_raise_a_semcache_error(
    fast: SemanticCache, call: Callable[[SemanticCache], Any], raised: type[BaseException]
) -> None:
    before = snapshot(fast)
    with pytest.raises(SemcacheError):
        call(fast)
    after = snapshot(fast)
    assert set(before) <= set(after) and all(after[i] == v for i, v in before.items())


def test_an_id_that_cannot_exist_is_not_found(fast: SemanticCache) -> None:
    assert fast.delete("\ud800") is False  # like any unknown id: delete is idempotent
    with pytest.raises(SemcacheError):
        fast.get("\ud800")


def test_feedback_on_an_id_that_cannot_exist(fast: SemanticCache) -> None:
    with pytest.raises(SemcacheError):
        fast.feedback("\ud800", True)
