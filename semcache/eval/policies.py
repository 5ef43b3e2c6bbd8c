"""The policies a comparison runs, and how a policy decides a batch of labelled pairs.

Peers' defaults are reproduced on our similarity scale (cosine of unit vectors):
GPTCache's ``similarity_threshold=0.8`` with its distance evaluation amounts to cosine >= 0.6,
and RedisVL's default ``distance_threshold=0.1`` (cosine distance) to cosine >= 0.9.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..threshold import (
    DEFAULT_THRESHOLD,
    CalibratedThreshold,
    HitPolicy,
    StaticThreshold,
    default_policy,
)
from .data import Pair

GPTCACHE_RULE = 0.6
REDISVL_DEFAULT = 0.9


@dataclass(frozen=True)
class NamedPolicy:
    """A policy with the row label it gets in a comparison table."""

    name: str
    policy: HitPolicy
    note: str = ""


def decide(policy: HitPolicy, pairs: Sequence[Pair], similarities: np.ndarray) -> np.ndarray:
    """Would ``policy`` serve the answer cached for ``a`` when ``b`` is looked up?

    Plain thresholds are vectorised; other policies are asked pair by pair, and only for
    pairs above their ``min_similarity`` (as the cache does).
    """
    sims = np.asarray(similarities, dtype=np.float64)
    above = sims >= policy.min_similarity
    if type(policy) in (StaticThreshold, CalibratedThreshold):
        return above
    out = np.zeros(len(pairs), dtype=bool)
    for i in np.flatnonzero(above):
        p = pairs[int(i)]
        out[i] = bool(policy.accept(p.b, p.a, float(sims[i])))
    return out


def standard_policies(
    calibrated: CalibratedThreshold | None = None, *, include_default: bool = True
) -> list[NamedPolicy]:
    """Peers' rules, the old static default, a calibrated threshold, and our policies."""
    from ..verifier import shipped_policy

    out = [
        NamedPolicy(f"GPTCache rule (cos>={GPTCACHE_RULE})", StaticThreshold(GPTCACHE_RULE)),
        NamedPolicy(f"RedisVL default (cos>={REDISVL_DEFAULT})", StaticThreshold(REDISVL_DEFAULT)),
        NamedPolicy(f"static {DEFAULT_THRESHOLD}", StaticThreshold(DEFAULT_THRESHOLD)),
    ]
    if calibrated is not None:
        out.append(
            NamedPolicy(
                f"calibrated (cos>={calibrated.threshold:.3f})", calibrated, calibrated.fit_on or ""
            )
        )
    for shape in ("score", "veto"):
        ver = shipped_policy(shape)
        out.append(
            NamedPolicy(
                f"verifier {shape} (cos>={ver.min_similarity:.3g}, p>={ver.min_score:.2f})",
                ver,
                f"hard-negative verifier, shipped model, {shape} operating point",
            )
        )
    if include_default:
        out.append(NamedPolicy("default_policy()", default_policy(), repr(default_policy())))
    return out
