"""Generated near-miss families: requests that differ in one detail, each phrased four ways.

A *family* is two or three intent groups built from one template: the groups differ in one
detail of a given *kind* (the direction of a conversion, a number, a unit, a negation, an
entity, or a swapped pair of words), so each group is a near miss of the others and needs its
own answer; within a group the four phrasings share one answer. This is the shape of traffic
where the near miss is the common case, which QQP-like data does not have.

Families are generated from templates and word lists in this module with a seeded RNG and
split into ``train`` (may be fit on), ``validation`` (operating points are chosen on it) and
``test`` (reported only): the test families come from templates held out of the other two,
and train and validation share templates but no family. The shipped
file is ``semcache/data/near_miss_families.jsonl`` (written by
``evals/make_near_miss_families.py``); everything in it is generated, so it is MIT like the
package.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError
from .data import IntentGroup, Pair

KINDS = ("direction", "number", "unit", "negation", "entity", "swap")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True, slots=True)
class Family:
    """Groups that look alike and need different answers; ``groups[i]`` phrasings share one."""

    name: str
    kind: str
    split: str
    groups: tuple[tuple[str, ...], ...]


# ------------------------------------------------------------------------------------------
# Word lists
# ------------------------------------------------------------------------------------------


def _split(text: str, sep: str | None = None) -> tuple[str, ...]:
    """A word list written as one string (readable), as a tuple."""
    return tuple(text.split(sep))


COUNTRIES = _split(
    "France Germany Spain Italy Portugal Poland Sweden Norway Finland Denmark Austria Greece "
    "Ireland Belgium Netherlands Hungary Romania Bulgaria Croatia Serbia Ukraine Turkey Egypt "
    "Morocco Kenya Nigeria Ghana Ethiopia Brazil Argentina Chile Peru Colombia Mexico Canada "
    "Japan China India Vietnam Thailand Indonesia Malaysia Australia Iceland Switzerland"
)
CITIES = _split(
    "Paris Berlin Madrid Rome Lisbon Warsaw Stockholm Oslo Helsinki Vienna Athens Dublin "
    "Brussels Amsterdam Budapest Prague Istanbul Cairo Nairobi Lagos Toronto Chicago Boston "
    "Seattle Denver Miami Tokyo Kyoto Osaka Seoul Beijing Shanghai Delhi Mumbai Bangkok Hanoi "
    "Sydney Melbourne Auckland Lima Bogota Santiago Montreal Vancouver Edinburgh Barcelona"
)
LANGUAGES = _split(
    "French German Spanish Italian Portuguese Polish Swedish Dutch Greek Turkish Japanese "
    "Chinese Korean Hindi Arabic Russian Vietnamese Thai Finnish Danish"
)
COMPANIES = _split(
    "Microsoft Apple Amazon Google Netflix Tesla Nvidia Intel Samsung Sony Nintendo Toyota "
    "Honda Siemens Nokia Spotify Airbnb Uber Oracle Adobe IBM Dell Lego Ikea Zara"
)
ANIMALS = _split(
    "cat dog horse rabbit owl eagle dolphin whale tiger lion fox wolf bear penguin turtle "
    "frog bee butterfly elephant giraffe otter squirrel hedgehog parrot"
)
SYSTEMS = ("Windows", "macOS", "Ubuntu", "Fedora", "Debian", "Android", "iOS", "FreeBSD")
PACKAGES = _split(
    "Docker Node.js PostgreSQL Python Git Java Redis nginx MySQL Go Rust Chrome Zoom Slack "
    "Blender GIMP VLC Steam Spotify"
)
BOOKS = _split(
    "Moby Dick|Pride and Prejudice|War and Peace|Dracula|Frankenstein|Ulysses|Emma|"
    "Middlemarch|Great Expectations|Jane Eyre|Little Women|The Odyssey|Walden|Persuasion",
    "|",
)
FORMATS = (
    ("PDF", "Word"), ("PNG", "JPEG"), ("CSV", "JSON"), ("XML", "YAML"), ("HTML", "Markdown"),
    ("WAV", "FLAC"), ("Excel", "CSV"), ("SVG", "PNG"), ("EPUB", "PDF"), ("GIF", "video"),
)  # fmt: skip
CONVERSIONS = (
    ("miles", "kilometers"), ("kilograms", "pounds"), ("degrees Celsius", "degrees Fahrenheit"),
    ("liters", "gallons"), ("inches", "centimeters"), ("feet", "meters"),
    ("US dollars", "euros"), ("ounces", "grams"), ("cups", "milliliters"),
    ("yards", "meters"), ("acres", "hectares"), ("square feet", "square meters"),
    ("British pounds", "euros"), ("Japanese yen", "US dollars"), ("horsepower", "kilowatts"),
    ("calories", "kilojoules"), ("nautical miles", "kilometers"), ("stones", "kilograms"),
    ("teaspoons", "tablespoons"), ("pints", "liters"),
)  # fmt: skip
SAME_KIND_UNITS = (
    ("minutes", "seconds"), ("minutes", "hours"), ("miles", "kilometers"),
    ("kilograms", "pounds"), ("euros", "dollars"), ("meters", "feet"), ("liters", "gallons"),
    ("grams", "ounces"), ("degrees Celsius", "degrees Fahrenheit"), ("days", "weeks"),
)  # fmt: skip
CONTAINS = (
    ("foods", "gluten"), ("drinks", "caffeine"), ("snacks", "nuts"), ("cheeses", "lactose"),
    ("fruits", "seeds"), ("sweets", "gelatin"), ("breads", "yeast"), ("sauces", "garlic"),
    ("soups", "meat"), ("cereals", "sugar"), ("medicines", "alcohol"), ("paints", "lead"),
    ("shampoos", "sulfates"), ("desserts", "eggs"), ("cocktails", "rum"),
)  # fmt: skip
DISHES = (
    ("pancakes", "eggs"), ("brownies", "butter"), ("pizza dough", "yeast"),
    ("mayonnaise", "eggs"), ("cookies", "sugar"), ("bread", "gluten"), ("pesto", "pine nuts"),
    ("hummus", "tahini"), ("lasagna", "meat"), ("ice cream", "cream"), ("curry", "coconut milk"),
    ("risotto", "wine"), ("mashed potatoes", "milk"), ("guacamole", "onion"),
)  # fmt: skip
ACTIONS = (
    "learn Rust", "buy a house now", "move to Berlin", "get a cat", "switch to Linux",
    "quit social media", "go vegan", "study abroad", "learn Latin", "buy an electric car",
    "start a podcast", "rent a flat", "take a gap year", "use Kubernetes", "work remotely",
)  # fmt: skip
SUBSTITUTES = (
    ("butter", "oil"), ("honey", "sugar"), ("baking soda", "baking powder"),
    ("yogurt", "sour cream"), ("almond milk", "cow's milk"), ("margarine", "butter"),
    ("applesauce", "eggs"), ("maple syrup", "honey"), ("cornstarch", "flour"),
    ("brown sugar", "white sugar"),
)  # fmt: skip
EVENTS = ("World Cup", "Super Bowl", "Tour de France", "Wimbledon men's final", "Champions League")


# ------------------------------------------------------------------------------------------
# Templates: each returns the groups of one family (lists of four phrasings)
# ------------------------------------------------------------------------------------------

Groups = list[list[str]]


def _convert_with_number(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.choice(CONVERSIONS)
    n = rng.randint(2, 500)

    def ask(x: str, y: str) -> list[str]:
        return [
            f"Convert {n} {x} to {y}",
            f"How many {y} are in {n} {x}?",
            f"What is {n} {x} in {y}?",
            f"Please convert {n} {x} into {y}.",
        ]

    return f"convert {n} {a}/{b}", [ask(a, b), ask(b, a)]


def _convert_formula(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.choice(CONVERSIONS)

    def ask(x: str, y: str) -> list[str]:
        return [
            f"How do I convert {x} to {y}?",
            f"What's the formula to convert {x} into {y}?",
            f"Give me the formula for converting {x} to {y}.",
            f"How can I change {x} into {y}?",
        ]

    return f"formula {a}/{b}", [ask(a, b), ask(b, a)]


def _file_format(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.choice(FORMATS)

    def ask(x: str, y: str) -> list[str]:
        return [
            f"How do I convert a {x} file to {y}?",
            f"What's the easiest way to turn a {x} into a {y} file?",
            f"Convert {x} to {y}: how?",
            f"How can I change a {x} file into {y} format?",
        ]

    return f"format {a}/{b}", [ask(a, b), ask(b, a)]


def _item_price(rng: random.Random) -> tuple[str, Groups]:
    n = rng.randint(10, 9999)
    m = n + rng.choice([1, -1, 10, 100]) if n > 100 else n + 1

    def ask(k: int) -> list[str]:
        fmt = f"{k:,}"
        return [
            f"What is the price of item {k}?",
            f"How much does item {fmt} cost?",
            f"Tell me the price of item number {k}.",
            f"What's the cost of item #{k}?",
        ]

    return f"price {n}/{m}", [ask(n), ask(m)]


def _multiply(rng: random.Random) -> tuple[str, Groups]:
    x, y = rng.randint(3, 99), rng.randint(3, 99)
    z = y + rng.choice([1, 2, 10])

    def ask(k: int) -> list[str]:
        return [
            f"What is {x} times {k}?",
            f"Multiply {x} by {k}.",
            f"What do you get when you multiply {x} and {k}?",
            f"Calculate {x} x {k}.",
        ]

    return f"multiply {x}*{y}/{z}", [ask(y), ask(z)]


def _itinerary(rng: random.Random) -> tuple[str, Groups]:
    city = rng.choice(CITIES)
    n = rng.choice([2, 3, 4, 5, 7, 10])
    m = n + rng.choice([1, 2, 3])

    def ask(k: int) -> list[str]:
        return [
            f"Plan a {k}-day trip to {city}.",
            f"Give me a {k} day itinerary for {city}.",
            f"What should I do in {city} over {k} days?",
            f"Suggest an itinerary for {k} days in {city}.",
        ]

    return f"itinerary {city} {n}/{m}", [ask(n), ask(m)]


def _winner(rng: random.Random) -> tuple[str, Groups]:
    event = rng.choice(EVENTS)
    y = rng.randint(1970, 2022)
    z = y + rng.choice([1, 2, 4, -4])

    def ask(k: int) -> list[str]:
        return [
            f"Who won the {event} in {k}?",
            f"Which team or player won the {k} {event}?",
            f"Tell me the winner of the {event} in {k}.",
            f"{k} {event}: who won it?",
        ]

    return f"winner {event} {y}/{z}", [ask(y), ask(z)]


def _prime(rng: random.Random) -> tuple[str, Groups]:
    n = rng.randint(20, 5000)
    m = n + rng.choice([1, 2, 6])

    def ask(k: int) -> list[str]:
        return [
            f"Is {k} a prime number?",
            f"Is the number {k} prime?",
            f"Tell me whether {k} is prime.",
            f"Check if {k} is a prime.",
        ]

    return f"prime {n}/{m}", [ask(n), ask(m)]


def _chapter(rng: random.Random) -> tuple[str, Groups]:
    book = rng.choice(BOOKS)
    n = rng.randint(1, 30)
    m = n + 1

    def ask(k: int) -> list[str]:
        return [
            f"Summarize chapter {k} of {book}.",
            f"Give me a summary of chapter {k} in {book}.",
            f"What happens in chapter {k} of {book}?",
            f"Can you sum up {book}, chapter {k}?",
        ]

    return f"chapter {book} {n}/{m}", [ask(n), ask(m)]


def _timer_unit(rng: random.Random) -> tuple[str, Groups]:
    n = rng.randint(2, 90)
    a, b = rng.choice([("minutes", "seconds"), ("minutes", "hours"), ("seconds", "hours")])

    def ask(u: str) -> list[str]:
        return [
            f"Set a timer for {n} {u}.",
            f"Start a {n} {u} timer.",
            f"Can you set a timer of {n} {u}?",
            f"Timer for {n} {u}, please.",
        ]

    return f"timer {n} {a}/{b}", [ask(a), ask(b)]


def _quantity_unit(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.choice(SAME_KIND_UNITS)
    n = rng.randint(2, 200)
    thing = rng.choice(["a backpack", "a run", "a delivery", "a recipe", "a budget", "a hike"])

    def ask(u: str) -> list[str]:
        return [
            f"Is {n} {u} a lot for {thing}?",
            f"Would {n} {u} be too much for {thing}?",
            f"For {thing}, is {n} {u} a lot?",
            f"Is {n} {u} excessive for {thing}?",
        ]

    return f"amount {n} {a}/{b} {thing}", [ask(a), ask(b)]


def _contains(rng: random.Random) -> tuple[str, Groups]:
    cat, x = rng.choice(CONTAINS)
    pos = [
        f"Which {cat} contain {x}?",
        f"List {cat} that contain {x}.",
        f"What {cat} have {x} in them?",
        f"Name some {cat} with {x}.",
    ]
    neg = [
        f"Which {cat} do not contain {x}?",
        f"List {cat} that don't contain {x}.",
        f"What {cat} have no {x} in them?",
        f"Name some {cat} without {x}.",
    ]
    return f"contains {cat}/{x}", [pos, neg]


def _recipe(rng: random.Random) -> tuple[str, Groups]:
    dish, ing = rng.choice(DISHES)
    pos = [
        f"How do I make {dish} with {ing}?",
        f"Give me a recipe for {dish} with {ing}.",
        f"What's a good way to make {dish} using {ing}?",
        f"Recipe for {dish} that uses {ing}?",
    ]
    neg = [
        f"How do I make {dish} without {ing}?",
        f"Give me a recipe for {dish} without {ing}.",
        f"What's a good way to make {dish} with no {ing}?",
        f"Recipe for {dish} that doesn't use {ing}?",
    ]
    return f"recipe {dish}/{ing}", [pos, neg]


def _reasons(rng: random.Random) -> tuple[str, Groups]:
    act = rng.choice(ACTIONS)
    pos = [
        f"What are good reasons to {act}?",
        f"Why should I {act}?",
        f"Give me reasons to {act}.",
        f"Convince me to {act}.",
    ]
    neg = [
        f"What are good reasons not to {act}?",
        f"Why shouldn't I {act}?",
        f"Give me reasons not to {act}.",
        f"Convince me not to {act}.",
    ]
    return f"reasons {act}", [pos, neg]


def _capital(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.sample(COUNTRIES, 2)

    def ask(c: str) -> list[str]:
        return [
            f"What is the capital of {c}?",
            f"Name the capital city of {c}.",
            f"Which city is the capital of {c}?",
            f"{c}'s capital is what?",
        ]

    return f"capital {a}/{b}", [ask(a), ask(b)]


def _translate(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.sample(LANGUAGES, 2)
    phrase = rng.choice(["good morning", "thank you", "see you tomorrow", "where is the station"])

    def ask(lang: str) -> list[str]:
        return [
            f"Translate '{phrase}' into {lang}.",
            f"How do you say '{phrase}' in {lang}?",
            f"What is '{phrase}' in {lang}?",
            f"'{phrase}' in {lang}, please.",
        ]

    return f"translate {phrase} {a}/{b}", [ask(a), ask(b)]


def _visit(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.sample(CITIES, 2)

    def ask(c: str) -> list[str]:
        return [
            f"What is the best time of year to visit {c}?",
            f"When should I visit {c}?",
            f"Which season is best for a trip to {c}?",
            f"When is the ideal time to travel to {c}?",
        ]

    return f"visit {a}/{b}", [ask(a), ask(b)]


def _poem(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.sample(ANIMALS, 2)

    def ask(x: str) -> list[str]:
        return [
            f"Write a short poem about a {x}.",
            f"Compose a brief poem on a {x}.",
            f"Can you write a little poem about a {x}?",
            f"I'd like a short poem about a {x}.",
        ]

    return f"poem {a}/{b}", [ask(a), ask(b)]


def _founder(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.sample(COMPANIES, 2)

    def ask(c: str) -> list[str]:
        return [
            f"Who founded {c}?",
            f"Who is the founder of {c}?",
            f"Name the founder of {c}.",
            f"{c} was founded by whom?",
        ]

    return f"founder {a}/{b}", [ask(a), ask(b)]


def _install(rng: random.Random) -> tuple[str, Groups]:
    pkg = rng.choice(PACKAGES)
    a, b = rng.sample(SYSTEMS, 2)

    def ask(os_: str) -> list[str]:
        return [
            f"How do I install {pkg} on {os_}?",
            f"What are the steps to install {pkg} on {os_}?",
            f"Installing {pkg} on {os_}: how do I do it?",
            f"What's the way to set up {pkg} on {os_}?",
        ]

    return f"install {pkg} {a}/{b}", [ask(a), ask(b)]


def _bigger(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.sample(COUNTRIES, 2)

    def ask(x: str, y: str) -> list[str]:
        return [
            f"Is {x} bigger than {y}?",
            f"Is {x} larger than {y}?",
            f"Does {x} have a larger area than {y}?",
            f"Is {x} greater in size than {y}?",
        ]

    return f"bigger {a}/{b}", [ask(a, b), ask(b, a)]


def _flights(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.sample(CITIES, 2)

    def ask(x: str, y: str) -> list[str]:
        return [
            f"Find cheap flights from {x} to {y}.",
            f"What are the cheapest flights from {x} to {y}?",
            f"How can I fly cheaply from {x} to {y}?",
            f"Budget flights from {x} to {y}?",
        ]

    return f"flights {a}/{b}", [ask(a, b), ask(b, a)]


def _time_zone(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.sample(CITIES, 2)

    def ask(x: str, y: str) -> list[str]:
        return [
            f"What time is it in {x} when it is noon in {y}?",
            f"When it's noon in {y}, what time is it in {x}?",
            f"If it is midday in {y}, what's the time in {x}?",
            f"Noon in {y} is what time in {x}?",
        ]

    return f"timezone {a}/{b}", [ask(a, b), ask(b, a)]


def _substitute(rng: random.Random) -> tuple[str, Groups]:
    a, b = rng.choice(SUBSTITUTES)

    def ask(x: str, y: str) -> list[str]:
        return [
            f"Can I use {x} instead of {y} in baking?",
            f"Is {x} a good substitute for {y} when baking?",
            f"When baking, can {x} replace {y}?",
            f"Can {x} stand in for {y} in a baking recipe?",
        ]

    return f"substitute {a}/{b}", [ask(a, b), ask(b, a)]


TEMPLATES: dict[str, tuple[Callable[[random.Random], tuple[str, Groups]], ...]] = {
    "direction": (_convert_with_number, _convert_formula, _file_format),
    "number": (_item_price, _multiply, _itinerary, _winner, _prime, _chapter),
    "unit": (_timer_unit, _quantity_unit),
    "negation": (_contains, _recipe, _reasons),
    "entity": (_capital, _translate, _visit, _poem, _founder, _install),
    "swap": (_bigger, _flights, _time_zone, _substitute),
}


def generate(per_kind: int = 100, *, seed: int = 0, validation: float = 1 / 3) -> list[Family]:
    """``per_kind`` distinct families of each kind, split into train, validation and test.

    The *last* template of each kind is held out: its families are the ``test`` split, so the
    test families are phrased in ways nothing was fit or chosen on. The other templates'
    families are split by family into ``train`` and ``validation`` (``validation`` share).
    Templates of a kind take turns; a family repeating an earlier family's prompt is drawn
    again, so no prompt is in two families (and so on two sides of a split).
    """
    if not 0.0 < validation < 1.0:
        raise InvalidInputError("validation is a share in (0, 1)")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Family] = []
    for kind in KINDS:
        templates = TEMPLATES[kind]
        made = 0
        tries = 0
        while made < per_kind and tries < per_kind * 50:
            tries += 1
            held_out = tries % len(templates) == len(templates) - 1
            name, groups = templates[tries % len(templates)](rng)
            prompts = [p for g in groups for p in g]
            if any(p in seen for p in prompts) or len(set(prompts)) != len(prompts):
                continue
            seen.update(prompts)
            split = "test" if held_out else ""
            out.append(Family(f"{kind}:{name}", kind, split, tuple(tuple(g) for g in groups)))
            made += 1
    open_ = [i for i, f in enumerate(out) if not f.split]
    random.Random(seed + 1).shuffle(open_)
    to_validation = set(open_[: round(validation * len(open_))])
    return [
        f if f.split else Family(f.name, f.kind, "validation" if i in to_validation else "train",
                                 f.groups)
        for i, f in enumerate(out)
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------
# Files and views
# ------------------------------------------------------------------------------------------


def save_families(families: Iterable[Family], path: str | Path) -> None:
    """One JSON object a line: ``{"family", "kind", "split", "groups": [[prompt, ...], ...]}``."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for f in families:
            row = {"family": f.name, "kind": f.kind, "split": f.split, "groups": f.groups}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_families(path: str | Path, *, split: str | None = None) -> list[Family]:
    """Read :func:`save_families`' file, optionally only one split."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"no such families file: {p}")
    if split is not None and split not in SPLITS:
        raise InvalidInputError(f"split must be one of {SPLITS}, not {split!r}")
    out: list[Family] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                fam = Family(
                    str(obj["family"]), str(obj["kind"]), str(obj["split"]),
                    tuple(tuple(str(p) for p in g) for g in obj["groups"]),
                )  # fmt: skip
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InvalidInputError(f"{p}:{lineno}: not a family row ({exc})") from None
            if fam.kind not in KINDS or fam.split not in SPLITS or len(fam.groups) < 2:
                raise InvalidInputError(f"{p}:{lineno}: bad kind, split or groups")
            if split is None or fam.split == split:
                out.append(fam)
    return out


def to_groups(families: Iterable[Family]) -> list[IntentGroup]:
    """Intent groups (one per group of each family), for the workload replay."""
    return [
        IntentGroup(f"{f.name}#{i}", g, f"{f.name}#0" if i else None)
        for f in families
        for i, g in enumerate(f.groups)
    ]


def to_pairs(families: Iterable[Family], *, source: str = "near_miss_families") -> list[Pair]:
    """Positives within each group; negatives between every two groups of a family."""
    out: list[Pair] = []
    for f in families:
        src = f"{source}:{f.split}:{f.kind}"
        for g in f.groups:
            out += [Pair(g[i], g[j], 1, src) for i in range(len(g)) for j in range(i + 1, len(g))]
        for gi in range(len(f.groups)):
            for gj in range(gi + 1, len(f.groups)):
                out += [Pair(x, y, 0, src) for x in f.groups[gi] for y in f.groups[gj]]
    return out
