"""Near-miss guards: what a cosine cannot see, checked in time linear in the texts.

Two rules sit in front of the default policy (:class:`GuardedPolicy`):

* **Quantities.** Two prompts whose numbers, the units bound to them, their units, or their
  dates differ are never a hit: "What is the price of item 366?" and "... item 367?" score
  0.97 cosine but need different answers. Numbers are normalised before they are compared
  ("$1,000", "$1000" and "1000 dollars" are one quantity; "five" is 5), so only a real
  difference counts, whatever the model's tokeniser makes of the digits.
* **The model's window.** all-MiniLM-L6-v2 sees the first 256 tokens of a text and silently
  drops the rest, so two prompts that share a long pasted document and differ in the question
  at the end score about 1.0. Above the window a semantic hit needs the same words (case,
  spacing and punctuation aside); the identical prompt is served by the exact tier anyway.

Each check is a few regular-expression passes over the texts: linear in their length, with
no pairwise comparison of tokens.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .errors import InvalidInputError
from .threshold import POLICY_FORMAT, HitPolicy

#: Tokens all-MiniLM-L6-v2 reads ([CLS] and [SEP] included); the rest of a text is dropped.
WINDOW_TOKENS = 256

# ------------------------------------------------------------------------------------------
# Quantities: numbers with their units, units, dates
# ------------------------------------------------------------------------------------------

_NUMWORDS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
    "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50",
    "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100",
    "thousand": "1000", "million": "1000000", "billion": "1000000000", "first": "1st",
    "third": "3rd", "fourth": "4th", "fifth": "5th", "tenth": "10th", "half": "0.5",
    "twice": "2", "double": "2", "triple": "3",
}  # fmt: skip
# "one" and "second" are left out: "which one", "wait a second" are not quantities.

_UNIT_WORDS = {
    # length
    "km": "km", "kms": "km", "kilometer": "km", "kilometers": "km", "kilometre": "km",
    "kilometres": "km", "mi": "mile", "mile": "mile", "miles": "mile", "m": "m", "meter": "m",
    "meters": "m", "metre": "m", "metres": "m", "cm": "cm", "centimeter": "cm",
    "centimeters": "cm", "centimetre": "cm", "centimetres": "cm", "mm": "mm",
    "millimeter": "mm", "millimeters": "mm", "inch": "inch", "inches": "inch",
    "ft": "foot", "foot": "foot", "feet": "foot", "yd": "yard", "yard": "yard", "yards": "yard",
    "nautical": "nautical",
    # mass
    "kg": "kg", "kgs": "kg", "kilo": "kg", "kilos": "kg", "kilogram": "kg", "kilograms": "kg",
    "g": "g", "gram": "g", "grams": "g", "mg": "mg", "milligram": "mg", "milligrams": "mg",
    "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb", "oz": "oz", "ounce": "oz",
    "ounces": "oz", "ton": "ton", "tons": "ton", "tonne": "ton", "tonnes": "ton",
    "stone": "stone",
    # temperature
    "c": "celsius", "celsius": "celsius", "centigrade": "celsius", "f": "fahrenheit",
    "fahrenheit": "fahrenheit", "k": "k", "kelvin": "kelvin",
    # volume
    "l": "liter", "liter": "liter", "liters": "liter", "litre": "liter", "litres": "liter",
    "ml": "ml", "milliliter": "ml", "milliliters": "ml", "gallon": "gallon",
    "gallons": "gallon", "gal": "gallon", "cup": "cup", "cups": "cup", "pint": "pint",
    "pints": "pint", "quart": "quart", "quarts": "quart", "tbsp": "tbsp", "tablespoon": "tbsp",
    "tablespoons": "tbsp", "tsp": "tsp", "teaspoon": "tsp", "teaspoons": "tsp",
    # money
    "usd": "usd", "dollar": "usd", "dollars": "usd", "bucks": "usd", "eur": "eur",
    "euro": "eur", "euros": "eur", "gbp": "gbp", "sterling": "gbp", "yen": "jpy", "jpy": "jpy",
    "cent": "cent", "cents": "cent", "inr": "inr", "rupee": "inr", "rupees": "inr",
    "cad": "cad", "aud": "aud", "chf": "chf", "cny": "cny", "yuan": "cny", "btc": "btc",
    "bitcoin": "btc",
    # speed, rate, share
    "mph": "mph", "kmh": "kmh", "kph": "kmh", "percent": "pct", "percentage": "pct",
    "pct": "pct", "bpm": "bpm", "rpm": "rpm",
    # data, energy, power
    "kb": "kb", "mb": "mb", "gb": "gb", "tb": "tb", "byte": "byte", "bytes": "byte",
    "bit": "bit", "bits": "bit", "kbps": "kbps", "mbps": "mbps", "gbps": "gbps", "hz": "hz",
    "khz": "khz", "mhz": "mhz", "ghz": "ghz", "w": "watt", "watt": "watt", "watts": "watt",
    "kw": "kw", "kwh": "kwh", "v": "volt", "volt": "volt", "volts": "volt", "mah": "mah",
    "calorie": "kcal", "calories": "kcal", "kcal": "kcal", "joule": "joule", "joules": "joule",
    # time
    "sec": "sec", "secs": "sec", "second": "sec", "seconds": "sec", "ms": "ms", "millisecond": "ms",
    "milliseconds": "ms", "min": "min", "mins": "min", "minute": "min", "minutes": "min",
    "h": "hour", "hr": "hour", "hrs": "hour", "hour": "hour", "hours": "hour", "day": "day",
    "days": "day", "week": "week", "weeks": "week", "month": "month", "months": "month",
    "year": "year", "years": "year", "yr": "year", "yrs": "year", "decade": "decade",
    "decades": "decade", "century": "century", "centuries": "century", "am": "am", "pm": "pm",
    # counts that change an answer
    "dozen": "dozen", "pair": "pair", "pairs": "pair",
}  # fmt: skip
#: Unit words that are also ordinary words or letters ("I am", "plan B", "a pair of"): units
#: only right after a number.
_BOUND_ONLY = frozenset({
    "m", "c", "f", "k", "g", "l", "h", "w", "v", "mi", "ms", "yd", "am", "pm", "min", "sec",
    "secs", "second", "stone", "pair", "pairs", "gal", "cup", "cups", "pint", "pints", "cad",
    "aud", "bit", "bits",
})  # fmt: skip
_SYMBOLS = {"$": "usd", "€": "eur", "£": "gbp", "¥": "jpy", "₹": "inr", "%": "pct", "°": "deg"}
_CURRENCY_SYMBOLS = frozenset("$€£¥₹")
#: "20 degrees Fahrenheit" is 20°F: the scale after "degrees" is the number's unit.
_DEGREE_WORDS = frozenset(("degree", "degrees", "deg"))
_TEMPERATURES = {
    w: _UNIT_WORDS[w] for w in ("c", "f", "k", "celsius", "centigrade", "fahrenheit", "kelvin")
}
#: Time words are everywhere ("hours a day"): as free units they count only beside a number.
_TIME_UNITS = frozenset(
    ("sec", "ms", "min", "hour", "day", "week", "month", "year", "decade", "century")
)
_ORDINAL = frozenset(("st", "nd", "rd", "th"))

_MONTHS = {
    "january": "jan", "february": "feb", "march": "mar", "april": "apr", "may": "may",
    "june": "jun", "july": "jul", "august": "aug", "september": "sep", "october": "oct",
    "november": "nov", "december": "dec", "jan": "jan", "feb": "feb", "mar": "mar",
    "apr": "apr", "jun": "jun", "jul": "jul", "aug": "aug", "sep": "sep", "sept": "sep",
    "oct": "oct", "nov": "nov", "dec": "dec",
}  # fmt: skip
#: Month words that are also ordinary words ("may", "march", "mar"...): dates only by a number.
_MONTH_BOUND_ONLY = frozenset(w for w in _MONTHS if len(w) <= 4 or w in ("march", "august"))
_DAYS = {
    "monday": "mon", "tuesday": "tue", "wednesday": "wed", "thursday": "thu", "friday": "fri",
    "saturday": "sat", "sunday": "sun", "today": "today", "tonight": "today",
    "tomorrow": "tomorrow", "yesterday": "yesterday", "weekend": "weekend",
    "weekday": "weekday", "weekdays": "weekday",
}  # fmt: skip

# One pass over the text: a number (thousands separators allowed; a leading minus only at a
# word start), a word, or a symbol. "366" and "item366" both give the number 366.
_TOKENS = re.compile(
    r"(?P<num>(?:(?<![^\s(\[=:])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)"
    r"|(?P<word>[^\W\d_]+)"
    r"|(?P<sym>[$€£¥₹%°])"
)


def _number(raw: str) -> str:
    """Canonical spelling of a number: no thousands commas or leading zeros ("007" is "7")."""
    neg = raw.startswith("-")
    body = raw.lstrip("-").replace(",", "")
    whole, dot, frac = body.partition(".")
    whole = whole.lstrip("0") or "0"
    out = whole + (dot + frac if dot else "")
    return "-" + out if neg and out.strip("0.") else out


@dataclass(frozen=True, slots=True)
class Quantities:
    """The parts of a prompt that change its answer when they change.

    ``numbers`` is the multiset of normalised numbers, ``bindings`` the multiset of
    (number, unit) pairs ("5 miles" -> ("5", "mile"); "$1,000" -> ("1000", "usd")), ``units``
    the units not bound to a number ("... to km"), ``dates`` month, weekday and relative-day
    words ("tomorrow").
    """

    numbers: Counter[str]
    bindings: Counter[tuple[str, str]]
    units: frozenset[str]
    dates: Counter[str]


@lru_cache(maxsize=4096)
def quantities(text: str) -> Quantities:
    """Parse the quantities of ``text`` (cached: stored prompts are compared again and again)."""
    items: list[tuple[str, str]] = []  # (kind, value): kind "num", "word" or "sym"
    for m in _TOKENS.finditer(text.lower()):
        kind = m.lastgroup or ""
        value = m.group()
        if kind == "word" and value in _NUMWORDS:
            kind, value = "num", _NUMWORDS[value]
        elif kind == "num":
            value = _number(value)
        elif kind == "word" and value in _ORDINAL and items and items[-1][0] == "num":
            items[-1] = ("num", items[-1][1] + value)  # "1st" is the ordinal "first"
            continue
        items.append((kind, value))
    numbers: Counter[str] = Counter()
    bindings: Counter[tuple[str, str]] = Counter()
    units: set[str] = set()
    dates: Counter[str] = Counter()
    bound_at: set[int] = set()
    for i, (kind, value) in enumerate(items):
        prev = items[i - 1] if i > 0 else ("", "")
        nxt = items[i + 1] if i + 1 < len(items) else ("", "")
        if kind == "num":
            numbers[value] += 1
            unit = ""
            if prev[0] == "sym" and prev[1] in _CURRENCY_SYMBOLS:
                unit = _SYMBOLS[prev[1]]
                bound_at.add(i - 1)
            elif nxt[0] == "sym" and nxt[1] == "°":  # 20°C, 20 °F, 20°
                after = items[i + 2] if i + 2 < len(items) else ("", "")
                unit = _UNIT_WORDS.get(after[1], "deg") if after[1] in ("c", "f", "k") else "deg"
                bound_at.update((i + 1, i + 2) if unit != "deg" else (i + 1,))
            elif nxt[0] == "word" and nxt[1] in _DEGREE_WORDS:  # 20 degrees (Celsius)
                after = items[i + 2] if i + 2 < len(items) else ("", "")
                unit = _TEMPERATURES.get(after[1], "deg") if after[0] == "word" else "deg"
                bound_at.update((i + 1, i + 2) if unit != "deg" else (i + 1,))
            elif nxt[0] == "sym" and nxt[1] in _SYMBOLS:
                unit = _SYMBOLS[nxt[1]]
                bound_at.add(i + 1)
            elif nxt[0] == "word" and nxt[1] in _UNIT_WORDS:
                unit = _UNIT_WORDS[nxt[1]]
                bound_at.add(i + 1)
            bindings[(value, unit)] += 1
        elif kind == "word":
            if value in _MONTHS and (
                value not in _MONTH_BOUND_ONLY or prev[0] == "num" or nxt[0] == "num"
            ):
                dates[_MONTHS[value]] += 1
            elif value in _DAYS:
                dates[_DAYS[value]] += 1
            elif i not in bound_at and value in _UNIT_WORDS and value not in _BOUND_ONLY:
                units.add(_UNIT_WORDS[value])
        elif kind == "sym" and nxt[0] != "num" and value in _CURRENCY_SYMBOLS:
            units.add(_SYMBOLS[value])
    return Quantities(numbers, bindings, frozenset(units), dates)


def quantity_difference(a: str, b: str) -> str | None:
    """Why ``a`` and ``b`` ask about different quantities, or None when they do not.

    Different numbers (or a number on one side only), the same number with a different unit,
    different dates, or different free units where a number is involved ("5 miles to km" /
    "5 miles to m") or both sides name units of measure ("miles to km" / "miles to feet").
    """
    qa, qb = quantities(a), quantities(b)
    if qa.numbers != qb.numbers:
        return "numbers differ"
    if qa.bindings != qb.bindings:
        return "units bound to the numbers differ"
    if qa.dates != qb.dates:
        return "dates differ"
    diff = qa.units ^ qb.units
    if diff and (qa.numbers or (qa.units and qb.units and diff - _TIME_UNITS)):
        return "units differ"
    return None


# ------------------------------------------------------------------------------------------
# The model's window
# ------------------------------------------------------------------------------------------

_PIECES = re.compile(r"\w+|[^\w\s]")
_WORDS = re.compile(r"\w+")


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    """The packaged model's fast tokenizer (no truncation, no padding), or None."""
    try:
        from tokenizers import Tokenizer

        from .embed import default_model_path

        tok = Tokenizer.from_file(os.path.join(default_model_path(), "tokenizer.json"))
    except Exception:  # no tokenizer: fall back to a conservative estimate
        return None
    tok.no_truncation()
    tok.no_padding()
    return tok


