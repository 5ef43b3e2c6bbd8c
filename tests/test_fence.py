"""A state machine against a reference model: no answer is ever served after the invalidation
that covers it returned, including answers computed while the invalidation ran.

Rules: store; store with a fence position taken before an invalidation; get_or_compute (sync and
async) whose compute step runs an invalidation of every kind (tags, tags in one namespace, bump,
delete, delete_prompt, update, invalidate_similar at radii on both sides of the prompt, expire
after a FakeClock tick) before returning; the same invalidations on their own; restart (close
and reopen). After every step each (prompt, namespace) is looked up, exactly and through the
index, and must give what the model says, and ``verify()`` must be clean.

AxisEmbedder makes similarities exact: topics are orthogonal, and ``"topic i variant j"`` is at
a known cosine from ``"topic i"``, so the model knows which radius covers what.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from semcache import FakeClock, Scope, SemanticCache

from .axis_embedder import AxisEmbedder, similarity

TOPICS = range(5)
NAMESPACES = ("a", "b")
TAGS = ("t0", "t1", "t2")
TTLS = (None, None, 10.0, 25.0)  # ticks are multiples of 7 s: never exactly at an expiry
TICKS = (0.0, 7.0, 14.0)
RADII = (0.98, 0.996, 0.999)  # variants 1, 2, 3 sit at 0.99875, 0.99504, 0.98894

topics = st.sampled_from(TOPICS)
namespaces = st.sampled_from(NAMESPACES)
tag_sets = st.lists(st.sampled_from(TAGS), max_size=2, unique=True)

# an invalidation: (kind, arguments); delete and update pick a live entry when they run
invalidations = st.one_of(
    st.tuples(st.just("none"), st.just(())),
    st.tuples(st.just("tags"), st.tuples(st.sampled_from(TAGS), st.none() | namespaces)),
    st.tuples(st.just("bump"), st.tuples(namespaces)),
    st.tuples(st.just("delete"), st.tuples(st.integers(0, 100))),
    st.tuples(st.just("delete_prompt"), st.tuples(topics, namespaces)),
    st.tuples(st.just("update"), st.tuples(st.integers(0, 100))),
    st.tuples(
        st.just("similar"),
        st.tuples(topics, st.integers(1, 3), st.sampled_from(RADII), st.none() | namespaces),
    ),
    st.tuples(st.just("expire"), st.tuples(st.sampled_from(TICKS))),
)


@dataclass
class Cached:
    """The model's view of one (topic, namespace)."""

    response: str
    tags: tuple[str, ...]
    expires_at: float | None
    entry_id: str | None
    maybe: bool = False  # either cached or not: the model learns which at the next lookup


class FenceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="semcache-fence-"))
        self.clock = FakeClock()
        self.cache = self._open()
        self.model: dict[tuple[int, str], Cached] = {}
        self.counter = 0

    def _open(self) -> SemanticCache:
        return SemanticCache(
            self.folder, embedder=AxisEmbedder(), clock=self.clock, threshold=0.9
        )

    def teardown(self) -> None:
        try:
            self.cache.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -------------------------------------------------------------------------- the model
    def _response(self) -> str:
        self.counter += 1
        return f"answer {self.counter}"

    def _live(self, key: tuple[int, str]) -> Cached | None:
        entry = self.model.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= self.clock.now():
            return None
        return entry

    def _targets(self) -> list[tuple[int, str]]:
        """Live entries whose id is known: what delete and update aim at."""
        return sorted(
            k
            for k, v in self.model.items()
            if self._live(k) is not None and not v.maybe and v.entry_id is not None
        )

    def _expiry(self, ttl: float | None) -> float | None:
        return None if ttl is None else self.clock.now() + ttl

    def _invalidate(self, kind: str, args: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
        """Run one invalidation on the cache and the model; returns what was actually run."""
        c = self.cache
        if kind in ("delete", "update"):
            targets = self._targets()
            if not targets:
                return "none", ()
            key = targets[args[0] % len(targets)]
            entry = self.model[key]
            assert entry.entry_id is not None
            if kind == "delete":
                assert c.delete(entry.entry_id) is True
                del self.model[key]
            else:
                response = self._response()
                c.update(entry.entry_id, response=response)
                entry.response = response
            return kind, (key,)
        if kind == "tags":
            tag, ns = args
            c.invalidate_tags(tag, namespace=ns)
            for key in [k for k, v in self.model.items() if tag in v.tags and ns in (None, k[1])]:
                del self.model[key]
        elif kind == "bump":
            (ns,) = args
            c.bump(ns)
            for key in [k for k in self.model if k[1] == ns]:
                del self.model[key]
        elif kind == "delete_prompt":
            topic, ns = args
            c.delete_prompt(f"topic {topic}", scope=Scope(namespace=ns))
            self.model.pop((topic, ns), None)
        elif kind == "similar":
            topic, variant, radius, ns = args
            scope = None if ns is None else Scope(namespace=ns)
            c.invalidate_similar(f"topic {topic} variant {variant}", radius, scope=scope)
            if similarity(0, variant) >= radius:
                for key in [k for k in self.model if k[0] == topic and ns in (None, k[1])]:
                    del self.model[key]
        elif kind == "expire":
            (tick,) = args
            self.clock.advance(tick)
            c.expire()
            for key in [k for k in self.model if self._live(k) is None]:
                del self.model[key]
        return kind, args

    @staticmethod
    def _covers(
        kind: str, args: tuple[Any, ...], key: tuple[int, str], tags: tuple[str, ...]
    ) -> bool | None:
        """Whether an invalidation covers an answer for ``key``: True, False, or None (either
        is allowed: an expire during the compute)."""
        topic, ns = key
        if kind == "tags":
            return args[0] in tags and args[1] in (None, ns)
        if kind == "bump":
            return args[0] == ns
        if kind == "delete_prompt":
            return tuple(args) == key
        if kind == "similar":
            t, variant, radius, scope_ns = args
            return t == topic and similarity(0, variant) >= radius and scope_ns in (None, ns)
        if kind == "expire":
            return None
        return False  # none; delete and update aim at other, live entries

    # -------------------------------------------------------------------------------- rules
    @rule(topic=topics, ns=namespaces, tags=tag_sets, ttl=st.sampled_from(TTLS))
    def store(self, topic: int, ns: str, tags: list[str], ttl: float | None) -> None:
        response = self._response()
        eid = self.cache.store(
            f"topic {topic}", response, scope=Scope(namespace=ns), tags=tags, ttl=ttl
        )
        assert eid is not None
        self.model[(topic, ns)] = Cached(response, tuple(tags), self._expiry(ttl), eid)

    @rule(inv=invalidations)
    def invalidate(self, inv: tuple[str, tuple[Any, ...]]) -> None:
        self._invalidate(*inv)

    @rule(
        topic=topics,
        ns=namespaces,
        tags=tag_sets,
        ttl=st.sampled_from(TTLS),
        inv=invalidations,
        via=st.sampled_from(["get_or_compute", "aget_or_compute", "store_fence"]),
    )
    def compute_across(
        self,
        topic: int,
        ns: str,
        tags: list[str],
        ttl: float | None,
        inv: tuple[str, tuple[Any, ...]],
        via: str,
    ) -> None:
        key, scope = (topic, ns), Scope(namespace=ns)
        if inv[0] == "expire":
            ttl = None  # the compute spans a tick: keep the answer's expiry out of the question
        before = self._live(key)
        ran: list[tuple[str, tuple[Any, ...]]] = []
        response = self._response()

        def llm(prompt: str) -> str:
            ran.append(self._invalidate(*inv))
            return response

        if via == "store_fence":
            if before is not None and not before.maybe:
                return  # the fence is for answers computed after a miss
            position = self.cache.position()
            llm(f"topic {topic}")
            eid = self.cache.store(
                f"topic {topic}", response, scope=scope, tags=tags, ttl=ttl, fence=position
            )
            stored: bool | None = eid is not None
        else:
            kwargs = {"scope": scope, "tags": tags, "ttl": ttl}
            if via == "get_or_compute":
                got = self.cache.get_or_compute(f"topic {topic}", llm, **kwargs)
            else:
                got = asyncio.run(self.cache.aget_or_compute(f"topic {topic}", llm, **kwargs))
            if not ran:  # a hit: the cached answer, which the model must have had
                assert before is not None, f"served {got!r} for {key}, which is not cached"
                assert got == before.response
                before.maybe = False
                return
            assert before is None or before.maybe, f"{key} was cached but recomputed"
            assert got == response  # the caller always gets the computed answer
            stored = None
        kind, args = ran[0]
        covered = self._covers(kind, args, key, tuple(tags))
        if covered is True:
            assert stored in (None, False), f"{via} stored {key} across {kind}{args}"
            self.model.pop(key, None)
            assert self.cache.lookup(f"topic {topic}", scope=scope) is None, (via, kind, args)
            return
        if covered is False:
            assert stored in (None, True), f"{via} fenced {key} across unrelated {kind}{args}"
        hit = self.cache.lookup(f"topic {topic}", scope=scope)
        if covered is False:
            assert hit is not None and hit.response == response, (via, kind, args, hit)
        if hit is None:
            self.model.pop(key, None)
        else:
            assert hit.response == response, (via, kind, args, hit)
            self.model[key] = Cached(response, tuple(tags), self._expiry(ttl), hit.entry_id)

    @rule(tick=st.sampled_from(TICKS[1:]))
    def tick(self, tick: float) -> None:
        self.clock.advance(tick)

    @rule()
    def restart(self) -> None:
        self.cache.close()
        self.cache = self._open()

    # --------------------------------------------------------------------------- invariants
    @invariant()
    def every_answer_is_the_models(self) -> None:
        for topic in TOPICS:
            for ns in NAMESPACES:
                key, scope = (topic, ns), Scope(namespace=ns)
                for text in (f"topic {topic}", f"topic {topic} variant 1"):
                    hit = self.cache.lookup(text, scope=scope)
                    entry = self._live(key)
                    if entry is None:
                        assert hit is None, f"{text!r} in {ns} served {hit.response!r}"
                    elif entry.maybe:
                        if hit is None:
                            del self.model[key]
                        else:
                            assert hit.response == entry.response
                            entry.maybe = False
                    else:
                        assert hit is not None, f"{text!r} in {ns} lost {entry.response!r}"
                        assert hit.response == entry.response, (text, ns, hit, entry)

    @invariant()
    def store_and_index_agree(self) -> None:
        assert self.cache.verify() == []


FenceMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_no_answer_is_served_after_the_invalidation_covering_it = FenceMachine.TestCase


def test_a_fenced_write_is_judged_on_its_vector_as_stored(tmp_path: Path) -> None:
    """The store keeps a vector in half precision, and a semantic invalidation removes what is
    within its radius of the stored vector: a fenced write is judged on that same vector, so
    one that the invalidation would remove is not cached after it, even at the radius's edge."""
    import numpy as np

    from semcache.vectorcodec import decode, encode

    from .fakes import HashEmbedder

    rng = np.random.default_rng(11)
    for _ in range(1000):  # a pair whose stored similarity is above its float32 one
        v, q = rng.standard_normal((2, 64)).astype(np.float32)
        v, q = v / np.linalg.norm(v), q / np.linalg.norm(q)
        exact, stored = float(q @ v), float(q @ decode(encode(v)))
        if stored - exact > 1e-5:
            break
    radius = (exact + stored) / 2  # covers the stored vector, not the float32 one
    cache = SemanticCache(tmp_path, embedder=HashEmbedder())
    try:
        position = cache.position()
        cache.invalidate_similar(q, radius)  # committed after the write's lookup
        assert cache.store("a prompt at the radius's edge", "old", vector=v, fence=position) is None
        uid = cache.store("a prompt at the radius's edge", "old", vector=v)  # unfenced: stored
        assert cache.invalidate_similar(q, radius) == [uid]  # and the same radius removes it
    finally:
        cache.close()
