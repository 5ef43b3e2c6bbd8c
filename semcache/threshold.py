"""Hit policies: how a candidate's similarity (and text) turns into "serve it" or "miss".

One similarity scale everywhere: cosine similarity of unit vectors, in [-1, 1]; a candidate is a
hit when the policy accepts it, and every policy rejects candidates below its
``min_similarity``, which also bounds how far the index search has to look.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import InvalidInputError

#: The plain cosine rule's threshold (``StaticThreshold()``); the default *policy* is the
#: verifier (see :func:`default_policy`).
DEFAULT_THRESHOLD = 0.85


@runtime_checkable
class HitPolicy(Protocol):
    """Decides whether a cached prompt may answer a new one.

    ``min_similarity`` is a floor: candidates below it are never accepted. ``accept`` sees both
    texts so a policy can look past the cosine (numbers, negation, word order).
    """

    min_similarity: float

    def accept(self, query: str, candidate: str, similarity: float) -> bool: ...


def check_threshold(value: Any) -> float:
    """A similarity threshold must be a finite number in [-1, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInputError(f"a threshold must be a finite number, not {value!r}")
    if not -1.0 <= value <= 1.0:
        raise InvalidInputError(
            f"threshold {value} is outside [-1, 1]: it is a cosine similarity, not a distance"
        )
    return float(value)


class StaticThreshold:
    """One global cosine threshold: a hit when ``similarity >= threshold``."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.min_similarity = check_threshold(threshold)

    def accept(self, query: str, candidate: str, similarity: float) -> bool:
        return similarity >= self.min_similarity

    def __repr__(self) -> str:
        return f"StaticThreshold({self.min_similarity})"


def as_policy(value: float | HitPolicy | None) -> HitPolicy:
    """Turn a float, a policy or None (the default policy) into a policy."""
    if value is None:
        return default_policy()
    if isinstance(value, HitPolicy):
        return value
    return StaticThreshold(check_threshold(value))


def default_policy() -> HitPolicy:
    """The policy ``SemanticCache(path)`` uses when none is given: guards, then the verifier.

    The near-miss guards (:class:`semcache.nearmiss.GuardedPolicy`) come first: prompts whose
    numbers, units or dates differ are never a hit ("item 366" / "item 367"), and prompts
    longer than the model's 256-token window are a hit only with the same words. Then the
    shipped verifier (:mod:`semcache.verifier`) at its ``"default"`` operating point (a cosine
    floor and a verifier score), chosen on a mix of validation workloads by
    ``evals/choose_default.py``. The measured error rates are in the README. Pass
    ``threshold=0.85`` (or any float) for the plain cosine rule, without the guards.
    """
    from .nearmiss import GuardedPolicy
    from .verifier import shipped_policy

    return GuardedPolicy(shipped_policy("default"))


# --------------------------------------------------------------------------------------------
# Calibration: the lowest threshold whose false-hit rate is bounded, with an exact binomial bound.
# --------------------------------------------------------------------------------------------

POLICY_FORMAT = 1


def _fhr_upper(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on a rate after k of n (exact, via the beta ppf)."""
    from scipy import stats

    if k >= n:
        return 1.0
    return float(stats.beta.ppf(confidence, k + 1, n - k))


def _pairs_to_arrays(
    pairs_or_similarities: Any, labels: Any, embedder: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Accept (similarities, labels), or labelled pairs (objects/dicts with a, b, label)."""
    if labels is not None:
        sims = np.asarray(pairs_or_similarities, dtype=np.float64).ravel()
        lab = np.asarray(labels).astype(int).ravel()
        if sims.shape != lab.shape:
            raise InvalidInputError("similarities and labels must have the same length")
        return sims, lab
    rows = list(pairs_or_similarities)
    if not rows:
        raise InvalidInputError("no pairs to calibrate on")

    def field(r: Any, name: str) -> Any:
        return r[name] if isinstance(r, dict) else getattr(r, name)

    a = [str(field(r, "a")) for r in rows]
    b = [str(field(r, "b")) for r in rows]
    lab = np.asarray([int(field(r, "label")) for r in rows])
    if embedder is None:
        from .embed import SentenceTransformerEmbedder

        embedder = SentenceTransformerEmbedder()
    va, vb = embedder.embed(a), embedder.embed(b)
    return np.einsum("ij,ij->i", va, vb).astype(np.float64), lab


class CalibratedThreshold:
    """A global threshold chosen by :func:`calibrate`, with the evidence behind it.

    It is a :class:`HitPolicy` (``similarity >= threshold``) that also records the target, the
    confidence, the counts it was fit on and the expected hit rate, so a deployment can say
    which wrong-answer rate it was promised. Saved and loaded as JSON.
    """

    kind = "calibrated"

    def __init__(
        self,
        threshold: float,
        *,
        target_false_hit_rate: float,
        confidence: float,
        false_hit_rate: float,
        false_hit_rate_upper: float,
        expected_hit_rate: float,
        n_positive: int,
        n_negative: int,
        model_id: str | None = None,
        fit_on: str | None = None,
    ) -> None:
        self.min_similarity = check_threshold(threshold)
        self.threshold = self.min_similarity
        self.target_false_hit_rate = float(target_false_hit_rate)
        self.confidence = float(confidence)
        self.false_hit_rate = float(false_hit_rate)
        self.false_hit_rate_upper = float(false_hit_rate_upper)
        self.expected_hit_rate = float(expected_hit_rate)
        self.n_positive = int(n_positive)
        self.n_negative = int(n_negative)
        self.model_id = model_id
        self.fit_on = fit_on

    def accept(self, query: str, candidate: str, similarity: float) -> bool:
        return similarity >= self.min_similarity

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": POLICY_FORMAT,
            "kind": self.kind,
            "threshold": self.threshold,
            "target_false_hit_rate": self.target_false_hit_rate,
            "confidence": self.confidence,
            "false_hit_rate": self.false_hit_rate,
            "false_hit_rate_upper": self.false_hit_rate_upper,
            "expected_hit_rate": self.expected_hit_rate,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "model_id": self.model_id,
            "fit_on": self.fit_on,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibratedThreshold:
        try:
            return cls(
                d["threshold"],
                target_false_hit_rate=d["target_false_hit_rate"],
                confidence=d["confidence"],
                false_hit_rate=d.get("false_hit_rate", float("nan")),
                false_hit_rate_upper=d.get("false_hit_rate_upper", float("nan")),
                expected_hit_rate=d.get("expected_hit_rate", float("nan")),
                n_positive=d.get("n_positive", 0),
                n_negative=d.get("n_negative", 0),
                model_id=d.get("model_id"),
                fit_on=d.get("fit_on"),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"not a calibrated-threshold record: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        save_policy(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibratedThreshold:
        policy = load_policy(path)
        if not isinstance(policy, cls):
            raise InvalidInputError(f"{path} holds a {type(policy).__name__}, not a calibration")
        return policy

    def __repr__(self) -> str:
        return (
            f"CalibratedThreshold({self.threshold:.4f}, target_fhr={self.target_false_hit_rate}, "
            f"confidence={self.confidence}, expected_hit_rate={self.expected_hit_rate:.3f})"
        )


def calibrate(
    pairs_or_similarities: Any,
    labels: Any = None,
    *,
    target_false_hit_rate: float = 0.01,
    confidence: float = 0.95,
    embedder: Any = None,
    fit_on: str | None = None,
) -> CalibratedThreshold:
    """The lowest threshold whose false-hit rate is at most the target, with confidence.

    Give either labelled pairs (objects or dicts with ``a``, ``b``, ``label``; they are embedded
    with ``embedder``, default the packaged model) or an array of similarities plus ``labels``.
    With ``n`` negatives of which ``k`` score at or above a threshold, the exact one-sided
    Clopper-Pearson upper bound of the false-hit rate is ``Beta.ppf(confidence, k+1, n-k)``;
    the result is the lowest threshold where that bound is <= ``target_false_hit_rate``, so
    across calibration sets the true rate exceeds the target in at most ``1 - confidence`` of
    them. ``expected_hit_rate`` is the share of positives at or above it (the recall).

    Raises :class:`InvalidInputError` when there are too few negatives for any bound to reach
    the target (about ``3 / target`` are needed at 95%).
    """
    if not 0.0 < target_false_hit_rate < 1.0:
        raise InvalidInputError("target_false_hit_rate must be in (0, 1)")
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError("confidence must be in (0, 1)")
    sims, lab = _pairs_to_arrays(pairs_or_similarities, labels, embedder)
    if not np.isfinite(sims).all():
        raise InvalidInputError("similarities must be finite")
    if not set(np.unique(lab).tolist()) <= {0, 1}:
        raise InvalidInputError("labels must be 0 or 1")
    neg = np.sort(sims[lab == 0])[::-1]  # descending
    pos = sims[lab == 1]
    n = len(neg)
    if n == 0 or _fhr_upper(0, n, confidence) > target_false_hit_rate:
        raise InvalidInputError(
            f"{n} negatives are too few to bound the false-hit rate by {target_false_hit_rate} "
            f"at {confidence:.0%} confidence; about {math.ceil(3 / target_false_hit_rate)} needed"
        )
    # The bound grows with k, so find the largest k allowed (binary search on k).
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fhr_upper(mid, n, confidence) <= target_false_hit_rate:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    # Accept at most k negatives: the threshold sits just above the (k+1)-th highest negative;
    # ties with it move the threshold above the whole tie (fewer than k accepted, still bounded).
    threshold = float(np.nextafter(neg[k], np.inf))
    threshold = min(max(threshold, -1.0), 1.0)
    k_real = int(np.sum(neg >= threshold))
    return CalibratedThreshold(
        threshold,
        target_false_hit_rate=target_false_hit_rate,
        confidence=confidence,
        false_hit_rate=k_real / n,
        false_hit_rate_upper=_fhr_upper(k_real, n, confidence),
        expected_hit_rate=float(np.mean(pos >= threshold)) if len(pos) else float("nan"),
        n_positive=len(pos),
        n_negative=n,
        model_id=getattr(embedder, "model_id", None),
        fit_on=fit_on,
    )


# --------------------------------------------------------------------------------------------
# Policy persistence: one JSON document per policy, dispatched on its "kind".
# --------------------------------------------------------------------------------------------


def policy_to_dict(policy: HitPolicy) -> dict[str, Any]:
    """A JSON-able record of a policy (static, calibrated, or anything with ``to_dict``)."""
    to_dict = getattr(policy, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    if isinstance(policy, StaticThreshold):
        return {"format": POLICY_FORMAT, "kind": "static", "threshold": policy.min_similarity}
    raise InvalidInputError(f"cannot serialise a {type(policy).__name__}")


def policy_from_dict(d: dict[str, Any]) -> HitPolicy:
    """Rebuild a policy from :func:`policy_to_dict`'s record."""
    if not isinstance(d, dict):
        raise InvalidInputError("a policy record must be a JSON object")
    kind = d.get("kind")
    if kind == "static":
        return StaticThreshold(d["threshold"])
    if kind == "calibrated":
        return CalibratedThreshold.from_dict(d)
    if kind == "verifier":
        from .verifier import VerifierPolicy

        return VerifierPolicy.from_dict(d)
    if kind == "guarded":
        from .nearmiss import GuardedPolicy

        return GuardedPolicy.from_dict(d)
    raise InvalidInputError(f"unknown policy kind {kind!r}")


def save_policy(policy: HitPolicy, path: str | os.PathLike[str]) -> None:
    """Write a policy as JSON (atomically), so the cache and the sidecar can load it."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(policy_to_dict(policy), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p)


def load_policy(path: str | os.PathLike[str]) -> HitPolicy:
    """Read a policy saved by :func:`save_policy` (or a calibration's ``save``)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(f"no policy file at {p}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"cannot read policy {p}: {exc}") from None
    return policy_from_dict(d)