@lru_cache(maxsize=4096)
def exceeds_window(text: str, window: int = WINDOW_TOKENS) -> bool:
    """Whether the model would drop part of ``text`` (more than ``window`` tokens).

    Linear: a text with at most ``window - 2`` characters fits (a token covers at least one);
    one with more words and punctuation marks than that does not (each is at least one token);
    in between, the packaged tokenizer counts, or, without it, 3 characters a token.
    """
    budget = window - 2  # [CLS] and [SEP]
    if len(text) <= budget:
        return False
    pieces = sum(1 for _ in _PIECES.finditer(text))
    if pieces > budget:
        return True
    tok = _tokenizer()
    if tok is None:
        return len(text) > 3 * budget
    return len(tok.encode(text, add_special_tokens=False).ids) > budget


def same_words(a: str, b: str) -> bool:
    """The same words in the same order, case, spacing and punctuation aside."""
    return _WORDS.findall(a.lower()) == _WORDS.findall(b.lower())


# ------------------------------------------------------------------------------------------
# The policy
# ------------------------------------------------------------------------------------------


class GuardedPolicy:
    """A :class:`~semcache.threshold.HitPolicy` with the near-miss guards in front of another.

    A candidate is served when ``similarity >= min_similarity``, and:

    * when either text is longer than the model's window (``window`` tokens): only if both
      have the same words (:func:`same_words`); the cosine saw only their beginnings;
    * otherwise, with ``quantities=True``, only if :func:`quantity_difference` finds none,
      and then only if ``inner`` accepts it.

    Every check is linear in the texts' length.
    """

    kind = "guarded"

    def __init__(
        self, inner: HitPolicy, *, quantities: bool = True, window: int | None = WINDOW_TOKENS
    ) -> None:
        if not isinstance(inner, HitPolicy):
            raise InvalidInputError(f"inner must be a hit policy, not {type(inner).__name__}")
        if window is not None and (isinstance(window, bool) or int(window) < 8):
            raise InvalidInputError("window is a token count (at least 8), or None for no limit")
        self.inner = inner
        self.min_similarity = inner.min_similarity
        self.quantities = bool(quantities)
        self.window = None if window is None else int(window)

    def reason(self, query: str, candidate: str, similarity: float) -> str | None:
        """Why the candidate is refused, or None when it is served."""
        if similarity < self.min_similarity:
            return "below the similarity floor"
        if self.window is not None and (
            exceeds_window(query, self.window) or exceeds_window(candidate, self.window)
        ):
            if same_words(query, candidate):
                return None
            return "longer than the model's window and not the same text"
        if self.quantities:
            why = quantity_difference(query, candidate)
            if why is not None:
                return why
        if not self.inner.accept(query, candidate, similarity):
            return f"refused by {self.inner!r}"
        return None

    def accept(self, query: str, candidate: str, similarity: float) -> bool:
        return self.reason(query, candidate, similarity) is None

    def to_dict(self) -> dict[str, Any]:
        from .threshold import policy_to_dict

        return {
            "format": POLICY_FORMAT,
            "kind": self.kind,
            "inner": policy_to_dict(self.inner),
            "quantities": self.quantities,
            "window": self.window,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuardedPolicy:
        from .threshold import policy_from_dict

        try:
            return cls(
                policy_from_dict(d["inner"]),
                quantities=bool(d.get("quantities", True)),
                window=d.get("window", WINDOW_TOKENS),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"not a guarded policy record: {exc}") from None

    def __repr__(self) -> str:
        return f"GuardedPolicy({self.inner!r}, quantities={self.quantities}, window={self.window})"
