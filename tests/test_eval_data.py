"""Loaders for labelled pairs and intent groups; group-aware splitting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from semcache.errors import InvalidInputError
from semcache.eval.data import (
    Pair,
    groups_to_pairs,
    load_intent_groups,
    load_pairs,
    pairs_to_groups,
    save_pairs,
    split_pairs,
    texts_of,
)
from semcache.eval.sources import PACKAGE_DATA, load_named


def test_load_pairs_round_trip_and_validation(tmp_path: Path) -> None:
    pairs = [Pair("a1", "b1", 1, "s"), Pair("a2", "b2", 0, "t")]
    save_pairs(pairs, tmp_path / "p.jsonl")
    assert load_pairs(tmp_path / "p.jsonl") == pairs
    assert load_pairs(tmp_path / "p.jsonl", limit=1) == pairs[:1]
    assert load_pairs(tmp_path / "p.jsonl", limit=0) == []  # it read one pair
    with pytest.raises(InvalidInputError, match="limit"):
        load_pairs(tmp_path / "p.jsonl", limit=-1)
    (tmp_path / "nosrc.jsonl").write_text('{"a": "x", "b": "y", "label": 1}\n\n')
    assert load_pairs(tmp_path / "nosrc.jsonl")[0].source == "unknown"
    for bad in ('{"a": "x", "b": "y"}', '{"a": "", "b": "y", "label": 1}',
                '{"a": "x", "b": "y", "label": 2}', "not json",
                '{"a": "x", "b": "y", "label": true}'):  # fmt: skip
        (tmp_path / "bad.jsonl").write_text(bad + "\n")
        with pytest.raises(InvalidInputError):
            load_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(InvalidInputError):
        load_pairs(tmp_path / "missing.jsonl")


def test_intent_groups_to_pairs(tmp_path: Path) -> None:
    rows = [
        {"intent": "fr", "prompts": ["capital of France?", "France's capital?"]},
        {"intent": "de", "prompts": ["capital of Germany?"], "near_miss_of": "fr"},
    ]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups = load_intent_groups(tmp_path / "g.jsonl")
    assert [g.intent for g in groups] == ["fr", "de"] and groups[1].near_miss_of == "fr"
    pairs = groups_to_pairs(groups)
    assert sum(p.label for p in pairs) == 1 and len(pairs) == 3
    bad_lines = [
        '{"intent": "x", "prompts": []}',
        "not json",
        "[1, 2]",
        '{"intent": "x", "prompts": [1, null]}',
        '{"intent": "x", "prompts": [""]}',
    ]
    for bad in bad_lines:
        (tmp_path / "bad.jsonl").write_text(bad + "\n")
        with pytest.raises(InvalidInputError):  # raw JSON and attribute errors before
            load_intent_groups(tmp_path / "bad.jsonl")


def test_groups_and_split_do_not_leak() -> None:
    pairs = [Pair("a", "b", 1), Pair("b", "c", 1), Pair("c", "d", 0), Pair("e", "f", 1),
             Pair("g", "h", 0), Pair("i", "j", 1)]  # fmt: skip
    g = pairs_to_groups(pairs)
    assert g["a"] == g["b"] == g["c"] != g["d"]
    assert g["e"] == g["f"] and g["g"] != g["h"]
    for seed in range(5):
        train, test = split_pairs(pairs, test_fraction=0.4, seed=seed)
        assert set(texts_of(train)).isdisjoint(texts_of(test))
    with pytest.raises(InvalidInputError):
        split_pairs(pairs, test_fraction=1.0)


def test_shipped_data_loads() -> None:
    bank = load_named("banking77_pairs")
    assert len(bank) == 9239 and {p.label for p in bank} == {0, 1}
    assert (PACKAGE_DATA / "banking77_pairs" / "PROVENANCE.md").is_file()
    assert len(load_named("gptcache_mock")) == 990
    hand = load_named("near_miss_intents")
    assert sum(p.label == 0 for p in hand) > 100 and sum(p.label for p in hand) > 100
