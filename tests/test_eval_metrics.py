"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from semcache.errors import InvalidInputError
from semcache.eval.metrics import (
    Confusion,
    Rate,
    clopper_pearson,
    clopper_pearson_upper,
    per_source,
    sweep,
    wilson,
)


def test_clopper_pearson_known_values() -> None:
    # 0 of 10: upper = 1 - 0.025 ** (1/10); lower 0.
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    # 5 of 10 (tabulated): [0.1871, 0.8129].
    lo, hi = clopper_pearson(5, 10)
    assert (lo, hi) == (pytest.approx(0.18709, abs=1e-4), pytest.approx(0.81291, abs=1e-4))
    assert clopper_pearson(10, 10)[1] == 1.0
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    # One-sided 95% upper after 0 of 300: 1 - 0.05 ** (1/300) (the "rule of three", ~3/n).
    assert clopper_pearson_upper(0, 300) == pytest.approx(1 - 0.05 ** (1 / 300))


def test_wilson_known_values() -> None:
    # 5 of 10 at 95%: centre 0.5, half-width 0.2634 -> [0.2366, 0.7634].
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)


def test_interval_input_checks() -> None:
    with pytest.raises(InvalidInputError):
        clopper_pearson(5, 3)
    with pytest.raises(InvalidInputError):
        wilson(1, 3, confidence=1.5)
    with pytest.raises(InvalidInputError):
        Rate.of(1, 2, method="bogus")


def test_confusion_hand_computed() -> None:
    accepted = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    labels = [1, 1, 0, 1, 0, 0, 0, 0, 1, 1]
    c = Confusion.from_decisions(accepted, labels)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 2, 3, 3)
    assert c.precision.value == 0.5
    assert c.recall.value == 0.4
    assert c.false_hit_rate.value == 0.4
    assert c.f1 == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    assert c.precision.lo < 0.5 < c.precision.hi
    d = c.as_dict()
    assert d["tp"] == 2 and d["precision"] == 0.5 and "false_hit_rate_hi" in d
    assert Confusion.from_decisions([0, 0], [0, 0]).precision.fmt() == "n/a"
    with pytest.raises(InvalidInputError):
        Confusion.from_decisions([1], [1, 0])
    with pytest.raises(InvalidInputError, match="0 or 1"):  # it counted nothing for a 2
        Confusion.from_decisions([1, 0], [2, 1])


def test_sweep_and_per_source() -> None:
    sims = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 1, 0, 0])
    sw = sweep(sims, labels, [0.55, 0.75, 0.9, 0.99])
    assert sw.tp.tolist() == [3, 2, 1, 0]
    assert sw.fp.tolist() == [2, 1, 1, 0]
    assert sw.recall.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert sw.false_hit_rate.tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 3, 0.0])
    assert sw.precision[:3].tolist() == pytest.approx([0.6, 2 / 3, 0.5])
    assert np.isnan(sw.precision[3])
    assert sw.at(0.9) == 2
    assert (sw.fhr_upper() >= sw.false_hit_rate).all()
    default = sweep(sims, labels)
    assert len(default.thresholds) == 101
    groups = per_source(sims >= 0.75, labels, ["x", "x", "y", "y", "y", "x"])
    assert set(groups) == {"all", "x", "y"}
    assert (groups["x"].tp, groups["x"].fp) == (1, 1)
    assert (groups["y"].tp, groups["y"].fn) == (1, 1)
