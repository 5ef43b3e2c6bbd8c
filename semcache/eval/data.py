"""Loaders for labelled prompt pairs and intent groups.

A pair file is JSONL, one ``{"a": str, "b": str, "label": 0 | 1, "source": str}`` per line:
label 1 means a cached answer to ``a`` is a correct answer to ``b``. An intent-group file is
JSONL ``{"intent": str, "prompts": [str, ...], "near_miss_of": str | null}``: every prompt in a
group shares one answer; near-miss groups look like another group but need a different answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInputError


@dataclass(frozen=True, slots=True)
class Pair:
    """One labelled pair: does a cached answer to ``a`` correctly answer ``b``?"""

    a: str
    b: str
    label: int
    source: str = "unknown"


@dataclass(frozen=True, slots=True)
class IntentGroup:
    """Prompts sharing one answer; ``near_miss_of`` names a group they must not be confused with."""

    intent: str
    prompts: tuple[str, ...]
    near_miss_of: str | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def _parse_pair(obj: object, where: str) -> Pair:
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where}: expected a JSON object")
    try:
        a, b, label = obj["a"], obj["b"], obj["label"]
    except KeyError as exc:
        raise InvalidInputError(f"{where}: missing field {exc.args[0]!r}") from None
    if not isinstance(a, str) or not isinstance(b, str) or not a.strip() or not b.strip():
        raise InvalidInputError(f"{where}: 'a' and 'b' must be non-empty strings")
    if label not in (0, 1) or isinstance(label, float | bool):
        raise InvalidInputError(f"{where}: 'label' must be 0 or 1, not {label!r}")
    source = obj.get("source") or "unknown"
    return Pair(a, b, int(label), str(source))


def load_pairs(path: str | Path, *, limit: int | None = None) -> list[Pair]:
    """Read a labelled-pairs JSONL file; blank lines are skipped, bad rows raise. ``limit``
    keeps the first that many pairs (0: none)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidInputError(f"limit must be a non-negative int or None, not {limit!r}")
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"no such pairs file: {p}")
    pairs: list[Pair] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{p}:{lineno}: not JSON ({exc.msg})") from None
            pairs.append(_parse_pair(obj, f"{p}:{lineno}"))
    return pairs


def pairs_from_dicts(rows: Iterable[dict[str, object]]) -> list[Pair]:
    """Validate in-memory rows (as from JSON) into pairs."""
    return [_parse_pair(r, f"row {i}") for i, r in enumerate(rows)]


def save_pairs(pairs: Iterable[Pair], path: str | Path) -> None:
    """Write pairs as JSONL (the format :func:`load_pairs` reads)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for p in pairs:
            row = {"a": p.a, "b": p.b, "label": p.label, "source": p.source}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_intent_groups(path: str | Path) -> list[IntentGroup]:
    """Read an intent-group JSONL file (``{"intent", "prompts", "near_miss_of"}`` per line)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"no such intent-group file: {p}")
    groups: list[IntentGroup] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{p}:{lineno}: not JSON ({exc.msg})") from None
            prompts = obj.get("prompts") if isinstance(obj, dict) else None
            if not isinstance(obj, dict) or not isinstance(obj.get("intent"), str):
                prompts = None
            if not isinstance(prompts, list) or not prompts:
                raise InvalidInputError(f"{p}:{lineno}: need 'intent' and a non-empty 'prompts'")
            if not all(isinstance(x, str) and x.strip() for x in prompts):
                raise InvalidInputError(f"{p}:{lineno}: 'prompts' must be non-empty strings")
            groups.append(IntentGroup(obj["intent"], tuple(prompts), obj.get("near_miss_of")))
    return groups


def groups_to_pairs(groups: Sequence[IntentGroup], *, source: str = "intents") -> list[Pair]:
    """Positives within each group; negatives between each near-miss group and its target."""
    by_name = {g.intent: g for g in groups}
    pairs: list[Pair] = []
    for g in groups:
        for i in range(len(g.prompts)):
            for j in range(i + 1, len(g.prompts)):
                pairs.append(Pair(g.prompts[i], g.prompts[j], 1, source))
        other = by_name.get(g.near_miss_of) if g.near_miss_of else None
        if other is not None:
            for x in g.prompts:
                for y in other.prompts:
                    pairs.append(Pair(y, x, 0, source))
    return pairs


def pairs_to_groups(pairs: Sequence[Pair]) -> dict[str, int]:
    """Answer ids for texts: connected components of the positive pairs (union-find).

    Texts joined by a chain of label-1 pairs share an answer; every other text is its own group.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = find(p.a), find(p.b)
        if p.label == 1 and ra != rb:
            parent[ra] = rb
    roots: dict[str, int] = {}
    return {t: roots.setdefault(find(t), len(roots)) for t in list(parent)}


def split_pairs(
    pairs: Sequence[Pair], *, test_fraction: float = 0.3, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """Split pairs by answer group, so no text and no intent appears on both sides.

    A plain random split leaks: the same question sits in train and test pairs. Here whole
    components of the positive-pair graph go to one side; a pair whose two texts land on
    different sides is dropped (it belongs to neither set cleanly).
    """
    if not 0.0 < test_fraction < 1.0:
        raise InvalidInputError("test_fraction must be in (0, 1)")
    group = pairs_to_groups(pairs)
    weight: dict[int, int] = {}
    for p in pairs:  # how many pairs touch each group: big intents weigh more
        weight[group[p.a]] = weight.get(group[p.a], 0) + 1
        weight[group[p.b]] = weight.get(group[p.b], 0) + 1
    ids = sorted(weight)
    rng = random.Random(seed)
    rng.shuffle(ids)
    goal = test_fraction * sum(weight.values())
    test_ids: set[int] = set()
    filled = 0
    for gid in ids:  # fill the test side to its share of pair ends, in random group order
        if filled >= goal:
            break
        test_ids.add(gid)
        filled += weight[gid]
    train: list[Pair] = []
    test: list[Pair] = []
    for p in pairs:
        ta, tb = group[p.a] in test_ids, group[p.b] in test_ids
        if ta and tb:
            test.append(p)
        elif not ta and not tb:
            train.append(p)
    return train, test


def texts_of(pairs: Iterable[Pair]) -> list[str]:
    """Unique texts in first-seen order."""
    return list(dict.fromkeys(t for p in pairs for t in (p.a, p.b)))
