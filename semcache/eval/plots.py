"""Matplotlib figures for an evaluation (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import sweep


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Write the figure to ``path`` and free it (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def histogram(sims: np.ndarray, labels: np.ndarray, path: Path, *, title: str = "") -> Path:
    """Similarity histograms of positives and negatives."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(0.0, float(np.min(sims))), 1.0, 51)
    ax.hist(sims[labels == 1], bins=bins, alpha=0.6, label="same answer (1)", density=True)
    ax.hist(sims[labels == 0], bins=bins, alpha=0.6, label="different answer (0)", density=True)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title or "similarity of labelled pairs")
    ax.legend()
    return _save(plt, fig, path)


def fhr_curve(
    sims: np.ndarray,
    labels: np.ndarray,
    path: Path,
    *,
    calibrated: float | None = None,
    target: float | None = None,
    confidence: float = 0.95,
    title: str = "",
) -> Path:
    """False-hit rate (with its exact upper bound) and recall against the threshold."""
    plt = _plt()
    sw = sweep(sims, labels, np.round(np.linspace(0.3, 1.0, 141), 3))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sw.thresholds, sw.false_hit_rate, label="false-hit rate")
    ax.plot(sw.thresholds, sw.fhr_upper(confidence), "--", label=f"FHR {confidence:.0%} upper")
    ax.plot(sw.thresholds, sw.recall, label="recall (hit rate)")
    if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:g}")
    if calibrated is not None:
        ax.axvline(calibrated, color="red", lw=1, label=f"calibrated {calibrated:.3f}")
    ax.set_xlabel("threshold (cosine)")
    ax.set_ylabel("rate")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title(title or "false-hit rate vs threshold")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def pr_curve(
    sims: np.ndarray,
    labels: np.ndarray,
    path: Path,
    *,
    points: Sequence[tuple[str, float, float]] = (),
    title: str = "",
) -> Path:
    """Precision of served hits against recall over the threshold sweep, with policy points."""
    plt = _plt()
    sw = sweep(sims, labels, np.round(np.linspace(0.0, 1.0, 201), 3))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sw.recall, sw.precision, label="cosine threshold")
    for name, recall, precision in points:
        ax.plot([recall], [precision], "o", label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision of served hits")
    ax.set_title(title or "precision-recall")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)
