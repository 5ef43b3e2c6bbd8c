"""A hit policy that holds a wrong-answer rate the user sets, and learns from labels.

``ErrorBudget(target_error=0.02)`` serves a semantic candidate when its *score* (the shipped
verifier's P(same answer), behind the near-miss guards) is at or above an operating point,
and it moves that point from labels it gets on the cache's own traffic, so that the exact
one-sided Clopper-Pearson upper bound of the wrong-answer rate among served candidates stays
at or under the target at the stated confidence:

* **from the first lookup** the point is the default policy's (``shipped_policy("default")``:
  a cosine floor and a verifier score chosen offline by ``evals/choose_default.py`` to serve
  at most 2% wrong answers per lookup on every validation workload), kept until the labels
  say otherwise, so it starts where ``SemanticCache(path)`` is;
* **free labels**: a candidate the policy refused is answered by the LLM and stored; whether
  the new answer agrees with the candidate's answer labels that candidate's score;
* **exploration**: a share (``explore``) of would-be hits in the uncertain band just above the
  point are sent to the LLM anyway where a compute function exists, and the agreement of the
  two answers labels the hit;
* **feedback**: ``observe(correct, score, source="feedback")`` from an explicit verdict.

Labels are kept per namespace as counts in score bins (a bounded, JSON-able state that can live
in the store). With labels, the operating point is the lowest bin edge where the labels at or
above it bound the wrong rate by the target; a point below the prior's needs that evidence.
The bound is exact for labels drawn at random from the served band; choosing the point after
seeing the labels, and free labels drawn only from refused candidates, make it approximate:
``stats()`` reports the labels behind the point so that a reader can judge.

The hooks a cache facade calls (see :meth:`ErrorBudget.decide`, :meth:`should_explore`,
:meth:`observe`, :meth:`agree`) are documented on each method. Whether two answers agree is a
pluggable judge (:class:`TextJudge`, :class:`JsonJudge`, :class:`EmbeddingJudge`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import InvalidInputError

STATE_FORMAT = 1
SOURCES = ("free", "explore", "feedback")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# Agreement judges: do two answers say the same thing?
# ------------------------------------------------------------------------------------------


@runtime_checkable
class AgreementJudge(Protocol):
    """Decides whether a cached answer and a fresh answer to a similar prompt agree."""

    def agree(self, cached: str, fresh: str) -> bool: ...


_SPACE = re.compile(r"\s+")


def _norm_text(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower().rstrip(".!")


class TextJudge:
    """Agree when the answers are the same text (Unicode form, spacing, case, end mark aside)."""

    def agree(self, cached: str, fresh: str) -> bool:
        return _norm_text(cached) == _norm_text(fresh)


class JsonJudge:
    """Agree when both answers parse as the same JSON value; otherwise as :class:`TextJudge`."""

    def agree(self, cached: str, fresh: str) -> bool:
        try:
            return bool(json.loads(cached) == json.loads(fresh))
        except (ValueError, TypeError):
            return TextJudge().agree(cached, fresh)


class EmbeddingJudge:
    """Agree when the answers' embeddings are at least ``cut`` similar (cosine), or the same text.

    ``embed`` is any :class:`~semcache.embed.Embedder`'s ``embed``. The default cut (0.9) is a
    starting point, not a calibration: calibrate it on answer pairs of your own traffic with
    :func:`semcache.calibrate` (label 1 when two answers are interchangeable).
    """

    def __init__(self, embed: Callable[[list[str]], np.ndarray], cut: float = 0.9) -> None:
        if not -1.0 <= float(cut) <= 1.0:
            raise InvalidInputError("cut is a cosine similarity in [-1, 1]")
        self.embed = embed
        self.cut = float(cut)

    def agree(self, cached: str, fresh: str) -> bool:
        if TextJudge().agree(cached, fresh):
            return True
        v = np.asarray(self.embed([cached, fresh]), dtype=np.float64)
        return float(v[0] @ v[1]) >= self.cut


# ------------------------------------------------------------------------------------------
# Labels and the operating point
# ------------------------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def upper_bound(wrong: int, n: int, confidence: float) -> float:
    """Exact one-sided Clopper-Pearson upper bound of a rate after ``wrong`` of ``n``."""
    from scipy import stats

    if n <= 0 or wrong >= n:
        return 1.0
    return float(stats.beta.ppf(confidence, wrong + 1, n - wrong))


def lower_bound(wrong: int, n: int, confidence: float) -> float:
    """Exact one-sided Clopper-Pearson lower bound of a rate after ``wrong`` of ``n``."""
    from scipy import stats

    if n <= 0 or wrong <= 0:
        return 0.0
    return float(stats.beta.ppf(1.0 - confidence, wrong, n - wrong + 1))


@dataclass(frozen=True, slots=True)
class Decision:
    """What :meth:`ErrorBudget.decide` concluded about one candidate.

    ``serve``: the candidate is a hit at the current point. ``score``: its score (None when a
    guard refused it outright: no label can change that). ``threshold``: the point it was
    compared with. ``uncertain``: a would-be hit in the band exploration samples from.
    """

    serve: bool
    score: float | None
    threshold: float
    uncertain: bool


class _Labels:
    """Counts of right and wrong labels per score bin, for one namespace."""

    def __init__(self, bins: int) -> None:
        self.right = [0] * bins
        self.wrong = [0] * bins
        self.by_source = dict.fromkeys(SOURCES, 0)

    def to_dict(self) -> dict[str, Any]:
        return {"right": self.right, "wrong": self.wrong, "by_source": self.by_source}

    @classmethod
    def from_dict(cls, d: dict[str, Any], bins: int) -> _Labels:
        lab = cls(bins)
        right, wrong = list(map(int, d["right"])), list(map(int, d["wrong"]))
        if len(right) != bins or len(wrong) != bins or min(right + wrong, default=0) < 0:
            raise InvalidInputError("label counts do not match the number of bins")
        lab.right, lab.wrong = right, wrong
        for k, v in dict(d.get("by_source", {})).items():
            if k in lab.by_source:
                lab.by_source[k] = int(v)
        return lab


class ErrorBudget:
    """A :class:`~semcache.threshold.HitPolicy` that holds ``target_error`` with ``confidence``.

    ``scorer`` maps (query, candidate, similarity) to a score in [0, 1] or None (refused
    outright); the default is the near-miss guards then the shipped verifier's P(same
    answer). ``prior`` is the score threshold used until labels move it, and
    ``min_similarity`` the cosine floor below which no candidate is scored (defaults: the
    default policy's operating point, ``shipped_policy("default")``). ``explore`` is the
    share of uncertain would-be hits (score within ``band`` above the point) that
    :meth:`should_explore` sends to the LLM.
    """

    kind = "error_budget"

    def __init__(
        self,
        target_error: float = 0.02,
        *,
        confidence: float = 0.95,
        explore: float = 0.05,
        band: float = 0.15,
        bins: int = 40,
        min_similarity: float | None = None,
        prior: float | None = None,
        scorer: Callable[[str, str, float], float | None] | None = None,
        judge: AgreementJudge | None = None,
        seed: int | None = None,
    ) -> None:
        if not 0.0 < float(target_error) < 1.0:
            raise InvalidInputError("target_error is a rate in (0, 1)")
        if not 0.0 < float(confidence) < 1.0:
            raise InvalidInputError("confidence is in (0, 1)")
        if not 0.0 <= float(explore) <= 1.0 or not 0.0 <= float(band) <= 1.0:
            raise InvalidInputError("explore and band are shares in [0, 1]")
        if isinstance(bins, bool) or int(bins) < 2:
            raise InvalidInputError("bins must be at least 2")
        self.target_error = float(target_error)
        self.confidence = float(confidence)
        self.explore = float(explore)
        self.band = float(band)
        self.bins = int(bins)
        if scorer is None or prior is None or min_similarity is None:
            from .nearmiss import GuardedPolicy, exceeds_window
            from .verifier import shipped_policy

            point = shipped_policy("default")
            if scorer is None:
                guard = GuardedPolicy(_Always(-1.0))  # the floor is checked in decide()

                def scorer(q: str, c: str, s: float) -> float | None:
                    if guard.reason(q, c, s) is not None:
                        return None
                    if exceeds_window(q) or exceeds_window(c):
                        return 1.0  # above the window the guard passed only the same words
                    return point.score(q, c, s)

            prior = point.min_score if prior is None else prior
            min_similarity = point.min_similarity if min_similarity is None else min_similarity
        self.min_similarity = float(min_similarity)
        self.prior = float(prior)
        self.scorer = scorer
        self.judge: AgreementJudge = judge if judge is not None else TextJudge()
        self._rng = random.Random(seed)
        self._labels: dict[str, _Labels] = {}
        self._points: dict[str, float] = {}
        self._lock = threading.Lock()
        self._save: Callable[[dict[str, Any]], None] | None = None
        self._save_every = 16
        self._save_seconds = 5.0
        self._pending = 0
        self._saved_at = 0.0
        self._saving = threading.Lock()

    # -- the HitPolicy protocol -------------------------------------------------------------

    def accept(self, query: str, candidate: str, similarity: float) -> bool:
        """Serve at the default namespace's current point (no exploration, no labels)."""
        return self.decide(query, candidate, similarity).serve

    # -- hooks for the facade ---------------------------------------------------------------

    def decide(
        self, query: str, candidate: str, similarity: float, *, namespace: str = "default"
    ) -> Decision:
        """Score one candidate and compare it with ``namespace``'s operating point.

        Call it for the best candidates of a lookup (most similar first) instead of
        ``accept``; keep the returned :class:`Decision` with the lookup: its ``score`` is what
        a later label is recorded against.
        """
        point = self.threshold(namespace)
        if similarity < self.min_similarity:
            return Decision(False, None, point, False)
        score = self.scorer(query, candidate, similarity)
        if score is None:
            return Decision(False, None, point, False)
        serve = score >= point
        return Decision(serve, float(score), point, serve and score < point + self.band)

    def should_explore(self, decision: Decision, *, can_compute: bool) -> bool:
        """Whether to answer this would-be hit from the LLM anyway, to label it.

        Only uncertain would-be hits, only where a compute function exists (``get_or_compute``,
        ``@cached``, the client wrapper, the sidecar's upstream), with probability
        ``explore``. The facade then calls the LLM, returns its answer, and calls
        ``observe(agree(cached, fresh), decision.score, source="explore")``.
        """
        return bool(can_compute and decision.uncertain and self._rng.random() < self.explore)

    def agree(self, cached: str, fresh: str) -> bool:
        """The judge's verdict on two answers (a label: True means the cached one was right)."""
        return bool(self.judge.agree(cached, fresh))

    def observe(
        self, correct: bool, score: float, *, namespace: str = "default", source: str = "free"
    ) -> None:
        """Record one label: the answer cached for a candidate of ``score`` was right or not.

        ``source`` is ``"free"`` (a refused candidate, then the LLM's answer compared with the
        candidate's), ``"explore"`` or ``"feedback"`` (``cache.feedback``). The operating
        point is recomputed from the namespace's labels.
        """
        if source not in SOURCES:
            raise InvalidInputError(f"source must be one of {SOURCES}, not {source!r}")
        if not isinstance(score, int | float) or not math.isfinite(score):
            raise InvalidInputError("a label needs the finite score the candidate had")
        b = min(self.bins - 1, max(0, int(float(score) * self.bins)))
        with self._lock:
            lab = self._labels.setdefault(namespace, _Labels(self.bins))
            if correct:
                lab.right[b] += 1
            else:
                lab.wrong[b] += 1
            lab.by_source[source] += 1
            self._points[namespace] = self._fit(lab)
            self._pending += 1
            due = self._save is not None and (
                self._pending >= self._save_every
                or time.monotonic() - self._saved_at >= self._save_seconds
            )
        if due:
            self.flush()

    def persist_to(
        self,
        save: Callable[[dict[str, Any]], None],
        *,
        every: int = 16,
        seconds: float = 5.0,
    ) -> None:
        """Keep the labels where ``save`` puts them as they arrive, in batches.

        After a label, :meth:`state_dict` is handed to ``save`` once ``every`` labels are
        pending or ``seconds`` have passed since the last save, so a process that is killed
        loses at most the labels of one batch (the cache would pass a function that writes the
        store's ``policy_state``). A ``save`` that raises is logged and retried with the next
        label; :meth:`flush` saves now.
        """
        if not callable(save):
            raise InvalidInputError("save must be a function of the state dict")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidInputError("every is a count of labels, at least 1")
        if not isinstance(seconds, int | float) or not seconds >= 0:
            raise InvalidInputError("seconds is a duration, at least 0")
        with self._lock:
            self._save, self._save_every, self._save_seconds = save, every, float(seconds)
            self._saved_at = time.monotonic()

    def flush(self) -> bool:
        """Hand pending labels to the :meth:`persist_to` function now; True when saved."""
        save = self._save
        if save is None:
            return False
        with self._saving:  # one save at a time, outside the labels' lock
            with self._lock:
                if not self._pending:
                    return True
                pending = self._pending
                state = self._state_locked()
            try:
                save(state)
            except Exception as exc:  # keep the labels pending; the next label retries
                log.warning("error-budget labels not saved: %s", exc)
                return False
            with self._lock:
                self._pending -= pending
                self._saved_at = time.monotonic()
        return True

    def threshold(self, namespace: str = "default") -> float:
        """``namespace``'s current score threshold (the prior until labels move it)."""
        return self._points.get(namespace, self.prior)

    def _fit(self, lab: _Labels) -> float:
        """The operating point ``lab`` supports.

        Lower than the prior: going down from the prior one bin edge at a time, the last edge
        (of a labelled bin) before the first whose labels, scored at or above it, fail to bound
        the wrong rate by the target (exact one-sided Clopper-Pearson at ``confidence``).
        Higher: when the labels at or above the prior show, at the same confidence, that it
        serves more wrong answers than the target, the lowest edge above it whose labels keep
        the observed rate under the target (1.0, no semantic hits, when none does).
        """
        right = np.cumsum(lab.right[::-1])[::-1]  # labels with a score in bin >= b
        wrong = np.cumsum(lab.wrong[::-1])[::-1]
        prior_bin = min(self.bins - 1, max(0, math.ceil(self.prior * self.bins - 1e-9)))
        # Fewer labels than this cannot bound the rate by the target even with none wrong.
        n_min = math.log(1.0 - self.confidence) / math.log(1.0 - self.target_error)
        # Fixed-sequence testing: edges are tested from the prior downwards, and the first
        # edge whose bound fails ends the search, so picking the lowest passing edge does not
        # spend the confidence once per edge tried.
        best = None
        for b in range(prior_bin - 1, -1, -1):
            n, k = int(right[b] + wrong[b]), int(wrong[b])
            if n < n_min and best is None:
                continue  # not enough labels yet this high up: no test, keep going down
            if k / n >= self.target_error or upper_bound(k, n, self.confidence) > self.target_error:
                break
            if lab.right[b] + lab.wrong[b]:
                best = b  # never below the lowest score that has labels: no extrapolation
        if best is not None:
            return best / self.bins
        n, k = int(right[prior_bin] + wrong[prior_bin]), int(wrong[prior_bin])
        if k and lower_bound(k, n, self.confidence) > self.target_error:
            for b in range(prior_bin + 1, self.bins):
                n, k = int(right[b] + wrong[b]), int(wrong[b])
                if n and k / n <= self.target_error:
                    return b / self.bins
            return 1.0
        return self.prior

    # -- reporting and state ----------------------------------------------------------------

    def stats(self, namespace: str = "default") -> dict[str, Any]:
        """The operating point, the labels behind it and the bound they give."""
        point = self.threshold(namespace)
        lab = self._labels.get(namespace)
        if lab is None:
            lab = _Labels(self.bins)
        b = min(self.bins - 1, max(0, math.ceil(point * self.bins - 1e-9)))
        n = sum(lab.right[b:]) + sum(lab.wrong[b:])
        k = sum(lab.wrong[b:])
        return {
            "threshold": point,
            "source": "prior" if point == self.prior else "labels",
            "labels": sum(lab.right) + sum(lab.wrong),
            "labels_by_source": dict(lab.by_source),
            "served_labels": n,
            "served_wrong": k,
            "bound": upper_bound(k, n, self.confidence) if n else None,
            "target": self.target_error,
            "confidence": self.confidence,
        }

    def state_dict(self) -> dict[str, Any]:
        """The learned state (labels per namespace), JSON-able, to keep in the store."""
        with self._lock:
            return self._state_locked()

    def _state_locked(self) -> dict[str, Any]:
        """The state for a caller that holds the policy's lock (a deep copy)."""
        return json.loads(
            json.dumps(
                {
                    "format": STATE_FORMAT,
                    "bins": self.bins,
                    "namespaces": {ns: lab.to_dict() for ns, lab in self._labels.items()},
                }
            )
        )

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (after a restart); points are refitted."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise InvalidInputError("not an error-budget state (format 1)")
        if int(state.get("bins", -1)) != self.bins:
            raise InvalidInputError(f"state has {state.get('bins')} bins, this policy {self.bins}")
        try:
            labels = {
                str(ns): _Labels.from_dict(d, self.bins)
                for ns, d in dict(state["namespaces"]).items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"bad error-budget state: {exc}") from None
        with self._lock:
            self._labels = labels
            self._points = {ns: self._fit(lab) for ns, lab in labels.items()}

    def __repr__(self) -> str:
        return (
            f"ErrorBudget(target_error={self.target_error}, confidence={self.confidence}, "
            f"explore={self.explore}, threshold={self.threshold():.3f})"
        )


class _Always:
    """A policy that accepts everything above a floor (the guards' inner policy when scoring)."""

    def __init__(self, floor: float) -> None:
        self.min_similarity = floor

    def accept(self, query: str, candidate: str, similarity: float) -> bool:
        return True
