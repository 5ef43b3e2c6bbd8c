"""A hard-negative verifier: a small classifier that rejects near-miss candidates.

A bi-encoder scores "Convert 5 miles to km" and "Convert 5 km to miles" at 0.99 cosine, and
"sort ascending" / "sort descending" at 0.95. Those are wrong answers a threshold cannot stop.
The verifier looks at what differs between the two texts: numbers and the units bound to
them, negation, capitalised names, antonyms, content words on one side only, word order,
question words and length, the embedding model's own word vectors (which one-sided word has
no counterpart on the other side, how rare it is, how the differing spans compare:
:mod:`semcache.wordvectors`), what a swap changes while the words stay the same (which
shared word now follows another relation word such as "from"/"to" or "by"/"with", which
neighbouring words were split up, whether the names changed order: PAWS-like pairs), plus
the cosine itself. A gradient-boosted tree ensemble (with
monotone constraints, so "more evidence of a difference" never raises the score) turns those
features into P(same answer). It runs in pure Python and numpy in a few hundred microseconds
for a short pair (``evals/train_verifier.py`` prints it) and is only consulted for candidates
above ``min_similarity``.

The shipped model (``semcache/data/verifier_model.json``) was trained only on data we may
ship: BANKING77 pairs, PAWS-Wiki dev, GPTCache's mock data, our hand-written near-miss
intents and generated near-miss families (see ``semcache/data/README.md``). Retrain on your
own pairs with :func:`train_verifier`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from .errors import InvalidInputError
from .threshold import POLICY_FORMAT, check_threshold

MODEL_FORMAT = 1
SHIPPED_MODEL = Path(__file__).parent / "data" / "verifier_model.json"

# ------------------------------------------------------------------------------------------
# Text analysis
# ------------------------------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    """A word set from a space-separated string (keeps the lexicons readable)."""
    return frozenset(text.split())


_STOP = _words(
    "a an the is are was were be been being am do does did doing i me my mine we us our you "
    "your yours he him his she her it its they them their this that these those there here of "
    "to in on at by for with about as into onto from up out over under again then so than too "
    "very can could would should will shall may might must have has had having just please "
    "also any some get got give tell know want need like let s t d ll re ve m im ive id one "
    "way thing things and or if but else ever really much many"
)
_WH = frozenset(["what", "how", "why", "when", "where", "who", "whom", "whose", "which"])
_NEGATION = _words("not no never none nothing nobody neither nor without cannot cant")
_NUMWORDS = {
    "zero": "0",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "fifteen": "15",
    "twenty": "20",
    "thirty": "30",
    "fifty": "50",
    "hundred": "100",
    "thousand": "1000",
    "first": "1st",
    "second": "2nd",
    "third": "3rd",
    "sixteenth": "16th",
    "tenth": "10th",
}
_UNITS = {
    "km": "km",
    "kms": "km",
    "kilometer": "km",
    "kilometers": "km",
    "kilometre": "km",
    "kilometres": "km",
    "mi": "mile",
    "mile": "mile",
    "miles": "mile",
    "m": "m",
    "meter": "m",
    "meters": "m",
    "metre": "m",
    "metres": "m",
    "cm": "cm",
    "centimeter": "cm",
    "centimeters": "cm",
    "mm": "mm",
    "millimeter": "mm",
    "millimeters": "mm",
    "in": "inch",
    "inch": "inch",
    "inches": "inch",
    "ft": "foot",
    "foot": "foot",
    "feet": "foot",
    "yard": "yard",
    "yards": "yard",
    "kg": "kg",
    "kgs": "kg",
    "kilo": "kg",
    "kilos": "kg",
    "kilogram": "kg",
    "kilograms": "kg",
    "g": "g",
    "gram": "g",
    "grams": "g",
    "lb": "lb",
    "lbs": "lb",
    "pound": "lb",
    "pounds": "lb",
    "oz": "oz",
    "ounce": "oz",
    "ounces": "oz",
    "c": "celsius",
    "celsius": "celsius",
    "centigrade": "celsius",
    "f": "fahrenheit",
    "fahrenheit": "fahrenheit",
    "kelvin": "kelvin",
    "l": "liter",
    "liter": "liter",
    "liters": "liter",
    "litre": "liter",
    "litres": "liter",
    "ml": "ml",
    "gallon": "gallon",
    "gallons": "gallon",
    "cup": "cup",
    "cups": "cup",
    "usd": "usd",
    "dollar": "usd",
    "dollars": "usd",
    "eur": "eur",
    "euro": "eur",
    "euros": "eur",
    "gbp": "gbp",
    "yen": "jpy",
    "jpy": "jpy",
    "mph": "mph",
    "kmh": "kmh",
    "kph": "kmh",
    "percent": "pct",
    "kb": "kb",
    "mb": "mb",
    "gb": "gb",
    "tb": "tb",
    "byte": "byte",
    "bytes": "byte",
    "second": "sec",
    "seconds": "sec",
    "minute": "min",
    "minutes": "min",
    "hour": "hour",
    "hours": "hour",
    "day": "day",
    "days": "day",
    "week": "week",
    "weeks": "week",
    "month": "month",
    "months": "month",
    "year": "year",
    "years": "year",
    "am": "am",
    "pm": "pm",
}
_ANTONYMS_RAW = """ascending descending|asc desc|increase decrease|increasing decreasing|
    increase reduce|max min|maximum minimum|largest smallest|biggest smallest|highest lowest|
    most least|more less|before after|above below|up down|upload download|import export|
    encrypt decrypt|encode decode|buy sell|add remove|add delete|enable disable|open close|
    start stop|push pull|input output|first last|left right|true false|on off|win lose|
    positive negative|cheap expensive|hot cold|fast slow|long short|early late|old new|
    young old|uppercase lowercase|upper lower|internal external|send receive|deposit withdraw|
    borrow lend|male female|men women|man woman|boy girl|north south|east west|past future|
    install uninstall|compress decompress|lock unlock|join leave|accept reject|allow deny|
    allow block|include exclude|love hate|pros cons|advantage disadvantage|forward backward|
    horizontal vertical|row column|bigger smaller|larger smaller|higher lower|easy hard|
    easiest hardest|best worst|better worse|soft hard|light dark|light heavy|wet dry|full empty|
    import export|inbound outbound|credit debit|income expense|profit loss|rise fall|
    enter exit|arrive depart|inside outside|plus minus|multiply divide|sum difference|
    mac windows|linux windows|android iphone|ios android|morning night|summer winter|
    spring autumn|day night|cat dog|yes no|always never|legal illegal|visible hidden|
    show hide|private public|online offline|local remote|import require|sync async|
    synchronous asynchronous|static dynamic|mutable immutable|client server|
    get post|read write|encrypted decrypted|parent child|before since|begin end|head tail"""

# A light stemmer: enough to treat "sorting"/"sorted"/"sorts" as one word.
_SUFFIXES = (
    "ational",
    "ization",
    "ations",
    "ation",
    "ingly",
    "ings",
    "ing",
    "edly",
    "ed",
    "ies",
    "es",
    "ly",
    "s",
)


def _stem(word: str) -> str:
    if len(word) <= 3 or word.isdigit():
        return word
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            stem = word[: -len(suf)]
            if suf == "ies":
                stem += "y"
            if suf == "s" and word.endswith("ss"):
                return word
            return stem
    return word


def _build_antonyms() -> frozenset[frozenset[str]]:
    out: set[frozenset[str]] = set()
    for chunk in _ANTONYMS_RAW.replace("\n", " ").split("|"):
        words = chunk.split()
        if len(words) == 2:
            out.add(frozenset((_stem(words[0]), _stem(words[1]))))
    return frozenset(out)


_ANTONYMS = _build_antonyms()


def _build_opposites() -> dict[str, frozenset[str]]:
    out: dict[str, set[str]] = {}
    for pair in _ANTONYMS:
        x, y = sorted(pair)
        out.setdefault(x, set()).add(y)
        out.setdefault(y, set()).add(x)
    return {k: frozenset(v) for k, v in out.items()}


_OPPOSITES = _build_opposites()
_NEG_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non")
_CONTRACTIONS = (
    (re.compile(r"\bcan't\b"), "can not"),
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'(s|re|ve|ll|d|m)\b"), ""),
)
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[a-z]+")
# Capitalised words and acronyms (with a letter: "000" in "1,000" is no name).
_CAP = re.compile(r"\b[A-Z][A-Za-z0-9]*\b|\b(?=[A-Z0-9]*[A-Z])[A-Z0-9]{2,}\b")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@dataclass(frozen=True, slots=True)
class _Parsed:
    tokens: tuple[str, ...]  # normalised, stemmed, all words
    surface: tuple[str, ...]  # the same words before stemming (for the model's word vectors)
    content: tuple[str, ...]  # without stop words / wh-words
    wh: frozenset[str]
    negations: int
    numbers: tuple[str, ...]
    units: tuple[str, ...]
    bindings: frozenset[tuple[str, str]]
    entities: frozenset[str]


@lru_cache(maxsize=8192)
def _parse(text: str) -> _Parsed:
    """Normalise one text into the parts the features compare (cached: prompts repeat)."""
    low = text.lower().replace("\u2019", "'").replace("`", "'")
    for pat, rep in _CONTRACTIONS:
        low = pat.sub(rep, low)
    raw = [_NUMWORDS.get(t, t) for t in _TOKEN.findall(low)]
    raw = [t.replace(",", "") if t[0].isdigit() else t for t in raw]
    # Unit words share one spelling ("kilometers" = "km"); short ones only after a number.
    canon = [
        _UNITS[t] if t in _UNITS and (len(t) > 2 or (i > 0 and raw[i - 1][0].isdigit())) else t
        for i, t in enumerate(raw)
    ]
    tokens = tuple(_stem(t) for t in canon)
    units: list[str] = []
    bindings: set[tuple[str, str]] = set()
    numbers: list[str] = []
    for i, t in enumerate(raw):
        if t[0].isdigit():
            numbers.append(t)
            nxt = raw[i + 1] if i + 1 < len(raw) else ""
            if nxt in _UNITS:
                bindings.add((t, _UNITS[nxt]))
            else:
                bindings.add((t, ""))
        elif t in _UNITS and (len(t) > 2 or (i > 0 and raw[i - 1][0].isdigit()) or t in ("km",)):
            units.append(_UNITS[t])
    # Capitalised words that are not sentence-initial, plus acronyms: a cheap entity detector.
    ents: set[str] = set()
    for m in _CAP.finditer(text):
        j = m.start() - 1  # the last character before the word that is not a space
        while j >= 0 and text[j].isspace():
            j -= 1
        sentence_start = j < 0 or text[j] in ".?!:\"'("
        if sentence_start and (not m.group().isupper() or len(m.group()) < 2):
            continue
        word = m.group().lower()
        if word not in _STOP and word not in _WH:
            ents.add(_stem(word))
    content = tuple(t for t in tokens if t not in _STOP and t not in _WH)
    return _Parsed(
        tokens=tokens,
        surface=tuple(canon),
        content=content,
        wh=frozenset(t for t in tokens if t in _WH),
        negations=sum(1 for t in raw if t in _NEGATION),
        numbers=tuple(numbers),
        units=tuple(units),
        bindings=frozenset(bindings),
        entities=frozenset(ents),
    )


#: At most this many one-sided words per side are checked for spelling variants: the check
#: compares words pairwise, and the cap keeps a decision's cost linear in the text.
TYPO_CAP = 64


def _typo_pairs(only_a: set[str], only_b: set[str]) -> int:
    """How many one-sided words are a spelling variant of a word on the other side.

    Only words sharing a first or last letter are compared (indexed, not all pairs), and only
    the first :data:`TYPO_CAP` of each side in sorted order, so the cost stays bounded.
    """
    by_first: dict[str, list[str]] = {}
    by_last: dict[str, list[str]] = {}
    for y in sorted(only_b)[:TYPO_CAP]:
        if len(y) >= 4:
            by_first.setdefault(y[0], []).append(y)
            by_last.setdefault(y[-1], []).append(y)
    n = 0
    for x in sorted(only_a)[:TYPO_CAP]:
        if len(x) < 4:
            continue
        for y in dict.fromkeys(by_first.get(x[0], []) + by_last.get(x[-1], [])):
            if abs(len(x) - len(y)) <= 2 and SequenceMatcher(None, x, y).ratio() >= 0.8:
                n += 1
                break
    return n


def _antonym_hits(only_a: set[str], only_b: set[str]) -> int:
    """Word swaps that flip the meaning: a lexicon of opposites, or a negating prefix.

    Counts the (a-word, b-word) pairs that are opposites, by lookups rather than comparing all
    pairs, so it is linear in the number of words.
    """
    n = 0
    for x in only_a:
        found = {y for y in _OPPOSITES.get(x, ()) if y in only_b}
        for p in _NEG_PREFIXES:
            if p + x in only_b:
                found.add(p + x)
            if x.startswith(p) and x[len(p) :] in only_b:
                found.add(x[len(p) :])
        n += len(found)
    return n


def _inversions(seq: list[int]) -> int:
    """Pairs i < j with seq[i] > seq[j], by merge sort: O(n log n), not O(n^2)."""
    if len(seq) < 2:
        return 0
    count = 0
    width = 1
    cur = list(seq)
    n = len(cur)
    while width < n:
        out: list[int] = []
        for lo in range(0, n, 2 * width):
            left, right = cur[lo : lo + width], cur[lo + width : lo + 2 * width]
            i = j = 0
            while i < len(left) and j < len(right):
                if left[i] <= right[j]:
                    out.append(left[i])
                    i += 1
                else:
                    out.append(right[j])
                    count += len(left) - i
                    j += 1
            out.extend(left[i:])
            out.extend(right[j:])
        cur = out
        width *= 2
    return count


def _discordance(a: Sequence[str], b: Sequence[str]) -> float:
    """Share of shared-word pairs whose order differs between the texts (0: same order)."""
    pos_b: dict[str, int] = {}
    for i, t in enumerate(b):
        pos_b.setdefault(t, i)
    seq = []
    seen: set[str] = set()
    for t in a:
        if t in pos_b and t not in seen:
            seen.add(t)
            seq.append(pos_b[t])
    n = len(seq)
    if n < 2:
        return 0.0
    return _inversions(seq) / (n * (n - 1) / 2)


#: Function words that carry a direction or a relation ("from X to Y", "over"/"under").
_RELATIONS = _words(
    "to in on at by for with about as into onto from up out over under than before after off "
    "again then too very"
)


def same_request(a: str, b: str) -> bool:
    """Whether two texts are one request written two ways, in a way no feature can contest.

    The same words once normalised (case, punctuation, contractions, number formats such as
    "$1,000" / "$1000", unit spellings, word endings), or the same content words in the same
    order with the same question words, negations and relation words ("to", "from",
    "over"...) in the same order: they differ only in articles, pronouns, auxiliaries and
    the like ("A woman is slicing a tomato." / "A woman is slicing tomato.").
    """
    pa, pb = _parse(a), _parse(b)
    if pa.tokens == pb.tokens:
        return True
    return (
        pa.content == pb.content
        and pa.wh == pb.wh
        and pa.negations == pb.negations
        and [t for t in pa.tokens if t in _RELATIONS] == [t for t in pb.tokens if t in _RELATIONS]
    )


FEATURES: tuple[str, ...] = (
    "similarity",
    "content_jaccard",
    "only_min",  # content words on the side with fewer unique words
    "only_max",
    "substitution",  # both sides have unique content words (a swap, not an elaboration)
    "typo_pairs",
    "antonyms",
    "negation_mismatch",
    "numbers_differ",  # both have numbers, and the sets differ
    "number_one_side",
    "binding_mismatch",  # the same numbers bound to different units
    "units_differ",
    "unit_order_swap",
    "entities_differ",  # both name entities, and some differ
    "entity_one_side",
    "wh_differ",
    "order_discordance",
    "same_bag_diff_order",
    "length_ratio",
    "len_min",
    "align_min",  # one-sided words: the worst best-match with the other side (word vectors)
    "align_mean",
    "unaligned_rarity",  # the rarest one-sided word with no good match (0: none)
    "span_min",  # the differing span, between the common prefix and suffix (words)
    "span_max",
    "span_sim",  # word-vector cosine of the two differing spans' content words
    # Word order and roles (swapped pairs, "X chaired by A with B" / "... by B with A"):
    "role_changes",  # shared content words whose relation word before them differs
    "role_change_share",
    "shared_bigram_jaccard",  # adjacent shared words, in each text's order, that match
    "inversions",  # shared-word pairs whose order differs (count, capped)
    "broken_links",  # adjacent shared words in one text that are not adjacent in the other
    "broken_link_share",
    "entity_order_swap",  # the same names in another order
    "entity_role_changes",  # names whose relation word before them differs
)

#: At most this many words per side enter the word-vector comparisons (bounded cost).
ALIGN_CAP = 48
#: A one-sided word whose best match is below this has no counterpart on the other side.
UNALIGNED = 0.4


def pair_features(query: str, candidate: str, similarity: float) -> list[float]:
    """The feature vector (in :data:`FEATURES` order) for one (query, candidate) pair.

    Symmetric in the two texts, so "is a cached answer to A right for B" and the reverse get
    the same score.
    """
    pa, pb = _parse(query), _parse(candidate)
    ca, cb = set(pa.content), set(pb.content)
    only_a, only_b = ca - cb, cb - ca
    typos = _typo_pairs(only_a, only_b) if only_a and only_b else 0
    union = len(ca | cb)
    jacc = len(ca & cb) / union if union else 1.0
    n_min, n_max = sorted((len(only_a), len(only_b)))
    na, nb = set(pa.numbers), set(pb.numbers)
    ua, ub = set(pa.units), set(pb.units)
    shared_nums = na & nb
    binding_mismatch = any(
        (n, u) not in pb.bindings for (n, u) in pa.bindings if n in shared_nums and u
    ) or any((n, u) not in pa.bindings for (n, u) in pb.bindings if n in shared_nums and u)
    unit_swap = (
        len(ua) >= 2
        and ua == ub
        and [u for u in dict.fromkeys(pa.units)] != [u for u in dict.fromkeys(pb.units)]
    )
    ea, eb = pa.entities, pb.entities
    ta, tb = pa.tokens, pb.tokens
    la, lb = len(ta), len(tb)
    align = _alignment(pa, pb, only_a, only_b)
    return [
        float(similarity),
        jacc,
        float(n_min - typos),
        float(n_max - typos),
        1.0 if n_min - typos > 0 else 0.0,
        float(typos),
        float(_antonym_hits(only_a, only_b)),
        1.0 if (pa.negations > 0) != (pb.negations > 0) else 0.0,
        1.0 if na and nb and na != nb else 0.0,
        1.0 if bool(na) != bool(nb) else 0.0,
        1.0 if binding_mismatch else 0.0,
        1.0 if ua and ub and ua != ub else 0.0,
        1.0 if unit_swap else 0.0,
        1.0 if ea and eb and ea != eb else 0.0,
        float(len(ea ^ eb)) if not (ea and eb) else 0.0,
        1.0 if pa.wh and pb.wh and pa.wh.isdisjoint(pb.wh) else 0.0,
        _discordance(pa.content, pb.content),
        1.0 if sorted(pa.content) == sorted(pb.content) and pa.content != pb.content else 0.0,
        min(la, lb) / max(la, lb, 1),
        float(min(la, lb)),
        *align,
        *_order_features(pa, pb),
    ]


#: Inversions are counted up to this many (a feature value, and the trees need no more).
INVERSION_CAP = 50
#: A content word's role is the relation word ("from", "by", "of"...) at most this many
#: words before it.
ROLE_REACH = 3


def _roles(p: _Parsed) -> dict[str, str]:
    """Content word -> the relation word shortly before its first occurrence ("" for none)."""
    out: dict[str, str] = {}
    last, last_at = "", -ROLE_REACH - 1
    for i, t in enumerate(p.tokens):
        if t in _RELATIONS:
            last, last_at = t, i
        elif t not in _STOP and t not in _WH:
            out.setdefault(t, last if i - last_at <= ROLE_REACH else "")
    return out


def _order_features(pa: _Parsed, pb: _Parsed) -> list[float]:
    """What a swap of words or names changes while the bag of words stays the same.

    PAWS-like pairs ("flights from A to B" / "from B to A", "chaired by A with a panel
    including B" / "chaired by B with a panel including A") share nearly every word, so the
    bag-of-words features and the cosine see no difference. Here: which shared words now
    follow another relation word (their role), which shared neighbours were split up, how
    many shared-word pairs changed order, and whether the names themselves moved. Each is
    one pass over the words (the inversions: a merge sort), so linear-ish in the text.
    """
    shared = set(pa.content) & set(pb.content)
    ra, rb = _roles(pa), _roles(pb)
    role_changes = sum(1 for t in shared if ra.get(t) != rb.get(t))
    seq_a = [t for t in pa.content if t in shared]
    seq_b = [t for t in pb.content if t in shared]
    links_a, links_b = set(pairwise(seq_a)), set(pairwise(seq_b))
    union = len(links_a | links_b)
    bigram_jaccard = len(links_a & links_b) / union if union else 1.0
    pos_b: dict[str, int] = {}
    for i, t in enumerate(pb.content):
        pos_b.setdefault(t, i)
    seq: list[int] = []
    seen: set[str] = set()
    for t in pa.content:
        if t in pos_b and t not in seen:
            seen.add(t)
            seq.append(pos_b[t])
    inversions = min(_inversions(seq), INVERSION_CAP)
    broken = len(links_a - links_b)
    names_a = list(dict.fromkeys(t for t in pa.content if t in pa.entities))
    names_b = list(dict.fromkeys(t for t in pb.content if t in pb.entities))
    swap = len(names_a) >= 2 and set(names_a) == set(names_b) and names_a != names_b
    both = set(names_a) & set(names_b)
    n = max(len(shared), 1)
    return [
        float(role_changes),
        role_changes / n,
        bigram_jaccard,
        float(inversions),
        float(broken),
        broken / n,
        1.0 if swap else 0.0,
        float(sum(1 for t in both if ra.get(t) != rb.get(t))),
    ]


def _content_surface(p: _Parsed) -> dict[str, str]:
    """Stemmed content word -> its first surface form."""
    out: dict[str, str] = {}
    for t, w in zip(p.tokens, p.surface, strict=True):
        if t not in _STOP and t not in _WH and not w[0].isdigit():
            out.setdefault(t, w)
    return out


def _alignment(pa: _Parsed, pb: _Parsed, only_a: set[str], only_b: set[str]) -> list[float]:
    """The word-vector features: how well one-sided words and the differing span match.

    Each side's one-sided content words (at most :data:`ALIGN_CAP`) are compared with the
    other side's content words (at most as many) through the model's own word vectors
    (:mod:`semcache.wordvectors`); the differing span is what lies between the longest common
    prefix and suffix of the two word sequences. Symmetric, and bounded in cost.
    """
    from . import wordvectors

    sa, sb = _content_surface(pa), _content_surface(pb)
    wa = [sa[t] for t in sorted(only_a) if t in sa][:ALIGN_CAP]
    wb = [sb[t] for t in sorted(only_b) if t in sb][:ALIGN_CAP]
    others_a, others_b = list(sa.values())[:ALIGN_CAP], list(sb.values())[:ALIGN_CAP]
    best = wordvectors.best_matches(wa, others_b) + wordvectors.best_matches(wb, others_a)
    words = wa + wb
    if best:
        align_min, align_mean = min(best), sum(best) / len(best)
        loose = [wordvectors.rarity(w) for w, m in zip(words, best, strict=True) if m < UNALIGNED]
        unaligned = max(loose, default=0.0)
    else:
        align_min, align_mean, unaligned = 1.0, 1.0, 0.0
    ta, tb = pa.tokens, pb.tokens
    n = min(len(ta), len(tb))
    pre = 0
    while pre < n and ta[pre] == tb[pre]:
        pre += 1
    suf = 0
    while suf < n - pre and ta[-1 - suf] == tb[-1 - suf]:
        suf += 1
    span_a = [w for t, w in zip(ta[pre : len(ta) - suf], pa.surface[pre : len(ta) - suf],
                                strict=True) if t in sa][:ALIGN_CAP]  # fmt: skip
    span_b = [w for t, w in zip(tb[pre : len(tb) - suf], pb.surface[pre : len(tb) - suf],
                                strict=True) if t in sb][:ALIGN_CAP]  # fmt: skip
    va, vb = wordvectors.mean_vector(span_a), wordvectors.mean_vector(span_b)
    span_sim = float(va @ vb) if va is not None and vb is not None else 1.0
    la, lb = len(ta) - pre - suf, len(tb) - pre - suf
    return [
        align_min,
        align_mean,
        unaligned,
        float(min(la, lb)),
        float(max(la, lb)),
        span_sim,
    ]


# Monotone constraints for training: -1 means "more of this never raises P(same answer)".
MONOTONE: dict[str, int] = {
    "similarity": 1,
    "content_jaccard": 1,
    "antonyms": -1,
    "negation_mismatch": -1,
    "numbers_differ": -1,
    "binding_mismatch": -1,
    "units_differ": -1,
    "entities_differ": -1,
    "wh_differ": -1,
    "same_bag_diff_order": -1,
    "align_min": 1,
    "role_changes": -1,
    "shared_bigram_jaccard": 1,
    "inversions": -1,
    "broken_links": -1,
    "entity_order_swap": -1,
    "entity_role_changes": -1,
}


# ------------------------------------------------------------------------------------------
# The model: boosted trees stored as JSON, evaluated in pure Python
# ------------------------------------------------------------------------------------------


class VerifierModel:
    """Boosted regression trees over :func:`pair_features`; ``score`` is P(same answer).

    Each tree is a list of nodes ``[feature, threshold, left, right, value]``; a leaf has
    ``feature == -1``. Missing values never occur (features are always defined).
    """

    def __init__(self, trees: list[list[list[float]]], base: float, meta: dict[str, Any]) -> None:
        self.trees = [
            [(int(n[0]), float(n[1]), int(n[2]), int(n[3]), float(n[4])) for n in t] for t in trees
        ]
        self.base = float(base)
        self.meta = dict(meta)
        features = tuple(self.meta.get("features", FEATURES))
        used = max((n[0] for t in self.trees for n in t), default=-1)
        # A model trained before features were appended uses the first ones only.
        if features != FEATURES[: len(features)] or used >= len(features):
            raise InvalidInputError(
                "verifier model was trained on other features; retrain it with this version"
            )
        self.features = features

    def raw(self, x: Sequence[float]) -> float:
        """The ensemble's log-odds for one feature vector (a plain loop: fastest for ~150
        shallow trees; numpy's per-call overhead costs more than it saves here)."""
        total = self.base
        for tree in self.trees:
            i = 0
            while True:
                f, thr, left, right, value = tree[i]
                if f < 0:
                    total += value
                    break
                i = left if x[f] <= thr else right
        return total

    def score(self, query: str, candidate: str, similarity: float) -> float:
        """P(a cached answer to ``candidate`` correctly answers ``query``).

        Pairs that :func:`same_request` finds equal score 1.0: they differ in nothing the
        features weigh, and the trees, fit on noisy labels, would otherwise put some of them
        near the cut.
        """
        if same_request(query, candidate):
            return 1.0
        z = self.raw(pair_features(query, candidate, similarity))
        return 1.0 / (1.0 + math.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "features": list(self.features),
            "base": self.base,
            "trees": [[list(n) for n in t] for t in self.trees],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerifierModel:
        if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
            raise InvalidInputError("not a semcache verifier model (format 1)")
        meta = dict(d.get("meta", {}))
        meta["features"] = d.get("features", list(FEATURES))
        return cls(d["trees"], d["base"], meta)

    def save(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VerifierModel:
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidInputError(f"no verifier model at {p}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"cannot read verifier model {p}: {exc}") from None
        return cls.from_dict(d)


@lru_cache(maxsize=1)
def shipped_model() -> VerifierModel:
    """The verifier trained on shippable data, bundled with the package (loaded once)."""
    return VerifierModel.load(SHIPPED_MODEL)


# ------------------------------------------------------------------------------------------
# The policy
# ------------------------------------------------------------------------------------------


class VerifierPolicy:
    """A :class:`~semcache.threshold.HitPolicy`: cosine floor, then the verifier's vote.

    A candidate is served when ``similarity >= min_similarity`` and the verifier's
    P(same answer) is at least ``min_score``. ``model`` defaults to the shipped model;
    ``model_path`` records where a custom model lives so the policy can be saved as JSON.
    """

    kind = "verifier"

    def __init__(
        self,
        min_similarity: float = 0.75,
        min_score: float = 0.5,
        *,
        model: VerifierModel | None = None,
        model_path: str | os.PathLike[str] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.min_similarity = check_threshold(min_similarity)
        if not 0.0 <= float(min_score) <= 1.0:
            raise InvalidInputError("min_score is a probability in [0, 1]")
        self.min_score = float(min_score)
        self.model_path = str(model_path) if model_path is not None else None
        if model is None:
            model = VerifierModel.load(model_path) if model_path else shipped_model()
        self.model = model
        self.info = dict(info or {})

    def score(self, query: str, candidate: str, similarity: float) -> float:
        return self.model.score(query, candidate, similarity)

    def accept(self, query: str, candidate: str, similarity: float) -> bool:
        if similarity < self.min_similarity:
            return False
        return self.model.score(query, candidate, similarity) >= self.min_score

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": POLICY_FORMAT,
            "kind": self.kind,
            "min_similarity": self.min_similarity,
            "min_score": self.min_score,
            "model_path": self.model_path,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerifierPolicy:
        try:
            return cls(
                d["min_similarity"],
                d["min_score"],
                model_path=d.get("model_path"),
                info=d.get("info"),
            )
        except KeyError as exc:
            raise InvalidInputError(f"not a verifier policy record: missing {exc}") from None

    def __repr__(self) -> str:
        return f"VerifierPolicy(min_similarity={self.min_similarity}, min_score={self.min_score})"


def shipped_policy(shape: str = "veto") -> VerifierPolicy:
    """The shipped verifier at an operating point recorded when it was trained.

    ``"veto"``: a calibrated cosine threshold, and the verifier rejects candidates it scores
    below 0.5. ``"score"``: a low cosine floor (0.5) and a calibrated verifier score. Both
    bound the false-hit rate at <= 2% (95%) on held-out shippable pairs. ``"default"``: the
    point the default policy uses behind the near-miss guards, chosen by
    ``evals/choose_default.py`` on a mix of validation workloads. See
    ``evals/bench_quality.py`` for how they fare on data they never saw.
    """
    key = {"veto": "policy", "score": "policy_score", "default": "policy_default"}.get(shape)
    if key is None:
        raise InvalidInputError(f"unknown operating point {shape!r}: 'veto', 'score' or 'default'")
    rec = dict(shipped_model().meta.get(key, {}))
    if not rec:
        raise InvalidInputError(f"the shipped verifier has no {shape!r} operating point")
    return VerifierPolicy(rec["min_similarity"], rec["min_score"], info=rec.get("info"))


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def _field(r: Any, name: str) -> Any:
    return r[name] if isinstance(r, dict) else getattr(r, name)


def featurize(pairs: Sequence[Any], similarities: Sequence[float]) -> list[list[float]]:
    """Feature rows for pairs (objects or dicts with ``a`` and ``b``) and their cosines."""
    if len(pairs) != len(similarities):
        raise InvalidInputError("one similarity per pair is needed")
    return [
        pair_features(str(_field(p, "a")), str(_field(p, "b")), float(s))
        for p, s in zip(pairs, similarities, strict=True)
    ]


def _export_hgb(clf: Any) -> tuple[list[list[list[float]]], float]:
    """Flatten a fitted sklearn HistGradientBoostingClassifier into JSON-able trees."""
    trees: list[list[list[float]]] = []
    for predictors in clf._predictors:  # one TreePredictor per iteration (binary: one class)
        nodes = predictors[0].nodes
        tree = []
        for node in nodes:
            if node["is_leaf"]:
                tree.append([-1, 0.0, 0, 0, float(node["value"])])
            else:
                tree.append(
                    [
                        int(node["feature_idx"]),
                        float(node["num_threshold"]),
                        int(node["left"]),
                        int(node["right"]),
                        0.0,
                    ]
                )
        trees.append(tree)
    base = float(clf._baseline_prediction.ravel()[0])
    return trees, base


def train_verifier(
    pairs: Sequence[Any],
    similarities: Sequence[float] | None = None,
    *,
    embedder: Any = None,
    sample_weight: Sequence[float] | None = None,
    max_iter: int = 150,
    max_depth: int = 3,
    learning_rate: float = 0.1,
    seed: int = 0,
) -> VerifierModel:
    """Fit a verifier on labelled pairs (``a``, ``b``, ``label``), e.g. your own traffic.

    ``similarities`` are the cosines under your cache's embedder; when omitted the pairs are
    embedded with ``embedder`` (default: the packaged model). Needs scikit-learn at training
    time only; the result is plain JSON trees.
    """
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier

    if len(pairs) < 20:
        raise InvalidInputError("need at least 20 labelled pairs to train a verifier")
    labels = np.asarray([int(_field(p, "label")) for p in pairs])
    if set(labels.tolist()) != {0, 1}:
        raise InvalidInputError("need both positive and negative pairs")
    if similarities is None:
        if embedder is None:
            from .embed import SentenceTransformerEmbedder

            embedder = SentenceTransformerEmbedder()
        va = embedder.embed([str(_field(p, "a")) for p in pairs])
        vb = embedder.embed([str(_field(p, "b")) for p in pairs])
        similarities = np.einsum("ij,ij->i", va, vb).tolist()
    x = np.asarray(featurize(pairs, similarities), dtype=np.float64)
    mono = [MONOTONE.get(f, 0) for f in FEATURES]
    clf = HistGradientBoostingClassifier(
        max_iter=max_iter,
        max_depth=max_depth,
        learning_rate=learning_rate,
        monotonic_cst=mono,
        l2_regularization=1.0,
        min_samples_leaf=20,
        early_stopping=False,
        random_state=seed,
    )
    clf.fit(x, labels, sample_weight=None if sample_weight is None else np.asarray(sample_weight))
    trees, base = _export_hgb(clf)
    model = VerifierModel(
        trees, base, {"features": list(FEATURES), "n_pairs": len(pairs), "n_pos": int(labels.sum())}
    )
    # The export must reproduce sklearn's decision function.
    check = x[: min(len(x), 200)]
    ref = clf.decision_function(check)
    ours = np.array([model.raw(row) for row in check])
    if not np.allclose(ref, ours, atol=1e-6):
        raise InvalidInputError("verifier export does not match the fitted model")
    return model


def calibrate_verifier(
    model: VerifierModel,
    pairs: Sequence[Any],
    similarities: Sequence[float],
    *,
    target_false_hit_rate: float = 0.02,
    confidence: float = 0.95,
    veto_below: float | None = 0.5,
    floor: float = 0.5,
) -> VerifierPolicy:
    """An operating point for ``model`` with a bounded false-hit rate on labelled pairs.

    Two shapes, both calibrated with :func:`semcache.threshold.calibrate` (exact
    Clopper-Pearson bound on the negatives accepted):

    * ``veto_below=p`` (default 0.5): the verifier only *vetoes* candidates it scores below
      ``p``, and the cosine threshold ``min_similarity`` is calibrated on what is left.
    * ``veto_below=None``: the cosine floor is fixed at ``floor`` and the verifier's score
      threshold ``min_score`` is calibrated.
    """
    import numpy as np

    from .threshold import calibrate

    sims = np.asarray(similarities, dtype=np.float64)
    labels = np.asarray([int(_field(p, "label")) for p in pairs])
    scores = np.array(
        [
            model.score(str(_field(p, "b")), str(_field(p, "a")), float(s)) if s >= floor else 0.0
            for p, s in zip(pairs, sims, strict=True)
        ]
    )
    if veto_below is None:
        cal = calibrate(scores, labels, target_false_hit_rate=target_false_hit_rate,
                        confidence=confidence)  # fmt: skip
        min_sim, min_score = floor, cal.threshold
    else:
        kept = np.where(scores >= veto_below, sims, -1.0)
        cal = calibrate(kept, labels, target_false_hit_rate=target_false_hit_rate,
                        confidence=confidence)  # fmt: skip
        min_sim, min_score = max(cal.threshold, floor), float(veto_below)
    info = {
        "target_false_hit_rate": target_false_hit_rate,
        "confidence": confidence,
        "calibration_fhr": cal.false_hit_rate,
        "calibration_fhr_upper": cal.false_hit_rate_upper,
        "calibration_hit_rate": cal.expected_hit_rate,
        "n_negative": cal.n_negative,
        "n_positive": cal.n_positive,
        "shape": "veto" if veto_below is not None else "score",
    }
    return VerifierPolicy(_round_up(min_sim), _round_up(min_score), model=model, info=info)


def _round_up(x: float, digits: int = 6) -> float:
    """Round a calibrated threshold *up*: rounding down could re-admit the negative it excludes."""
    return min(1.0, math.ceil(x * 10**digits) / 10**digits)
