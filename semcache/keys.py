"""Prompt normalisation and the keys derived from prompt and scope."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata

from .errors import InvalidInputError, InvalidPromptError

_WS = re.compile(r"\s+")


def check_text(value: str, what: str, error: type[InvalidInputError] = InvalidInputError) -> str:
    """``value`` if it is text that every store can keep: UTF-8 encodable (no lone surrogates,
    which a decoder that allows them may produce) and without NUL characters (PostgreSQL's
    text cannot hold them, so SQLite refuses them too), else ``error`` naming ``what``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(
            f"{what} is not valid Unicode text (a lone surrogate at position {exc.start})"
        ) from None
    if "\x00" in value:
        raise error(
            f"{what} holds a NUL character (at position {value.index(chr(0))}), which no "
            "store keeps as text"
        )
    return value


def normalise(prompt: object) -> str:
    """The form exact repeats are matched on: NFKC, whitespace collapsed, ends stripped.

    Case and punctuation are kept: they can change meaning ("US" / "us"), and the semantic tier
    handles the harmless variants.
    """
    if not isinstance(prompt, str):
        raise InvalidPromptError(f"a prompt must be a str, not {type(prompt).__name__}")
    check_text(prompt, "the prompt", InvalidPromptError)
    text = _WS.sub(" ", unicodedata.normalize("NFKC", prompt)).strip()
    if not text:
        raise InvalidPromptError("a prompt must not be empty or only whitespace")
    return text


def shard_key(scope_digest: str, version: int) -> str:
    """The partition searched for a scope: its digest plus the namespace's current version."""
    return f"{scope_digest}:{version}"


def new_uids(n: int) -> list[str]:
    """``n`` new entry ids: 128 random bits each from the OS's random source, as 32 hex
    digits (as long as a uuid4's hex form, without its version bits), from one read for all
    of them."""
    digits = os.urandom(16 * n).hex()
    return [digits[i : i + 32] for i in range(0, 32 * n, 32)]


def exact_key(shard: str, normalised_prompt: str) -> str:
    """Key of an exact repeat (L1 tier): the shard plus the normalised prompt."""
    return hashlib.sha256(f"{shard}\x00{normalised_prompt}".encode()).hexdigest()
