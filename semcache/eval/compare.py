"""One comparison run: policies x labelled pairs, on the same embeddings, fit on one half.

The calibrated threshold is fit on a calibration split (by answer group, so no text is on both
sides) or on a separate file, and every policy is then reported on the evaluation split only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidInputError
from ..threshold import CalibratedThreshold, calibrate
from .data import Pair, split_pairs
from .embcache import EmbeddingCache
from .metrics import Confusion, per_source
from .policies import NamedPolicy, decide


@dataclass
class PolicyResult:
    """A policy's confusion on the evaluation pairs, overall and per source."""

    name: str
    by_source: dict[str, Confusion]
    note: str = ""

    @property
    def overall(self) -> Confusion:
        return self.by_source["all"]


@dataclass
class Comparison:
    """Everything one run measured (the table, the plots and results.json are built from it)."""

    eval_pairs: list[Pair]
    eval_sims: np.ndarray
    results: list[PolicyResult]
    calibrated: CalibratedThreshold | None = None
    calib_size: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "n_eval_pairs": len(self.eval_pairs),
            "n_calibration_pairs": self.calib_size,
            "calibrated": None if self.calibrated is None else self.calibrated.to_dict(),
            "policies": {
                r.name: {src: c.as_dict() for src, c in r.by_source.items()} for r in self.results
            },
            "notes": self.notes,
        }


def similarities(cache: EmbeddingCache, pairs: Sequence[Pair]) -> np.ndarray:
    """Cosine of each pair, embedding each distinct text once."""
    cache.preload([t for p in pairs for t in (p.a, p.b)])
    return cache.pair_similarities([p.a for p in pairs], [p.b for p in pairs])


def fit_calibration(
    calib_pairs: Sequence[Pair],
    calib_sims: np.ndarray,
    *,
    target_fhr: float,
    confidence: float,
    fit_on: str,
    model_id: str | None = None,
) -> CalibratedThreshold | None:
    """Calibrate on the given split; None (with no exception) when it has too few negatives."""
    labels = np.array([p.label for p in calib_pairs])
    try:
        cal = calibrate(
            calib_sims,
            labels,
            target_false_hit_rate=target_fhr,
            confidence=confidence,
            fit_on=fit_on,
        )
    except InvalidInputError:
        return None
    cal.model_id = model_id
    return cal


def compare(
    pairs: Sequence[Pair],
    cache: EmbeddingCache,
    policies: Sequence[NamedPolicy],
    *,
    calib_pairs: Sequence[Pair] | None = None,
    target_fhr: float = 0.01,
    confidence: float = 0.95,
    calibrate_split: float = 0.5,
    seed: int = 0,
    with_calibrated: bool = True,
    progress: object = None,
) -> Comparison:
    """Fit the calibrated threshold on a split (or ``calib_pairs``) and score every policy."""
    notes: list[str] = []
    if calib_pairs is None and with_calibrated:
        calib, evaluation = split_pairs(pairs, test_fraction=1 - calibrate_split, seed=seed)
        notes.append(
            f"calibrated on a {calibrate_split:.0%} split by answer group ({len(calib)} pairs), "
            f"reported on the other ({len(evaluation)} pairs)"
        )
    else:
        calib, evaluation = list(calib_pairs or []), list(pairs)
    eval_sims = similarities(cache, evaluation)
    calibrated = None
    if with_calibrated and calib:
        calibrated = fit_calibration(
            calib,
            similarities(cache, calib),
            target_fhr=target_fhr,
            confidence=confidence,
            fit_on=f"{len(calib)} calibration pairs",
            model_id=cache.model_id,
        )
        if calibrated is None:
            notes.append("too few negatives in the calibration split for the target; skipped")
    named = list(policies)
    if calibrated is not None:
        named.insert(
            min(3, len(named)),
            NamedPolicy(f"calibrated (cos>={calibrated.threshold:.3f})", calibrated, "fit split"),
        )
    labels = np.array([p.label for p in evaluation])
    sources = [p.source for p in evaluation]
    results = []
    for np_ in named:
        accepted = decide(np_.policy, evaluation, eval_sims)
        results.append(PolicyResult(np_.name, per_source(accepted, labels, sources), np_.note))
        if callable(progress):
            progress(np_.name)
    return Comparison(evaluation, eval_sims, results, calibrated, len(calib), notes)
