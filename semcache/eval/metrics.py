"""Metrics for hit decisions, each with a confidence interval.

Vocabulary (pairs view): a *served hit* is a pair the policy accepts. Precision is the share of
served hits that are correct, recall (hit rate) the share of positives served, the false-hit
rate the share of negatives served. Intervals are exact Clopper-Pearson by default (Wilson on
request); both are two-sided at the given confidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from ..errors import InvalidInputError

Interval = tuple[float, float]


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Exact two-sided binomial interval for k successes in n trials (``(0, 1)`` when n is 0)."""
    _check(k, n, confidence)
    if n == 0:
        return (0.0, 1.0)
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return (lo, hi)


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper bound: P(true rate <= bound) >= confidence."""
    _check(k, n, confidence)
    if n == 0 or k == n:
        return 1.0
    return float(stats.beta.ppf(confidence, k + 1, n - k))


def wilson(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval (two-sided)."""
    _check(k, n, confidence)
    if n == 0:
        return (0.0, 1.0)
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _check(k: int, n: int, confidence: float) -> None:
    if n < 0 or k < 0 or k > n:
        raise InvalidInputError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise InvalidInputError(f"confidence must be in (0, 1), got {confidence}")


def interval(k: int, n: int, confidence: float = 0.95, method: str = "clopper-pearson") -> Interval:
    """Dispatch on ``method``: ``"clopper-pearson"`` or ``"wilson"``."""
    if method == "wilson":
        return wilson(k, n, confidence)
    if method in ("clopper-pearson", "exact"):
        return clopper_pearson(k, n, confidence)
    raise InvalidInputError(f"unknown interval method {method!r}")


@dataclass(frozen=True)
class Rate:
    """A proportion with its interval; ``value`` is NaN when there were no trials."""

    k: int
    n: int
    value: float
    lo: float
    hi: float

    @classmethod
    def of(cls, k: int, n: int, confidence: float = 0.95, method: str = "clopper-pearson") -> Rate:
        lo, hi = interval(k, n, confidence, method)
        return cls(k, n, k / n if n else float("nan"), lo, hi)

    def fmt(self, digits: int = 1) -> str:
        """``12.3% [10.1, 14.6]`` (percentages)."""
        if self.n == 0:
            return "n/a"
        v, lo, hi = (f"{100 * x:.{digits}f}" for x in (self.value, self.lo, self.hi))
        return f"{v}% [{lo}, {hi}]"


@dataclass(frozen=True)
class Confusion:
    """Counts of a hit decision over labelled pairs, and the metrics derived from them."""

    tp: int
    fp: int
    fn: int
    tn: int
    confidence: float = 0.95
    method: str = "clopper-pearson"

    @classmethod
    def from_decisions(
        cls,
        accepted: Sequence[bool] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        confidence: float = 0.95,
        method: str = "clopper-pearson",
    ) -> Confusion:
        acc = np.asarray(accepted, dtype=bool)
        lab = np.asarray(labels).astype(int)
        if acc.shape != lab.shape:
            raise InvalidInputError("accepted and labels must have the same length")
        if lab.size and not np.isin(lab, (0, 1)).all():  # another value would count nowhere
            raise InvalidInputError("labels must be 0 or 1")
        tp = int(np.sum(acc & (lab == 1)))
        fp = int(np.sum(acc & (lab == 0)))
        fn = int(np.sum(~acc & (lab == 1)))
        tn = int(np.sum(~acc & (lab == 0)))
        return cls(tp, fp, fn, tn, confidence, method)

    def _rate(self, k: int, n: int) -> Rate:
        return Rate.of(k, n, self.confidence, self.method)

    @property
    def precision(self) -> Rate:
        """Share of served hits that are correct."""
        return self._rate(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> Rate:
        """Share of positives served (the hit rate on repeatable prompts)."""
        return self._rate(self.tp, self.tp + self.fn)

    @property
    def false_hit_rate(self) -> Rate:
        """Share of negatives served: the wrong-answer rate when a near miss is the candidate."""
        return self._rate(self.fp, self.fp + self.tn)

    @property
    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        """Flat numbers for tables and JSON."""
        out: dict[str, float | int] = {k: v for k, v in asdict(self).items() if k != "method"}
        for name in ("precision", "recall", "false_hit_rate"):
            r: Rate = getattr(self, name)
            out[name], out[f"{name}_lo"], out[f"{name}_hi"] = r.value, r.lo, r.hi
        out["f1"] = self.f1
        return out


@dataclass(frozen=True)
class Sweep:
    """Metrics at each threshold of a sweep (arrays aligned with ``thresholds``)."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int

    @property
    def recall(self) -> np.ndarray:
        return self.tp / max(self.n_pos, 1)

    @property
    def false_hit_rate(self) -> np.ndarray:
        return self.fp / max(self.n_neg, 1)

    @property
    def precision(self) -> np.ndarray:
        served = self.tp + self.fp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(served > 0, self.tp / np.maximum(served, 1), np.nan)

    @property
    def f1(self) -> np.ndarray:
        denom = self.tp + self.fp + self.n_pos
        return np.where(denom > 0, 2 * self.tp / np.maximum(denom, 1), np.nan)

    def fhr_upper(self, confidence: float = 0.95) -> np.ndarray:
        """One-sided Clopper-Pearson upper bound of the false-hit rate at each threshold."""
        return np.array([clopper_pearson_upper(int(k), self.n_neg, confidence) for k in self.fp])

    def at(self, threshold: float) -> int:
        """Index of the first sweep threshold >= ``threshold``."""
        return int(min(np.searchsorted(self.thresholds, threshold), len(self.thresholds) - 1))


def sweep(
    similarities: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> Sweep:
    """Counts of ``similarity >= t`` for each threshold (default: 0.00, 0.01, ... 1.00)."""
    sims = np.asarray(similarities, dtype=np.float64)
    lab = np.asarray(labels).astype(int)
    if sims.shape != lab.shape:
        raise InvalidInputError("similarities and labels must have the same length")
    ts = np.round(np.linspace(0.0, 1.0, 101), 2) if thresholds is None else np.asarray(thresholds)
    ts = np.sort(ts.astype(np.float64))
    pos, neg = np.sort(sims[lab == 1]), np.sort(sims[lab == 0])
    tp = len(pos) - np.searchsorted(pos, ts, side="left")
    fp = len(neg) - np.searchsorted(neg, ts, side="left")
    return Sweep(ts, tp.astype(int), fp.astype(int), len(pos), len(neg))


def per_source(
    accepted: Sequence[bool] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    sources: Sequence[str],
    confidence: float = 0.95,
) -> dict[str, Confusion]:
    """One confusion per ``source`` value (plus ``"all"``)."""
    acc = np.asarray(accepted, dtype=bool)
    lab = np.asarray(labels).astype(int)
    src = np.asarray(sources)
    out = {"all": Confusion.from_decisions(acc, lab, confidence)}
    for s in sorted(set(src.tolist())):
        m = src == s
        out[s] = Confusion.from_decisions(acc[m], lab[m], confidence)
    return out
