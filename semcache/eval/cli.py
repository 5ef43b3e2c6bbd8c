"""``semcache eval``: measure hit policies on a labelled-pairs file.

Prints a table (served-hit precision, recall, false-hit rate, F1, with exact 95% intervals)
per source, writes plots and ``results.json`` to ``--out``, and with ``--replay`` also replays
the file as a workload through a real cache. Heavy imports happen inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

POLICY_HELP = (
    "policies to compare (repeatable): gptcache, redisvl, static, verifier, default, a cosine "
    "like 0.92, or a policy JSON file; default: all (a calibrated threshold is always added)"
)


def _resolve(names: list[str]) -> list:  # type: ignore[type-arg]
    from ..threshold import StaticThreshold, check_threshold, default_policy, load_policy
    from .policies import NamedPolicy, standard_policies

    std = {p.name.split(" ")[0].lower(): p for p in standard_policies()}
    aliases = {
        "gptcache": "gptcache",
        "redisvl": "redisvl",
        "static": "static",
        "verifier": "verifier",
        "default": "default_policy()",
    }
    if not names:
        return standard_policies()
    out = []
    for name in names:
        key = aliases.get(name.lower())
        if key is not None:
            match = [p for k, p in std.items() if k.startswith(key.split("(")[0].lower())]
            if key == "default_policy()":
                out.append(NamedPolicy("default_policy()", default_policy()))
            elif match:
                out.append(match[0])
            continue
        path = Path(name)
        if path.is_file():
            out.append(NamedPolicy(path.name, load_policy(path)))
            continue
        try:
            value = check_threshold(float(name))
        except ValueError:
            raise typer.BadParameter(f"unknown policy {name!r}") from None
        out.append(NamedPolicy(f"cos>={value:g}", StaticThreshold(value)))
    return out


def eval_command(
    data: Annotated[Path, typer.Option("--data", help="labelled pairs JSONL: a, b, label, source")],
    policy: Annotated[list[str] | None, typer.Option("--policy", help=POLICY_HELP)] = None,
    target_fhr: Annotated[float, typer.Option("--target-fhr", help="calibration target")] = 0.01,
    confidence: Annotated[float, typer.Option(help="confidence of bounds and intervals")] = 0.95,
    out: Annotated[Path, typer.Option("--out", help="folder for plots and results.json")] = Path(
        "eval-out"
    ),
    calibrate_on: Annotated[
        Path | None, typer.Option(help="fit the calibrated threshold on this file instead")
    ] = None,
    replay: Annotated[bool, typer.Option(help="also replay the pairs as a workload")] = False,
    limit: Annotated[int | None, typer.Option(help="use only the first N pairs")] = None,
    save_calibration: Annotated[
        Path | None, typer.Option(help="write the calibrated threshold (JSON) here")
    ] = None,
) -> None:
    """Compare hit policies on labelled pairs: precision, recall, false-hit rate, with intervals."""
    import json
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console
    from rich.table import Table

    from ..embed import SentenceTransformerEmbedder
    from ..errors import InvalidInputError, SemcacheError
    from ..progress import Progress, bars
    from ..threshold import save_policy
    from .compare import compare
    from .data import load_pairs
    from .embcache import EmbeddingCache
    from .plots import fhr_curve, histogram, pr_curve
    from .replay import replay as run_replay
    from .replay import workload_from_pairs

    console = Console()
    try:
        pairs = load_pairs(data, limit=limit)
        if not pairs:
            raise InvalidInputError(f"{data} gives no pairs to evaluate (--limit {limit})")
        calib = load_pairs(calibrate_on) if calibrate_on else None
        named = _resolve(policy or [])
    except SemcacheError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    out.mkdir(parents=True, exist_ok=True)
    with bars(console):  # each stage a rich bar with its count, rate and ETA
        with Progress("embedding", unit="texts") as embedded:
            base = [0]  # texts of the embedding calls already finished

            def on_embed(done: int, total: int) -> None:
                embedded.update(base[0] + done, total=base[0] + total)
                if done >= total:
                    base[0] += total

            cache = EmbeddingCache(SentenceTransformerEmbedder(), progress=on_embed)
            with Progress("policies", total=len(named) + 1, unit="policies") as scored:
                result = compare(
                    pairs,
                    cache,
                    named,
                    calib_pairs=calib,
                    target_fhr=target_fhr,
                    confidence=confidence,
                    progress=lambda _name: scored.advance(),
                )
        replays = []
        if replay:
            workload = workload_from_pairs(result.eval_pairs)
            cache.preload([t for t, _ in workload])
            runs = [
                (r.name, pol)
                for r in result.results
                if (pol := next((n.policy for n in named if n.name == r.name), result.calibrated))
                is not None
            ]
            with Progress("replay", total=len(workload) * len(runs), unit="lookups") as replayed:
                for number, (name, pol) in enumerate(runs):

                    def on_step(i: int, _total: int, base: int = number * len(workload)) -> None:
                        replayed.update(base + i)

                    replays.append(
                        run_replay(workload, pol, embedder=cache, name=name, progress=on_step)
                    )

    sources = list(result.results[0].by_source) if result.results else []
    for src in sources:
        table = Table(title=f"{data.name} - {src}", show_lines=False)
        for col in ("policy", "served", "precision of hits", "recall", "false-hit rate", "F1"):
            table.add_column(col)
        for r in result.results:
            c = r.by_source[src]
            table.add_row(
                r.name,
                str(c.tp + c.fp),
                c.precision.fmt(),
                c.recall.fmt(),
                c.false_hit_rate.fmt(2),
                f"{c.f1:.3f}",
            )
        console.print(table)
    if result.calibrated is not None:
        cal = result.calibrated
        console.print(
            f"calibrated threshold {cal.threshold:.4f}: FHR {cal.false_hit_rate:.2%} on the "
            f"calibration split (<= {cal.false_hit_rate_upper:.2%} at {cal.confidence:.0%}), "
            f"expected hit rate {cal.expected_hit_rate:.1%}"
        )
        if save_calibration is not None:
            save_policy(cal, save_calibration)
            console.print(f"saved calibration to {save_calibration}")
    for note in result.notes:
        console.print(f"[dim]{note}[/dim]")
    if replays:
        table = Table(title="workload replay (prompts in order, store on miss)")
        for col in (
            "policy",
            "lookups",
            "repeatable",
            "answered (of repeatable)",
            "wrong answers per lookup",
            "precision of hits",
        ):
            table.add_column(col)
        for rr in replays:
            table.add_row(
                rr.policy,
                str(rr.lookups),
                str(rr.repeatable),
                rr.answered_repeatable.fmt(),
                rr.wrong_per_lookup.fmt(2),
                rr.hit_precision.fmt(),
            )
        console.print(table)

    import numpy as np

    labels = np.array([p.label for p in result.eval_pairs])
    sims = result.eval_sims
    plots = [
        histogram(sims, labels, out / "similarity_hist.png", title=data.name),
        fhr_curve(
            sims,
            labels,
            out / "fhr_vs_threshold.png",
            target=target_fhr,
            calibrated=None if result.calibrated is None else result.calibrated.threshold,
            confidence=confidence,
            title=data.name,
        ),
        pr_curve(
            sims,
            labels,
            out / "precision_recall.png",
            title=data.name,
            points=[
                (r.name, r.overall.recall.value, r.overall.precision.value)
                for r in result.results
                if r.overall.tp + r.overall.fp
            ],
        ),
    ]
    doc = result.as_dict()
    doc["data"] = str(data)
    doc["replay"] = [
        {
            "policy": r.policy,
            "lookups": r.lookups,
            "repeatable": r.repeatable,
            "correct_hits": r.correct_hits,
            "wrong_hits": r.wrong_hits,
            "misses": r.misses,
        }
        for r in replays
    ]
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    console.print(f"wrote {', '.join(p.name for p in plots)} and results.json to {out}/")
